"""Model and dataset sources checked before anything loads: local folders, cached hub names, reachable hub.

Without this a hub name on a machine without network retried for ~25-50 s inside ``from_pretrained`` /
``load_dataset`` and ended in a message naming neither the config key nor the value, and a mistyped local folder
(``models/tiny-lama``) was sent to the hub as a repository name. :func:`check_sources` decides per value:

- an existing path: fine;
- a value that can only be a path (``./x``, ``/x``, ``~/x``, more than one ``/``, a data-file suffix, or a first
  component that is an existing local folder, as ``models/`` in ``models/tiny-lama``): a missing folder/file,
  named with its key and the nearest existing entries;
- a hub name already in the local Hugging Face cache: fine;
- otherwise, with ``HF_HUB_OFFLINE`` set: refused at once; else the hub's reachability is checked once per
  process (one TCP connect, 3 s timeout) and an unreachable hub is refused, naming the key and value.
"""
from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlparse

__all__ = ["SourceError", "check_sources", "check_source", "hub_offline", "hub_reachable"]

_DATA_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv", ".bz2", ".xz", ".zst", ".txt", ".safetensors",
                  ".bin", ".gguf")
_REACHABLE: dict[str, Optional[str]] = {}  # endpoint -> None (reachable) or the reason it is not


class SourceError(ValueError):
    """A model/dataset source cannot be found locally and cannot come from the hub; names the config key."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> Optional[str]:
    """None when the hub endpoint accepts a TCP connection, else why not; checked once per endpoint and process."""
    endpoint = _endpoint()
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            _REACHABLE[endpoint] = None
        except OSError as err:
            _REACHABLE[endpoint] = f"{type(err).__name__}: {err}"
    return _REACHABLE[endpoint]


def _only_a_path(value: str) -> bool:
    if value.startswith((".", "/", "~", "\\")) or (len(value) > 1 and value[1] == ":"):
        return True
    if value.count("/") > 1 or value.lower().endswith(_DATA_SUFFIXES):
        return True
    first = value.split("/")[0]
    return "/" in value and Path(first).is_dir()


def _missing_path_message(key: str, value: str, kind: str) -> str:
    path = Path(value).expanduser()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    hint = ""
    if parent.is_dir():
        names = [p.name for p in parent.iterdir()]
        close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
        hint = f"; {str(parent)!r} exists" + (f" and holds {', '.join(map(repr, close))}" if close else "")
    noun = "file" if Path(value).suffix.lower() in _DATA_SUFFIXES else "folder"
    return f"{key}: {value!r} is not an existing {noun} (a local path, not a hub {kind} name){hint}"


def _in_cache(value: str, kind: str) -> bool:
    if kind == "dataset":  # `datasets` keeps prepared copies in its own cache: <org>___<name>
        root = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
        if root.is_dir() and any(p.name.startswith(value.replace("/", "___")) for p in root.iterdir()):
            return True
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(value, repo_type=kind, local_files_only=True)
        return True
    except Exception:  # not cached, or not a valid repo id
        return False


def check_source(key: str, value: Optional[str], kind: str = "model") -> None:
    """Checks one source (``kind``: model or dataset); raises :class:`SourceError` naming ``key`` and ``value``."""
    if not value:
        return
    if Path(value).expanduser().exists():
        return
    if _only_a_path(value):
        raise SourceError(_missing_path_message(key, value, kind))
    if _in_cache(value, kind):
        return
    if hub_offline():
        raise SourceError(f"{key}: {value!r} is not a local {'folder' if kind == 'model' else 'file or folder'} "
                          f"and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it first "
                          "(without HF_HUB_OFFLINE) or give a local path")
    reason = hub_reachable()
    if reason is not None:
        raise SourceError(f"{key}: {value!r} is not a local path and not in the Hugging Face cache, and the hub "
                          f"({_endpoint()}) cannot be reached ({reason}); give a local path, or download it on a "
                          "machine with network")


def check_sources(sources: Iterable[tuple[str, Optional[str], str]]) -> None:
    """:func:`check_source` for each ``(config key, value, kind)``."""
    for key, value, kind in sources:
        check_source(key, value, kind)
