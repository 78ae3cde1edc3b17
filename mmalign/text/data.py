"""Preference data for the text backend: loading (local JSON files with the ``json`` module, the rest with
``datasets``), schema detection and validation, tokenisation with truncation that keeps the response, and
batching of pairs and ragged groups into one concatenated batch.

Supported row schemas (``data.format``; ``auto`` detects it from the first row):

- ``pairs``: ``{"prompt": str, "chosen": str, "rejected": str}``; responses are scored as written, plus EOS.
- ``conversational``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` (messages are
  ``{"role", "content"}``), or without ``prompt`` when ``chosen``/``rejected`` are whole conversations that share
  everything before their last assistant message. Rendered with the tokenizer's chat template.
- ``hh``: ``{"chosen": str, "rejected": str}`` full Anthropic-HH dialogues ``"\\n\\nHuman: … \\n\\nAssistant: …"``,
  split at the last assistant turn into the shared prompt and the two responses.
- ``groups``: ``{"prompt": str, "chosen": [str, ...], "rejected": [str, ...]}`` of any (ragged) sizes, for
  mdpo/mipo (SPEC §3); padded members are masked out.

Any further column whose values are numbers or lists of numbers travels with the row into ``batch["extra"]``
as a tensor, where objectives with extra inputs (e.g. ``bins`` of causal_dpo) pick it up by name; columns
``bin_chosen`` + ``bin_rejected`` (or ``bin``) also arrive as ``bins`` ([B, 2] or [B]).

Row numbers in error messages are 1-based (= the line of a JSONL file without blank lines).
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import itertools
import json
import logging
import lzma
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch

__all__ = [
    "batch_response_ids",
    "batch_to_device",
    "PreferenceExample",
    "Rows",
    "load_rows",
    "detect_format",
    "parse_preference_rows",
    "split_hh_dialogue",
    "hh_prompt_to_messages",
    "render_prompt",
    "truncate_prompt",
    "PreferenceTokenizer",
    "TokenizedPreferenceDataset",
    "PreferenceCollator",
    "load_preference_dataset",
]

logger = logging.getLogger("mmalign.text.data")

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")

Message = Mapping[str, str]
Text = Any  # str, or a list of messages


@dataclass
class PreferenceExample:
    """One validated row: a prompt (text or messages) and >= 1 chosen and >= 1 rejected responses."""

    prompt: Text
    chosen: list[Text]
    rejected: list[Text]
    row: int  # 1-based row number in the source
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- loading
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


def load_rows(source: str, *, split: str = "train", subset: Optional[str] = None, max_samples: Optional[int] = None) -> Rows:
    """The rows of a local file, a dataset folder or a hub dataset split, as :class:`Rows`; with ``max_samples``,
    only the first ``max_samples`` rows.

    Local ``.json`` / ``.jsonl`` files (optionally ``.gz``, ``.bz2`` or ``.xz``) are read with the ``json`` module
    (layouts: :func:`_read_json_rows`), without importing ``datasets`` (which brings pyarrow and pandas, ~100 MiB
    of RSS). ``datasets`` reads the rest: Parquet, CSV, ``.zst`` files, ``save_to_disk`` or data-file folders
    (``split``), hub names (``subset``, ``split``).
    """
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
    except (OSError, EOFError, UnicodeDecodeError) as err:  # unreadable or corrupt, e.g. a truncated .gz
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
    raise ValueError(f"{path}: expected JSON Lines, a list of row objects or an object; got {_kind(document)} "
                     f"{_short(document)}")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_row(path: Path, value: Any, row: int, line_no: Optional[int]) -> dict[str, Any]:
    if not isinstance(value, dict):
        where = f"row {row}" + (f" (line {line_no})" if line_no is not None else "")
        raise ValueError(f"{path}: {where}: expected a JSON object (one row), got {_kind(value)} {_short(value)}")
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


def _kind(value: Any) -> Optional[str]:
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
        inner = {_kind(v) for v in value} - {None}
        return f"list of {inner.pop()}s" if len(inner) == 1 else "list"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- parsing
class _RowError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def detect_format(row: Mapping[str, Any], source: str = "<data>") -> str:
    """The schema of one row: pairs, conversational, hh or groups (see the module docstring)."""
    chosen = row.get("chosen")
    if "prompt" in row and row.get("prompt") is not None:
        if isinstance(chosen, str):
            return "pairs"
        if _is_messages(chosen) or _is_messages(row["prompt"]):
            return "conversational"
        if isinstance(chosen, (list, tuple)):
            return "groups"
    else:
        if isinstance(chosen, str):
            return "hh"
        if _is_messages(chosen):
            return "conversational"
    raise ValueError(
        f"{source}: row 1: cannot detect the data format from fields {sorted(row)}; expected {{prompt, chosen, rejected}} "
        "strings (pairs), message lists (conversational), HH dialogues {chosen, rejected}, or groups "
        "{prompt, chosen: [..], rejected: [..]}; set data.format explicitly"
    )


def _text(row: Mapping[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None:
        raise _RowError(name, "missing or null")
    if not isinstance(value, str):
        raise _RowError(name, f"expected a string, got {_kind(value)} {_short(value)}")
    if not allow_empty and not value.strip():
        raise _RowError(name, "empty string")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if value is None:
        raise _RowError(name, "missing or null")
    if not _is_messages(value):
        raise _RowError(name, f"expected a non-empty list of {{role, content}} messages, got {_short(value)}")
    out = []
    for i, message in enumerate(value):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _RowError(f"{name}[{i}]", f"a message needs string 'role' and 'content', got {_short(dict(message))}")
        out.append({"role": role, "content": content})
    return out


def split_hh_dialogue(
    text: str, *, row: int | None = None, field: str | None = None, source: str | None = None
) -> tuple[str, str]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a"`` -> (``"\\n\\nHuman: q\\n\\nAssistant:"``, ``" a"``): the prompt ends
    with the last assistant marker, the response is the rest.

    ``row`` (1-based), ``field`` and ``source`` only enrich the ValueError raised for a non-string or a dialogue
    without an assistant turn.
    """
    context = "".join(
        part for part in (
            f"{source}: " if source is not None else "",
            f"row {row}: " if row is not None else "",
            f"field {field!r}: " if field is not None else "",
        )
    )
    if not isinstance(text, str):
        raise ValueError(f"{context}expected a string dialogue, got {type(text).__name__}")
    index = text.rfind(HH_ASSISTANT)
    if index < 0:
        raise ValueError(f"{context}no '\\n\\nAssistant:' turn")
    cut = index + len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def hh_prompt_to_messages(prompt: str) -> list[dict[str, str]]:
    """An HH prompt (``…\\n\\nAssistant:``) as chat messages: Human -> user, Assistant -> assistant."""
    import re

    body = prompt[: -len(HH_ASSISTANT)] if prompt.endswith(HH_ASSISTANT) else prompt
    parts = re.split(r"\n\n(Human|Assistant):", body)
    messages = []
    # parts = [preamble, role, text, role, text, ...]
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def _as_messages(prompt: Text, system_prompt: Optional[str] = None) -> list[dict[str, str]]:
    """A prompt as chat messages: HH dialogues split into turns, other text as one user message, messages kept;
    ``system_prompt`` is prepended unless the conversation already starts with a system message."""
    if isinstance(prompt, str):
        messages = hh_prompt_to_messages(prompt) if HH_ASSISTANT in prompt or prompt.startswith(HH_HUMAN) else (
            [{"role": "user", "content": prompt.strip()}]
        )
    else:
        messages = list(prompt)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_prompt(tokenizer, prompt: Text, *, use_chat_template: bool, system_prompt: Optional[str] = None) -> tuple[str, bool]:
    """The prompt text a model is sampled from, rendered exactly as :class:`PreferenceTokenizer` renders it for
    training; returns ``(text, add_special_tokens)`` (False for chat-rendered text, which holds its own BOS).

    Plain text without ``use_chat_template`` is returned as is; otherwise the chat template with the generation
    prompt renders :func:`_as_messages` (HH dialogues split into user/assistant turns).
    """
    if not use_chat_template and isinstance(prompt, str):
        return prompt, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat-formatted prompts need a chat template, and the tokenizer has none; set model.chat_template")
    messages = _as_messages(prompt, system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def _parse_row(row: Mapping[str, Any], fmt: str) -> tuple[Text, list[Text], list[Text]]:
    if fmt == "pairs":
        return _text(row, "prompt", allow_empty=True), [_text(row, "chosen")], [_text(row, "rejected")]
    if fmt == "groups":
        prompt = _text(row, "prompt", allow_empty=True)
        groups = []
        for name in ("chosen", "rejected"):
            value = row.get(name)
            if value is None:
                raise _RowError(name, "missing or null")
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or len(value) == 0:
                raise _RowError(name, f"expected a non-empty list of strings, got {_short(value)}")
            for i, member in enumerate(value):
                if not isinstance(member, str) or not member.strip():
                    raise _RowError(f"{name}[{i}]", f"expected a non-empty string, got {_short(member)}")
            groups.append(list(value))
        return prompt, groups[0], groups[1]
    if fmt == "hh":
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        try:
            prompt_c, response_c = split_hh_dialogue(chosen)
        except ValueError:
            raise _RowError("chosen", "no '\\n\\nAssistant:' turn in the dialogue") from None
        try:
            prompt_r, response_r = split_hh_dialogue(rejected)
        except ValueError:
            raise _RowError("rejected", "no '\\n\\nAssistant:' turn in the dialogue") from None
        if prompt_c != prompt_r:
            raise _RowError(
                "rejected", "the chosen and rejected dialogues differ before their last '\\n\\nAssistant:' turn, so "
                "they do not share a prompt"
            )
        # An empty last assistant turn is kept: real HH rows prefer saying nothing (scored as EOS alone).
        return prompt_c, [response_c], [response_r]
    if fmt == "conversational":
        chosen = _messages(row.get("chosen"), "chosen")
        rejected = _messages(row.get("rejected"), "rejected")
        if row.get("prompt") is not None:
            prompt_value = row["prompt"]
            prompt = [{"role": "user", "content": prompt_value}] if isinstance(prompt_value, str) else _messages(prompt_value, "prompt")
            return prompt, [chosen], [rejected]
        # Implicit prompt: everything before the last message, which must be the assistant's and shared.
        for name, conversation in (("chosen", chosen), ("rejected", rejected)):
            if conversation[-1]["role"] != "assistant":
                raise _RowError(name, "the last message must be the assistant's response")
        if chosen[:-1] != rejected[:-1]:
            raise _RowError("rejected", "chosen and rejected conversations differ before their last message")
        if not chosen[:-1]:
            raise _RowError("chosen", "no prompt messages before the assistant's response")
        return chosen[:-1], [chosen[-1:]], [rejected[-1:]]
    raise ValueError(f"unknown data format {fmt!r}; allowed: pairs, conversational, hh, groups")


def _numeric_extra(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Number):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, numbers.Number) and not isinstance(v, bool) for v in value
    )


def parse_preference_rows(
    rows: Sequence[Mapping[str, Any]] | Any,
    *,
    fmt: str = "auto",
    source: str = "<data>",
    on_invalid: Literal["error", "skip"] = "error",
) -> tuple[list[PreferenceExample], str]:
    """Validates every row before any training; returns the examples and the (detected) format.

    A malformed row raises ``ValueError("<source>: row <n>: field '<name>': <what is wrong>")``; with
    ``on_invalid="skip"`` such rows are dropped with one warning listing them.
    """
    if len(rows) == 0:
        raise ValueError(f"{source}: no rows")
    if fmt == "auto":
        fmt = detect_format(rows[0], source)
    core = {"prompt", "chosen", "rejected"}
    examples, skipped = [], []
    for index, row in enumerate(rows):
        number = index + 1
        try:
            prompt, chosen, rejected = _parse_row(row, fmt)
        except _RowError as err:
            message = f"{source}: row {number}: field {err.field_name!r}: {err} (format {fmt})"
            if on_invalid == "skip":
                skipped.append((number, message))
                continue
            raise ValueError(message + "; fix the row, or set data.on_invalid=skip to drop such rows") from None
        extra = {k: v for k, v in row.items() if k not in core and _numeric_extra(v)}
        # causal_dpo's bins may come as one column per response or one per pair
        if "bins" not in extra and "bin_chosen" in extra and "bin_rejected" in extra:
            extra["bins"] = [extra["bin_chosen"], extra["bin_rejected"]]
        elif "bins" not in extra and "bin" in extra:
            extra["bins"] = extra["bin"]
        examples.append(PreferenceExample(prompt, chosen, rejected, number, extra))
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) of %d; first: %s", source, len(skipped), len(rows), skipped[0][1])
    if not examples:
        raise ValueError(f"{source}: every row is malformed; first: {skipped[0][1]}")
    return examples, fmt


# --------------------------------------------------------------------------------------------- tokenising
def truncate_prompt(prompt_ids: list[int], keep: int, *, keep_first_token: bool = False) -> list[int]:
    """The last ``keep`` tokens of a prompt (``keep`` >= 1). With ``keep_first_token`` a cut prompt keeps its first
    token (a BOS or other leading special token the model always saw at position 0) and drops tokens after it."""
    if len(prompt_ids) <= keep:
        return list(prompt_ids)
    if keep_first_token and keep >= 2:
        return [prompt_ids[0]] + list(prompt_ids[len(prompt_ids) - keep + 1:])
    return list(prompt_ids[-keep:])


def truncate_pair(
    prompt_ids: list[int],
    responses: list[list[int]],
    *,
    max_prompt_length: int,
    max_response_length: int,
    max_length: Optional[int] = None,
    keep_first_token: bool = False,
) -> tuple[list[int], list[list[int]]]:
    """Truncation that keeps the response: responses keep their first ``max_response_length`` tokens, the prompt
    its last ``max_prompt_length``; then, if prompt + longest response exceeds ``max_length``, the prompt is cut
    from the left first (keeping >= 1 token, which predicts the first response token), then the responses.
    ``keep_first_token``: see :func:`truncate_prompt` (set when the prompt starts with a special token)."""
    responses = [r[:max_response_length] for r in responses]
    prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, keep_first_token=keep_first_token)
    if max_length is not None:
        longest = max(len(r) for r in responses)
        if len(prompt_ids) + longest > max_length:
            keep = max(1, max_length - longest)
            prompt_ids = truncate_prompt(prompt_ids, keep, keep_first_token=keep_first_token)
            room = max_length - len(prompt_ids)
            responses = [r[:room] for r in responses]
    return prompt_ids, responses


class PreferenceTokenizer:
    """Turns :class:`PreferenceExample` s into token ids: ``prompt_ids`` (never scored) and the responses' ids.

    Plain text: the prompt is tokenised with the tokenizer's special tokens (e.g. BOS), each response without
    them and followed by EOS. Messages: prompt = chat template with the generation prompt; response = the
    rest of the templated conversation (its end-of-turn tokens included). ``use_chat_template`` also renders
    plain-text prompts (HH dialogues split into turns) as chat messages, for instruction-tuned models.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_prompt_length: int = 512,
        max_response_length: int = 512,
        max_length: Optional[int] = None,
        use_chat_template: bool = False,
        system_prompt: Optional[str] = None,
    ):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.max_length = max_length
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one (responses end with EOS)")

    def _as_messages(self, prompt: Text) -> list[dict[str, str]]:
        return _as_messages(prompt, self.system_prompt)

    def _render_chat(self, prompt_messages: list, response: Text, row: int) -> tuple[str, str]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise ValueError(f"row {row}: conversational data needs a chat template, and the tokenizer has none; set "
                             "model.chat_template")
        response_messages = [{"role": "assistant", "content": response.strip()}] if isinstance(response, str) else list(response)
        prompt_text = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(prompt_messages + response_messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"row {row}: the chat template does not render the prompt (with the generation prompt) as a prefix "
                "of the full conversation, so the response tokens cannot be located; use a template without this "
                "behaviour (model.chat_template)"
            )
        return prompt_text, full_text[len(prompt_text):]

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def __call__(self, examples: Sequence[PreferenceExample]) -> list[dict[str, Any]]:
        tok = self.tokenizer
        prompts, responses, chat_flags = [], [], []
        for ex in examples:
            members = ex.chosen + ex.rejected
            chat = self.use_chat_template or not isinstance(ex.prompt, str) or any(not isinstance(m, str) for m in members)
            chat_flags.append(chat)
            if chat:
                messages = self._as_messages(ex.prompt)
                rendered = [self._render_chat(messages, m, ex.row) for m in members]
                prompts.append(rendered[0][0])
                responses.append([r for _, r in rendered])
            else:
                prompts.append(ex.prompt)
                responses.append(list(members))
        # Batched calls: one per kind (fast tokenizers parallelise internally).
        plain_prompts = [p for p, c in zip(prompts, chat_flags) if not c]
        chat_prompts = [p for p, c in zip(prompts, chat_flags) if c]
        plain_prompt_ids = iter(self._encode(plain_prompts, True) if plain_prompts else [])
        chat_prompt_ids = iter(self._encode(chat_prompts, False) if chat_prompts else [])
        flat_responses = [r for rs in responses for r in rs]
        flat_ids = iter(self._encode(flat_responses, False) if flat_responses else [])
        start_token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        special_ids = set(tok.all_special_ids)
        out = []
        for ex, chat, rs in zip(examples, chat_flags, responses):
            prompt_ids = list(next(chat_prompt_ids) if chat else next(plain_prompt_ids))
            if not prompt_ids:
                # The first response token must be predicted from something.
                prompt_ids = [start_token]
            member_ids = []
            for _ in rs:
                ids = list(next(flat_ids))
                if not chat:
                    ids.append(tok.eos_token_id)
                member_ids.append(ids)
            if any(len(ids) == 0 for ids in member_ids):
                raise ValueError(f"row {ex.row}: a response tokenises to zero tokens")
            prompt_ids, member_ids = truncate_pair(
                prompt_ids, member_ids, max_prompt_length=self.max_prompt_length,
                max_response_length=self.max_response_length, max_length=self.max_length,
                keep_first_token=prompt_ids[0] in special_ids,
            )
            k = len(ex.chosen)
            out.append({
                "prompt_ids": prompt_ids,
                "chosen_ids": member_ids[:k],
                "rejected_ids": member_ids[k:],
                "row": ex.row,
                "extra": dict(ex.extra),
            })
        return out


class TokenizedPreferenceDataset(torch.utils.data.Dataset):
    """Tokenised examples (dicts with prompt_ids, chosen_ids, rejected_ids, row, extra; optionally
    ref_chosen/ref_rejected after reference precomputation)."""

    def __init__(self, items: list[dict[str, Any]], *, source: str = "<data>", data_format: str = "pairs"):
        self.items = items
        self.source = source
        self.data_format = data_format

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def max_group_sizes(self) -> tuple[int, int]:
        return (max(len(i["chosen_ids"]) for i in self.items), max(len(i["rejected_ids"]) for i in self.items))

    def fingerprint(self) -> str:
        """sha256 of every token id (prompt, members, order): keys caches on exactly what the model sees."""
        digest = hashlib.sha256()
        for item in self.items:
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                value = item[key]
                seqs = value if key != "prompt_ids" else [value]
                digest.update(key.encode())
                for seq in seqs:
                    digest.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
                    digest.update(b"|")
        return digest.hexdigest()


@dataclass
class PreferenceCollator:
    """Builds ONE padded batch holding every chosen and rejected member of every example.

    Batch keys: ``input_ids``, ``attention_mask`` [N, T] (right-padded); ``loss_mask`` [N, T] bool marking
    response tokens (prompt and padding are never scored); ``chosen_index`` [B, k_w] / ``rejected_index``
    [B, k_l] (row of each member in the N sequences, -1 for a missing member of a ragged group);
    ``chosen_mask`` / ``rejected_mask`` (index >= 0); ``chosen_lengths`` [B, k_w] (response tokens);
    ``ragged`` (bool); ``num_tokens`` (int); ``logits_start`` (int); ``extra`` (dict of tensors from numeric columns);
    ``ref_chosen`` / ``ref_rejected`` [B, k] when reference log-probs were precomputed.

    ``share_prompt=True`` packs each example into ONE row instead — the prompt once, then every chosen and rejected
    response — so the prompt is encoded once per example rather than once per member (see
    :func:`mmalign.text.logprobs.shared_prompt_logprobs`). The row keys then are ``input_ids``, ``segment_ids``
    (0 prompt, 1.. response number within the row, -1 padding), ``position_ids`` (each response continues the
    prompt's positions) and the scoring plan ``score_rows`` / ``score_positions`` (the position whose logits predict
    the token) / ``score_labels`` / ``score_members`` (member index, as in ``chosen_index``) [M], ``logit_positions``
    [K] (sorted positions whose logits are needed) with ``score_logit_index`` [M] into it, and ``num_members``.
    The member indexes, masks, lengths, extras and precomputed references are the same as in the padded layout.
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    share_prompt: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._shared_prompt_batch(items) if self.share_prompt else self._padded_batch(items)
        batch.update(_member_tables(items))
        return batch

    def _row_length(self, longest: int) -> int:
        if self.pad_to_multiple_of:
            return int(math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        return longest

    def _padded_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        # one row per member, in member order (see _member_tables)
        sequences = [(item["prompt_ids"], response) for item in items
                     for response in item["chosen_ids"] + item["rejected_ids"]]
        n, length = len(sequences), self._row_length(max(len(p) + len(r) for p, r in sequences))
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        loss_mask = torch.zeros((n, length), dtype=torch.bool)
        for row, (prompt, response) in enumerate(sequences):
            end = len(prompt) + len(response)
            input_ids[row, :end] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[row, :end] = 1
            loss_mask[row, len(prompt) : end] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "num_tokens": int(attention_mask.sum()),
            # logits before the shortest prompt's last token are never needed (see sequence_logprobs)
            "logits_start": min(len(p) for p, _ in sequences) - 1,
        }

    def _shared_prompt_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rows: list[tuple[list[int], list[int], list[int]]] = []  # (token ids, segment ids, position ids)
        score_rows, score_positions, score_labels, score_members = [], [], [], []
        member = 0  # numbered as in _member_tables
        for b, item in enumerate(items):
            prompt = item["prompt_ids"]
            ids, segments, positions = list(prompt), [0] * len(prompt), list(range(len(prompt)))
            for segment, response in enumerate(item["chosen_ids"] + item["rejected_ids"], start=1):
                start = len(ids)
                # the first response token is predicted by the prompt's last position, the others by their left
                # neighbour in the row
                score_positions += ([len(prompt) - 1] + list(range(start, start + len(response) - 1)))[: len(response)]
                score_labels += response
                score_rows += [b] * len(response)
                score_members += [member] * len(response)
                ids += response
                segments += [segment] * len(response)
                positions += range(len(prompt), len(prompt) + len(response))
                member += 1
            rows.append((ids, segments, positions))
        length = self._row_length(max(len(r[0]) for r in rows))
        # padded in Python, one tensor per field: cheaper than a tensor per row (collation runs every step)
        input_ids = torch.tensor([r[0] + [self.pad_token_id] * (length - len(r[0])) for r in rows], dtype=torch.long)
        segment_ids = torch.tensor([r[1] + [-1] * (length - len(r[1])) for r in rows], dtype=torch.long)
        position_ids = torch.tensor([r[2] + [0] * (length - len(r[2])) for r in rows], dtype=torch.long)
        score_positions_t = torch.tensor(score_positions, dtype=torch.long)
        logit_positions, score_logit_index = torch.unique(score_positions_t, sorted=True, return_inverse=True)
        return {
            "input_ids": input_ids,
            "segment_ids": segment_ids,
            "position_ids": position_ids,
            "score_rows": torch.tensor(score_rows, dtype=torch.long),
            "score_positions": score_positions_t,
            "score_labels": torch.tensor(score_labels, dtype=torch.long),
            "score_members": torch.tensor(score_members, dtype=torch.long),
            "logit_positions": logit_positions,
            "score_logit_index": score_logit_index,
            "num_members": member,
            "num_tokens": int(sum(len(r[0]) for r in rows)),
        }


def _member_tables(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The layout-independent keys: members numbered example by example, chosen before rejected."""
    batch_size = len(items)
    k_w = max(len(i["chosen_ids"]) for i in items)
    k_l = max(len(i["rejected_ids"]) for i in items)
    chosen_index = torch.full((batch_size, k_w), -1, dtype=torch.long)
    rejected_index = torch.full((batch_size, k_l), -1, dtype=torch.long)
    chosen_lengths = torch.ones((batch_size, k_w), dtype=torch.float32)
    member = 0
    for b, item in enumerate(items):
        for j, response in enumerate(item["chosen_ids"]):
            chosen_index[b, j], chosen_lengths[b, j] = member, len(response)
            member += 1
        for j in range(len(item["rejected_ids"])):
            rejected_index[b, j] = member
            member += 1
    batch: dict[str, Any] = {
        "chosen_index": chosen_index,
        "rejected_index": rejected_index,
        "chosen_mask": chosen_index >= 0,
        "rejected_mask": rejected_index >= 0,
        "chosen_lengths": chosen_lengths,
        "ragged": bool((chosen_index < 0).any() or (rejected_index < 0).any()),
        "extra": _collate_extra(items),
    }
    if all("ref_chosen" in i for i in items):
        ref_chosen = torch.zeros((batch_size, k_w), dtype=torch.float32)
        ref_rejected = torch.zeros((batch_size, k_l), dtype=torch.float32)
        for b, item in enumerate(items):
            ref_chosen[b, : len(item["ref_chosen"])] = torch.tensor(item["ref_chosen"], dtype=torch.float32)
            ref_rejected[b, : len(item["ref_rejected"])] = torch.tensor(item["ref_rejected"], dtype=torch.float32)
        batch["ref_chosen"] = ref_chosen
        batch["ref_rejected"] = ref_rejected
    return batch


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_response_ids(batch: Mapping[str, Any]) -> list[list[int]]:
    """The scored response tokens of every member of a :class:`PreferenceCollator` batch (either layout), in member
    order (the numbering of ``chosen_index`` / ``rejected_index``)."""
    if "segment_ids" in batch:
        responses: list[list[int]] = [[] for _ in range(int(batch["num_members"]))]
        for member, token in zip(batch["score_members"].tolist(), batch["score_labels"].tolist()):
            responses[member].append(token)
        return responses
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    return [input_ids[n][loss_mask[n]].tolist() for n in range(input_ids.shape[0])]


def _collate_extra(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    names = set(items[0].get("extra", {}))
    for item in items[1:]:
        names &= set(item.get("extra", {}))
    out = {}
    for name in sorted(names):
        values = [item["extra"][name] for item in items]
        try:
            out[name] = torch.tensor(values)
        except (ValueError, TypeError):  # ragged lists: not a tensor input
            continue
    return out


def load_preference_dataset(
    source: str,
    tokenizer,
    *,
    split: str = "train",
    subset: Optional[str] = None,
    fmt: str = "auto",
    max_samples: Optional[int] = None,
    max_prompt_length: int = 512,
    max_response_length: int = 512,
    max_length: Optional[int] = None,
    use_chat_template: bool = False,
    system_prompt: Optional[str] = None,
    on_invalid: Literal["error", "skip"] = "error",
    transform_examples: Optional[Callable[[list, Rows], list]] = None,
) -> TokenizedPreferenceDataset:
    """load_rows -> parse_preference_rows (validates every row) -> PreferenceTokenizer, in one call.
    ``transform_examples(examples, rows)``, if given, returns the examples to tokenise (e.g. with bins attached)."""
    rows = load_rows(source, split=split, subset=subset, max_samples=max_samples)
    examples, detected = parse_preference_rows(rows, fmt=fmt, source=source, on_invalid=on_invalid)
    if transform_examples is not None:
        examples = transform_examples(examples, rows)
    encoder = PreferenceTokenizer(
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_response_length=max_response_length,
        max_length=max_length,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )
    try:
        items = encoder(examples)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return TokenizedPreferenceDataset(items, source=source, data_format=detected)
