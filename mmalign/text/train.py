"""CLI and call: ``python -m mmalign.text.train --config run.yaml [--set key=value ...]`` and
``mmalign.text.train(config)``; the recipe lives in :mod:`mmalign.text.recipes.preference`, CNRPO configs (a
``cnrpo:`` section) go to :mod:`mmalign.text.recipes.cnrpo`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import mmalign
from mmalign.config import ConfigError, add_config_arguments, config_help, load_config, to_dict
from mmalign.entrypoints import make_module_callable
from mmalign.text.config import TextTrainConfig
from mmalign.text.recipes.preference import train

__all__ = ["train", "main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmalign.text.train",
        description="Preference optimisation (DPO, IPO, rDPO, cDPO, hinge, f-DPO, mDPO, mIPO, ...) of a causal LM. "
        "Writes metrics.jsonl, metrics.png, config.yaml, checkpoints/ and final/ (model or LoRA adapter + "
        "tokenizer + config) to output_dir. Objectives: " + ", ".join(mmalign.available_objectives()) + ". "
        "causal_dpo's bins come from a bins: section (source: length quantiles of the response in tokens, a data "
        "column, or a keyword table such as the 60 demographic bins; computed when the data is loaded and written "
        "to output_dir/bins.json) or from a precomputed 'bins' column (python -m mmalign.text.bins).",
        epilog=config_help(TextTrainConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="resume from a checkpoint folder, or from the latest one in output_dir when no value")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return parser


def _is_cnrpo_config(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config reports the problem with the file name
    return isinstance(data, dict) and "cnrpo" in data


def main(argv: Optional[list[str]] = None) -> int:
    import yaml

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.config is not None and _is_cnrpo_config(args.config):
        # CNRPO runs (two stages, own config) are handled by their module; it parses the same arguments.
        from mmalign.text.recipes.cnrpo import main as cnrpo_main

        return cnrpo_main(sys.argv[1:] if argv is None else argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(TextTrainConfig, args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    summary = train(cfg, resume_from_checkpoint=args.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one summary line per job, not per process
        return 0
    metrics = {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float))}
    print(f"done: {summary['global_step']} steps in {summary['train_runtime_s']:.1f}s; final model: "
          f"{summary['final_dir']}; last metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0




make_module_callable(__name__, train)

if __name__ == "__main__":
    sys.exit(main())
