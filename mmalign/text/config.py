"""The typed configuration of a text preference run (``python -m mmalign.text.train --config x.yaml``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from mmalign.engine.config import TrainingConfig
from mmalign.engine.sections import LoraConfig as SharedLoraConfig
from mmalign.engine.sections import OLD_DATA_KEYS, OLD_MODEL_KEYS, OLD_TOP_KEYS, ObjectiveConfig
from mmalign.text.data.bins import BinSpec

__all__ = [
    "ModelConfig",
    "DataConfig",
    "ObjectiveConfig",
    "LoraConfig",
    "ReferenceConfig",
    "TextTrainingConfig",
    "TextTrainConfig",
    "DATA_FORMATS",
]

DATA_FORMATS = ("auto", "pairs", "conversational", "hh", "implicit", "groups")


@dataclass
class ModelConfig:
    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_MODEL_KEYS
    name_or_path: Optional[str] = field(
        default=None, metadata={"help": "hub name or local folder of a causal LM (from_pretrained); may be omitted "
                                        "when the call passes model=..."})
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file inside name_or_path to load (dequantised)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "weights dtype; bf16 weights + mixed_precision=bf16 for large models"}
    )
    tokenizer: Optional[str] = field(default=None, metadata={"help": "tokenizer name/path; default: name_or_path"})
    chat_template: Optional[str] = field(
        default=None, metadata={"help": "Jinja chat template overriding the tokenizer's (conversational data)"}
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2; default: transformers' choice"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    fused_activations: bool = field(
        default=True,
        metadata={"help": "run transformers' Python tanh-GELUs (gelu_new/gelu_fast: GPT-2, GPT-J, Phi-2...) as torch's "
                  "fused GELU(approximate='tanh'): same function, about half its time; SiLU-gated MLPs (Llama family) keep one "
                  "activation fewer for backward; Llama-family RMSNorm and RoPE run as one autograd function each on CPU"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub repo"})


@dataclass
class DataConfig:
    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_DATA_KEYS
    train: Optional[str] = field(
        default=None, metadata={"help": "training data: a .json/.jsonl(.gz)/.parquet/.csv file, a dataset folder or a "
                                        "hub dataset name; may be omitted when the call passes train_dataset=..."})
    train_split: str = field(default="train", metadata={"help": "split of a hub dataset (or of a local file: 'train')"})
    eval: Optional[str] = field(default=None, metadata={"help": "evaluation data (file or hub name); null = none"})
    eval_split: str = field(default="test", metadata={"help": "split of the hub eval dataset"})
    subset: Optional[str] = field(default=None, metadata={"help": "hub dataset configuration name"})
    format: Literal["auto", "pairs", "conversational", "hh", "implicit", "groups"] = field(
        default="auto",
        metadata={
            "help": "row schema: pairs {prompt, chosen, rejected} strings; conversational (message lists); "
            "hh (full dialogues, split at the last assistant turn); implicit (TRL's {chosen, rejected} full texts: the "
            "common prefix is the prompt); groups {prompt, chosen: [..], rejected: [..]}; "
            "auto = detect from the first row"
        },
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N training rows"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N eval rows"})
    use_chat_template: bool = field(
        default=False,
        metadata={"help": "render plain-text prompts with the tokenizer's chat template too (HH dialogues become "
                  "user/assistant turns); message-list data always uses it"},
    )
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "system message prepended to chat-templated prompts that have none"}
    )
    on_invalid: Literal["error", "skip"] = field(
        default="error", metadata={"help": "a malformed row stops the run (error) or is dropped with a warning (skip)"}
    )
    redraw_members: Optional[int] = field(
        default=None, metadata={"help": "treat each training group as a pool and use k members drawn from it with "
                                "replacement, fresh at every epoch (mmalign.text.data.redraw); null = the groups as given"}
    )

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples", "redraw_members"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name}: invalid value {value!r}; expected an integer >= 1 or null")


@dataclass
class LoraConfig(SharedLoraConfig):
    """The shared LoRA section (``direct_forward`` moved there: the image backbones take it too)."""


@dataclass
class ReferenceConfig:
    mode: Literal["auto", "adapter", "model", "precomputed"] = field(
        default="auto",
        metadata={
            "help": "adapter: the LoRA base with adapters disabled (no second copy); model: a separate frozen model; "
            "precomputed: reference log-probs computed once before training and cached on disk (no reference "
            "forward in the step); auto: adapter under LoRA, else model"
        },
    )
    name_or_path: Optional[str] = field(
        default=None, metadata={"help": "reference model (modes model/precomputed); default: the initial policy"}
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file inside reference.name_or_path"})
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "where precomputed log-probs are cached; default: <output_dir>/reference_cache"}
    )
    batch_size: Optional[int] = field(
        default=None, metadata={"help": "batch size of the precomputation; default: training.batch_size"}
    )


@dataclass
class TextTrainingConfig(TrainingConfig):
    max_prompt_length: int = field(default=512, metadata={"help": "prompt tokens kept (truncated from the left)"})
    max_response_length: int = field(default=512, metadata={"help": "response tokens kept (truncated from the right)"})
    max_length: Optional[int] = field(
        default=None,
        metadata={"help": "cap on prompt + response tokens: the prompt is cut (from the left) first; null = no cap"},
    )
    share_prompt: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={"help": "encode each prompt once for all its responses (one row per example, block attention "
                  "mask; needs eager/sdpa attention): on, off, or auto = on when the model supports it, a check "
                  "on the first examples gives the same log-probs as the padded layout, and the run is not on CUDA "
                  "(there its dense mask measured 1.1-1.7x slower at 2048 tokens: bench/RESULTS.md, GPU)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_prompt_length", "max_response_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name}: invalid value {getattr(self, name)!r}; expected an integer >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"training.max_length: invalid value {self.max_length!r}; expected an integer >= 2 or null")


@dataclass
class TextTrainConfig:
    """A text preference-optimisation run."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = OLD_TOP_KEYS

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the policy model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training/eval data"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "the preference objective"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "optional LoRA adapters"})
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, metadata={"help": "the reference policy"})
    training: TextTrainingConfig = field(default_factory=TextTrainingConfig, metadata={"help": "optimisation"})
    bins: Optional[BinSpec] = field(
        default=None,
        metadata={"help": "objective causal_dpo: bins of the spurious factor computed when the data is loaded, as "
                  "python -m mmalign.text.bins computes them (source: length | column | keywords); null = read a "
                  "precomputed 'bins' (or 'bin_chosen' + 'bin_rejected', or 'bin') data column"},
    )
    output_dir: str = field(default="outputs/text-run", metadata={"help": "run folder (metrics, checkpoints, final/)"})

    def __post_init__(self) -> None:
        if self.lora.initial_adapter and not self.lora.enabled:
            raise ValueError(f"lora.initial_adapter: {self.lora.initial_adapter!r} does nothing with lora.enabled: "
                             "false; set lora.enabled: true to continue training that adapter, or remove it")
        if self.training.eval_steps and not self.data.eval:
            raise ValueError(f"training.eval_steps: {self.training.eval_steps} does nothing without data.eval; set "
                             "training.eval_steps: 0 or give data.eval")
        if self.bins is not None:
            from mmalign.shared.objectives.registry import objective as build_objective

            objective = build_objective(self.objective.name, **self.objective.hyperparameters)
            if "bins" not in getattr(objective, "extra_inputs", ()):
                raise ValueError(f"bins: objective {self.objective.name!r} takes no bins; the bins: section is for "
                                 "objective causal_dpo (remove it, or set objective.name: causal_dpo)")
        if self.reference.mode == "adapter" and not self.lora.enabled:
            raise ValueError("reference.mode: 'adapter' needs lora.enabled: true (the reference is the adapter-"
                             "disabled base); use 'model' or 'precomputed' for full fine-tuning")
        if self.reference.mode == "adapter" and self.reference.name_or_path:
            raise ValueError("reference.name_or_path: a separate reference model cannot be used with mode 'adapter'")

    @property
    def resolved_reference_mode(self) -> str:
        if self.reference.mode != "auto":
            return self.reference.mode
        if self.lora.enabled and not self.reference.name_or_path:
            return "adapter"
        return "model"
