"""Online alignment of causal LMs: ``mmalign.text.online(config, reward=...)`` and ``python -m mmalign.text.online``.

Each step samples k responses per prompt from the current policy, scores them with a reward
(:mod:`mmalign.rewards`) and optimises one of (``algorithm.name``):

- ``rloo`` / ``grpo`` — policy gradient with a group baseline (RLOO, GRPO advantages), PPO's clipped sequence ratio
  with ``updates_per_rollout`` inner updates, and a divergence to the reference among reverse KL, forward KL, JS and
  α (f-DPO's names) either in the reward (thesis §2.8.1) or in the loss (§2.8.2), see
  :mod:`mmalign.shared.divergences`;
- ``group`` — chosen and rejected groups formed from the k samples by reward, then any objective of
  ``mmalign.objective`` (online mDPO / mIPO / DPO...; ``updates_per_rollout`` epochs per generation, §3.6.4);
- ``best_of_n`` / ``rejection_sampling`` — fine-tuning on the best sample / the samples above a threshold.

The loop is the engine's (:class:`mmalign.engine.Trainer`): optimizer, schedule, clipping, metrics.jsonl,
atomic checkpoints and exact resume (the rollout counter that seeds the sampler and the open rollout are saved
with the checkpoint). Under LoRA the reference is the adapter-disabled base. Logged per step: ``reward/mean``,
``reward/std``, ``heldout_reward/mean`` (reward-hacking monitor), ``kl`` and ``divergence`` to the reference,
``response/length``, ``entropy``; ``reward_hacking.png`` plots both rewards against the divergence.

    python -m mmalign.text.online --config configs/text/online-rloo-tiny.yaml --set algorithm.name=grpo
"""
from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

import mmalign
from mmalign.cli import run_command
from mmalign.config import load_config
from mmalign.engine import Trainer
from mmalign.engine.result import TrainResult
from mmalign.engine.threads import torch_threads
from mmalign.entrypoints import make_module_callable
from mmalign.rewards import build_reward, score
from mmalign.text.data import load_rows, render_prompt, split_hh_dialogue
from mmalign.text.modeling.logprobs import SHARED_PROMPT_ATTENTION, attention_implementation, shared_prompt_slower_on
from mmalign.text.modeling.loading import apply_lora_config, load_causal_lm, load_tokenizer, unwrap
from mmalign.text.modeling.references import AdapterReference, FrozenModelReference
from mmalign.text.online_config import OnlineConfig
from mmalign.text.online_inputs import ONLINE_EXTRA_INPUTS, add_prompt_features
from mmalign.text.rollout import OnlineLoss, RepeatedBatches
from mmalign.text.modeling.sampling import sample_completions

__all__ = ["online", "load_prompts", "plot_reward_hacking", "main"]

logger = logging.getLogger("mmalign.text.online")

PLOT_KEYS = ("loss", "reward/mean", "heldout_reward/mean", "kl", "divergence", "response/length", "entropy")


def load_prompts(source: str, tokenizer, cfg: OnlineConfig, *, max_samples: Optional[int], context: Optional[int]
                 ) -> list[dict[str, Any]]:
    """Prompt items (``prompt``, rendered ``text``, ``prompt_ids``, ``add_special_tokens``) of a data file; a prompt
    that leaves no room for ``sampling.max_new_tokens`` in the model's context stops the run, naming the row."""
    name = "chosen" if cfg.prompts.hh else cfg.prompts.field_name
    items, skipped = [], 0
    for number, row in enumerate(load_rows(source, max_samples=max_samples), start=1):
        prompt = row.get(name)
        if cfg.prompts.hh:
            prompt = split_hh_dialogue(prompt, row=number, field=name, source=source)[0]
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError(f"{source}: row {number}: field {name!r}: expected a non-empty prompt, got {prompt!r}")
        text, special = render_prompt(tokenizer, prompt, use_chat_template=cfg.prompts.use_chat_template,
                                      system_prompt=cfg.prompts.system_prompt)
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise ValueError(f"{source}: row {number}: the prompt encodes to no tokens")
        if context is not None and len(ids) + cfg.sampling.max_new_tokens > context:
            if cfg.prompts.too_long == "skip":
                skipped += 1
                continue
            raise ValueError(f"{source}: row {number}: prompt of {len(ids)} tokens + sampling.max_new_tokens="
                             f"{cfg.sampling.max_new_tokens} exceeds the model's context of {context} tokens")
        items.append({"prompt": prompt if isinstance(prompt, str) else text, "text": text, "prompt_ids": ids,
                      "add_special_tokens": special, "raw_prompt": prompt, "row": number, "source_row": row})
    if skipped:
        logger.warning("%s: %d prompt(s) longer than the context allows left out (prompts.too_long: skip)", source, skipped)
    if not items:
        raise ValueError(f"{source}: no prompts" + (" short enough for the model's context" if skipped else ""))
    return items


def _context_length(model) -> Optional[int]:
    config = unwrap(model).config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_share_prompt(setting: str, model) -> bool:
    """Whether the model's attention takes the shared-prompt mask; ``on`` without it is refused."""
    supported = attention_implementation(model) in SHARED_PROMPT_ATTENTION
    if setting == "on" and not supported:
        raise ValueError(f"training.share_prompt: on needs attn_implementation in {SHARED_PROMPT_ATTENTION}")
    return supported


def _share_prompt(setting: str, model, device: torch.device) -> bool:
    """``device``: the trainer's (accelerate's choice)."""
    supported = _check_share_prompt(setting, model)
    slower = shared_prompt_slower_on(device) if setting == "auto" else None
    if slower is not None:
        logger.info("share_prompt: off (auto): %s", slower)
        return False
    return setting != "off" and supported


def _evaluator(cfg: OnlineConfig, tokenizer, items, reward, heldout):
    def evaluate(model) -> dict[str, float]:
        samples = sample_completions(unwrap(model), tokenizer, [i["text"] for i in items], n=cfg.sampling.eval_k,
                                     max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                                     top_p=cfg.sampling.top_p, seed=cfg.training.seed, batch_size=cfg.sampling.batch_size,
                                     add_special_tokens=items[0]["add_special_tokens"])
        prompts = [i["prompt"] for i in items for _ in range(cfg.sampling.eval_k)]
        outputs = [t for row in samples.texts for t in row]
        groups = [b for b in range(len(items)) for _ in range(cfg.sampling.eval_k)]
        result = {"reward": float(score(reward, prompts, outputs, group_ids=groups).mean()),
                  "response_length": sum(map(sum, samples.num_tokens)) / len(outputs)}
        if heldout is not None:
            result["heldout_reward"] = float(score(heldout, prompts, outputs, group_ids=groups).mean())
        return result

    return evaluate


def plot_reward_hacking(metrics_path: str | Path, png_path: str | Path) -> Optional[Path]:
    """Training reward and held-out reward against the divergence to the reference (``divergence``, else ``kl``);
    None when the log has neither a divergence nor a held-out reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmalign.engine.plots import read_metrics, save_figure

    rows = read_metrics(metrics_path)
    x_key = next((k for k in ("divergence", "kl") if any(k in r for r in rows)), None)
    if x_key is None or not any("heldout_reward/mean" in r for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, style in (("reward/mean", "o-"), ("heldout_reward/mean", "s--")):
        points = [(r[x_key], r[key]) for r in rows if x_key in r and key in r]
        if points:
            ax.plot(*zip(*points), style, ms=3, label=key)
    ax.set_xlabel(f"{x_key} to the reference")
    ax.set_ylabel("reward")
    ax.set_title("reward-hacking monitor")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png_path)


def online(config: OnlineConfig | Mapping[str, Any] | str | Path, *, reward: Any = None, heldout_reward: Any = None,
           overrides: Optional[list[str]] = None, resume_from_checkpoint: Any = None) -> TrainResult:
    """Runs an online job; returns its :class:`~mmalign.engine.TrainResult` (as ``mmalign.text.train``), with the
    details ``num_prompts``, ``reward`` (its name), ``algorithm`` and ``reward_hacking_plot``.

    ``reward`` / ``heldout_reward``: reward objects or callables (:mod:`mmalign.rewards`) used instead of the
    config's ``reward:`` / ``heldout_reward:`` sections. Everything is validated before the first step.
    """
    cfg = load_config(OnlineConfig, config, overrides or [])
    if resume_from_checkpoint is not None:
        cfg.training.resume_from_checkpoint = resume_from_checkpoint
    with torch_threads(cfg.training.num_threads):
        return _online(cfg, reward, heldout_reward)


def _online(cfg: OnlineConfig, reward: Any, heldout: Any) -> TrainResult:
    from accelerate.utils import set_seed

    set_seed(cfg.training.seed)
    reward = build_reward(reward if reward is not None else (cfg.reward or None))
    if heldout is None and cfg.heldout_reward:
        heldout = build_reward(cfg.heldout_reward)
    algo = cfg.algorithm
    objective = None
    if algo.name == "group":
        objective = mmalign.objective(algo.objective.name, **algo.objective.hyperparameters)
        member_pairs = objective.pairs == "members"
        if algo.selection == "threshold" and (member_pairs or not objective.accepts_groups):
            raise ValueError(f"algorithm.objective: {objective.name!r} is pairwise"
                             f"{' on member pairs' if member_pairs else ''}; threshold groups are ragged (use "
                             "mdpo/mipo) or use selection top_bottom")
        if not objective.accepts_groups and (algo.group_size or cfg.sampling.k // 2) != 1:
            raise ValueError(f"algorithm.group_size: objective {objective.name!r} is pairwise: set group_size: 1 "
                             "(best vs worst sample) or use mdpo/mipo")
        unknown = set(getattr(objective, "extra_inputs", ())) - set(ONLINE_EXTRA_INPUTS)
        if unknown:
            raise ValueError(f"algorithm.objective: {objective.name!r} needs inputs {sorted(unknown)} that online "
                             "groups do not have")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               gguf_file=None if cfg.model.tokenizer else cfg.model.gguf_file,
                               chat_template=cfg.model.chat_template, trust_remote_code=cfg.model.trust_remote_code)
    model = load_causal_lm(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
                           attn_implementation=cfg.model.attn_implementation,
                           trust_remote_code=cfg.model.trust_remote_code, fused_activations=cfg.model.fused_activations)
    context = _context_length(model)
    train_items = load_prompts(cfg.prompts.train, tokenizer, cfg, max_samples=cfg.prompts.max_train_samples,
                               context=context)
    train_items = add_prompt_features(train_items, cfg, tokenizer, context=context, source=cfg.prompts.train)
    eval_items = (load_prompts(cfg.prompts.eval, tokenizer, cfg, max_samples=cfg.prompts.max_eval_samples,
                               context=context) if cfg.prompts.eval else None)
    if len({i["add_special_tokens"] for i in train_items}) > 1:
        raise ValueError(f"{cfg.prompts.train}: mixes chat-formatted and plain prompts; set prompts.use_chat_template")
    reference_model = None
    if cfg.needs_reference and not cfg.lora.enabled:
        reference_model = (load_causal_lm(cfg.reference.name_or_path, gguf_file=cfg.reference.gguf_file,
                                          dtype=cfg.model.dtype) if cfg.reference.name_or_path else copy.deepcopy(model))
    if cfg.lora.enabled:
        model = apply_lora_config(model, cfg.lora)
    _check_share_prompt(cfg.training.share_prompt, model)  # refused before the trainer is built
    loss = OnlineLoss(cfg, tokenizer, reward, heldout, objective=objective)  # the layout: once the device is known
    repeats = algo.updates_per_rollout
    dataset = (RepeatedBatches(train_items, cfg.training.batch_size, repeats, cfg.training.seed) if repeats > 1
               else train_items)  # a list is a map-style dataset

    def save_model(unwrapped: torch.nn.Module, directory: Path) -> None:
        unwrapped.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    output_dir = Path(cfg.output_dir)
    trainer = Trainer(model, config=cfg.training, output_dir=output_dir, train_dataset=dataset,
                      collate_fn=list, compute_loss=loss, save_model=save_model, resolved_config=cfg,
                      shuffle=repeats == 1, plot_keys=PLOT_KEYS)
    trainer.accelerator.register_for_checkpointing(loss)  # the rollout counter (sampler seed) and open rollout
    share = _share_prompt(cfg.training.share_prompt, model, trainer.device)
    loss.use_shared_prompt(share)
    if cfg.needs_reference:
        loss.reference = (AdapterReference(model) if reference_model is None
                          else FrozenModelReference(trainer.prepare_frozen(reference_model)))
    if eval_items is not None:
        trainer.evaluate_fn = _evaluator(cfg, tokenizer, eval_items, reward, heldout)
    logger.info("online %s: %d prompts, k=%d, share_prompt=%s, reference=%s", algo.name, len(train_items),
                cfg.sampling.k, share, "none" if loss.reference is None else type(loss.reference).__name__)
    summary = trainer.train(resume_from_checkpoint=cfg.training.resume_from_checkpoint)
    plot = None
    if trainer.is_main_process and cfg.training.plot:
        plot = plot_reward_hacking(output_dir / "metrics.jsonl", output_dir / "reward_hacking.png")
    return TrainResult.from_summary(summary, model=trainer.model, output_dir=output_dir, tokenizer=tokenizer,
                                    num_prompts=len(train_items), algorithm=algo.name,
                                    reward=getattr(reward, "name", type(reward).__name__),
                                    reward_hacking_plot=str(plot) if plot else None)


DESCRIPTION = (
    "Online alignment of a causal LM against a reward: RLOO/GRPO (PPO clip, divergence to the reference in the "
    "reward or the loss), online group objectives (mdpo, mipo, dpo, cnrpo, causal_dpo... on groups formed by "
    "reward), best-of-n and rejection-sampling fine-tuning. Writes metrics.jsonl, metrics.png, reward_hacking.png, "
    "config.yaml, checkpoints/ and final/ to output_dir.")


def _run(cfg: OnlineConfig, args) -> int:
    from accelerate import PartialState

    result = online(cfg)
    if PartialState().is_main_process:  # one summary line per job, not per process
        print(result.summary_line())
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(prog="python -m mmalign.text.online", description=DESCRIPTION, config_cls=OnlineConfig,
                       run=_run, argv=argv)


make_module_callable(__name__, online)


if __name__ == "__main__":
    sys.exit(main())
