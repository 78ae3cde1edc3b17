"""Reading preference rows: local JSON / JSONL (with the ``json`` module, compressed or not), Parquet and CSV files,
dataset folders and hub datasets (with ``datasets``), as :class:`Rows`. Row numbers in errors are 1-based."""
from __future__ import annotations

import bz2
import gzip
import itertools
import json
import lzma
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from mmalign.io import locate_non_utf8

__all__ = ["Rows", "load_rows", "in_memory_rows", "value_kind", "short_repr"]

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


class Rows(Sequence[dict[str, Any]]):
    """What :func:`load_rows` returns: a read-only sequence of rows, each a plain ``dict`` (column -> value), in
    source order. Supports ``len``, indexing (a slice gives a :class:`Rows`) and iteration. Rows are handed out as
    stored, not copied: copy one (``dict(row)``) before changing it. ``source`` names where they came from."""

    __slots__ = ("_rows", "source")

    def __init__(self, rows: Sequence[dict[str, Any]], source: str = "<data>"):
        self._rows = tuple(rows)
        self.source = source

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Rows(self._rows[index], self.source)
        return self._rows[index]

    def __iter__(self):
        return iter(self._rows)

    def __repr__(self) -> str:
        return f"Rows({len(self._rows)} rows from {self.source})"


def _split_compression(path: Path) -> tuple[list[str], Optional[str]]:
    """(lower-case suffixes without the compression one, the compression suffix or None)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        return suffixes[:-1], suffixes[-1]
    return suffixes, None


def _local_builder(path: Path) -> Optional[str]:
    suffixes, _ = _split_compression(path)
    return LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None


def in_memory_rows(data: Any, *, split: str = "train", max_samples: Optional[int] = None,
                   name: str = "dataset") -> Rows:
    """Rows of an in-memory dataset: a ``datasets.Dataset``, a ``DatasetDict`` (its ``split``), :class:`Rows` or a
    list of dicts. ``name`` (e.g. ``"train_dataset"``) names the source in errors, as a file name would."""
    if isinstance(data, Rows):
        rows = list(data)
    elif isinstance(data, Mapping) and all(hasattr(v, "column_names") for v in data.values()):  # DatasetDict
        if split not in data:
            raise ValueError(f"{name}: no split {split!r}; available: {', '.join(map(str, data))}")
        return in_memory_rows(data[split], max_samples=max_samples, name=f"{name}[{split!r}]")
    elif hasattr(data, "column_names") and hasattr(data, "to_list"):  # datasets.Dataset
        if max_samples is not None and len(data) > max_samples:
            data = data.select(range(max_samples))
        rows = data.to_list()
    elif isinstance(data, (list, tuple)):
        rows = list(data)
    else:
        raise ValueError(f"{name}: expected a file or folder path, a datasets.Dataset or DatasetDict, or a list of "
                         f"dicts; got {type(data).__name__}")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise ValueError(f"{name}: row {number}: expected a mapping of column -> value, got {value_kind(row)}")
    rows = [dict(row) for row in rows[:max_samples]]
    return Rows(rows, f"{name} ({type(data).__name__})" if not isinstance(data, Rows) else name)


def load_rows(source: Any, *, split: str = "train", subset: Optional[str] = None, max_samples: Optional[int] = None,
              name: Optional[str] = None) -> Rows:
    """The rows of a local file, a dataset folder or a hub dataset split, as :class:`Rows`; with ``max_samples``,
    only the first ``max_samples`` rows. In-memory data (a ``Dataset``, ``DatasetDict``, list of dicts) goes
    through :func:`in_memory_rows` (``name`` names it in errors).

    Local ``.json`` / ``.jsonl`` files (optionally ``.gz``, ``.bz2`` or ``.xz``) are read with the ``json`` module
    (layouts: :func:`_read_json_rows`), without importing ``datasets`` (which brings pyarrow and pandas, ~100 MiB
    of RSS). ``datasets`` reads the rest: Parquet, CSV, ``.zst`` files, ``save_to_disk`` or data-file folders
    (``split``), hub names (``subset``, ``split``).
    """
    if not isinstance(source, (str, os.PathLike)):
        return in_memory_rows(source, split=split, max_samples=max_samples, name=name or "dataset")
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        builder = _local_builder(path)
        if builder is None:
            raise ValueError(f"{source}: unsupported file type; expected .json, .jsonl, .parquet or .csv (optionally .gz)")
        if builder == "json" and _split_compression(path)[1] != ".zst":
            return Rows(_read_json_rows(path, max_samples=max_samples), source)
    elif not path.exists() and (
        source.startswith((".", "/", "~")) or Path(source).suffix.lower() in (".json", ".jsonl", ".parquet", ".csv", ".gz")
    ):
        raise ValueError(f"{source}: file not found")
    import datasets

    if path.is_dir():
        # a `save_to_disk` folder, or a folder of data files that `load_dataset` understands
        try:
            if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
                dataset = datasets.load_from_disk(str(path))
                if isinstance(dataset, datasets.DatasetDict):
                    if split not in dataset:
                        raise ValueError(f"no split {split!r}; available: {', '.join(dataset)}")
                    dataset = dataset[split]
            else:
                dataset = datasets.load_dataset(str(path), subset, split=split)
        except Exception as err:
            raise ValueError(f"{source} (split {split!r}): could not load the dataset folder: {err}") from err
    elif path.is_file():  # Parquet, CSV, .zst
        builder = _local_builder(path)
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:
            raise ValueError(f"{source}: could not be read as {builder}: {err}") from err
    else:
        try:
            dataset = datasets.load_dataset(source, subset, split=split)
        except Exception as err:
            raise ValueError(f"{source} (split {split!r}): could not load from the hub or cache: {err}") from err
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    return Rows(dataset.to_list(), source)


def _read_json_rows(path: str | Path, *, max_samples: Optional[int] = None) -> list[dict[str, Any]]:
    """The rows of a local JSON file (optionally ``.gz``/``.bz2``/``.xz``), read with the ``json`` module.

    Layouts, whatever the suffix (the ones ``datasets`` read):

    - JSON Lines: one object per line, blank lines skipped; read line by line, stopping after ``max_samples`` rows.
    - A JSON list of objects (``json.dump(rows, f)``), pretty-printed or not.
    - One top-level object (in a ``.json`` file; in a ``.jsonl`` file an object is always one row): a dict of
      equally long column lists (``Dataset.to_dict()``, ``DataFrame.to_dict("list")``) gives one row per position;
      any other object, e.g. one row holding lists of chat messages, is one row.

    A leading UTF-8 BOM is ignored. Malformed input is a ValueError naming the file, the row and line, and the
    problem: invalid JSON, a row that is not an object, no rows, unequal column lengths, an unreadable file.
    """
    path = Path(path)
    suffixes, compression = _split_compression(path)
    opener = {None: open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(compression)
    if opener is None:
        raise ValueError(f"{path}: cannot read {compression} files without `datasets`; use .gz, .bz2 or .xz")
    single_object_allowed = bool(suffixes) and suffixes[-1] == ".json"
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            lines = ((number, line) for number, line in enumerate(handle, 1) if line.strip())
            first = next(lines, None)
            if first is None:
                raise ValueError(f"{path}: no rows (the file is empty)")
            value = _UNPARSED
            if not first[1].lstrip().startswith("["):
                try:
                    value = json.loads(first[1])
                except json.JSONDecodeError:
                    pass  # not one value per line: one (pretty-printed) document, or a broken first row
            if value is _UNPARSED:
                # keep the blank lines before it so that JSON error line numbers are the file's
                rows = _json_document_rows(path, "\n" * (first[0] - 1) + first[1] + handle.read(), single_object_allowed)
            else:
                second = next(lines, None)
                if second is None and single_object_allowed and isinstance(value, dict):
                    rows = _rows_of_object(path, value)  # a .json file holding one object on one line
                else:
                    rows = _json_lines_rows(path, value, first[0], itertools.chain([second] if second else [], lines),
                                            max_samples)
    except UnicodeDecodeError:  # the decoder's offset is into a buffer: name the line and row instead
        raise ValueError(locate_non_utf8(path, opener, rows_are_lines=".jsonl" in suffixes)) from None
    except (OSError, EOFError) as err:  # unreadable or corrupt, e.g. a truncated .gz
        raise ValueError(f"{path}: could not be read: {err}") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows if max_samples is None else rows[:max_samples]


_UNPARSED = object()


def _json_lines_rows(path: Path, first: Any, first_line_no: int, rest, max_samples: Optional[int]) -> list[dict[str, Any]]:
    """JSON Lines: ``first`` is the parsed first row, ``rest`` yields (line number, line) of the other non-blank
    lines; stops after ``max_samples`` rows."""
    rows = [_json_row(path, first, 1, first_line_no)]
    for line_no, line in rest:
        if max_samples is not None and len(rows) >= max_samples:
            break
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: row {len(rows) + 1} (line {line_no}): invalid JSON: {err.msg} "
                             f"(column {err.pos + 1})") from None
        rows.append(_json_row(path, value, len(rows) + 1, line_no))
    return rows


def _json_document_rows(path: Path, text: str, single_object_allowed: bool) -> list[dict[str, Any]]:
    """One JSON document: a list of row objects, or a top-level object (see :func:`_rows_of_object`)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) >= 2 and not lines[0][1].lstrip().startswith("[") and _is_json_object(lines[1][1]):
            # the next line is a row on its own: JSON Lines whose first row is broken
            try:
                json.loads(lines[0][1])
            except json.JSONDecodeError as row_err:
                raise ValueError(f"{path}: row 1 (line {lines[0][0]}): invalid JSON: {row_err.msg} "
                                 f"(column {row_err.pos + 1})") from None
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(document, list):
        return [_json_row(path, value, number, None) for number, value in enumerate(document, 1)]
    if isinstance(document, dict):
        return _rows_of_object(path, document) if single_object_allowed else [document]
    raise ValueError(f"{path}: expected JSON Lines, a list of row objects or an object; got {value_kind(document)} "
                     f"{short_repr(document)}")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_row(path: Path, value: Any, row: int, line_no: Optional[int]) -> dict[str, Any]:
    if not isinstance(value, dict):
        where = f"row {row}" + (f" (line {line_no})" if line_no is not None else "")
        raise ValueError(f"{path}: {where}: expected a JSON object (one row), got {value_kind(value)} {short_repr(value)}")
    return value


def _rows_of_object(path: Path, document: dict[str, Any]) -> list[dict[str, Any]]:
    """A top-level object: a dict of columns (every value a list, none of them a list of objects such as chat
    messages) gives one row per position; any other object is one row; an empty object, none."""
    if not document:
        return []
    columns = list(document.values())
    is_columns = all(
        isinstance(column, list) and not (column and all(isinstance(v, dict) for v in column)) for column in columns
    )
    if not is_columns:
        return [document]
    lengths = {name: len(column) for name, column in document.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: a top-level object of column lists needs equally long columns; got lengths {lengths}")
    return [dict(zip(document, values)) for values in zip(*columns)]


def value_kind(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, numbers.Number):
        return "number"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, (list, tuple)):
        inner = {value_kind(v) for v in value} - {None}
        return f"list of {inner.pop()}s" if len(inner) == 1 else "list"
    return type(value).__name__


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

