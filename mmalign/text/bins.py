"""``python -m mmalign.text.bins IN OUT --source ...``: add bin columns to a preference file (SPEC §5)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from mmalign.io import write_jsonl
from mmalign.text.data.bins import BinSpec, assign_bins
from mmalign.text.data.reward_rows import load_reward_rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m mmalign.text.bins IN OUT --source ...``: writes IN's pairs with ``bins`` columns to OUT (JSONL)."""
    parser = argparse.ArgumentParser(
        prog="python -m mmalign.text.bins",
        description="Add bin columns (bin_chosen, bin_rejected, bins=[chosen, rejected]) to a preference file, for "
        "objective causal_dpo in the text trainer or for reward models (SPEC §5). Prints the bin counts.",
    )
    parser.add_argument("input", help="pairs file (.jsonl/.json/.parquet/.csv, optionally .gz): prompt, chosen, rejected")
    parser.add_argument("output", help="output .jsonl")
    parser.add_argument("--source", choices=["length", "column", "keywords"], default="length")
    parser.add_argument("--num-bins", type=int, default=10, help="length: quantile bins M")
    parser.add_argument("--column", help="column: the field naming the bin")
    parser.add_argument("--keyword-table", default="demographic", help="keywords: 'demographic' or a YAML table")
    parser.add_argument("--text", choices=["prompt", "response", "both"], default="prompt")
    parser.add_argument("--unmatched", choices=["error", "drop", "extra_bin"], default="drop")
    parser.add_argument("--tokenizer", help="length in tokens of this tokenizer (default: whitespace words)")
    parser.add_argument("--length-edges", help="reuse quantile edges (JSON list) fitted on the training split")
    args = parser.parse_args(argv)

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(args.tokenizer))
    spec = BinSpec(source=args.source, num_bins=args.num_bins, column=args.column, keyword_table=args.keyword_table,
                   text=args.text, unmatched=args.unmatched)
    edges = json.loads(args.length_edges) if args.length_edges else None
    assignment = assign_bins(load_reward_rows(args.input), spec, tokenizer=tokenizer, length_edges=edges, source=args.input)
    write_jsonl(args.output, assignment.rows)
    print(json.dumps({"output": args.output, "rows": len(assignment.rows), "dropped": len(assignment.dropped_rows),
                      "length_edges": assignment.length_edges, "bins": assignment.counts()}, indent=1))


if __name__ == "__main__":
    main()
