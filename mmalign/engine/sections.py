"""The config sections every job spells the same way, whatever the modality: ``objective`` (``name`` plus the
objective's hyperparameters, flat: ``{name: mdpo, beta: 0.1}``) and ``lora`` (``enabled``, ``r``, ``alpha``,
``dropout``, ``target_modules``, ``initial_adapter``). ``training`` is :class:`mmalign.engine.TrainingConfig`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

__all__ = ["ObjectiveConfig", "LoraConfig", "check_objective", "OLD_MODEL_KEYS", "OLD_DATA_KEYS", "OLD_TOP_KEYS"]

# Old spellings, refused with the new key (a class lists them in RENAMED_KEYS; mmalign.config refuses them).
OLD_MODEL_KEYS = {
    "pretrained": "use model.name_or_path",
    "finetuning": "use lora.enabled (true = LoRA adapters, false = full fine-tuning)",
    "lora_rank": "use lora.r", "lora_alpha": "use lora.alpha", "lora_dropout": "use lora.dropout",
    "lora_target_modules": "use lora.target_modules",
}
OLD_DATA_KEYS = {
    "path": "use data.train", "split": "use data.train_split", "max_samples": "use data.max_train_samples",
}
OLD_TOP_KEYS = {
    "resume_from_checkpoint": "use training.resume_from_checkpoint (CLI: --resume)",
    "num_threads": "use training.num_threads", "threads": "use training.num_threads",
}


def check_objective(name: str, hyperparameters: dict[str, Any], *, key: str = "objective") -> None:
    """Builds the objective once, so an unknown name or a missing / unknown / out-of-range hyperparameter stops the
    config before any model loads."""
    from mmalign.shared.objectives.registry import available_objectives, objective

    names = available_objectives()
    if name not in names:
        raise ValueError(f"{key}.name: invalid value {name!r}; expected one of {', '.join(names)}")
    try:
        objective(name, **hyperparameters)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key}: {err}") from None


@dataclass
class ObjectiveConfig:
    """The preference objective: ``name`` and, in the same section, its keyword arguments."""

    name: str = field(default="dpo", metadata={"help": "objective name: see mmalign.available_objectives()"})
    hyperparameters: dict[str, Any] = field(
        default_factory=lambda: {"beta": 0.1},
        metadata={"help": "the objective's keyword arguments, written directly in the section: objective.beta: 0.1, "
                          "objective.eps, objective.nll, ... (see mmalign.objective)"},
    )

    # Keys other than the fields are the objective's hyperparameters (mmalign.config reads and writes them flat).
    FLAT_FIELD: ClassVar[str] = "hyperparameters"
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "params": "write the hyperparameters directly under objective (e.g. objective.eps: 0.1)",
    }

    def __post_init__(self) -> None:
        check_objective(self.name, self.hyperparameters)


@dataclass
class LoraConfig:
    """LoRA adapters; the reference is then the adapter-disabled base (no second copy of the weights)."""

    enabled: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights (peft)"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: Optional[float] = field(default=32.0, metadata={"help": "LoRA scaling alpha; null = r (scale 1)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: Union[str, list[str]] = field(
        default="all-linear", metadata={"help": "module names to adapt, or 'all-linear'"}
    )
    initial_adapter: Optional[str] = field(
        default=None,
        metadata={"help": "folder of a saved PEFT adapter to continue training (instead of a fresh one); the "
                  "adapter-disabled reference is still the base model"},
    )
    direct_forward: bool = field(
        default=True,
        metadata={"help": "run LoRA layers over nn.Linear/Conv1D as base + in-place scaling·(x Aᵀ)Bᵀ, trained "
                  "as one autograd function over a frozen base (the same function and gradients as peft's "
                  "forward, faster on CPU); off: peft's own forward"},
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r: invalid value {self.r!r}; expected an integer >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout: invalid value {self.dropout!r}; expected a number in [0, 1)")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora.alpha: invalid value {self.alpha!r}; expected a number > 0 or null")

    @property
    def scale_alpha(self) -> float:
        """alpha, with null meaning r."""
        return float(self.r if self.alpha is None else self.alpha)
