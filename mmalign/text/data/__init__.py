"""Preference data for the text backend: ``files`` (reading rows), ``schema`` (row schemas, detection and
validation), ``prompts`` (HH dialogues, chat messages, prompt rendering), ``tokenization`` (truncation that keeps
the response, the tokenised dataset), ``collation`` (pairs and ragged groups into one batch) and
:func:`load_preference_dataset`, which chains them. See ``schema`` for the supported row schemas."""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional

from mmalign.text.data.collation import PreferenceCollator, batch_response_ids, batch_to_device
from mmalign.text.data.files import Rows, in_memory_rows, load_rows
from mmalign.text.data.prompts import HH_ASSISTANT, HH_HUMAN, as_messages, hh_prompt_to_messages, render_prompt, split_hh_dialogue
from mmalign.text.data.schema import PreferenceExample, detect_format, parse_preference_rows
from mmalign.text.data.tokenization import PreferenceTokenizer, TokenizedPreferenceDataset, truncate_pair, truncate_prompt

__all__ = [
    "HH_ASSISTANT", "HH_HUMAN",
    "batch_response_ids", "batch_to_device", "PreferenceExample", "Rows", "load_rows", "detect_format",
    "parse_preference_rows", "in_memory_rows", "split_hh_dialogue", "hh_prompt_to_messages", "as_messages", "render_prompt",
    "truncate_prompt", "truncate_pair", "PreferenceTokenizer", "TokenizedPreferenceDataset", "PreferenceCollator",
    "load_preference_dataset",
]


def load_preference_dataset(
    source: Any,
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
    refuse_identical: bool = True,
    name: Optional[str] = None,
) -> TokenizedPreferenceDataset:
    """load_rows (a path, or in-memory data: a Dataset, DatasetDict or list of dicts) -> parse_preference_rows (validates every row) -> PreferenceTokenizer, in one call.
    ``transform_examples(examples, rows)``, if given, returns the examples to tokenise (e.g. with bins attached)."""
    rows = load_rows(source, split=split, subset=subset, max_samples=max_samples, name=name)
    source = rows.source  # a file name, or e.g. "train_dataset (Dataset)" for in-memory data
    examples, detected = parse_preference_rows(rows, fmt=fmt, source=source, on_invalid=on_invalid,
                                               refuse_identical=refuse_identical)
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
