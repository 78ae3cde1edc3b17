"""Which run an ``output_dir`` belongs to, so that no run starts over, rotates away or resumes into another's.

``output_dir/checkpoints/run.json`` records the id of the run that owns the folder; every checkpoint's
``trainer_state.json`` carries the id of the run that wrote it. A fresh run refuses a folder holding another run's
checkpoints unless told to overwrite them; a resume adopts the folder's id and only considers checkpoints of that
run that are complete (their manifest matches their files).
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from mmalign.engine.checkpoints import (
    CheckpointError,
    checkpoint_problem,
    list_checkpoints,
    read_trainer_state,
    recover_interrupted_replace,
)

__all__ = ["RUN_FILE", "RunConflictError", "new_run_id", "read_run_id", "write_run_id", "find_latest_checkpoint",
           "resolve_run"]

logger = logging.getLogger("mmalign.engine")

RUN_FILE = "run.json"


class RunConflictError(RuntimeError):
    """``output_dir`` holds checkpoints of another run; the message says how to resume or overwrite."""


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def read_run_id(root: Path) -> Optional[str]:
    try:
        return json.loads((root / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_id(root: Path, run_id: str) -> None:
    from mmalign.io import atomic_write_text

    atomic_write_text(root / RUN_FILE, json.dumps({"run_id": run_id}))


def _checkpoint_run_id(folder: Path) -> Optional[str]:
    try:
        return read_trainer_state(folder).get("run_id")
    except CheckpointError:
        return None


def find_latest_checkpoint(output_dir: Path | str, run_id: Optional[str] = None) -> Optional[Path]:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints`` (of run ``run_id``, default
    the folder's owner), or None. Incomplete ones and other runs' are skipped with a warning."""
    root = Path(output_dir) / "checkpoints"
    recover_interrupted_replace(root)
    run_id = run_id or read_run_id(root)
    for step, folder in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(folder)
        if problem is not None:
            logger.warning("skipping %s: incomplete (%s)", folder, problem)
            continue
        owner = _checkpoint_run_id(folder)
        if run_id is not None and owner != run_id:
            logger.warning("skipping %s: written by run %s, this output_dir belongs to run %s", folder, owner, run_id)
            continue
        return folder
    return None


def resolve_run(output_dir: Path, resume: Any, *, overwrite: bool) -> tuple[Optional[Path], str, bool]:
    """(checkpoint to resume from or None, the run id, whether the old checkpoints must be deleted).

    Reads only: the caller (main process) deletes and records, so every process reaches the same decision.
    """
    root = output_dir / "checkpoints"
    recover_interrupted_replace(root)
    owner = read_run_id(root)
    existing = list_checkpoints(root)
    if resume in (True, "latest"):
        latest = find_latest_checkpoint(output_dir, owner)
        if latest is not None:
            return latest, owner or _checkpoint_run_id(latest) or new_run_id(), False
        logger.warning("resume_from_checkpoint='latest': no complete checkpoint of this run in %s; starting from "
                       "scratch", root)
        resume = None
    if resume not in (None, False):
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={str(path)!r}: not a checkpoint folder; expected e.g. "
                                    f"{root}/checkpoint-100")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"resume_from_checkpoint={str(path)!r}: not a complete checkpoint: {problem}")
        run_id = _checkpoint_run_id(path) or new_run_id()
        inside = path.resolve().parent == root.resolve()
        others = [f for _, f in existing if _checkpoint_run_id(f) != run_id]
        if not inside and others and not overwrite:
            raise RunConflictError(_conflict_message(output_dir, owner, existing, "resume from another folder's "
                                                     "checkpoint into it"))
        return path, run_id, bool(others) and not inside
    if existing and not overwrite:
        raise RunConflictError(_conflict_message(output_dir, owner, existing, "start a new run in it"))
    return None, new_run_id(), bool(existing)


def _conflict_message(output_dir: Path, owner: Optional[str], existing: list, action: str) -> str:
    steps = ", ".join(str(step) for step, _ in existing[-5:])
    return (f"output_dir {str(output_dir)!r} holds checkpoints of another run (run {owner or 'of unknown id'}; "
            f"steps {steps}); refusing to {action}: resume that run (--resume, or resume_from_checkpoint: latest), "
            f"choose another output_dir, or set training.overwrite_output_dir: true to delete its checkpoints")


def clear_checkpoints(root: Path) -> None:
    """Deletes every checkpoint folder and the run record under ``root`` (training.overwrite_output_dir)."""
    for _, folder in list_checkpoints(root):
        shutil.rmtree(folder)
    (root / RUN_FILE).unlink(missing_ok=True)
