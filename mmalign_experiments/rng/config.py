"""The RNG experiment's config: data (intervals), sampling, methods and the shared LoRA / training sections."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from mmalign.engine.sections import OLD_TOP_KEYS
from mmalign.text.config import LoraConfig, TextTrainingConfig

SMOLLM2 = "smollm2"  # model.name_or_path alias: the SmolLM2-135M-Instruct folder from mmalign.text.modeling.smollm

logger = logging.getLogger("mmalign_experiments.rng")


# ------------------------------------------------------------------------------------------------ config
def resolve_device(setting: str):
    """``sampling.device``: ``auto`` is CUDA when torch sees a GPU, else the CPU -- the choice the trainer's
    accelerate makes for a single process and the one the image pipelines make (``torch.cuda.is_available()``);
    anything else must be a torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(setting)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"sampling.device: invalid value {setting!r}; expected auto or a torch device such as "
                         f"cpu or cuda:0 ({error})") from None


@dataclass
class RngDataConfig:
    num_train_intervals: int = field(default=16, metadata={"help": "training prompts (intervals [a, a+m])"})
    num_test_intervals: int = field(default=8, metadata={"help": "held-out prompts, disjoint from every training interval"})
    low_min: int = field(default=0, metadata={"help": "smallest interval start a"})
    low_max: int = field(default=1000, metadata={"help": "largest interval start a (thesis: a in [0, 1000])"})
    train_gap_min: int = field(default=5, metadata={"help": "smallest training gap m (thesis: 5)"})
    train_gap_max: int = field(default=10, metadata={"help": "largest training gap m (thesis: 10)"})
    test_gap_min: int = field(default=5, metadata={"help": "smallest held-out gap m"})
    test_gap_max: int = field(default=10, metadata={"help": "largest held-out gap m"})
    group_size: int = field(default=4, metadata={"help": "k: answers per chosen and per rejected group (<= train_gap_min+1 with member_draws: distinct)"})
    rejected_pool_size: int = field(
        default=16, metadata={"help": "answers sampled from the model per training prompt; rejected groups are drawn from them"}
    )
    system_prompt: Optional[str] = field(
        default="You are a helpful assistant.", metadata={"help": "system message (null: the chat template's default)"}
    )
    prompt_template: str = field(
        default="Give me a random integer between {low} and {high}.",
        metadata={"help": "user message; {low} and {high} are filled in"},
    )
    answer_prefix: str = field(
        default="Random integer:",
        metadata={"help": "text appended after the assistant header so that the answer starts with the number"},
    )
    use_chat_template: bool = field(default=True, metadata={"help": "render the prompt with the tokenizer's chat template"})
    seed: int = field(default=0, metadata={"help": "seed of the intervals and the chosen/rejected draws"})
    member_draws: Literal["iid", "distinct"] = field(
        default="iid", metadata={"help": "chosen members: i.i.d. uniform with replacement (mIPO's premise) or distinct"}
    )
    redraw_pool_size: Optional[int] = field(
        default=None, metadata={"help": "chosen pool per prompt; training re-draws k members of each pool every "
                                "epoch (mmalign_experiments.rng.groups); null = fixed groups"}
    )

    def __post_init__(self) -> None:
        if self.num_train_intervals < 1 or self.num_test_intervals < 1:
            raise ValueError("data.num_train_intervals and data.num_test_intervals must be >= 1")
        if not 0 <= self.low_min <= self.low_max:
            raise ValueError(f"data: need 0 <= low_min <= low_max, got {self.low_min}, {self.low_max}")
        for kind in ("train", "test"):
            lo, hi = getattr(self, f"{kind}_gap_min"), getattr(self, f"{kind}_gap_max")
            if not 1 <= lo <= hi:
                raise ValueError(f"data: need 1 <= {kind}_gap_min <= {kind}_gap_max, got {lo}, {hi}")
        if self.redraw_pool_size is not None and self.redraw_pool_size < 1:
            raise ValueError(f"data.redraw_pool_size: invalid value {self.redraw_pool_size}; expected >= 1 or null")
        if self.group_size < 1 or (self.member_draws == "distinct" and self.group_size > self.train_gap_min + 1):
            raise ValueError(
                f"data.group_size: invalid value {self.group_size}; k must be >= 1, and with member_draws: distinct "
                f"at most train_gap_min + 1 = {self.train_gap_min + 1}"
            )
        if self.rejected_pool_size < self.group_size:
            raise ValueError(f"data.rejected_pool_size ({self.rejected_pool_size}) must be >= group_size ({self.group_size})")
        if "{low}" not in self.prompt_template or "{high}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain {low} and {high}")


@dataclass
class RngSamplingConfig:
    num_samples: int = field(default=32, metadata={"help": "answers sampled per held-out prompt and model"})
    max_new_tokens: int = field(default=5, metadata={"help": "tokens per answer (a number plus end of turn)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    batch_size: int = field(default=128, metadata={"help": "sequences decoded together"})
    seed: int = field(default=1234, metadata={"help": "sampling seed (the same for every model)"})
    device: str = field(
        default="auto", metadata={"help": "where the base and tuned models sample: auto = cuda when torch sees a GPU "
                                  "(as the trainer's accelerate chooses), else cpu; or a torch device such as cuda:1"})

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a bad value fails when the config loads, not after the training


@dataclass
class RngMethodConfig:
    label: str = field(metadata={"help": "name in the tables, e.g. mDPO"})
    objective: str = field(metadata={"help": "objective name (mmalign.available_objectives())"})
    hyperparameters: dict[str, Any] = field(default_factory=dict, metadata={"help": "the objective's keyword "
                                                                                "arguments, flat: beta: 0.1, nll: 1.0"})

    FLAT_FIELD: ClassVar[str] = "hyperparameters"  # {label: DPO, objective: dpo, beta: 0.1, nll: 1.0}


def _default_methods() -> list[RngMethodConfig]:
    return [
        RngMethodConfig("DPO", "dpo", {"beta": 0.1, "nll": 1.0}),
        RngMethodConfig("mDPO", "mdpo", {"beta": 0.1, "nll": 1.0}),
        RngMethodConfig("IPO", "ipo", {"beta": 0.1, "nll": 1.0}),
        RngMethodConfig("mIPO", "mipo", {"beta": 0.1, "nll": 1.0}),
    ]


@dataclass
class RngConfig:
    """The RNG uniformity experiment (thesis §3.6.1)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_TOP_KEYS

    model: str = field(default=SMOLLM2, metadata={"help": "causal LM folder/hub name, or 'smollm2' (converted offline)"})
    data: RngDataConfig = field(default_factory=RngDataConfig, metadata={"help": "intervals and preference groups"})
    sampling: RngSamplingConfig = field(default_factory=RngSamplingConfig, metadata={"help": "evaluation sampling"})
    methods: list[RngMethodConfig] = field(default_factory=_default_methods, metadata={"help": "methods to train"})
    comparisons: list[list[str]] = field(
        default_factory=lambda: [["mDPO", "DPO"], ["mIPO", "IPO"]],
        metadata={"help": "pairs of labels for head-to-head win rates (every method vs 'base' is always reported)"},
    )
    lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(enabled=True, r=8, alpha=16.0, dropout=0.0),
        metadata={"help": "LoRA adapters (as in mmalign.text.recipes.preference)"},
    )
    training: TextTrainingConfig = field(
        default_factory=lambda: TextTrainingConfig(batch_size=4, learning_rate=1e-3, num_epochs=2, lr_scheduler="constant",
                                                   logging_steps=2),
        metadata={"help": "optimisation of every method; batch_size counts groups (pairwise methods: k pairs per group)"},
    )
    member_pairs: bool = field(
        default=True,
        metadata={"help": "pairwise methods (DPO, IPO) train on the groups file with objective.pairs: members: the k "
                  "pairs (chosen_i, rejected_i) of each group, the prompt encoded once per group, batch_size groups "
                  "x k pairs per step (issue #17); false: the pairs file, k rows per group and k times the batch size "
                  "(the earlier path, the same pairs per step)"},
    )
    output_dir: str = field(default="outputs/rng-quickstart", metadata={"help": "run folder"})
    num_plot_intervals: int = field(default=3, metadata={"help": "held-out intervals shown in histograms.png"})

    def __post_init__(self) -> None:
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels) or "base" in labels:
            raise ValueError(f"methods: labels must be unique and not 'base', got {labels}")
        for pair in self.comparisons:
            if len(pair) != 2 or any(label not in labels for label in pair):
                raise ValueError(f"comparisons: {pair} must name two method labels out of {labels}")
