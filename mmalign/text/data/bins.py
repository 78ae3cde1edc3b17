"""Bins of a spurious factor for causal reward models and causal DPO (SPEC §5, thesis ch. 4).

The binned MMD penalty needs, for every response (or every pair), the id of the bin its spurious factor falls
in. Three sources:

* ``length``: response length (tokens when a tokenizer is given, else whitespace words) cut into ``num_bins``
  quantile bins. The edges are fitted on the training data once (:func:`fit_length_edges`) and reused for any
  other split, so a bin means the same lengths everywhere.
* ``column``: a dataset column that already names the factor (concept, demographic group, "has the sycophancy
  prefix"); its distinct values become bins in sorted order.
* ``keywords``: a keyword-category table matched against the text. The built-in ``demographic`` table is thesis
  Tables 4.7–4.9 (4 age × 3 gender × 5 race categories = 60 bins, thesis §4.12.2). Keywords match whole words,
  case-insensitively, with an optional plural ``s``/``es``; when several categories of one attribute match, the
  keyword that occurs first in the text decides. A text with no keyword of some attribute is *unmatched*:
  ``unmatched="error"`` refuses it, ``"drop"`` leaves the row out (the thesis filters HH-RLHF this way) and
  ``"extra_bin"`` gives it one more bin.

:func:`assign_bins` writes ``bin_chosen`` / ``bin_rejected`` into rows (one bin per response) and the list column
``bins = [bin_chosen, bin_rejected]``, which the text trainer passes to ``causal_dpo`` and :mod:`mmalign.text.recipes.reward`
reads. Every error names the source, row and field.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np

from mmalign.text.data.keywords import DEMOGRAPHIC_TABLE, KeywordTable

__all__ = [
    "BinSpec",
    "BinAssignment",
    "assign_bins",
    "fit_length_edges",
    "length_bins",
    "response_length",
    "check_bin_sizes",
    "check_bin_column",
    "assign_example_bins",
    "preference_text",
]



# ------------------------------------------------------------------------------------------------------------
# Lengths.


def response_length(text: str, tokenizer: Any = None) -> int:
    """Tokens of ``text`` under ``tokenizer`` (no special tokens), or whitespace words without one."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_length_edges(lengths: Sequence[float], num_bins: int) -> np.ndarray:
    """Inner quantile edges cutting ``lengths`` into ``num_bins`` bins (ties may merge bins; duplicates removed)."""
    if num_bins < 2:
        raise ValueError(f"length bins: num_bins must be >= 2; got {num_bins}")
    values = np.asarray(lengths, dtype=np.float64)
    if values.size == 0:
        raise ValueError("length bins: no lengths to fit the quantile edges on")
    edges = np.quantile(values, np.linspace(0, 1, num_bins + 1)[1:-1])
    return np.unique(edges)


def length_bins(lengths: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Bin id of each length: the number of edges ≤ it, in ``0..len(edges)``."""
    return np.searchsorted(np.asarray(edges), np.asarray(lengths, dtype=np.float64), side="right").astype(np.int64)


# ------------------------------------------------------------------------------------------------------------
# Specs and assignment.


@dataclass
class BinSpec:
    """Where the bins of the spurious factor come from (a config section ``bins:``)."""

    source: Literal["length", "column", "keywords"] = field(
        default="length", metadata={"help": "length quantiles, a dataset column, or a keyword-category table"}
    )
    num_bins: int = field(default=10, metadata={"help": "length: number of quantile bins M (thesis: 10, 20, 30)"})
    column: Optional[str] = field(
        default=None,
        metadata={"help": "column: the field naming the bin; per response if the row has <column>_chosen and "
                  "<column>_rejected, else one per pair"},
    )
    keyword_table: str = field(
        default="demographic",
        metadata={"help": "keywords: 'demographic' (thesis Tables 4.7-4.9, 60 bins) or a YAML file "
                  "{attribute: {category: [keywords]}}"},
    )
    text: Literal["prompt", "response", "both"] = field(
        default="prompt", metadata={"help": "keywords: match the prompt, the response, or both concatenated"}
    )
    unmatched: Literal["error", "drop", "extra_bin"] = field(
        default="drop", metadata={"help": "keywords: a text without a keyword of some attribute is refused, left out, or binned apart"}
    )
    min_bin_size: int = field(default=2, metadata={"help": "a used bin with fewer members than this is an error"})

    def __post_init__(self) -> None:
        if self.source == "length" and self.num_bins < 2:
            raise ValueError(f"bins.num_bins: invalid value {self.num_bins}; expected >= 2")
        if self.source == "column" and not self.column:
            raise ValueError("bins.column: source 'column' needs the name of the column")
        if self.min_bin_size < 2:
            raise ValueError(f"bins.min_bin_size: invalid value {self.min_bin_size}; expected >= 2 (MMD needs two members)")


@dataclass
class BinAssignment:
    """The result of :func:`assign_bins`: rows with ``bin_chosen``/``bin_rejected``, labels, edges, drops."""

    rows: list[dict[str, Any]]
    labels: list[str]
    length_edges: Optional[list[float]] = None
    dropped_rows: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Responses per bin label (bins with no member omitted)."""
        counter = Counter()
        for row in self.rows:
            counter[row["bin_chosen"]] += 1
            counter[row["bin_rejected"]] += 1
        return {self.labels[b]: n for b, n in sorted(counter.items())}


def _load_keyword_table(name: str) -> KeywordTable:
    if name == "demographic":
        return DEMOGRAPHIC_TABLE
    import yaml

    try:
        with open(name) as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ValueError(f"bins.keyword_table: cannot read {name!r} ({exc}); use 'demographic' or a YAML file") from None
    return KeywordTable.from_mapping(data, source=name)


def _text_field(row: Mapping[str, Any], key: str, number: int, source: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{source}: row {number}: field {key!r} must be a string; got {type(value).__name__}")
    return value


def _column_value(row: Mapping[str, Any], key: str, number: int, source: str) -> Any:
    if key not in row:
        raise ValueError(f"{source}: row {number}: missing bin column {key!r}")
    value = row[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{source}: row {number}: bin column {key!r} is missing (None/NaN)")
    if not isinstance(value, (str, int, bool, float)):
        raise ValueError(f"{source}: row {number}: bin column {key!r} must be a string or number; got {type(value).__name__}")
    return value


def check_bin_sizes(bin_ids: Sequence[int], labels: Sequence[str] | Mapping[int, str], minimum: int, *, source: str) -> None:
    """Refuse a bin with fewer than ``minimum`` members: its within-bin MMD term cannot be estimated."""
    counts = Counter(int(b) for b in bin_ids)
    small = {labels[b]: n for b, n in sorted(counts.items()) if n < minimum}
    if small:
        raise ValueError(
            f"{source}: bins with fewer than {minimum} members: {small}; merge bins (fewer length bins, coarser "
            "categories) or add data. The MMD penalty needs at least two members per bin."
        )
    if len(counts) < 2:
        raise ValueError(f"{source}: all responses fall in one bin ({labels[next(iter(counts))]!r}); the MMD penalty would be 0")


def assign_bins(
    rows: Sequence[Mapping[str, Any]],
    spec: BinSpec,
    *,
    tokenizer: Any = None,
    length_edges: Optional[Sequence[float]] = None,
    column_labels: Optional[Sequence[str]] = None,
    source: str = "dataset",
    check_sizes: bool = True,
    row_numbers: Optional[Sequence[int]] = None,
) -> BinAssignment:
    """Adds ``bin_chosen`` and ``bin_rejected`` (ints) to copies of ``rows`` (fields ``prompt``/``chosen``/``rejected``).

    ``length_edges`` / ``column_labels``: reuse the edges / label order fitted on the training split (pass
    ``assignment.length_edges`` / ``assignment.labels``) so that evaluation bins mean the same thing.
    ``check_sizes``: refuse bins with fewer than ``spec.min_bin_size`` members (turn off for small eval splits).
    ``row_numbers``: the 1-based number of each row in ``source`` for error messages (default 1, 2, ...).
    """
    if not rows:
        raise ValueError(f"{source}: no rows to bin")
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(rows) + 1))
    if len(numbers) != len(rows):
        raise ValueError(f"assign_bins: {len(numbers)} row numbers for {len(rows)} rows")
    for number, row in zip(numbers, rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{source}: row {number}: expected a mapping")
    rows = [dict(r) for r in rows]
    dropped: list[int] = []
    edges_out: Optional[list[float]] = None
    if spec.source == "length":
        chosen = [response_length(_text_field(r, "chosen", n, source), tokenizer) for n, r in zip(numbers, rows)]
        rejected = [response_length(_text_field(r, "rejected", n, source), tokenizer) for n, r in zip(numbers, rows)]
        edges = np.asarray(length_edges, dtype=np.float64) if length_edges is not None else fit_length_edges(chosen + rejected, spec.num_bins)
        edges_out = [float(e) for e in edges]
        bounds = [-math.inf, *edges_out, math.inf]
        labels = [f"len[{_fmt(bounds[i])},{_fmt(bounds[i + 1])})" for i in range(len(bounds) - 1)]
        for row, bc, br in zip(rows, length_bins(chosen, edges), length_bins(rejected, edges)):
            row["bin_chosen"], row["bin_rejected"] = int(bc), int(br)
        kept = rows
    elif spec.source == "column":
        key = spec.column
        per_response = all(f"{key}_chosen" in r and f"{key}_rejected" in r for r in rows)
        values = []
        for i, row in enumerate(rows):
            if per_response:
                values.append((_column_value(row, f"{key}_chosen", numbers[i], source),
                               _column_value(row, f"{key}_rejected", numbers[i], source)))
            else:
                value = _column_value(row, key, numbers[i], source)
                values.append((value, value))
        labels = [str(v) for v in column_labels] if column_labels is not None else sorted({str(v) for pair in values for v in pair})
        index_of = {label: b for b, label in enumerate(labels)}
        for i, (row, (vc, vr)) in enumerate(zip(rows, values)):
            for side, value in (("chosen", vc), ("rejected", vr)):
                if str(value) not in index_of:
                    raise ValueError(f"{source}: row {numbers[i]}: bin column value {value!r} is not one of the known bins {labels}")
                row[f"bin_{side}"] = index_of[str(value)]
        kept = rows
    else:
        table = _load_keyword_table(spec.keyword_table)
        labels = table.bin_labels() + (["unmatched"] if spec.unmatched == "extra_bin" else [])
        kept = []
        for i, row in enumerate(rows):
            prompt = _text_field(row, "prompt", numbers[i], source) if spec.text in ("prompt", "both") else ""
            sides = {}
            for side in ("chosen", "rejected"):
                response = _text_field(row, side, numbers[i], source) if spec.text in ("response", "both") else ""
                sides[side] = table.bin_of(f"{prompt}\n{response}")
            if any(b is None for b in sides.values()):
                if spec.unmatched == "error":
                    text = _text_field(row, "prompt", numbers[i], source) if spec.text != "response" else row.get("chosen", "")
                    missing = [a for a, c in table.categorize(str(text)).items() if c is None]
                    raise ValueError(f"{source}: row {numbers[i]}: no keyword of attribute(s) {missing} of {table.name} in the {spec.text} text")
                if spec.unmatched == "drop":
                    dropped.append(i)
                    continue
                sides = {k: (table.num_bins if v is None else v) for k, v in sides.items()}
            row["bin_chosen"], row["bin_rejected"] = sides["chosen"], sides["rejected"]
            kept.append(row)
        if not kept:
            raise ValueError(f"{source}: no row matched {table.name} (all {len(rows)} rows dropped as unmatched)")
    for row in kept:
        # One list column: the text trainer's collate turns it into batch["extra"]["bins"] [B, 2] (causal_dpo).
        row["bins"] = [row["bin_chosen"], row["bin_rejected"]]
    if check_sizes:
        check_bin_sizes([r["bin_chosen"] for r in kept] + [r["bin_rejected"] for r in kept], labels, spec.min_bin_size, source=source)
    return BinAssignment(rows=kept, labels=labels, length_edges=edges_out, dropped_rows=dropped)


#: Columns that carry bins into causal_dpo (see :func:`mmalign.text.data.parse_preference_rows`).
BIN_COLUMNS = ("bins", "bin_chosen", "bin_rejected", "bin")


def preference_text(value: Any) -> str:
    """A prompt or response as plain text for binning: a string as is; a message list (conversational data): its
    messages' contents joined by newlines."""
    if isinstance(value, str):
        return value
    return "\n".join(str(message.get("content", "")) for message in value)


def assign_example_bins(
    examples: Sequence[Any],
    rows: Any,
    spec: BinSpec,
    *,
    tokenizer: Any = None,
    length_edges: Optional[Sequence[float]] = None,
    column_labels: Optional[Sequence[str]] = None,
    source: str = "dataset",
    check_sizes: bool = True,
) -> tuple[list[Any], BinAssignment]:
    """:func:`assign_bins` for parsed preference examples (the text trainer's data path, ``bins:`` section).

    ``examples``: :class:`mmalign.text.data.PreferenceExample` pairs (any row schema: pairs, conversational, HH)
    parsed from ``rows`` (``example.row`` is the 1-based row number in ``rows``). The bin texts are the example's
    prompt and its chosen/rejected response (message lists as :func:`preference_text`), so HH dialogues are binned
    on the last assistant turn as ``python -m mmalign.text.bins`` bins them; ``source: column`` reads the column from
    the original row. Returns the examples that were kept (``unmatched: drop`` leaves some out), each with
    ``extra["bins"] = [chosen bin, rejected bin]``, and the assignment (its ``dropped_rows`` index ``examples``).
    """
    from dataclasses import replace

    reserved = set(BIN_COLUMNS)
    if spec.source == "column":  # the spec's own column may have one of these names
        reserved -= {spec.column, f"{spec.column}_chosen", f"{spec.column}_rejected"}
    bin_rows = []
    for example in examples:
        if len(example.chosen) != 1 or len(example.rejected) != 1:
            raise ValueError(f"{source}: row {example.row}: bins: need pairs (one chosen, one rejected response); "
                             f"got {len(example.chosen)} chosen and {len(example.rejected)} rejected")
        row = dict(rows[example.row - 1])
        clash = sorted(reserved & set(row))
        if clash:
            raise ValueError(f"{source}: row {example.row}: the data already has bin column(s) {clash} and the config "
                             "has a bins: section; remove one of them (precomputed columns are used when there is "
                             "no bins: section)")
        row.update(prompt=preference_text(example.prompt), chosen=preference_text(example.chosen[0]),
                   rejected=preference_text(example.rejected[0]))
        bin_rows.append(row)
    assignment = assign_bins(bin_rows, spec, tokenizer=tokenizer, length_edges=length_edges,
                             column_labels=column_labels, source=source, check_sizes=check_sizes,
                             row_numbers=[e.row for e in examples])
    dropped = set(assignment.dropped_rows)
    kept = [e for i, e in enumerate(examples) if i not in dropped]
    binned = [replace(e, extra={**e.extra, "bins": list(r["bins"])}) for e, r in zip(kept, assignment.rows)]
    return binned, assignment


def check_bin_column(bins: Sequence[Any], row_numbers: Sequence[int], *, minimum: int = 2, source: str = "dataset") -> None:
    """Validates a precomputed ``bins`` column (one id per pair, or ``[chosen, rejected]``): integer ids (no NaN,
    no fractions), and every bin with at least ``minimum`` members, not all in one bin (:func:`check_bin_sizes`)."""
    ids: list[int] = []
    for number, value in zip(row_numbers, bins):
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) not in (1, 2):
            raise ValueError(f"{source}: row {number}: field 'bins': expected one bin id or [chosen, rejected]; got {value!r}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
                raise ValueError(f"{source}: row {number}: field 'bins': bin ids must be integers; got {value!r}")
        ids.extend(int(v) for v in (values * 2 if len(values) == 1 else values))
    check_bin_sizes(ids, {b: f"bin {b}" for b in set(ids)}, minimum, source=source)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return f"{value:g}"
