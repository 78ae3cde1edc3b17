"""The ``rounds:`` section of an image training config: online rounds (generate → score → group → train) instead of
training on a fixed preference set; ``mmalign.image.train`` then runs :func:`mmalign.image.online.online`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional

from mmalign.rewards.config import RewardSpec

__all__ = ["RoundsConfig", "ROUND_KEYS"]


@dataclass
class RoundsConfig:
    """What a round generates and how it is scored and grouped (the rest comes from the training config's model,
    lora, objective, diffusion, training and output_dir sections; the image side is ``data.resolution``).
    :class:`mmalign.image.online.ImageOnlineConfig` is this plus those sections."""

    prompts: list[str] = field(metadata={"help": "training prompts (k images each per round)"})
    reward: list[RewardSpec] = field(default_factory=list, metadata={"help": "image reward specs (or pass reward=...)"})
    rounds: int = field(default=2, metadata={"help": "rounds of generation and training"})
    heldout_prompts: list[str] = field(default_factory=list, metadata={"help": "prompts evaluated after each round"})
    k: int = field(default=6, metadata={"help": "images generated per prompt per round"})
    selection: Literal["top_bottom", "threshold"] = field(default="top_bottom", metadata={"help": "group formation"})
    group_size: Optional[int] = field(default=None, metadata={"help": "top_bottom: m images per group (default k//2)"})
    threshold: Optional[float] = field(default=None, metadata={"help": "threshold: the reward a chosen image needs"})
    eval_k: int = field(default=6, metadata={"help": "images per held-out prompt at each evaluation"})
    num_inference_steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance (1 = off)"})
    scheduler: Literal["ddim", "dpm_solver"] = field(default="ddim", metadata={"help": "sampler"})
    seed: int = field(default=0, metadata={"help": "seed of the generations (round r, image i: seed + 100003 r + i)"})
    reference: Literal["initial", "previous"] = field(
        default="initial", metadata={"help": "reference of each round: initial = the starting model; previous = the "
                                             "policy the previous round left (iterative DPO; a frozen copy: one more UNet in memory)"})

    def __post_init__(self) -> None:
        if self.reference not in ("initial", "previous"):
            raise ValueError(f"reference must be 'initial' or 'previous'; got {self.reference!r}")
        if not self.prompts:
            raise ValueError("prompts: give at least one training prompt")
        if self.rounds < 1 or self.k < 2 or self.eval_k < 1:
            raise ValueError(f"rounds >= 1, k >= 2 (chosen and rejected groups) and eval_k >= 1 needed; got "
                             f"{self.rounds}, {self.k}, {self.eval_k}")
        if self.selection == "threshold" and self.threshold is None:
            raise ValueError("threshold: selection 'threshold' needs a reward threshold")


#: the keys of RoundsConfig (ImageOnlineConfig has them too)
ROUND_KEYS = tuple(f.name for f in fields(RoundsConfig))
