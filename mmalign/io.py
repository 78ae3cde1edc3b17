"""Small file helpers shared by every module: atomic writes (temp file + ``os.replace``) and JSONL read/write.

An artefact is either the old file or the complete new one, never half-written: the bytes go to a temporary
file in the same folder (same filesystem, so ``os.replace`` is atomic) which is removed if anything fails.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "json_safe", "read_jsonl", "write_jsonl", "locate_non_utf8"]


def json_safe(value: Any) -> Any:
    """A structure JSON can hold: NaN/inf become null (JSON has neither), numpy scalars Python numbers, tuples
    lists, mapping keys strings; recursive."""
    import math

    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def locate_non_utf8(path: str | os.PathLike, opener: Any = open, *, rows_are_lines: bool = True) -> str:
    """Where the first non-UTF-8 bytes of a text file are, as a message: line, row (the n-th non-blank line, when
    each line is a row) and column, instead of a decoder's byte offset into some buffer. ``opener`` reads the file
    (``gzip.open`` for ``.gz``...) in binary mode."""
    row = 0
    with opener(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                where = f"row {row + 1} (line {line_no})" if rows_are_lines else f"line {line_no}"
                bad = raw[err.start:err.end]
                return (f"{path}: {where}, column {err.start + 1}: bytes {bad!r} are not valid UTF-8 ({err.reason}); "
                        "save the file as UTF-8")
            if text.strip():
                row += 1
    return f"{path}: not valid UTF-8"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.jsonl.gz`` file (blank lines skipped).

    A line that is not a JSON object is a ValueError naming the file and the 1-based line number.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {line_no}: expected a JSON object")
                rows.append(row)
    except UnicodeDecodeError:
        raise ValueError(locate_non_utf8(path, opener)) from None
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Writes one JSON object per line to ``path`` atomically (see :func:`atomic_write_bytes`); returns the path."""
    text = "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows)
    return atomic_write_text(path, text)
