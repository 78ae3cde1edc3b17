"""CNRPO for causal LMs: bias learning behind triggers, then the main stage (SPEC §4, cnrpo Algorithm 1).

One config, two stages, built on the text trainer (:func:`mmalign.text.recipes.preference.train`):

1. **Bias learning** (Eq. 7): every auxiliary set ``D_i`` gets its trigger ``t_i`` attached to each prompt
   (:class:`mmalign.shared.triggers.TriggerPolicy`: append / prepend / template; an HH prompt ending in
   "\\n\\nAssistant:" gets the trigger in the human turn) and DPO with β runs on their union, starting from and
   referenced to the SFT model. With ``balance_auxiliary`` the smaller sets are repeated up to the largest, so the
   loss is ``(1/k) Σ_i L_DPO(D_i^t)`` as in Eq. 7 rather than a size-weighted mean. Optional ``anchor_data``
   adds untriggered pairs (as backdoor poisoning mixes clean data), which helps small models tie the bias to
   the trigger instead of learning it everywhere.
2. **Main stage** (Eq. 14): the noisy main set with the ``cnrpo`` objective (β, γ, one α per trigger), starting
   from the stage-1 model, reference = the SFT model. Every step, a no-grad forward of the *current* policy scores
   the same responses behind each triggered prompt ``x ⊕ t_i`` (the stop-gradient term); the trainer receives
   them through its ``extra_inputs_hook``.

A hook after stage 1 (``after_bias_stage``) can inspect the stage-1 model; the trigger report of the paper's
Figures 3–4 is such a hook, in the experiments (``python -m mmalign_experiments.cnrpo_report``).

    python -m mmalign.text.cnrpo --config configs/text/cnrpo-length-tiny.yaml [--stage bias|main|all]

Output folders: ``<output_dir>/bias`` (stage 1: the trainer's usual run folder) and ``<output_dir>/main``.

**Under LoRA** (``lora.enabled``) one base model, the SFT model, serves every forward: stage 1 trains a fresh
adapter on it (reference = adapter disabled = SFT); stage 2 continues that adapter (``lora.initial_adapter`` =
``bias/final``), so the policy is base + adapter, the stop-gradient triggered forward is the same model with the
adapter, and the reference is the same model with the adapter disabled, i.e. the SFT model (SPEC §4).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence


from mmalign.cli import run_command
from mmalign.config import from_dict, load_config, save_config, to_dict
from mmalign.io import write_jsonl
from mmalign.shared.triggers import validate_triggers
from mmalign.text.config import TextTrainConfig
from mmalign.text.data import PreferenceExample, PreferenceTokenizer, load_rows, parse_preference_rows
from mmalign.text.recipes.cnrpo_config import CNRPO_ROW_COLUMN, DEFAULT_TRIGGERS, CNRPOConfig, CNRPOSection
from mmalign.text.recipes.cnrpo_triggers import TriggeredLogprobs, attach_trigger, triggered_prompt_ids

__all__ = [
    "CNRPOSection",
    "CNRPOConfig",
    "DEFAULT_TRIGGERS",
    "attach_trigger",
    "TriggeredLogprobs",
    "run_cnrpo",
    "load_examples",
    "load_stage_model",
    "main",
]

logger = logging.getLogger("mmalign.text.recipes.cnrpo")

# ------------------------------------------------------------------------------------------------------------
# Triggers on prompts.


def load_examples(source: str, fmt: str, *, split: str = "train", max_samples: Optional[int] = None,
              on_invalid: str = "error") -> list[PreferenceExample]:
    rows = load_rows(source, split=split, max_samples=max_samples)
    examples, _ = parse_preference_rows(rows, fmt=fmt, source=source, on_invalid=on_invalid)
    return examples


def _example_row(example: PreferenceExample, prompt: Any = None) -> dict[str, Any]:
    """A pairs/conversational row for the trainer's data loader (one chosen, one rejected)."""
    if len(example.chosen) != 1 or len(example.rejected) != 1:
        raise ValueError(f"row {example.row}: CNRPO needs pairs (one chosen, one rejected response)")
    row = {"prompt": example.prompt if prompt is None else prompt, "chosen": example.chosen[0],
           "rejected": example.rejected[0]}
    row.update(example.extra)
    return row


def _format_of(examples: Sequence[PreferenceExample]) -> str:
    return "pairs" if all(isinstance(e.prompt, str) and isinstance(e.chosen[0], str) for e in examples) else "conversational"


# ------------------------------------------------------------------------------------------------------------
# The pipeline.


def _stage_config(cfg: CNRPOConfig, *, train_file: Path, eval_file: Optional[Path], model_path: str,
                  reference_path: Optional[str], objective: dict[str, Any], epochs: float,
                  learning_rate: Optional[float], output_dir: Path, fmt: str,
                  initial_adapter: Optional[str] = None) -> TextTrainConfig:
    """The text-trainer config of one stage. ``reference_path``: the SFT model, the reference of full
    fine-tuning when the user gave none; under LoRA it is not used: the policy's base IS the SFT model, so the
    trainer's adapter-disabled (or deep-copied, for mode ``model``) reference is the SFT model without a reload."""
    # only the trainer's sections: a subclass (e.g. the experiments' report config) may add its own
    base = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(CNRPOConfig)}
    base.pop("cnrpo")
    if cfg.lora.enabled:
        base["lora"] = {**base["lora"], "initial_adapter": initial_adapter}
        reference_path = None
    base["model"] = {**base["model"], "name_or_path": model_path, "gguf_file": None if model_path != cfg.model.name_or_path else cfg.model.gguf_file}
    if model_path != cfg.model.name_or_path:
        base["model"]["tokenizer"] = None
    base["data"] = {**base["data"], "train": str(train_file), "eval": str(eval_file) if eval_file else None,
                    "format": fmt, "max_train_samples": None, "max_eval_samples": None, "train_split": "train",
                    "eval_split": "train"}
    reference = dict(base["reference"])
    if reference_path is not None and not reference.get("name_or_path"):
        reference["name_or_path"] = reference_path
        reference["gguf_file"] = cfg.model.gguf_file if reference_path == cfg.model.name_or_path else None
    if reference["mode"] == "auto" and not cfg.lora.enabled:  # under LoRA the trainer's auto is the adapter reference
        reference["mode"] = "model"
    base["reference"] = reference
    base["objective"] = objective
    training = dict(base["training"])
    training["num_epochs"] = epochs
    training["max_steps"] = -1
    if learning_rate is not None:
        training["learning_rate"] = learning_rate
    base["training"] = training
    base["output_dir"] = str(output_dir)
    return from_dict(TextTrainConfig, base, source="cnrpo stage config")


def _prepare_special_tokens(cfg: CNRPOConfig, directory: Path) -> str:
    """Adds the triggers as special tokens to the SFT model + tokenizer, saved once into ``directory``."""
    from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer

    marker = directory / "mmalign_triggers.json"
    if marker.exists() and json.loads(marker.read_text()).get("triggers") == cfg.cnrpo.triggers:
        return str(directory)
    from mmalign.hub import check_sources

    check_sources([("model.name_or_path", cfg.model.name_or_path, "model"),
                   ("model.tokenizer", cfg.model.tokenizer, "model")])
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               gguf_file=None if cfg.model.tokenizer else cfg.model.gguf_file)
    model = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype)
    added = tokenizer.add_tokens(list(cfg.cnrpo.triggers), special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "mmalign_triggers.json").write_text(json.dumps({"triggers": cfg.cnrpo.triggers, "added": added}))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return str(directory)


AfterBiasStage = Callable[..., Optional[Mapping[str, Any]]]


def run_cnrpo(cfg: CNRPOConfig | Mapping[str, Any] | str | Path, *, stage: Literal["all", "bias", "main"] = "all",
              overrides: Optional[list[str]] = None, after_bias_stage: Optional[AfterBiasStage] = None) -> dict[str, Any]:
    """Runs stage 1 and/or stage 2; returns ``{"bias": summary, "main": summary}`` plus what ``after_bias_stage``
    returns: called after stage 1 as ``after_bias_stage(cfg, final_dir, examples, out_dir=, base_model=)`` (the
    experiments' trigger report is one).

    All data is loaded and validated (trigger collisions, schemas) before any model is loaded.
    ``stage="main"`` resumes from ``<output_dir>/bias/final`` written by an earlier ``stage="bias"`` run.
    """
    from mmalign.text.modeling.loading import load_tokenizer
    from mmalign.text.recipes.preference import train

    if not isinstance(cfg, CNRPOConfig) or overrides:
        cfg = load_config(CNRPOConfig, cfg, overrides or [])
    section = cfg.cnrpo
    policy = section.policy
    out = Path(cfg.output_dir)
    work = out / "data"
    d = cfg.data

    # -- load and validate everything first ------------------------------------------------------------------
    main_examples = load_examples(d.train, d.format, split=d.train_split, max_samples=d.max_train_samples, on_invalid=d.on_invalid)
    eval_examples = load_examples(d.eval, d.format, split=d.eval_split, max_samples=d.max_eval_samples,
                              on_invalid=d.on_invalid) if d.eval else []
    auxiliary = [load_examples(path, section.auxiliary_format) for path in section.auxiliary_data]
    anchors = [load_examples(path, section.auxiliary_format) for path in section.anchor_data]
    validate_triggers(section.triggers, (e.prompt for e in main_examples), source=f"{d.train} (main set)")
    if eval_examples:
        validate_triggers(section.triggers, (e.prompt for e in eval_examples), source=f"{d.eval} (main eval set)")
    for path, examples in zip(section.auxiliary_data, auxiliary):
        validate_triggers(section.triggers, (e.prompt for e in examples), source=f"{path} (auxiliary set)")
    for path, examples in zip(section.anchor_data, anchors):
        validate_triggers(section.triggers, (e.prompt for e in examples), source=f"{path} (anchor set)")

    sft_path = cfg.model.name_or_path
    if section.triggers_as_special_tokens:
        sft_path = _prepare_special_tokens(cfg, out / "sft-with-triggers")
    results: dict[str, Any] = {}
    bias_dir, main_dir = out / "bias", out / "main"
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "cnrpo_config.yaml")

    # -- stage 1: bias learning on the triggered auxiliary sets ----------------------------------------------------
    if stage in ("all", "bias"):
        target = max(len(a) for a in auxiliary) if section.balance_auxiliary else None
        rows = []
        for trigger, examples in zip(section.triggers, auxiliary):
            triggered = [_example_row(e, attach_trigger(e.prompt, trigger, policy)) for e in examples]
            if target is not None:
                triggered = [triggered[i % len(triggered)] for i in range(target)]
            rows.extend(triggered)
        num_triggered = len(rows)
        rows.extend(_example_row(e) for a in anchors for e in a)
        fmt = _format_of([e for a in auxiliary + anchors for e in a])
        train_file = write_jsonl(work / "bias_train.jsonl", rows)
        stage_cfg = _stage_config(cfg, train_file=train_file, eval_file=None, model_path=sft_path,
                                  reference_path=sft_path, objective={"name": "dpo", "beta": section.beta},
                                  epochs=section.bias_epochs, learning_rate=section.bias_learning_rate,
                                  output_dir=bias_dir, fmt=fmt)
        logger.info("CNRPO stage 1 (bias learning): %d triggered pairs over %d auxiliary set(s), %d untriggered anchor "
                    "pairs", num_triggered, len(auxiliary), len(rows) - num_triggered)
        results["bias"] = train(stage_cfg)
        if after_bias_stage is not None:  # e.g. the trigger report of mmalign_experiments.cnrpo_report
            results.update(after_bias_stage(cfg, bias_dir / "final", eval_examples or main_examples,
                                            out_dir=bias_dir, base_model=sft_path) or {})

    # -- stage 2: the main CNRPO loss ---------------------------------------------------------------------------------
    if stage in ("all", "main"):
        start = _stage_one_output(bias_dir / "final", lora=cfg.lora.enabled)
        tokenizer = load_tokenizer(str(start))
        encoder = PreferenceTokenizer(
            tokenizer, max_prompt_length=cfg.training.max_prompt_length,
            max_response_length=cfg.training.max_response_length, max_length=cfg.training.max_length,
            use_chat_template=d.use_chat_template, system_prompt=d.system_prompt,
        )
        main_rows = []
        for index, example in enumerate(main_examples):
            row = _example_row(example)
            row[CNRPO_ROW_COLUMN] = index
            main_rows.append(row)
        fmt = _format_of(main_examples)
        train_file = write_jsonl(work / "main_train.jsonl", main_rows)
        # Eval rows continue the row numbering, so one hook serves training and evaluation batches.
        eval_file = None
        if eval_examples:
            offset = len(main_examples)
            eval_rows = [{**_example_row(e), CNRPO_ROW_COLUMN: offset + i} for i, e in enumerate(eval_examples)]
            eval_file = write_jsonl(work / "main_eval.jsonl", eval_rows)
        hook = TriggeredLogprobs(triggered_prompt_ids(list(main_examples) + list(eval_examples), section.triggers,
                                                       policy, encoder), tokenizer.pad_token_id,
                                 max_length=cfg.training.max_length, special_ids=tokenizer.all_special_ids)
        objective = {"name": "cnrpo", "beta": section.beta, "gamma": section.gamma, "alphas": list(section.alphas)}
        # Full fine-tuning continues the stage-1 model; LoRA continues the stage-1 adapter on the SFT base.
        stage_cfg = _stage_config(cfg, train_file=train_file, eval_file=eval_file,
                                  model_path=sft_path if cfg.lora.enabled else str(start),
                                  reference_path=sft_path, objective=objective, epochs=section.main_epochs,
                                  learning_rate=None, output_dir=main_dir, fmt=fmt,
                                  initial_adapter=str(start) if cfg.lora.enabled else None)
        logger.info("CNRPO stage 2 (main): %d pairs, alphas %s, gamma %s, beta %s", len(main_rows), section.alphas,
                    section.gamma, section.beta)
        entropy_weight = (section.beta if section.gamma is None else section.gamma) + sum(section.alphas) - section.beta
        if abs(entropy_weight) > 1e-9:
            # Eq. 8's entropy weight γ − β + Σα: nonzero, a policy equal to its reference already gets
            # (γ + Σα − β)·h_ref(x) inside the sigmoid, a raw log-likelihood margin that favours the less likely
            # (e.g. the longer) response when positive (docs/bias-robust.md, length-bias runs)
            logger.warning("CNRPO: gamma + sum(alphas) - beta = %.3g, not 0: the logit carries an offset of that "
                           "times the reference's raw margin; gamma + sum(alphas) = beta removes it", entropy_weight)
        results["main"] = train(stage_cfg, extra_inputs_hook=hook)
    return results


def _stage_one_output(final: Path, *, lora: bool) -> Path:
    """The stage-1 result stage 2 starts from: a full model folder, or under LoRA an adapter folder."""
    is_adapter = (final / "adapter_config.json").exists()
    is_model = (final / "config.json").exists()
    if not is_adapter and not is_model:
        raise FileNotFoundError(f"stage 'main' starts from the stage-1 {'adapter' if lora else 'model'} {final}, which "
                                "does not exist; run --stage bias (or all) first")
    if lora and not is_adapter:
        raise ValueError(f"lora.enabled: the stage-1 result {final} is a full model (stage 1 ran without LoRA); run "
                         "stage 1 again with lora.enabled: true, or set lora.enabled: false")
    if not lora and is_adapter:
        raise ValueError(f"lora.enabled: the stage-1 result {final} is a LoRA adapter; set lora.enabled: true (stage 2 "
                         "continues the adapter on the SFT model), or run stage 1 again without LoRA")
    return final


def load_stage_model(cfg: CNRPOConfig, model_dir: Path, base_model: Optional[str]):
    """A stage's result for sampling: a full model folder, or an adapter folder applied to ``base_model`` (the
    SFT model, default ``model.name_or_path``) and merged (plain weights sample faster)."""
    from mmalign.text.modeling.loading import load_causal_lm

    if not (Path(model_dir) / "adapter_config.json").exists():
        return load_causal_lm(str(model_dir), dtype=cfg.model.dtype)
    from peft import PeftModel

    base_path = base_model or cfg.model.name_or_path
    gguf_file = cfg.model.gguf_file if base_path == cfg.model.name_or_path else None
    base = load_causal_lm(base_path, gguf_file=gguf_file, dtype=cfg.model.dtype)
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()


# ------------------------------------------------------------------------------------------------------------
# CLI.


def _add_stage(parser) -> None:
    parser.add_argument("--stage", choices=["all", "bias", "main"], default="all",
                        help="run both stages (all), only bias learning, or only the main stage (from bias/final)")


def _run(cfg: CNRPOConfig, args) -> int:
    results = run_cnrpo(cfg, stage=args.stage)
    for name in ("bias", "main"):
        if name in results:
            print(f"{name}: {results[name].global_step} steps, final model {results[name].final_dir}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(
        prog="python -m mmalign.text.cnrpo", config_cls=CNRPOConfig, run=_run, argv=argv, config_required=True,
        add_arguments=_add_stage,
        description="CNRPO (SPEC §4): stage 1 learns each bias behind its trigger (DPO on the triggered auxiliary "
        "sets), stage 2 optimises the main set with the stop-gradient triggered log-ratios. Writes <output_dir>/bias "
        "and <output_dir>/main (each a text-trainer run folder). The trigger report after stage 1 is an experiment: "
        "python -m mmalign_experiments.cnrpo_report.")
