"""One online step's data: sample k responses per prompt from the policy, score them, turn them into a loss.

:class:`OnlineLoss` is the engine's ``compute_loss`` for :mod:`mmalign.text.online`. A call receives a batch of
prompts and:

1. samples ``k`` responses per prompt from the current policy (:func:`mmalign.text.modeling.sampling.sample_completions`:
   batched, KV cache, each prompt pre-filled once and its cache copied to its k rows), with a seed derived from
   the run seed and the rollout number — the sampler's whole RNG state is that number, which is checkpointed;
2. scores them with the reward (:func:`mmalign.rewards.score`: one finite number per response or a named error)
   and the held-out reward when there is one;
3. runs one policy forward over the k responses with the prompt encoded once (the offline trainer's
   shared-prompt layout, :class:`~mmalign.text.data.PreferenceCollator`), a no-grad reference forward when the
   algorithm needs one, and the algorithm's loss.

With ``updates_per_rollout = E > 1`` the same rollout serves E consecutive calls (the dataset repeats each batch
E times, :class:`RepeatedBatches`); the first call fixes ``π_old`` for the clipped ratio. The rollout in progress
is part of the checkpoint, so a resumed run continues it exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mmalign.engine import StepOutput
from mmalign.rewards import WeightedSum, normalize_per_group, reward_name, score
from mmalign.shared.divergences import divergence_estimate, divergence_penalty
from mmalign.shared.objectives.batch import masked_mean
from mmalign.shared.policy_gradient import clipped_policy_loss, form_groups, group_advantages
from mmalign.text.data import PreferenceCollator, batch_to_device
from mmalign.text.data.bins import preference_text
from mmalign.text.online_inputs import GroupInputs
from mmalign.text.modeling.logprobs import batch_logprobs, gather_groups
from mmalign.text.modeling.loading import unwrap
from mmalign.text.modeling.sampling import sample_completions

__all__ = ["Rollout", "OnlineLoss", "RepeatedBatches", "generate_rollout"]


class RepeatedBatches(torch.utils.data.Dataset):
    """Prompts in a fixed seeded order, each batch of ``batch_size`` repeated ``repeats`` times in a row (the
    updates of one rollout); a tail shorter than a batch is dropped."""

    def __init__(self, items: list[dict[str, Any]], batch_size: int, repeats: int, seed: int):
        usable = len(items) // batch_size * batch_size
        if usable == 0:
            raise ValueError(f"prompts: {len(items)} prompt(s), fewer than training.batch_size={batch_size}")
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(items), generator=generator)[:usable].tolist()
        self.items, self.batch_size, self.repeats = items, batch_size, repeats

    def __len__(self) -> int:
        return len(self.order) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        block, within = divmod(index, self.batch_size * self.repeats)
        return self.items[self.order[block * self.batch_size + within % self.batch_size]]


@dataclass
class Rollout:
    """k sampled responses per prompt and their scores; ``old_logp`` [B, k] is set by the first update."""

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    rewards: torch.Tensor  # [B, k]
    heldout: Optional[torch.Tensor]  # [B, k]
    lengths: torch.Tensor  # [B, k] response tokens (end token not counted)
    entropy: torch.Tensor  # [B, k] mean token entropy
    finished: torch.Tensor  # [B, k]
    parts: dict[str, torch.Tensor]
    old_logp: Optional[torch.Tensor] = None
    features: dict[str, list] = field(default_factory=dict)  # per prompt: triggered_ids, bins, prompts (online_inputs)

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def generate_rollout(model, tokenizer, items: list[dict[str, Any]], *, k: int, sampling, seed: int, reward,
                     heldout=None, normalize: str = "none") -> Rollout:
    """Samples and scores k responses for each prompt item (``prompt``, ``text``, ``add_special_tokens``)."""
    policy = unwrap(model)
    texts = [item["text"] for item in items]
    special = {item["add_special_tokens"] for item in items}
    samples = sample_completions(policy, tokenizer, texts, n=k, max_new_tokens=sampling.max_new_tokens,
                                 temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                                 batch_size=sampling.batch_size, add_special_tokens=special.pop(),
                                 fast_decode=sampling.fast_decode)
    prompts = [item["prompt"] for item in items for _ in range(k)]
    outputs = [text for row in samples.texts for text in row]
    group_ids = [b for b in range(len(items)) for _ in range(k)]
    shape = (len(items), k)
    parts = {}
    if isinstance(reward, WeightedSum):
        parts = {f"reward/{name}": v.reshape(shape) for name, v in reward.parts(prompts, outputs, group_ids=group_ids).items()}
        total = sum(w * parts[f"reward/{reward_name(r)}"].reshape(-1) for r, w in zip(reward.rewards, reward.weights))
    else:
        total = score(reward, prompts, outputs, group_ids=group_ids)
    total = normalize_per_group(total, group_ids, normalize)
    held = score(heldout, prompts, outputs, group_ids=group_ids).reshape(shape) if heldout is not None else None
    as_tensor = lambda rows, dtype=torch.float32: torch.tensor(rows, dtype=dtype)  # noqa: E731
    features = {"prompts": [preference_text(item.get("raw_prompt", item["prompt"])) for item in items]}
    for key, name in (("triggered_ids", "triggered_ids"), ("bin", "bins")):
        if all(key in item for item in items):
            features[name] = [item[key] for item in items]
    return Rollout(features=features, 
        prompt_ids=[item["prompt_ids"] for item in items], response_ids=samples.token_ids,
        rewards=total.reshape(shape), heldout=held, lengths=as_tensor(samples.num_tokens),
        entropy=as_tensor(samples.token_entropy), finished=as_tensor(samples.finished), parts=parts,
    )


class OnlineLoss:
    """``compute_loss(model, batch)`` of an online run (see the module docstring); also a checkpointable object
    (``state_dict`` / ``load_state_dict``: the call count, which fixes the sampler's seed, and the open rollout)."""

    def __init__(self, cfg, tokenizer, reward, heldout=None, reference=None, objective=None, share_prompt=True):
        self.cfg, self.tokenizer, self.reward, self.heldout = cfg, tokenizer, reward, heldout
        self.reference, self.objective = reference, objective
        self.collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=share_prompt)
        self.group_inputs = GroupInputs(cfg, tokenizer, share_prompt)
        self.calls = 0
        self.rollout: Optional[Rollout] = None

    def use_shared_prompt(self, share_prompt: bool) -> None:
        """The batch layout of the training forwards (decided once the trainer's device is known)."""
        self.collator.share_prompt = share_prompt
        self.group_inputs.share_prompt = share_prompt

    # -------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "rollout": None if self.rollout is None else self.rollout.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.rollout = None if state["rollout"] is None else Rollout(**state["rollout"])

    def sampler_seed(self, rollout_number: int) -> int:
        return (self.cfg.training.seed * 1_000_003 + rollout_number) % (2 ** 63)

    # -------------------------------------------------------------------------------- the step
    def __call__(self, model: torch.nn.Module, batch: list[dict[str, Any]]) -> StepOutput:
        algo = self.cfg.algorithm
        metrics: dict[str, torch.Tensor] = {}
        if self.calls % algo.updates_per_rollout == 0:
            start = time.perf_counter()
            self.rollout = generate_rollout(
                model, self.tokenizer, batch, k=self.cfg.sampling.k, sampling=self.cfg.sampling,
                seed=self.sampler_seed(self.calls // algo.updates_per_rollout), reward=self.reward,
                heldout=self.heldout, normalize=self.cfg.reward_normalize)
            metrics.update(_rollout_metrics(self.rollout))
            # sampling + scoring wall time; the engine's tokens/s covers the whole step
            generated = float((self.rollout.lengths + self.rollout.finished).sum())
            metrics["rollout/tokens_per_s"] = torch.tensor(generated / max(time.perf_counter() - start, 1e-9))
        self.calls += 1
        rollout = self.rollout
        items = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": []}
                 for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
        device = next(model.parameters()).device
        train_batch = batch_to_device(self.collator(items), device)
        logp = gather_groups(batch_logprobs(model, train_batch)[0], train_batch["chosen_index"])  # [B, k]
        ref = None
        if self.reference is not None:
            ref = gather_groups(self.reference(model, train_batch), train_batch["chosen_index"])
            rho = (logp - ref).detach()
            metrics["kl"] = divergence_estimate(rho, "reverse_kl").mean()
            if algo.divergence_in != "none":
                metrics["divergence"] = divergence_estimate(rho, algo.divergence, algo.alpha).mean()
        if algo.name == "group":
            loss = self._loss_group(model, logp, ref, rollout, metrics)
        elif algo.name == "best_of_n":
            loss = self._loss_best_of_n(logp, ref, rollout, metrics)
        elif algo.name == "rejection_sampling":
            loss = self._loss_rejection_sampling(logp, ref, rollout, metrics)
        else:  # rloo, grpo
            loss = self._loss_policy_gradient(logp, ref, rollout, metrics)
        if not bool(torch.isfinite(loss)):  # before backward: a non-finite step must never reach a checkpoint
            raise FloatingPointError(f"online step {self.calls}: non-finite loss ({float(loss.detach())}); stopping before the "
                                     "update (no checkpoint is written from this step)")
        return StepOutput(loss=loss, metrics=metrics, num_tokens=train_batch["num_tokens"])

    def _loss_policy_gradient(self, logp, ref, rollout: Rollout, metrics) -> torch.Tensor:
        algo = self.cfg.algorithm
        rewards = rollout.rewards.to(logp.device)
        use_divergence = ref is not None and algo.divergence_in != "none" and algo.beta > 0
        if use_divergence and algo.divergence_in == "reward":  # thesis §2.8.1: r − β·g(t), t = π_ref/π
            penalty = divergence_penalty((logp - ref).detach(), algo.divergence, algo.alpha)
            rewards = rewards - algo.beta * penalty
            metrics["reward/penalised"] = rewards.mean()
            metrics["divergence/penalty_max"] = penalty.max()
        if rollout.old_logp is None:
            rollout.old_logp = logp.detach().cpu()
        advantages = group_advantages(rewards, algo.name)
        surrogate, clipped = clipped_policy_loss(logp, rollout.old_logp.to(logp.device), advantages, algo.clip_epsilon)
        loss = surrogate.mean()
        metrics["pg/clipped_fraction"] = clipped
        if use_divergence and algo.divergence_in == "loss":  # thesis §2.8.2: β·E[g(t) − g'(1)(t − 1)]
            loss = loss + algo.beta * divergence_estimate(logp - ref, algo.divergence, algo.alpha).mean()
        return loss

    def _loss_group(self, model, logp, ref, rollout: Rollout, metrics) -> torch.Tensor:
        algo = self.cfg.algorithm
        chosen, chosen_mask, rejected, rejected_mask, valid = form_groups(
            rollout.rewards, selection=algo.selection, group_size=algo.group_size, threshold=algo.threshold)
        metrics["groups/valid_fraction"] = valid.float().mean()
        if not bool(valid.any()):  # every prompt's k rewards tie: no preference, no update
            return logp.sum() * 0.0
        rows = valid.nonzero().squeeze(-1)
        pick = lambda values, index: torch.gather(values[rows], 1, index[rows].to(values.device))  # noqa: E731
        lengths = (rollout.lengths + rollout.finished).to(logp.device)  # scored tokens (end token included)
        out = self.objective(
            policy_chosen=pick(logp, chosen), policy_rejected=pick(logp, rejected),
            ref_chosen=pick(ref, chosen), ref_rejected=pick(ref, rejected),
            chosen_mask=chosen_mask[rows].to(logp.device), rejected_mask=rejected_mask[rows].to(logp.device),
            chosen_lengths=pick(lengths, chosen).clamp_min(1),
            **self.group_inputs(model, rollout, rows, chosen[rows], rejected[rows]))
        metrics.update({f"objective/{name}": value for name, value in out.metric_tensors.items()})
        return out.loss

    def _sft_loss(self, logp, rollout: Rollout, keep: torch.Tensor, metrics) -> torch.Tensor:
        """Mean per-token NLL of the kept samples (best-of-n, rejection sampling)."""
        lengths = (rollout.lengths + rollout.finished).clamp_min(1).to(logp.device)
        keep = keep.to(logp.device)
        metrics["sft/kept_fraction"] = keep.float().mean()
        if not bool(keep.any()):
            return logp.sum() * 0.0
        return -(logp / lengths)[keep].mean()

    def _loss_best_of_n(self, logp, ref, rollout: Rollout, metrics) -> torch.Tensor:
        best = rollout.rewards.argmax(-1, keepdim=True)
        keep = torch.zeros_like(rollout.rewards, dtype=torch.bool).scatter_(1, best, True)
        return self._sft_loss(logp, rollout, keep, metrics)

    def _loss_rejection_sampling(self, logp, ref, rollout: Rollout, metrics) -> torch.Tensor:
        return self._sft_loss(logp, rollout, rollout.rewards >= self.cfg.algorithm.threshold, metrics)


def _rollout_metrics(rollout: Rollout) -> dict[str, torch.Tensor]:
    metrics = {
        "reward/mean": rollout.rewards.mean(),
        "reward/std": rollout.rewards.std(unbiased=False),
        "reward/std_within_prompt": rollout.rewards.std(-1, unbiased=False).mean(),
        "response/length": rollout.lengths.mean(),
        "response/finished": rollout.finished.mean(),
        "entropy": rollout.entropy.mean(),
        **{name: value.mean() for name, value in rollout.parts.items()},
    }
    if rollout.heldout is not None:
        metrics["heldout_reward/mean"] = rollout.heldout.mean()
    return metrics
