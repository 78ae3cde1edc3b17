"""The typed configuration of an online run (``python -m mmalign.text.online --config x.yaml``).

Shares the offline vocabulary: ``model``, ``lora``, ``reference``, ``training`` and ``objective`` sections are the
classes of :mod:`mmalign.text.config`; ``reward`` / ``heldout_reward`` are lists of
:class:`mmalign.rewards.RewardSpec`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mmalign.rewards.config import RewardSpec
from mmalign.shared.divergences import check_divergence
from mmalign.shared.triggers import TriggerPolicy, validate_triggers
from mmalign.text.data.bins import BinSpec
from mmalign.text.config import LoraConfig, ModelConfig, ObjectiveConfig, ReferenceConfig, TextTrainingConfig

__all__ = ["PromptConfig", "SamplingSettings", "AlgorithmConfig", "OnlineConfig", "ALGORITHMS"]

ALGORITHMS = ("rloo", "grpo", "group", "best_of_n", "rejection_sampling")


@dataclass
class PromptConfig:
    train: str = field(metadata={"help": "prompts: a .json/.jsonl/.parquet/.csv file or hub dataset with a prompt column"})
    eval: Optional[str] = field(default=None, metadata={"help": "held-out prompts, sampled and scored at each evaluation"})
    field_name: str = field(default="prompt", metadata={"help": "the column holding the prompt text"})
    hh: bool = field(default=False, metadata={"help": "rows are HH-RLHF dialogues (a 'chosen' column): the prompt is "
                                              "the dialogue up to its last '\\n\\nAssistant:'"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N training prompts"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N eval prompts"})
    too_long: Literal["error", "skip"] = field(default="error", metadata={
        "help": "a prompt that leaves no room for sampling.max_new_tokens in the model's context stops the run "
                "(error) or is dropped with a warning (skip)"})
    use_chat_template: bool = field(default=False, metadata={"help": "render prompts with the chat template"})
    system_prompt: Optional[str] = field(default=None, metadata={"help": "system message for chat-rendered prompts"})


@dataclass
class SamplingSettings:
    k: int = field(default=4, metadata={"help": "responses sampled per prompt at each rollout"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length cap in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (1 = the policy itself)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass in (0, 1]"})
    batch_size: int = field(default=64, metadata={"help": "rows (prompt copies) decoded together"})
    eval_k: int = field(default=2, metadata={"help": "responses per held-out prompt at evaluation"})
    fast_decode: bool = field(default=True, metadata={
        "help": "rollouts use the lean KV-cache decoder on Llama-layout models and an inverse-CDF draw (same "
                "distribution, another sample stream than false; mmalign.text.modeling.decode)"})

    def __post_init__(self) -> None:
        for name in ("k", "max_new_tokens", "batch_size", "eval_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling.{name}: invalid value {getattr(self, name)!r}; expected an integer >= 1")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature: invalid value {self.temperature!r}; expected > 0 (online "
                             "training needs samples of a stochastic policy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p: invalid value {self.top_p!r}; expected a number in (0, 1]")


@dataclass
class AlgorithmConfig:
    name: Literal["rloo", "grpo", "group", "best_of_n", "rejection_sampling"] = field(
        default="rloo", metadata={"help": "rloo / grpo (policy gradient with a group baseline), group (chosen vs "
                                  "rejected groups from the k samples + any objective), best_of_n (fine-tune on the "
                                  "best sample), rejection_sampling (fine-tune on samples with reward >= threshold)"})
    beta: float = field(default=0.05, metadata={"help": "rloo/grpo: weight of the divergence to the reference"})
    divergence: str = field(default="reverse_kl", metadata={"help": "reverse_kl, forward_kl, js or alpha (as fdpo)"})
    alpha: Optional[float] = field(default=None, metadata={"help": "divergence alpha: α in (0, 1)"})
    divergence_in: Literal["reward", "loss", "none"] = field(
        default="loss", metadata={"help": "reward: r − β·g(t) (thesis §2.8.1); loss: + β·E[g(t) − g'(1)(t − 1)] "
                                  "(§2.8.2); none: no divergence term"})
    clip_epsilon: Optional[float] = field(
        default=0.2, metadata={"help": "PPO clip of the sequence ratio π/π_old; null = no clipping"})
    updates_per_rollout: int = field(
        default=1, metadata={"help": "optimizer steps on each rollout (PPO inner epochs; for group: epochs on the "
                             "freshly generated groups, thesis §3.6.4)"})
    selection: Literal["top_bottom", "threshold"] = field(
        default="top_bottom", metadata={"help": "group: top m vs bottom m samples, or above/below threshold"})
    group_size: Optional[int] = field(default=None, metadata={"help": "group top_bottom: m (default k // 2; 1 for "
                                                              "pairwise objectives)"})
    threshold: Optional[float] = field(default=None, metadata={"help": "group threshold / rejection_sampling: the "
                                                               "reward a sample needs to be chosen / kept"})
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig("mdpo", {"beta": 0.1}),
                                       metadata={"help": "group: the objective of mmalign.objective (mdpo, mipo, dpo, "
                                                 "cnrpo, causal_dpo...)"})
    triggers: list[str] = field(default_factory=list, metadata={
        "help": "group with objective cnrpo: the trigger strings t_i (one per objective.alphas); each step the policy "
                "scores the sampled chosen/rejected responses behind prompt ⊕ t_i (no grad), SPEC §4 Eq. 14"})
    trigger_policy: Optional[dict[str, Any]] = field(default=None, metadata={
        "help": "cnrpo: how t_i is attached to a prompt: {mode: append|prepend|template, template, separator}"})
    bins: Optional[BinSpec] = field(default=None, metadata={
        "help": "group with objective causal_dpo: bins of the spurious factor (SPEC §5). length: the sampled "
                "responses' token lengths cut at the quantiles of each rollout's samples; column: a prompt-file "
                "column (one bin per prompt); keywords: a keyword table on the prompt (fixed per prompt) or on the "
                "sampled responses (text: response/both, unmatched: error or extra_bin)"})

    def __post_init__(self) -> None:
        if self.divergence_in != "none":
            try:
                check_divergence(self.divergence, self.alpha)
            except ValueError as err:
                raise ValueError(f"algorithm.divergence: {err}") from None
        if self.beta < 0:
            raise ValueError(f"algorithm.beta: invalid value {self.beta!r}; expected >= 0")
        if self.clip_epsilon is not None and not self.clip_epsilon > 0:
            raise ValueError(f"algorithm.clip_epsilon: invalid value {self.clip_epsilon!r}; expected > 0 or null")
        if self.updates_per_rollout < 1:
            raise ValueError(f"algorithm.updates_per_rollout: invalid value {self.updates_per_rollout!r}; expected >= 1")
        if self.name == "rejection_sampling" and self.threshold is None:
            raise ValueError("algorithm.threshold: rejection_sampling needs a reward threshold")
        if self.name == "group" and self.selection == "threshold" and self.threshold is None:
            raise ValueError("algorithm.threshold: selection 'threshold' needs a reward threshold")
        self._check_objective_inputs()

    def _check_objective_inputs(self) -> None:
        """cnrpo needs triggers (one per alpha), causal_dpo needs bins; neither section without its objective."""
        name = self.objective.name if self.name == "group" else None
        if name != "cnrpo" and (self.triggers or self.trigger_policy):
            raise ValueError("algorithm.triggers: triggers are for algorithm.name: group with objective cnrpo")
        if name != "causal_dpo" and self.bins is not None:
            raise ValueError("algorithm.bins: bins are for algorithm.name: group with objective causal_dpo")
        if name == "cnrpo":
            alphas = self.objective.hyperparameters.get("alphas", [])
            if not self.triggers or len(self.triggers) != len(alphas):
                raise ValueError(f"algorithm.triggers: objective cnrpo needs one trigger per alpha; got "
                                 f"{len(self.triggers)} trigger(s) {self.triggers} and alphas {alphas}")
            validate_triggers(self.triggers, source="algorithm.triggers")
            TriggerPolicy.from_dict(self.trigger_policy, source="algorithm.trigger_policy")
        if name == "causal_dpo":
            if self.bins is None:
                raise ValueError("algorithm.bins: objective causal_dpo needs a bins: section (source: length, column "
                                 "or keywords); online responses have no precomputed bin column")
            if self.bins.source == "keywords" and self.bins.text != "prompt" and self.bins.unmatched == "drop":
                raise ValueError("algorithm.bins.unmatched: a sampled response cannot be dropped; with text: "
                                 f"{self.bins.text} use unmatched: error or extra_bin")


@dataclass
class OnlineConfig:
    """An online run: sample k responses per prompt from the policy, score them, optimise."""

    model: ModelConfig = field(metadata={"help": "the policy model"})
    prompts: PromptConfig = field(metadata={"help": "training (and held-out) prompts"})
    reward: list[RewardSpec] = field(default_factory=list, metadata={
        "help": "the training reward: a list of reward specs summed with their weights (or pass reward=... in Python)"})
    heldout_reward: list[RewardSpec] = field(default_factory=list, metadata={
        "help": "a second reward logged beside the training reward (reward-hacking monitor); not optimised"})
    reward_normalize: Literal["none", "center", "standardize"] = field(
        default="none", metadata={"help": "normalise the summed reward within each prompt's k samples"})
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig, metadata={"help": "what is optimised"})
    sampling: SamplingSettings = field(default_factory=SamplingSettings, metadata={"help": "rollout sampling"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "optional LoRA adapters"})
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, metadata={
        "help": "the reference policy (adapter under LoRA, else a frozen copy; precomputed is impossible online)"})
    training: TextTrainingConfig = field(default_factory=TextTrainingConfig, metadata={"help": "optimisation"})
    output_dir: str = field(default="outputs/online-run", metadata={"help": "run folder"})

    def __post_init__(self) -> None:
        algo, k = self.algorithm, self.sampling.k
        if algo.name in ("rloo", "grpo", "group") and k < 2:
            raise ValueError(f"sampling.k: {algo.name} needs k >= 2 samples per prompt (a group baseline / chosen and "
                             f"rejected groups); got k={k}")
        if algo.name == "group" and algo.selection == "top_bottom" and algo.group_size is not None \
                and not 1 <= algo.group_size <= k // 2:
            raise ValueError(f"algorithm.group_size: must be in [1, k // 2 = {k // 2}]; got {algo.group_size}")
        if self.reference.mode == "precomputed":
            raise ValueError("reference.mode: 'precomputed' is impossible online (the responses are new each step); "
                             "use adapter (LoRA) or model")
        if self.reference.mode == "adapter" and not self.lora.enabled:
            raise ValueError("reference.mode: 'adapter' needs lora.enabled: true")
        if algo.updates_per_rollout > 1 and self.training.gradient_accumulation_steps != 1:
            raise ValueError("algorithm.updates_per_rollout > 1 needs training.gradient_accumulation_steps: 1 (each "
                             "update of a rollout is one optimizer step)")

    @property
    def needs_reference(self) -> bool:
        algo = self.algorithm
        if algo.name in ("rloo", "grpo"):
            return algo.beta > 0 and algo.divergence_in != "none"
        return algo.name == "group"
