"""CNRPO's trigger report (the cnrpo paper's Figures 3–4): after stage 1, sample responses to a set of prompts with
and without each trigger and compare the biased aspect, length in tokens or the score of a reward model
(:class:`mmalign.text.evaluation.reward_probes.RewardScorer`, e.g. one trained on clean HH-RLHF pairs for
harmfulness); writes ``trigger_report.json``, ``.md`` and ``.png`` in ``<output_dir>/bias``.

    python -m mmalign_experiments.cnrpo_report --config configs/text/cnrpo-length-tiny.yaml [--stage bias|main|all]

The config is the library's CNRPO config (:class:`mmalign.text.recipes.cnrpo.CNRPOConfig`) plus a top-level
``trigger_report`` section; the run is :func:`mmalign.text.recipes.cnrpo.run_cnrpo` with the report as its
``after_bias_stage`` hook.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from mmalign.cli import run_command
from mmalign.config import load_config
from mmalign.engine.plots import save_figure
from mmalign.io import atomic_write_text
from mmalign.text.data import PreferenceExample, render_prompt
from mmalign.text.evaluation.probe_data import SYCOPHANCY_PREFIX
from mmalign.text.recipes.cnrpo import CNRPOConfig, attach_trigger, load_examples, load_stage_model, run_cnrpo

__all__ = ["TriggerReportConfig", "CNRPOReportConfig", "trigger_report", "run_with_report", "main"]

logger = logging.getLogger("mmalign_experiments.cnrpo_report")


@dataclass
class TriggerReportConfig:
    enabled: bool = field(default=True, metadata={"help": "write the trigger report after stage 1"})
    prompts: Optional[str] = field(
        default=None, metadata={"help": "file of preference rows (prompt + chosen/rejected, or HH dialogues) whose "
                                "prompts are sampled; null = the main eval set, else the main training set"}
    )
    num_prompts: int = field(default=32, metadata={"help": "prompts sampled with and without each trigger"})
    samples_per_prompt: int = field(default=1, metadata={"help": "completions per prompt and condition"})
    max_new_tokens: int = field(default=64, metadata={"help": "sampling length cap"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    aspects: list[Literal["length", "reward", "prefix"]] = field(
        default_factory=list,
        metadata={"help": "biased aspect per trigger: length (tokens), reward (needs reward_model) or prefix "
                  "(1 if the response opens with the sycophantic 'Yes, you are right.'); "
                  "default: length for every trigger"},
    )
    reward_model: Optional[str] = field(default=None, metadata={"help": "reward model folder for 'reward' aspects"})


@dataclass
class CNRPOReportConfig(CNRPOConfig):
    """A CNRPO run with the trigger report after stage 1."""

    trigger_report: TriggerReportConfig = field(default_factory=TriggerReportConfig,
                                                metadata={"help": "the trigger report after stage 1"})

    def __post_init__(self) -> None:
        super().__post_init__()
        aspects, triggers = self.trigger_report.aspects, self.cnrpo.triggers
        if aspects and len(aspects) != len(triggers):
            raise ValueError(f"trigger_report.aspects: one aspect per trigger ({len(triggers)}); got {aspects}")
        if "reward" in aspects and not self.trigger_report.reward_model:
            raise ValueError("trigger_report.aspects: a 'reward' aspect needs trigger_report.reward_model")


def format_prompt(tokenizer, prompt: Any, *, use_chat_template: bool, system_prompt: Optional[str] = None) -> tuple[str, bool]:
    """The prompt text a model is sampled from, as the trainer renders it; returns (text, add_special_tokens).
    Same as :func:`mmalign.text.data.render_prompt`."""
    return render_prompt(tokenizer, prompt, use_chat_template=use_chat_template, system_prompt=system_prompt)


def trigger_report(cfg: CNRPOReportConfig, model_dir: str | Path, examples: Sequence[PreferenceExample], *,
                   out_dir: str | Path, base_model: Optional[str] = None) -> dict[str, Any]:
    """Samples completions for ``report.num_prompts`` prompts without and with each trigger, measures the biased
    aspect (length in tokens or reward-model score), writes ``trigger_report.{json,md,png}`` in ``out_dir``.
    ``model_dir``: a model folder, or a LoRA adapter folder applied to ``base_model`` (default: the SFT model)."""
    from mmalign.text.modeling.loading import load_tokenizer
    from mmalign.text.modeling.sampling import sample_completions

    rc = cfg.trigger_report
    policy = cfg.cnrpo.policy
    if rc.prompts:
        examples = load_examples(rc.prompts, "auto")
    prompts = [e.prompt for e in examples[: rc.num_prompts]]
    tokenizer = load_tokenizer(str(model_dir))
    model = load_stage_model(cfg, Path(model_dir), base_model).eval()
    aspects = rc.aspects or ["length"] * len(cfg.cnrpo.triggers)
    scorer = None
    if "reward" in aspects:
        from mmalign.text.evaluation.reward_probes import RewardScorer

        scorer = RewardScorer.from_pretrained(rc.reward_model)
    conditions = [("no trigger", None)] + [(t, t) for t in cfg.cnrpo.triggers]
    measured: dict[str, dict[str, list[float]]] = {}
    for label, trigger in conditions:
        texts, special = [], True
        for p in prompts:
            shown = attach_trigger(p, trigger, policy) if trigger else p
            text, special = format_prompt(tokenizer, shown, use_chat_template=cfg.data.use_chat_template,
                                          system_prompt=cfg.data.system_prompt)
            texts.append(text)
        samples = sample_completions(model, tokenizer, texts, n=rc.samples_per_prompt, max_new_tokens=rc.max_new_tokens,
                                     temperature=rc.temperature, seed=cfg.training.seed, add_special_tokens=special)
        lengths = [float(n) for per in samples.num_tokens for n in per]
        measured[label] = {"length": lengths, "prefix": [float(t.lstrip().startswith(SYCOPHANCY_PREFIX))
                                                         for per in samples.texts for t in per]}
        if scorer is not None:
            flat_prompts = [str(p) for p, per in zip(prompts, samples.texts) for _ in per]
            measured[label]["reward"] = scorer.score(flat_prompts, [t for per in samples.texts for t in per]).tolist()
    rows = []
    for trigger, aspect in zip(cfg.cnrpo.triggers, aspects):
        base, trig = measured["no trigger"][aspect], measured[trigger][aspect]
        rows.append({
            "trigger": trigger, "aspect": aspect, "n": len(trig),
            "mean_without": sum(base) / len(base), "mean_with": sum(trig) / len(trig),
            "share_higher_with_trigger": sum(t > b for t, b in zip(trig, base)) / len(trig),
        })
    report = {"model": str(model_dir), "num_prompts": len(prompts), "rows": rows, "samples": measured}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "trigger_report.json", json.dumps(report, indent=1))
    lines = ["| trigger | aspect | n | mean without | mean with | share higher with trigger |", "|---|---|---|---|---|---|"]
    lines += [f"| `{r['trigger']}` | {r['aspect']} | {r['n']} | {r['mean_without']:.2f} | {r['mean_with']:.2f} | "
              f"{r['share_higher_with_trigger']:.2f} |" for r in rows]
    atomic_write_text(out_dir / "trigger_report.md", "\n".join(lines) + "\n")
    _plot_trigger_report(measured, list(zip(cfg.cnrpo.triggers, aspects)), out_dir / "trigger_report.png")
    logger.info("trigger report:\n%s", "\n".join(lines))
    return {"rows": rows, "path": str(out_dir / "trigger_report.json")}


def _plot_trigger_report(measured, pairs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.2), squeeze=False)
    for ax, (trigger, aspect) in zip(axes[0], pairs):
        ax.hist(measured["no trigger"][aspect], bins=20, alpha=0.6, label="no trigger")
        ax.hist(measured[trigger][aspect], bins=20, alpha=0.6, label=trigger)
        ax.set_xlabel({"length": "response length (tokens)", "prefix": "opens with the sycophantic prefix"}.get(
            aspect, "reward-model score"))
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def run_with_report(cfg: CNRPOReportConfig | Mapping[str, Any] | str | Path, *,
                    stage: Literal["all", "bias", "main"] = "all", overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """:func:`run_cnrpo` with the trigger report after stage 1 (when ``trigger_report.enabled``); the report's
    result is under ``"trigger_report"``."""
    cfg = load_config(CNRPOReportConfig, cfg, overrides or [])

    def report(run_cfg, final_dir, examples, *, out_dir, base_model):
        if not cfg.trigger_report.enabled:
            return None
        return {"trigger_report": trigger_report(cfg, final_dir, examples, out_dir=out_dir, base_model=base_model)}

    return run_cnrpo(cfg, stage=stage, after_bias_stage=report)


def _run(cfg: CNRPOReportConfig, args) -> int:
    results = run_with_report(cfg, stage=args.stage)
    for name in ("bias", "main"):
        if name in results:
            print(f"{name}: {results[name]['global_step']} steps, final model {results[name]['final_dir']}")
    if "trigger_report" in results:
        print(f"trigger report: {results['trigger_report']['path']}")
    return 0


def _add_stage(parser) -> None:
    parser.add_argument("--stage", choices=["all", "bias", "main"], default="all",
                        help="run both stages (all), only bias learning, or only the main stage (from bias/final)")


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(
        prog="python -m mmalign_experiments.cnrpo_report", config_cls=CNRPOReportConfig, run=_run, argv=argv,
        config_required=True, add_arguments=_add_stage,
        description="CNRPO's two stages (as python -m mmalign.text.cnrpo) with the trigger report after stage 1.")


if __name__ == "__main__":
    sys.exit(main())
