"""Row schemas of preference data: detection and validation of every row into :class:`PreferenceExample` s.

Supported row schemas (``data.format``; ``auto`` detects it from the first row):

- ``pairs``: ``{"prompt": str, "chosen": str, "rejected": str}``; responses are scored as written, plus EOS.
- ``conversational``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` (messages are
  ``{"role", "content"}``), or without ``prompt`` when ``chosen``/``rejected`` are whole conversations that share
  everything before their last assistant message. Rendered with the tokenizer's chat template.
- ``implicit``: ``{"chosen": str, "rejected": str}`` full texts without HH markers (TRL's implicit-prompt rows): the
  common prefix is the prompt, the rest the responses.
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

import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from mmalign.data_checks import check_identical_responses
from mmalign.text.data.files import short_repr, value_kind
from mmalign.text.data.prompts import HH_ASSISTANT, split_hh_dialogue, split_implicit_prompt

__all__ = ["PreferenceExample", "RowError", "is_messages", "detect_format", "parse_preference_rows"]

logger = logging.getLogger("mmalign.text.data")

Text = Any  # str, or a list of messages


@dataclass
class PreferenceExample:
    """One validated row: a prompt (text or messages) and >= 1 chosen and >= 1 rejected responses."""

    prompt: Text
    chosen: list[Text]
    rejected: list[Text]
    row: int  # 1-based row number in the source
    extra: dict[str, Any] = field(default_factory=dict)



# --------------------------------------------------------------------------------------------- parsing
class RowError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


def is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def detect_format(row: Mapping[str, Any], source: str = "<data>") -> str:
    """The schema of one row: pairs, conversational, hh or groups (see the module docstring)."""
    chosen = row.get("chosen")
    if "prompt" in row and row.get("prompt") is not None:
        if isinstance(chosen, str):
            return "pairs"
        if is_messages(chosen) or is_messages(row["prompt"]):
            return "conversational"
        if isinstance(chosen, (list, tuple)):
            return "groups"
    else:
        if isinstance(chosen, str):
            # HH dialogues carry their turns; other full texts are TRL's implicit-prompt rows (common prefix = prompt)
            return "hh" if HH_ASSISTANT in chosen else "implicit"
        if is_messages(chosen):
            return "conversational"
    raise ValueError(
        f"{source}: row 1: cannot detect the data format from fields {sorted(row)}; expected {{prompt, chosen, rejected}} "
        "strings (pairs), message lists (conversational), HH dialogues {chosen, rejected}, or groups "
        "{prompt, chosen: [..], rejected: [..]}; set data.format explicitly"
    )


def _text(row: Mapping[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None:
        raise RowError(name, "missing or null")
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {value_kind(value)} {short_repr(value)}")
    if not allow_empty and not value.strip():
        raise RowError(name, "empty string")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if value is None:
        raise RowError(name, "missing or null")
    if not is_messages(value):
        raise RowError(name, f"expected a non-empty list of {{role, content}} messages, got {short_repr(value)}")
    out = []
    for i, message in enumerate(value):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError(f"{name}[{i}]", f"a message needs string 'role' and 'content', got {short_repr(dict(message))}")
        out.append({"role": role, "content": content})
    return out



def _parse_row(row: Mapping[str, Any], fmt: str) -> tuple[Text, list[Text], list[Text]]:
    if fmt == "pairs":
        return _text(row, "prompt", allow_empty=True), [_text(row, "chosen")], [_text(row, "rejected")]
    if fmt == "groups":
        prompt = _text(row, "prompt", allow_empty=True)
        groups = []
        for name in ("chosen", "rejected"):
            value = row.get(name)
            if value is None:
                raise RowError(name, "missing or null")
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or len(value) == 0:
                raise RowError(name, f"expected a non-empty list of strings, got {short_repr(value)}")
            for i, member in enumerate(value):
                if not isinstance(member, str) or not member.strip():
                    raise RowError(f"{name}[{i}]", f"expected a non-empty string, got {short_repr(member)}")
            groups.append(list(value))
        return prompt, groups[0], groups[1]
    if fmt == "hh":
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        try:
            prompt_c, response_c = split_hh_dialogue(chosen)
        except ValueError:
            raise RowError("chosen", "no '\\n\\nAssistant:' turn in the dialogue") from None
        try:
            prompt_r, response_r = split_hh_dialogue(rejected)
        except ValueError:
            raise RowError("rejected", "no '\\n\\nAssistant:' turn in the dialogue") from None
        if prompt_c != prompt_r:
            raise RowError(
                "rejected", "the chosen and rejected dialogues differ before their last '\\n\\nAssistant:' turn, so "
                "they do not share a prompt"
            )
        # An empty last assistant turn is kept: real HH rows prefer saying nothing (scored as EOS alone).
        return prompt_c, [response_c], [response_r]
    if fmt == "implicit":
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        try:
            prompt, response_c, response_r = split_implicit_prompt(chosen, rejected)
        except ValueError as err:
            raise RowError("rejected", str(err)) from None
        return prompt, [response_c], [response_r]
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
                raise RowError(name, "the last message must be the assistant's response")
        if chosen[:-1] != rejected[:-1]:
            raise RowError("rejected", "chosen and rejected conversations differ before their last message")
        if not chosen[:-1]:
            raise RowError("chosen", "no prompt messages before the assistant's response")
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
    refuse_identical: bool = True,
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
        except RowError as err:
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
    # chosen == rejected: warned about; a file of nothing else is refused (there is no preference to learn)
    check_identical_responses(((e.row, e.chosen, e.rejected) for e in examples), source=source,
                              refuse_all=refuse_identical)
    return examples, fmt


