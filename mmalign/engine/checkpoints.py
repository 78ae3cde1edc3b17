"""Checkpoint files that run no code when read, written atomically, with a manifest that proves them complete.

A checkpoint folder ``checkpoints/checkpoint-<step>`` holds (see ``docs/reliability.md``):

- ``model.safetensors``: the trained weights (only the trainable ones when part of the model is frozen);
- ``optimizer.pt``: the optimizer's ``state_dict`` (tensors, numbers, strings), read with ``weights_only=True``;
- ``scheduler.json`` / ``scaler.json``: the LR schedule's and the fp16 loss scaler's state, as JSON;
- ``rng_state_<process>.safetensors``: the Python, NumPy, torch CPU and CUDA generator states of each process;
- ``metric_window_<process>.json``: each process's partial metric window;
- ``trainer_state.json``: step, epoch, position in the epoch, run id;
- ``manifest.json``, written last: every other file and its size.

Nothing here uses pickle: ``safetensors`` and JSON cannot carry code, and ``torch.load(weights_only=True)`` only
rebuilds tensors and plain containers, so a file planted in a checkpoint folder cannot run anything.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

__all__ = [
    "CheckpointError", "MANIFEST_NAME", "TRAINER_STATE_NAME", "CHECKPOINT_PREFIX", "write_manifest",
    "checkpoint_problem", "replace_folder", "recover_interrupted_replace", "list_checkpoints", "save_model_state",
    "load_model_state", "save_optimizer_state", "load_optimizer_state", "save_json_state", "load_json_state",
    "save_rng_state", "load_rng_state",
]

logger = logging.getLogger("mmalign.engine")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.json"
SCALER_NAME = "scaler.json"
RNG_NAME = "rng_state_{}.safetensors"
CUSTOM_NAME = "custom_state_{}.pt"
OLD_PREFIX = ".old-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as it is (incomplete, unreadable, of another run); the message says why."""


# ------------------------------------------------------------------------------------------ manifest
def write_manifest(folder: Path, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Lists every file of ``folder`` with its size in ``manifest.json`` (written last, through a temp file)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    body = {"format": 1, "files": files, **dict(extra or {})}
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a complete checkpoint (no/unreadable manifest, a listed file missing or of another
    size), or None when it is complete."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return f"no {MANIFEST_NAME} (the write was interrupted, or the folder predates manifests)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST_NAME} ({err})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is listed in {MANIFEST_NAME} but missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {MANIFEST_NAME} says {size}"
    return None


def read_trainer_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: unreadable {TRAINER_STATE_NAME} ({err})") from None


# ------------------------------------------------------------------------------------------ folders
def replace_folder(tmp: Path, final: Path) -> None:
    """Puts the complete folder ``tmp`` at ``final``: an existing ``final`` is moved aside first, then ``tmp`` is
    renamed in, then the old one is deleted, so a kill at any point leaves a complete folder under one of the two
    names (:func:`recover_interrupted_replace` puts it back)."""
    old = final.parent / f"{OLD_PREFIX}{final.name}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def recover_interrupted_replace(root: Path) -> None:
    """Finishes replacements a kill interrupted: ``.old-X`` without ``X`` is renamed back, with ``X`` deleted."""
    if not root.is_dir():
        return
    for old in root.iterdir():
        if old.is_dir() and old.name.startswith(OLD_PREFIX):
            final = root / old.name[len(OLD_PREFIX):]
            try:  # another process of the same job may be doing the same
                if final.exists():
                    shutil.rmtree(old)
                else:
                    os.replace(old, final)
            except OSError:
                pass


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder under ``root``, complete or not, by step."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX):
            try:
                found.append((int(child.name[len(CHECKPOINT_PREFIX):]), child))
            except ValueError:
                continue
    return sorted(found)


# ------------------------------------------------------------------------------------------ model
def save_model_state(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``state`` as safetensors; tensors sharing storage (tied weights) are stored once, the aliases in metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.cpu().contiguous().clone()  # a copy: safetensors refuses views of shared storage
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: unreadable weights ({type(err).__name__}: {err})") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# ------------------------------------------------------------------------------------------ optimizer / JSON
def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    torch.save(optimizer.state_dict(), path)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    try:
        # weights_only: the restricted unpickler rebuilds tensors and plain containers and refuses anything else
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable optimizer state ({type(err).__name__}: {err})") from None
    try:
        optimizer.load_state_dict(_undecayed_groups_merged(state, optimizer))
    except ValueError as err:
        raise CheckpointError(f"{path}: the optimizer state does not fit this run's optimizer ({err}); resume with "
                              "the parameters and training settings the checkpoint was written with") from None


def _undecayed_groups_merged(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A checkpoint written before AdamW got one group when ``weight_decay`` is 0 (until 4 Dec 2026: matrices,
    then vectors, in two groups of weight decay 0) for today's single group, which keeps the same order (matrices,
    then vectors): the saved parameter indices are concatenated. Any other state is returned as it is."""
    saved = state.get("param_groups") if isinstance(state, dict) else None
    if not saved or len(saved) < 2 or len(optimizer.param_groups) != 1:
        return state
    settings = [{k: v for k, v in group.items() if k != "params"} for group in saved]
    if any(group.get("weight_decay", None) != 0.0 for group in settings) or any(g != settings[0] for g in settings):
        return state
    merged = dict(saved[0], params=[index for group in saved for index in group["params"]])
    return {**state, "param_groups": [merged]}


def save_custom_state(obj: Any, path: Path) -> None:
    """``obj.state_dict()`` (tensors, numbers, strings, lists, dicts) of an object registered for checkpointing."""
    torch.save(obj.state_dict(), path)


def load_custom_state(obj: Any, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never code, as for the optimizer
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable state of a registered object ({type(err).__name__}: {err})") from None
    obj.load_state_dict(state)


def save_json_state(state: Mapping[str, Any], path: Path) -> None:
    with open(path, "w") as fh:
        json.dump(dict(state), fh)


def load_json_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """A LambdaLR's state without its lambdas (code, rebuilt from the config)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler: Any, state: Mapping[str, Any]) -> None:
    full = dict(state)
    full["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(full)


# ------------------------------------------------------------------------------------------ RNG
def save_rng_state(path: Path) -> None:
    """The Python, NumPy, torch CPU and CUDA generator states of this process, as tensors + JSON metadata."""
    import numpy as np
    from safetensors.torch import save_file

    version, python_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    meta = {"python_version": version, "python_gauss": gauss, "numpy_kind": np_kind, "numpy_pos": int(np_pos),
            "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss)}
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def load_rng_state(path: Path) -> None:
    """Restores what :func:`save_rng_state` wrote; a CheckpointError (nothing restored) if it cannot be read whole."""
    import numpy as np
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            meta = json.loads(handle.metadata()["meta"])
        python = (meta["python_version"], tuple(int(v) for v in tensors["python"].tolist()), meta["python_gauss"])
        numpy_state = (meta["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
                       meta["numpy_has_gauss"], meta["numpy_gauss"])
        torch_state = tensors["torch"]
        cuda = [tensors[f"cuda_{i}"] for i in range(sum(1 for k in tensors if k.startswith("cuda_")))]
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
