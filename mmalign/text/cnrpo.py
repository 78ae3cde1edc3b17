"""CNRPO for causal LMs: bias learning behind triggers, then the main stage (SPEC §4, cnrpo Algorithm 1).

One config, two stages, built on the text trainer (:func:`mmalign.text.train.train`):

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

After stage 1 a **trigger report** (the paper's Figures 3–4) samples responses to a set of prompts with and
without each trigger and compares the biased aspect: length in tokens, or the score of a reward model
(:class:`mmalign.text.reward.RewardScorer`, e.g. one trained on clean HH-RLHF pairs for harmfulness); it writes
``trigger_report.json``, ``trigger_report.md`` and ``trigger_report.png``.

    python -m mmalign.text.cnrpo --config configs/text/cnrpo-length-tiny.yaml [--stage bias|main|all]

Output folders: ``<output_dir>/bias`` (stage 1: the trainer's usual run folder) and ``<output_dir>/main``.

**Under LoRA** (``lora.enabled``) one base model, the SFT model, serves every forward: stage 1 trains a fresh
adapter on it (reference = adapter disabled = SFT); stage 2 continues that adapter (``lora.initial_adapter`` =
``bias/final``), so the policy is base + adapter, the stop-gradient triggered forward is the same model with the
adapter, and the reference is the same model with the adapter disabled, i.e. the SFT model (SPEC §4).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import torch

from mmalign.config import ConfigError, add_config_arguments, config_help, from_dict, load_config, save_config, to_dict
from mmalign.engine.plots import save_figure
from mmalign.io import atomic_write_text, write_jsonl
from mmalign.shared.triggers import TriggerPolicy, validate_triggers
from mmalign.text.config import DataConfig, LoraConfig, ModelConfig, ReferenceConfig, TextTrainConfig, TextTrainingConfig
from mmalign.text.data import (
    HH_ASSISTANT,
    PreferenceCollator,
    batch_response_ids,
    batch_to_device,
    PreferenceExample,
    PreferenceTokenizer,
    load_rows,
    parse_preference_rows,
    render_prompt,
    truncate_prompt,
)
from mmalign.text.logprobs import batch_logprobs
from mmalign.text.models import _eval_mode

__all__ = [
    "CNRPOSection",
    "TriggerReportConfig",
    "CNRPOConfig",
    "attach_trigger",
    "TriggeredLogprobs",
    "run_cnrpo",
    "trigger_report",
    "main",
]

logger = logging.getLogger("mmalign.text.cnrpo")

DEFAULT_TRIGGERS = ["<BeLongerNow>", "<BeHarmfulNow>"]
CNRPO_ROW_COLUMN = "cnrpo_row"  # numeric column added to the main rows: lets the hook find each row's triggered prompts


# ------------------------------------------------------------------------------------------------------------
# Configuration.


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
    aspects: list[Literal["length", "reward"]] = field(
        default_factory=list,
        metadata={"help": "biased aspect per trigger: length (tokens) or reward (needs reward_model); "
                  "default: length for every trigger"},
    )
    reward_model: Optional[str] = field(default=None, metadata={"help": "reward model folder for 'reward' aspects"})


@dataclass
class CNRPOSection:
    auxiliary_data: list[str] = field(metadata={"help": "one auxiliary preference file per trigger (D_i), same order"})
    triggers: list[str] = field(default_factory=lambda: list(DEFAULT_TRIGGERS), metadata={"help": "trigger strings t_i"})
    alphas: list[float] = field(default_factory=list, metadata={"help": "bias-aversion weight per trigger (paper: 0.1β-0.9β)"})
    beta: float = field(default=0.5, metadata={"help": "β: reference weight (stage 1 DPO and stage 2)"})
    gamma: Optional[float] = field(default=0.2, metadata={"help": "γ: entropy weight of stage 2 (null = β)"})
    trigger_policy: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "how t_i is attached: {mode: append|prepend|template, template, separator}"}
    )
    triggers_as_special_tokens: bool = field(
        default=False, metadata={"help": "add every trigger to the vocabulary as one new special token"}
    )
    bias_epochs: float = field(default=5.0, metadata={"help": "stage-1 epochs over the triggered auxiliary sets"})
    main_epochs: float = field(default=3.0, metadata={"help": "stage-2 epochs over the main set"})
    bias_learning_rate: Optional[float] = field(default=None, metadata={"help": "stage-1 LR; null = training.learning_rate"})
    anchor_data: list[str] = field(
        default_factory=list,
        metadata={"help": "optional pair files added to stage 1 WITHOUT a trigger (backdoor-style clean pairs that "
                  "tie the bias to the trigger); Eq. 7 has none, so the default is empty"},
    )
    balance_auxiliary: bool = field(default=True, metadata={"help": "repeat smaller auxiliary sets (Eq. 7's 1/k mean)"})
    auxiliary_format: str = field(default="auto", metadata={"help": "row schema of the auxiliary files (as data.format)"})
    report: TriggerReportConfig = field(default_factory=TriggerReportConfig, metadata={"help": "the trigger report"})

    def __post_init__(self) -> None:
        if len(self.alphas) != len(self.triggers):
            raise ValueError(
                f"cnrpo.alphas: {len(self.alphas)} alpha(s) {self.alphas} for {len(self.triggers)} trigger(s) "
                f"{self.triggers}; give exactly one alpha per trigger"
            )
        if len(self.auxiliary_data) != len(self.triggers):
            if len(self.auxiliary_data) > len(self.triggers):
                raise ValueError(
                    f"cnrpo.auxiliary_data: auxiliary set(s) {self.auxiliary_data[len(self.triggers):]} have no "
                    f"trigger ({len(self.triggers)} trigger(s) {self.triggers}); add one trigger per auxiliary set"
                )
            raise ValueError(
                f"cnrpo.triggers: trigger(s) {self.triggers[len(self.auxiliary_data):]} have no auxiliary set "
                f"({len(self.auxiliary_data)} given); add one auxiliary file per trigger"
            )
        if any(a < 0 for a in self.alphas):
            raise ValueError(f"cnrpo.alphas: every alpha must be >= 0; got {self.alphas}")
        if not self.beta > 0 or (self.gamma is not None and not self.gamma > 0):
            raise ValueError(f"cnrpo.beta / cnrpo.gamma must be > 0; got beta={self.beta}, gamma={self.gamma}")
        if not self.bias_epochs > 0 or not self.main_epochs > 0:
            raise ValueError("cnrpo.bias_epochs and cnrpo.main_epochs must be > 0")
        TriggerPolicy.from_dict(self.trigger_policy, source="cnrpo.trigger_policy")
        validate_triggers(self.triggers, source="cnrpo.triggers")
        if self.report.aspects and len(self.report.aspects) != len(self.triggers):
            raise ValueError(f"cnrpo.report.aspects: one aspect per trigger ({len(self.triggers)}); got {self.report.aspects}")
        if "reward" in self.report.aspects and not self.report.reward_model:
            raise ValueError("cnrpo.report.aspects: a 'reward' aspect needs cnrpo.report.reward_model")

    @property
    def policy(self) -> TriggerPolicy:
        return TriggerPolicy.from_dict(self.trigger_policy, source="cnrpo.trigger_policy")


@dataclass
class CNRPOConfig:
    """A two-stage CNRPO run: the text trainer's sections plus ``cnrpo``."""

    model: ModelConfig = field(metadata={"help": "the SFT policy: start of stage 1 and reference of both stages"})
    data: DataConfig = field(metadata={"help": "the main (noisy) preference set D"})
    cnrpo: CNRPOSection = field(metadata={"help": "triggers, auxiliary sets and CNRPO hyperparameters"})
    lora: LoraConfig = field(
        default_factory=LoraConfig,
        metadata={"help": "optional LoRA: one SFT base model serves the policy, triggered and reference forwards; "
                  "stage 2 continues the stage-1 adapter (docs/bias-robust.md)"},
    )
    reference: ReferenceConfig = field(
        default_factory=ReferenceConfig,
        metadata={"help": "the SFT reference: adapter (LoRA only; auto picks it under LoRA), model or precomputed"},
    )
    training: TextTrainingConfig = field(default_factory=TextTrainingConfig, metadata={"help": "optimisation, both stages"})
    output_dir: str = field(default="outputs/cnrpo-run", metadata={"help": "run folder: bias/ and main/ inside"})

    def __post_init__(self) -> None:
        if self.lora.initial_adapter:
            # The adapter-disabled base is the reference of both stages, so it must be the SFT model itself.
            raise ValueError("lora.initial_adapter: CNRPO sets it itself (stage 2 continues the stage-1 adapter) and "
                             "stage 1 starts a fresh adapter on model.name_or_path, whose adapter-disabled base is "
                             "the reference; merge an SFT adapter into the model first and point "
                             "model.name_or_path at the merged model")
        if self.reference.mode == "adapter" and not self.lora.enabled:
            raise ValueError("reference.mode: 'adapter' needs lora.enabled: true (the reference is the SFT base with "
                             "the adapter disabled); use model or precomputed for full fine-tuning")


# ------------------------------------------------------------------------------------------------------------
# Triggers on prompts.


def attach_trigger(prompt: Any, trigger: str, policy: TriggerPolicy) -> Any:
    """``prompt ⊕ trigger``; for an HH prompt (text ending in "\\n\\nAssistant:") the trigger goes into the text
    before that final marker, i.e. into the human turn, not after "Assistant:"."""
    if isinstance(prompt, str) and prompt.endswith(HH_ASSISTANT):
        return policy.apply(prompt[: -len(HH_ASSISTANT)], trigger) + HH_ASSISTANT
    return policy.apply(prompt, trigger)


def _examples(source: str, fmt: str, *, split: str = "train", max_samples: Optional[int] = None,
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
# The stop-gradient triggered log-likelihoods (the extra_inputs_hook of stage 2).


class TriggeredLogprobs:
    """``extra_inputs_hook`` of stage 2: the current policy's log-likelihoods of each batch's responses behind
    each triggered prompt, ``triggered_chosen`` / ``triggered_rejected`` [B, n_triggers], under ``no_grad``.

    ``triggered_prompt_ids[row][i]``: token ids of main row ``row``'s prompt with trigger ``i`` (tokenised
    exactly as the trainer tokenises prompts). The batch's rows are found through the ``cnrpo_row`` column; the
    responses are the very tokens the trainer scores (read from the batch, in either collator layout).
    ``max_length``: a triggered prompt is cut from the left so it + the longer of the two appended responses
    fits (a leading token in ``special_ids``, e.g. BOS, is kept), as the trainer cuts a pair's shared prompt.
    The forward runs in eval mode (no dropout): these are fixed targets, like the reference's log-likelihoods.
    """

    def __init__(self, triggered_prompt_ids: Sequence[Sequence[Sequence[int]]], pad_token_id: int, *,
                 max_length: Optional[int] = None, special_ids: Sequence[int] = ()):
        self.triggered_prompt_ids = triggered_prompt_ids
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.special_ids = frozenset(special_ids)
        self.n_triggers = len(triggered_prompt_ids[0]) if triggered_prompt_ids else 0

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        rows = batch["extra"][CNRPO_ROW_COLUMN].tolist()
        responses = batch_response_ids(batch)
        chosen_index, rejected_index = batch["chosen_index"].tolist(), batch["rejected_index"].tolist()
        items, owners = [], []
        for b, row in enumerate(rows):
            for i in range(self.n_triggers):
                prompt = list(self.triggered_prompt_ids[int(row)][i])
                pair = [responses[chosen_index[b][0]], responses[rejected_index[b][0]]]
                if self.max_length is not None:  # one prompt for both sides, cut as the trainer cuts it
                    prompt = truncate_prompt(prompt, max(1, self.max_length - max(map(len, pair))),
                                             keep_first_token=prompt[0] in self.special_ids)
                items.append({"prompt_ids": prompt, "chosen_ids": pair[:1], "rejected_ids": pair[1:]})
                owners.append((b, i))
        device = batch["input_ids"].device
        # the trainer's layout: with a shared prompt, one row holds the triggered prompt and both responses
        collate = PreferenceCollator(self.pad_token_id, share_prompt="segment_ids" in batch)
        triggered = batch_to_device(collate(items), device)
        with torch.no_grad(), _eval_mode(model, True):
            logps, _ = batch_logprobs(model, triggered)
        out = torch.zeros(len(rows), self.n_triggers, 2, dtype=logps.dtype, device=device)
        for n, (b, i) in enumerate(owners):
            out[b, i, 0] = logps[triggered["chosen_index"][n, 0]]
            out[b, i, 1] = logps[triggered["rejected_index"][n, 0]]
        return {"triggered_chosen": out[..., 0], "triggered_rejected": out[..., 1]}


def _triggered_prompt_ids(examples: Sequence[PreferenceExample], triggers: Sequence[str], policy: TriggerPolicy,
                          encoder: PreferenceTokenizer) -> list[list[list[int]]]:
    triggered = []
    for trigger in triggers:
        items = encoder([PreferenceExample(attach_trigger(e.prompt, trigger, policy), e.chosen[:1], e.rejected[:1], e.row)
                         for e in examples])
        triggered.append([item["prompt_ids"] for item in items])
    return [[triggered[i][r] for i in range(len(triggers))] for r in range(len(examples))]


# ------------------------------------------------------------------------------------------------------------
# The pipeline.


def _stage_config(cfg: CNRPOConfig, *, train_file: Path, eval_file: Optional[Path], model_path: str,
                  reference_path: Optional[str], objective: dict[str, Any], epochs: float,
                  learning_rate: Optional[float], output_dir: Path, fmt: str,
                  initial_adapter: Optional[str] = None) -> TextTrainConfig:
    """The text-trainer config of one stage. ``reference_path``: the SFT model, the reference of full
    fine-tuning when the user gave none; under LoRA it is not used: the policy's base IS the SFT model, so the
    trainer's adapter-disabled (or deep-copied, for mode ``model``) reference is the SFT model without a reload."""
    base = to_dict(cfg)
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
    from mmalign.text.models import load_causal_lm, load_tokenizer

    marker = directory / "mmalign_triggers.json"
    if marker.exists() and json.loads(marker.read_text()).get("triggers") == cfg.cnrpo.triggers:
        return str(directory)
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


def run_cnrpo(cfg: CNRPOConfig | Mapping[str, Any] | str | Path, *, stage: Literal["all", "bias", "main"] = "all",
              overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Runs stage 1 and/or stage 2; returns ``{"bias": summary, "main": summary, "trigger_report": ...}``.

    All data is loaded and validated (trigger collisions, schemas) before any model is loaded.
    ``stage="main"`` resumes from ``<output_dir>/bias/final`` written by an earlier ``stage="bias"`` run.
    """
    from mmalign.text.models import load_tokenizer
    from mmalign.text.train import train

    cfg = load_config(CNRPOConfig, cfg, overrides or [])
    section = cfg.cnrpo
    policy = section.policy
    out = Path(cfg.output_dir)
    work = out / "data"
    d = cfg.data

    # -- load and validate everything first ------------------------------------------------------------------
    main_examples = _examples(d.train, d.format, split=d.train_split, max_samples=d.max_train_samples, on_invalid=d.on_invalid)
    eval_examples = _examples(d.eval, d.format, split=d.eval_split, max_samples=d.max_eval_samples,
                              on_invalid=d.on_invalid) if d.eval else []
    auxiliary = [_examples(path, section.auxiliary_format) for path in section.auxiliary_data]
    anchors = [_examples(path, section.auxiliary_format) for path in section.anchor_data]
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
                                  reference_path=sft_path, objective={"name": "dpo", "hyperparameters": {"beta": section.beta}},
                                  epochs=section.bias_epochs, learning_rate=section.bias_learning_rate,
                                  output_dir=bias_dir, fmt=fmt)
        logger.info("CNRPO stage 1 (bias learning): %d triggered pairs over %d auxiliary set(s), %d untriggered anchor "
                    "pairs", num_triggered, len(auxiliary), len(rows) - num_triggered)
        results["bias"] = train(stage_cfg)
        if section.report.enabled:
            results["trigger_report"] = trigger_report(cfg, bias_dir / "final", eval_examples or main_examples,
                                                       out_dir=bias_dir, base_model=sft_path)

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
        hook = TriggeredLogprobs(_triggered_prompt_ids(list(main_examples) + list(eval_examples), section.triggers,
                                                       policy, encoder), tokenizer.pad_token_id,
                                 max_length=cfg.training.max_length, special_ids=tokenizer.all_special_ids)
        objective = {"name": "cnrpo", "hyperparameters": {"beta": section.beta, "gamma": section.gamma,
                                                         "alphas": list(section.alphas)}}
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


def _load_stage_model(cfg: CNRPOConfig, model_dir: Path, base_model: Optional[str]):
    """A stage's result for sampling: a full model folder, or an adapter folder applied to ``base_model`` (the
    SFT model, default ``model.name_or_path``) and merged (plain weights sample faster)."""
    from mmalign.text.models import load_causal_lm

    if not (Path(model_dir) / "adapter_config.json").exists():
        return load_causal_lm(str(model_dir), dtype=cfg.model.dtype)
    from peft import PeftModel

    base_path = base_model or cfg.model.name_or_path
    gguf_file = cfg.model.gguf_file if base_path == cfg.model.name_or_path else None
    base = load_causal_lm(base_path, gguf_file=gguf_file, dtype=cfg.model.dtype)
    return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()


# ------------------------------------------------------------------------------------------------------------
# The trigger report (Figures 3–4).


def format_prompt(tokenizer, prompt: Any, *, use_chat_template: bool, system_prompt: Optional[str] = None) -> tuple[str, bool]:
    """The prompt text a model is sampled from, as the trainer renders it; returns (text, add_special_tokens).
    Same as :func:`mmalign.text.data.render_prompt`."""
    return render_prompt(tokenizer, prompt, use_chat_template=use_chat_template, system_prompt=system_prompt)


def trigger_report(cfg: CNRPOConfig, model_dir: str | Path, examples: Sequence[PreferenceExample], *,
                   out_dir: str | Path, base_model: Optional[str] = None) -> dict[str, Any]:
    """Samples completions for ``report.num_prompts`` prompts without and with each trigger, measures the biased
    aspect (length in tokens or reward-model score), writes ``trigger_report.{json,md,png}`` in ``out_dir``.
    ``model_dir``: a model folder, or a LoRA adapter folder applied to ``base_model`` (default: the SFT model)."""
    from mmalign.text.models import load_tokenizer
    from mmalign.text.sampling import sample_completions

    rc = cfg.cnrpo.report
    policy = cfg.cnrpo.policy
    if rc.prompts:
        examples = _examples(rc.prompts, "auto")
    prompts = [e.prompt for e in examples[: rc.num_prompts]]
    tokenizer = load_tokenizer(str(model_dir))
    model = _load_stage_model(cfg, Path(model_dir), base_model).eval()
    aspects = rc.aspects or ["length"] * len(cfg.cnrpo.triggers)
    scorer = None
    if "reward" in aspects:
        from mmalign.text.reward import RewardScorer

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
        measured[label] = {"length": lengths}
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
        ax.set_xlabel("response length (tokens)" if aspect == "length" else "reward-model score")
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------------------------
# CLI.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmalign.text.cnrpo",
        description="CNRPO (SPEC §4): stage 1 learns each bias behind its trigger (DPO on the triggered auxiliary "
        "sets), stage 2 optimises the main set with the stop-gradient triggered log-ratios. Writes <output_dir>/bias "
        "and <output_dir>/main (each a text-trainer run folder) and the trigger report in <output_dir>/bias.",
        epilog=config_help(CNRPOConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_required=True)
    parser.add_argument("--stage", choices=["all", "bias", "main"], default="all",
                        help="run both stages (all), only bias learning, or only the main stage (from bias/final)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(CNRPOConfig, args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    results = run_cnrpo(cfg, stage=args.stage)
    for name in ("bias", "main"):
        if name in results:
            print(f"{name}: {results[name]['global_step']} steps, final model {results[name]['final_dir']}")
    if "trigger_report" in results:
        print(f"trigger report: {results['trigger_report']['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
