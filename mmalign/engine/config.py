"""The modality-agnostic training hyperparameters shared by the text and image backends."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

__all__ = ["TrainingConfig"]

ReportTarget = Literal["jsonl", "tensorboard", "trackio", "wandb"]

# optional extras: the package each metric sink needs, and the extra that installs it
REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
                   "wandb": ("wandb", "wandb")}


@dataclass
class TrainingConfig:
    """Optimisation, schedule, logging and checkpointing of one run (see ``mmalign.engine.Trainer``)."""

    batch_size: int = field(default=8, metadata={"help": "samples (preference pairs/groups) per device per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-7, metadata={"help": "peak learning rate of AdamW"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="linear", metadata={"help": "decay after warmup: constant, linear to 0, or cosine to 0"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "optimizer steps of linear warmup from 0"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps to run; -1 = num_epochs over the data"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the training data when max_steps is -1"})
    max_grad_norm: Optional[float] = field(
        default=1.0, metadata={"help": "clip the global gradient norm to this; null or 0 disables clipping"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not applied to biases/norms)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    seed: int = field(default=42, metadata={"help": "seed of model init, data order and dropout"})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "continue a run: a checkpoint folder, or 'latest' (the newest under "
                                        "output_dir/checkpoints); null = start fresh (CLI: --resume)"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "autocast precision of the forward pass (accelerate)"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log averaged metrics every N optimizer steps"})
    save_steps: int = field(default=0, metadata={"help": "write a resumable checkpoint every N optimizer steps; 0 = never"})
    eval_steps: int = field(default=0, metadata={"help": "run the evaluate callback every N optimizer steps; 0 = only at the end"})
    save_total_limit: Optional[int] = field(
        default=2, metadata={"help": "keep at most this many checkpoints (oldest deleted first); null = keep all"}
    )
    report_to: list[ReportTarget] = field(
        default_factory=lambda: ["jsonl"],
        metadata={"help": "metric sinks; metrics.jsonl is always written; tensorboard (output_dir/tensorboard), "
                          "trackio (local, offline) and wandb are optional extras (pip install mmalign[NAME])"},
    )
    num_threads: Optional[int] = field(
        default=None, metadata={"help": "torch CPU threads (torch.set_num_threads); null = leave torch's default"}
    )
    release_freed_memory: bool = field(
        default=False, metadata={"help": "Linux/glibc: allocate blocks over 128 KiB with mmap, so activations freed "
                                         "after backward go back to the system instead of a growing heap: lower peak "
                                         "memory (SmolLM2 LoRA -380 MiB) for more CPU time per step (+45 %, page "
                                         "faults); process-wide (mmalign.engine.allocator)"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start a new run in an output_dir that holds another run's checkpoints, "
                                         "deleting them (otherwise refused: resume it or choose another folder)"}
    )
    deterministic: bool = field(
        default=False, metadata={"help": "CUDA: deterministic kernels (torch.use_deterministic_algorithms, cuDNN "
                                         "without autotuning, a fixed cuBLAS workspace) so that seeded and resumed "
                                         "runs repeat bit for bit there as on CPU; slower, and an operation without a "
                                         "deterministic kernel stops the run naming it (mmalign.engine.determinism)"}
    )
    allow_inexact_resume: bool = field(
        default=False, metadata={"help": "resume even when a checkpoint's random-generator state cannot be read "
                                         "(the run then does not repeat an uninterrupted one); otherwise refused"}
    )

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "threads": "use training.num_threads", "resume": "use training.resume_from_checkpoint",
    }
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm progress bar on the main process"})
    plot: bool = field(default=True, metadata={"help": "draw metrics.png (loss, margins, accuracies) at the end"})

    def __post_init__(self) -> None:
        import math

        for name in ("learning_rate", "num_epochs", "max_grad_norm", "weight_decay", "adam_beta1", "adam_beta2",
                     "adam_epsilon"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"training.{name}: invalid value {value!r}: not finite (NaN/inf); expected a "
                                 "finite number")
        positive = {
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "logging_steps": self.logging_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"training.{name}: invalid value {value!r}; expected an integer >= 1")
        non_negative = {
            "warmup_steps": self.warmup_steps,
            "save_steps": self.save_steps,
            "eval_steps": self.eval_steps,
            "weight_decay": self.weight_decay,
            "dataloader_num_workers": self.dataloader_num_workers,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"training.{name}: invalid value {value!r}; expected a value >= 0")
        if not self.learning_rate > 0:
            raise ValueError(f"training.learning_rate: invalid value {self.learning_rate!r}; expected a number > 0")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"training.max_steps: invalid value {self.max_steps!r}; expected -1 or an integer >= 1")
        if self.max_steps == -1 and not self.num_epochs > 0:
            raise ValueError(
                f"training.num_epochs: invalid value {self.num_epochs!r}; expected a number > 0 when max_steps is -1"
            )
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"training.max_grad_norm: invalid value {self.max_grad_norm!r}; expected >= 0 or null")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(
                f"training.save_total_limit: invalid value {self.save_total_limit!r}; expected an integer >= 1 or null"
            )
        for target in self.report_to:
            package, extra = REPORT_PACKAGES.get(target, (None, None))
            if package is not None and importlib.util.find_spec(package) is None:
                raise ValueError(f"training.report_to: {target!r} needs the package {package!r}, which is not "
                                 f"installed; pip install 'mmalign[{extra}]' (or drop {target!r})")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"training.num_threads: invalid value {self.num_threads!r}; expected an integer >= 1 or null")
