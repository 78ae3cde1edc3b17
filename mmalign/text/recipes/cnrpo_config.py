"""The config of a two-stage CNRPO run (SPEC §4): the text trainer's sections plus ``cnrpo`` (triggers, auxiliary
sets, β, γ, α)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional


from mmalign.shared.triggers import TriggerPolicy, validate_triggers
from mmalign.text.config import DataConfig, LoraConfig, ModelConfig, ReferenceConfig, TextTrainingConfig


__all__ = ["DEFAULT_TRIGGERS", "CNRPO_ROW_COLUMN", "CNRPOSection", "CNRPOConfig"]

DEFAULT_TRIGGERS = ["<BeLongerNow>", "<BeHarmfulNow>"]
CNRPO_ROW_COLUMN = "cnrpo_row"  # numeric column added to the main rows: lets the hook find each row's triggered prompts


# ------------------------------------------------------------------------------------------------------------
# Configuration.


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
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "report": "the trigger report is an experiment now: put its settings in a top-level trigger_report section "
                  "and run python -m mmalign_experiments.cnrpo_report --config FILE",
    }

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

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "trigger_report": "the trigger report is an experiment: run this config with "
                          "python -m mmalign_experiments.cnrpo_report --config FILE",
    }

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
