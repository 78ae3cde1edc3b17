"""CLI and call: ``python -m mmalign.text.train --config run.yaml [--set key=value ...]`` and
``mmalign.text.train(config)``; the recipe lives in :mod:`mmalign.text.recipes.preference`, CNRPO configs (a
``cnrpo:`` section) go to :mod:`mmalign.text.recipes.cnrpo`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from mmalign.cli import run_command
from mmalign.entrypoints import make_module_callable
from mmalign.shared.objectives.registry import available_objectives
from mmalign.text.config import TextTrainConfig
from mmalign.text.recipes.preference import train

__all__ = ["train", "main"]

DESCRIPTION = (
    "Preference optimisation (DPO, IPO, rDPO, cDPO, hinge, f-DPO, mDPO, mIPO, ...) of a causal LM. Writes "
    "metrics.jsonl, metrics.png, config.yaml, checkpoints/ and final/ (model or LoRA adapter + tokenizer + config) "
    "to output_dir. Objectives: {objectives}. causal_dpo's bins come from a bins: section (source: length quantiles "
    "of the response in tokens, a data column, or a keyword table such as the 60 demographic bins; computed when "
    "the data is loaded and written to output_dir/bins.json) or from a precomputed 'bins' column (python -m "
    "mmalign.text.bins). A config with a cnrpo: section runs CNRPO's two stages (python -m mmalign.text.cnrpo)."
)


def _config_argument(argv: Sequence[str]) -> Optional[Path]:
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return Path(argv[index + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def _is_cnrpo_config(path: Optional[Path]) -> bool:
    import yaml

    if path is None:
        return False
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the config loader reports the problem with the file name
    return isinstance(data, dict) and "cnrpo" in data


def _run(cfg: TextTrainConfig, args) -> int:
    from accelerate import PartialState

    result = train(cfg)
    if PartialState().is_main_process:  # one summary line per job, not per process
        print(result.summary_line())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_cnrpo_config(_config_argument(argv)):
        # CNRPO runs (two stages, own config) are handled by their module; it parses the same arguments.
        from mmalign.text.recipes.cnrpo import main as cnrpo_main

        return cnrpo_main(argv)
    return run_command(prog="python -m mmalign.text.train", config_cls=TextTrainConfig, run=_run, argv=argv,
                       description=DESCRIPTION.format(objectives=", ".join(available_objectives())))


make_module_callable(__name__, train)

if __name__ == "__main__":
    sys.exit(main())
