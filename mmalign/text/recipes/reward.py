"""Reward models, vanilla and causal (CRM), trained with Bradley–Terry plus the binned MMD penalty (SPEC §5).

A reward model is ``AutoModelForSequenceClassification`` with one output (LoRA optional), scoring
``prompt ⊕ response``. The loss of a batch of pairs is

    −log σ(r(x, y_w) − r(x, y_l))  +  λ · Σ_{m<m'} MMD²(P_m, P_m')

with the penalty (thesis Eq. 4.4) over the bins of a spurious factor (:mod:`mmalign.text.data.bins`: length quantiles,
a dataset column, a keyword table), measured on the last hidden state at the scored token (``representation: hidden``) or on
the reward itself (``representation: reward``); *unconditional* over all responses of the batch, *conditional* inside the
chosen and inside the rejected responses. λ = 0 (or no ``bins``) is the vanilla reward model.

After training (and every ``eval_steps``) it reports on the eval pairs: pairwise accuracy, the Pearson correlation
of reward with response length, per-bin reward statistics, and the measured MMD of the reward between bins;
optional probes (``probes: [sycophancy, decisions]``) measure the reward that a spurious factor alone buys.

    python -m mmalign.text.reward --config configs/text/reward-sycophancy-crm.yaml [--set crm.lam=10]
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F

from mmalign.cli import run_command
from mmalign.config import ConfigError, load_config
from mmalign.engine.sections import OLD_DATA_KEYS, OLD_TOP_KEYS
from mmalign.engine.plots import save_figure
from mmalign.io import atomic_write_text
from mmalign.shared.mmd import binned_mmd_penalty
from mmalign.text.data.reward_rows import load_reward_rows
from mmalign.text.data.bins import BinSpec, assign_bins
from mmalign.text.config import LoraConfig, ModelConfig, TextTrainingConfig
from mmalign.text.modeling.reward_model import pad_sequences, render_pair, reward_forward
from mmalign.text.recipes.inputs import (
    JobInputs, check_job_sources, is_peft_model, require, resolve_tokenizer, split_objects,
)
from mmalign.text.evaluation.reward_probes import RewardScorer, decision_probe, evaluate_reward_model, sycophancy_probe

__all__ = [
    "CRMConfig",
    "RewardDataConfig",
    "RewardTrainConfig",
    "RewardScorer",
    "load_reward_rows",
    "crm_loss",
    "evaluate_reward_model",
    "sycophancy_probe",
    "decision_probe",
    "train_reward_model",
    "main",
]

logger = logging.getLogger("mmalign.text.recipes.reward")

PROBES = ("sycophancy", "decisions")


# ------------------------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class RewardDataConfig:
    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_DATA_KEYS

    train: Optional[str] = field(
        default=None, metadata={"help": "training pairs: .jsonl(.gz) {prompt, chosen, rejected} (or HH dialogues "
                                        "{chosen, rejected}), a dataset folder or a hub dataset name; may be omitted "
                                        "when the call passes train_dataset=..."})
    eval: Optional[str] = field(default=None, metadata={"help": "held-out pairs for the report; null = none"})
    train_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    eval_split: str = field(default="test", metadata={"help": "split of the hub eval dataset"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "first N training pairs only"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "first N eval pairs only"})
    use_chat_template: bool = field(default=False, metadata={"help": "render prompt + response with the chat template"})


@dataclass
class CRMConfig:
    lam: float = field(default=0.0, metadata={"help": "λ, weight of the binned MMD penalty (thesis: 0.1-100); 0 = vanilla RM"})
    conditional: bool = field(default=False, metadata={"help": "penalty inside chosen and inside rejected (conditional CRM)"})
    representation: Literal["hidden", "reward"] = field(
        default="hidden", metadata={"help": "what must not depend on the bin: the last hidden state or the reward"}
    )
    bandwidth: Optional[list[float]] = field(
        default=None, metadata={"help": "Gaussian kernel bandwidths (summed); null = median heuristic per batch"}
    )

    def __post_init__(self) -> None:
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"crm.lam: invalid value {self.lam!r}; expected a finite number >= 0")


@dataclass
class RewardTrainConfig:
    """A reward-model run (vanilla or causal)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_TOP_KEYS

    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "the backbone (loaded as AutoModelForSequenceClassification, 1 label)"})
    data: RewardDataConfig = field(default_factory=RewardDataConfig, metadata={"help": "pairs"})
    bins: Optional[BinSpec] = field(default=None, metadata={"help": "bins of the spurious factor; null = no penalty"})
    crm: CRMConfig = field(default_factory=CRMConfig, metadata={"help": "the MMD penalty"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "optional LoRA adapters (score head trains fully)"})
    training: TextTrainingConfig = field(default_factory=TextTrainingConfig, metadata={"help": "optimisation"})
    trainable_top_layers: Optional[int] = field(
        default=None, metadata={"help": "train only the top N transformer blocks + the score head (cheap CPU runs); "
                                "null = all weights (or the LoRA adapters)"},
    )
    probes: list[str] = field(default_factory=list, metadata={"help": "held-out probes after training: sycophancy, decisions"})
    probe_samples: int = field(default=200, metadata={"help": "sycophancy probe: held-out questions"})
    probe_decision_templates: Optional[list[int]] = field(
        default=None, metadata={"help": "decisions probe: template indices 0-7 to score (null = all)"}
    )
    output_dir: str = field(default="outputs/reward-run", metadata={"help": "run folder"})

    def __post_init__(self) -> None:
        if self.crm.lam > 0 and self.bins is None:
            raise ValueError("crm.lam > 0 needs a bins: section (the spurious factor to be invariant to)")
        if self.trainable_top_layers is not None and self.trainable_top_layers < 0:
            raise ValueError(f"trainable_top_layers: invalid value {self.trainable_top_layers}; expected >= 0 or null")
        if self.trainable_top_layers is not None and self.lora.enabled:
            raise ValueError("trainable_top_layers and lora.enabled exclude each other; choose one")
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown:
            raise ValueError(f"probes: unknown probe(s) {unknown}; expected some of {list(PROBES)}")


# ------------------------------------------------------------------------------------------------------------
# Data.


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _tokenize_pairs(rows, tokenizer, *, use_chat_template: bool, max_length: int) -> list[dict[str, Any]]:
    texts = [render_pair(tokenizer, r["prompt"], r[side], use_chat_template) for r in rows for side in ("chosen", "rejected")]
    # Truncate from the left: the response (at the end) is what is judged; the score is read at the last token.
    ids = tokenizer(texts, add_special_tokens=not use_chat_template)["input_ids"]
    items = []
    for i, row in enumerate(rows):
        item = {"chosen_ids": ids[2 * i][-max_length:], "rejected_ids": ids[2 * i + 1][-max_length:]}
        if "bins" in row:
            item["bins"] = list(row["bins"])
        items.append(item)
    return items


def _collate(pad_token_id: int):
    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # One forward over 2B sequences: the B chosen first, then the B rejected.
        input_ids, attention_mask = pad_sequences([i["chosen_ids"] for i in items] + [i["rejected_ids"] for i in items], pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if all("bins" in i for i in items):
            bins = torch.tensor([i["bins"] for i in items], dtype=torch.long)  # [B, 2]
            batch["bins"] = torch.cat([bins[:, 0], bins[:, 1]])  # [2B], in the order of the sequences
        return batch

    return collate


# ------------------------------------------------------------------------------------------------------------
# Model and loss.


def crm_loss(
    rewards: torch.Tensor, hidden: torch.Tensor, bins: Optional[torch.Tensor], crm: CRMConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BT loss + λ·binned MMD for ``2B`` responses ordered [chosen..., rejected...] (SPEC §5).

    ``bins`` [2B] (or None for the vanilla model). Returns the scalar loss and detached metric tensors.
    """
    n = rewards.shape[0] // 2
    chosen, rejected = rewards[:n], rewards[n:]
    bt = -F.logsigmoid(chosen - rejected).mean()
    metrics = {
        "bt_loss": bt.detach(),
        "accuracy": (chosen > rejected).float().mean().detach(),
        "reward_margin": (chosen - rejected).mean().detach(),
    }
    loss = bt
    if bins is not None and crm.lam > 0:
        features = hidden if crm.representation == "hidden" else rewards.unsqueeze(-1)
        groups = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)]).to(rewards.device)
        penalty, used = binned_mmd_penalty(
            features, bins, groups=groups if crm.conditional else None, bandwidth=crm.bandwidth
        )
        loss = loss + crm.lam * penalty
        metrics["mmd/penalty"] = penalty.detach()
        metrics["mmd/bins_used"] = torch.tensor(float(used))
    return loss, metrics


def _load_model(cfg: RewardTrainConfig, inputs: JobInputs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = cfg.model
    if inputs.model is not None:
        model = inputs.model
        if getattr(getattr(model, "config", None), "num_labels", None) != 1:
            raise ConfigError("model: a reward model object must be a sequence classifier with num_labels=1")
        tokenizer = resolve_tokenizer(inputs.tokenizer, m, model)
        model.config.pad_token_id = tokenizer.pad_token_id
        return _finish_model(cfg, model.train()), tokenizer
    kwargs: dict[str, Any] = {"num_labels": 1, "trust_remote_code": m.trust_remote_code}
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    if m.dtype != "auto":
        kwargs["dtype"] = getattr(torch, m.dtype)
    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(m.tokenizer or m.name_or_path),
                                              gguf_file=m.gguf_file if not m.tokenizer else None)
    if m.chat_template:
        tokenizer.chat_template = m.chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(os.path.expanduser(m.name_or_path), **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return _finish_model(cfg, model), tokenizer


def _finish_model(cfg: RewardTrainConfig, model):
    """LoRA (unless the object already has adapters), frozen lower layers, gradient checkpointing."""
    if cfg.lora.enabled and not is_peft_model(model):
        from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, PeftLoraConfig(
            task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.scale_alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        ))
    if cfg.trainable_top_layers is not None:
        _freeze_below_top_layers(model, cfg.trainable_top_layers)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _freeze_below_top_layers(model, n_top: int) -> None:
    """Freezes everything except the last ``n_top`` transformer blocks, the final norm and the score head."""
    n_layers = model.config.num_hidden_layers
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers), None)
    if blocks is None:
        raise ValueError(f"trainable_top_layers: cannot find the {n_layers} transformer blocks of {type(model).__name__}")
    if n_top > n_layers:
        raise ValueError(f"trainable_top_layers: {n_top} > the model's {n_layers} layers")
    model.requires_grad_(False)
    for block in list(blocks)[n_layers - n_top:]:
        block.requires_grad_(True)
    for name, module in model.named_modules():
        # The score head and the final norm (names of the common decoder families).
        if name.split(".")[-1] in ("score", "classifier", "norm", "ln_f", "final_layernorm"):
            module.requires_grad_(True)


# ------------------------------------------------------------------------------------------------------------
# Training.


def _plot_per_bin(report: Mapping[str, Any], path: Path) -> Optional[Path]:
    stats = report.get("per_bin_reward")
    if not stats:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(stats)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(labels) + 2), 3.5))
    ax.bar(range(len(labels)), [stats[k]["mean"] for k in labels], yerr=[stats[k]["std"] for k in labels], capsize=2)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("reward (mean ± std)")
    ax.set_title("reward per bin (eval)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def train_reward_model(config: RewardTrainConfig | Mapping[str, Any] | str | Path | None = None, *,
                       model: Any = None, tokenizer: Any = None, train_dataset: Any = None,
                       eval_dataset: Any = None) -> dict[str, Any]:
    """Trains, saves ``<output_dir>/final`` and writes ``reward_report.json`` (+ ``reward_per_bin.png``); returns
    the report (``report["model"]``: the trained model). Objects as in :func:`mmalign.text.train`: ``model`` an
    ``AutoModelForSequenceClassification`` with one label, ``tokenizer``, in-memory pair datasets.
    ``training.num_threads`` holds for the whole run (data, training, probes) and is restored afterwards."""
    from mmalign.engine.threads import torch_threads

    config, inputs = split_objects(config, JobInputs(model, tokenizer, train_dataset, eval_dataset))
    cfg = load_config(RewardTrainConfig, config)
    require(cfg.model.name_or_path if inputs.model is None else inputs.model, "model.name_or_path", "model")
    require(cfg.data.train if inputs.train_dataset is None else inputs.train_dataset, "data.train", "train_dataset")
    with torch_threads(cfg.training.num_threads):
        return _train_reward_model(cfg, inputs)


def _rows(cfg: RewardTrainConfig, given: Any, path: Optional[str], split: str, limit: Optional[int], name: str):
    if given is not None:
        return load_reward_rows(given, split=split, max_samples=limit, name=name)
    return load_reward_rows(path, split=split, max_samples=limit) if path else []


def _train_reward_model(cfg: RewardTrainConfig, inputs: JobInputs) -> dict[str, Any]:
    from mmalign.engine import StepOutput, Trainer

    check_job_sources(cfg, inputs)  # offline: fail in seconds, naming the key
    output_dir = Path(cfg.output_dir)
    d = cfg.data
    train_rows = _rows(cfg, inputs.train_dataset, d.train, d.train_split, d.max_train_samples, "train_dataset")
    eval_rows = _rows(cfg, inputs.eval_dataset, d.eval, d.eval_split, d.max_eval_samples, "eval_dataset")
    torch.manual_seed(cfg.training.seed)  # the score head is initialised at random
    model, tokenizer = _load_model(cfg, inputs)
    bin_labels: Optional[list[str]] = None
    if cfg.bins is not None:
        assignment = assign_bins(train_rows, cfg.bins, tokenizer=tokenizer, source=cfg.data.train or "train_dataset")
        train_rows, bin_labels = assignment.rows, assignment.labels
        logger.info("bins (%s): %s", cfg.bins.source, assignment.counts())
        if eval_rows:
            eval_rows = assign_bins(eval_rows, cfg.bins, tokenizer=tokenizer, length_edges=assignment.length_edges,
                                    column_labels=assignment.labels if cfg.bins.source == "column" else None,
                                    source=cfg.data.eval or "eval_dataset", check_sizes=False).rows
    max_length = cfg.training.max_length or (cfg.training.max_prompt_length + cfg.training.max_response_length)
    items = _tokenize_pairs(train_rows, tokenizer, use_chat_template=cfg.data.use_chat_template, max_length=max_length)
    scorer = RewardScorer(model, tokenizer, use_chat_template=cfg.data.use_chat_template,
                          batch_size=cfg.training.batch_size * 2, max_length=max_length)
    use_bins = cfg.bins is not None and cfg.crm.lam > 0

    def compute_loss(model, batch) -> StepOutput:
        rewards, hidden = reward_forward(model, batch["input_ids"], batch["attention_mask"])
        loss, metrics = crm_loss(rewards, hidden, batch.get("bins") if use_bins else None, cfg.crm)
        metrics["rewards/accuracies"] = metrics["accuracy"]
        metrics["rewards/margins"] = metrics["reward_margin"]
        return StepOutput(loss=loss, metrics=metrics, num_tokens=int(batch["attention_mask"].sum()))

    def evaluate(model) -> dict[str, float]:
        scorer.model = model
        report = evaluate_reward_model(scorer, eval_rows, bin_labels=bin_labels)
        return {k: v for k, v in report.items() if isinstance(v, (int, float))}

    def save_model(model, directory: Path) -> None:
        if cfg.lora.enabled:
            model = model.merge_and_unload()
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        atomic_write_text(directory / "reward_model.json", json.dumps({"use_chat_template": cfg.data.use_chat_template, "bin_labels": bin_labels}, indent=1))

    trainer = Trainer(
        model, config=cfg.training, output_dir=output_dir, train_dataset=_PairDataset(items),
        collate_fn=_collate(tokenizer.pad_token_id), compute_loss=compute_loss, save_model=save_model,
        # The final report evaluates once after training; the callback only serves periodic evaluation.
        evaluate=evaluate if eval_rows and cfg.training.eval_steps else None, resolved_config=cfg,
        plot_keys=("loss", "bt_loss", "mmd/penalty", "rewards/accuracies", "eval_pairwise_accuracy"),
    )
    summary = trainer.train()
    model = trainer.model
    scorer.model = model
    report: dict[str, Any] = {"train": {k: summary[k] for k in ("global_step", "train_runtime_s")}}
    if eval_rows:
        report["eval"] = evaluate_reward_model(scorer, eval_rows, bin_labels=bin_labels)
    if "sycophancy" in cfg.probes:
        report["sycophancy_probe"] = sycophancy_probe(scorer, cfg.probe_samples)
    if "decisions" in cfg.probes:
        report["decision_probe"] = decision_probe(scorer, cfg.probe_decision_templates)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "reward_report.json", json.dumps(report, indent=1))
    if "eval" in report:
        _plot_per_bin(report["eval"], output_dir / "reward_per_bin.png")
    logger.info("reward report: %s", json.dumps(report))
    return {**report, "model": model, "tokenizer": tokenizer}


def _run(cfg: RewardTrainConfig, args) -> int:
    report = train_reward_model(cfg)
    print(json.dumps({k: v for k, v in report.items() if k not in ("model", "tokenizer")}, indent=1))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(prog="python -m mmalign.text.reward", config_cls=RewardTrainConfig, run=_run, argv=argv,
                       description="Train a (causal) reward model: Bradley-Terry + binned MMD penalty (SPEC §5).")
