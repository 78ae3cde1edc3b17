"""Online rounds for text-to-image diffusion: ``mmalign.image.online(config, reward=...)``.

Each round (the curated self-consuming loop; thesis §3.6.4's iterative mDPO):

1. generate ``k`` images per training prompt with the current policy (the UNet with its LoRA adapters);
2. score them with an image reward (:mod:`mmalign.rewards`, e.g. :class:`~mmalign.rewards.image.ClassifierReward`:
   a group's demographic balance or a requested attribute);
3. form chosen and rejected groups per prompt by reward (:func:`mmalign.shared.policy_gradient.form_groups`: top m
   vs bottom m, or a threshold), written as an ordinary group dataset (``round-NN/data.jsonl`` + PNGs);
4. train on them with the offline image trainer's pieces (:mod:`mmalign.image.training`: the same model, objective
   and engine) against the reference chosen by ``reference``: ``initial`` (default) = the model the rounds started
   from (the adapter-disabled base under LoRA, a frozen copy under full fine-tuning), ``previous`` = a frozen copy
   of the policy as the previous round left it (the iterative-DPO convention: each round a fresh trust region);
5. evaluate: images for the held-out prompts (fixed seeds, the same every round) scored by the held-out reward
   (default: the training reward), and for a classifier reward the Simpson index of its labels per prompt (SPEC §6);
   or the caller's ``evaluate(model) -> dict`` instead.

Why ``initial`` is the default: thesis §3.6.4 does not say which reference its iterative mDPO used; anchoring every
round to the starting model keeps the divergence penalty on the total drift from it (what an offline run of the same
objective bounds, and what a debiasing run must keep small to keep the faces), where ``previous`` lets the drift
compound over rounds (the convention of iterative/self-rewarding DPO, Pang et al. 2024, Yuan et al. 2024).

``rounds.jsonl`` gets one row per round (round 0 = before training) and ``rounds.png`` plots it. The same run is
``python -m mmalign.image.online --config rounds.yaml [--resume]`` and, from an image training config with a
``rounds:`` section, ``mmalign.image.train`` / ``python -m mmalign.image.train``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from mmalign.engine.config import TrainingConfig
from mmalign.engine.result import TrainResult
from mmalign.engine.sections import LoraConfig
from mmalign.image.config import (
    DiffusionConfig,
    ImageDataConfig,
    ImageModelConfig,
    ImageObjectiveConfig,
    ImageTrainConfig,
    default_image_lora,
)
from mmalign.image.rounds_config import ROUND_KEYS, RoundsConfig

__all__ = ["ImageOnlineConfig", "online"]

logger = logging.getLogger("mmalign.image.online")


@dataclass
class ImageOnlineConfig(RoundsConfig):
    """Rounds of generate → score → group → train for a diffusion model: the ``rounds:`` keys
    (:class:`~mmalign.image.rounds_config.RoundsConfig`) plus the model, its training and the run folder."""

    model: ImageModelConfig = field(default_factory=ImageModelConfig, metadata={"help": "the diffusion model"})
    lora: LoraConfig = field(default_factory=default_image_lora,
                             metadata={"help": "LoRA on the UNet; enabled: false = full fine-tuning (the policy files "
                                               "then hold the whole UNet)"})
    resolution: int = field(default=64, metadata={"help": "generated (and trained) image side"})
    objective: ImageObjectiveConfig = field(default_factory=lambda: ImageObjectiveConfig(name="mdpo"),
                                            metadata={"help": "the objective on the groups"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata={"help": "training noise"})
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(learning_rate=1e-5, max_steps=50),
                                     metadata={"help": "optimisation of each round (max_steps per round)"})
    output_dir: str = field(default="runs/image-online", metadata={"help": "run folder (round-NN/, rounds.jsonl)"})

    def __post_init__(self) -> None:
        if not self.model.name_or_path:
            raise ValueError("model.name_or_path is required (a diffusers pipeline folder)")
        super().__post_init__()
        if self.training.max_steps < 1:
            raise ValueError("training.max_steps: set the optimizer steps of each round (>= 1)")


def _generate(model, prompts: list[str], cfg: ImageOnlineConfig, first_seed: int):
    from mmalign.image.generation import generate_images

    return generate_images(model.unet, model.conditioner, model.noise_scheduler.config, prompts, vae=model.vae,
                           seeds=[first_seed + i for i in range(len(prompts))], scheduler=cfg.scheduler,
                           num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                           height=cfg.resolution, width=cfg.resolution)


def _evaluate(model, cfg: ImageOnlineConfig, reward, heldout) -> dict[str, float]:
    import numpy as np

    from mmalign.rewards import score
    from mmalign.shared.metrics import mean_simpson_index

    prompts = [p for p in (cfg.heldout_prompts or cfg.prompts) for _ in range(cfg.eval_k)]
    groups = [i // cfg.eval_k for i in range(len(prompts))]
    images = [np.asarray(im.convert("RGB")) for im in _generate(model, prompts, cfg, cfg.seed + 7_777_777)]
    row = {"heldout_reward": float(score(heldout, prompts, images, group_ids=groups).mean())}
    classifier = getattr(heldout, "classifier", None)
    if classifier is not None:  # hard labels of the classifier: the Simpson index per prompt (SPEC §6)
        predictions = classifier.classify(np.stack(images))[heldout.attribute]
        by_prompt: dict[int, list] = {}
        for group, prediction in zip(groups, predictions):
            if prediction.label is not None:
                by_prompt.setdefault(group, []).append(prediction.label)
        row[f"simpson_{heldout.attribute}"] = mean_simpson_index(list(by_prompt.values())) if by_prompt else float("nan")
    return row


def _write_round_data(directory: Path, prompts: list[str], images, rewards: torch.Tensor, cfg: ImageOnlineConfig) -> tuple[Path, dict]:
    from mmalign.io import atomic_write_text
    from mmalign.shared.policy_gradient import form_groups

    chosen, chosen_mask, rejected, rejected_mask, valid = form_groups(
        rewards, selection=cfg.selection, group_size=cfg.group_size, threshold=cfg.threshold)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for b, prompt in enumerate(prompts):
        names = []
        for j in range(cfg.k):
            name = f"images/{b:04d}_{j:02d}.png"
            images[b * cfg.k + j].save(directory / name)
            names.append(name)
        if bool(valid[b]):
            rows.append({"prompt": prompt,
                         "chosen": [names[j] for j in chosen[b][chosen_mask[b]].tolist()],
                         "rejected": [names[j] for j in rejected[b][rejected_mask[b]].tolist()]})
    if not rows:
        raise ValueError(f"{directory}: every prompt's {cfg.k} images tie on the reward; no preference to train on")
    path = directory / "data.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
             "groups": len(rows), "scores": rewards.tolist()}
    atomic_write_text(directory / "scores.json", json.dumps(stats, indent=1))
    return path, stats


def _plot_rounds(rows: list[dict], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmalign.engine.plots import save_figure

    keys = [k for k in rows[0] if k != "round" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["round"] for r in rows], [r[key] for r in rows], "o-")
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def online_config(config: ImageTrainConfig) -> ImageOnlineConfig:
    """The online-rounds config of an image training config with a ``rounds:`` section (its model, lora, objective,
    diffusion, training and output_dir; ``data.resolution`` as the generated image side)."""
    if config.rounds is None:
        raise ValueError("rounds: this image training config has no rounds: section")
    values = {key: getattr(config.rounds, key) for key in ROUND_KEYS}
    try:
        return ImageOnlineConfig(**values, model=config.model, lora=config.lora, objective=config.objective,
                                 diffusion=config.diffusion, training=config.training, output_dir=config.output_dir,
                                 resolution=config.data.resolution)
    except ValueError as err:
        from mmalign.config import ConfigError

        raise ConfigError(f"rounds: {err}") from None


def online(config: ImageOnlineConfig | Mapping[str, Any] | str | os.PathLike, *, reward: Any = None,
           heldout_reward: Any = None, evaluate: Optional[Callable[[Any], Mapping[str, float]]] = None,
           overrides=()) -> TrainResult:
    """Runs (or, with ``training.resume_from_checkpoint: latest``, resumes) the rounds; returns a
    :class:`~mmalign.engine.TrainResult`: the policy pipeline model, every round's metric rows (``round`` added)
    as ``log``, and the details ``rounds`` (one row per round, round 0 = untrained) and ``plot``.

    Exact resume: a finished round leaves ``round-NN/policy.safetensors`` (the LoRA tensors) and its row in
    ``rounds.jsonl``; a resumed run reloads the last finished round's policy, reuses a round's generated data when
    it was complete (``scores.json`` is written last), and resumes a round's training from its own checkpoints
    (the engine's exact resume). Generation seeds depend only on the round and the image index, and each round's
    trainer seeds itself, so a resumed run equals an uninterrupted one. With ``reference: previous`` the reference
    is rebuilt from the last finished round's policy file, so a resumed round trains against the same reference.

    ``evaluate(model) -> {name: number}``, when given, replaces the built-in held-out evaluation: it is called on
    the :class:`~mmalign.image.diffusion.DiffusionPreferenceModel` before training (round 0) and after every round,
    and its numbers go into that round's row (e.g. an experiment's own measurement).
    """
    from mmalign.config import load_config

    cfg = load_config(ImageOnlineConfig, config, list(overrides))
    reward = _build_reward(reward, cfg)
    heldout = heldout_reward if heldout_reward is not None else reward
    from mmalign.engine.threads import torch_threads

    with torch_threads(cfg.training.num_threads):
        return _rounds(cfg, reward, heldout, evaluate)


def _build_reward(reward: Any, cfg: ImageOnlineConfig):
    from mmalign.rewards import build_reward

    return build_reward(reward if reward is not None else (cfg.reward or None))


def _rounds(cfg: ImageOnlineConfig, reward, heldout, evaluate=None) -> TrainResult:
    import numpy as np
    from accelerate.utils import set_seed

    from mmalign.engine import Trainer
    from mmalign.engine.faults import fault_point
    from mmalign.engine.result import read_metric_rows
    from mmalign.image.data.dataset import collate_groups
    from mmalign.image.training import build_dataset, build_objective, build_preference_model, make_compute_loss, save_trained_unet
    from mmalign.image.rounds_state import finished_rounds, load_policy, save_policy, use_policy_as_reference
    from mmalign.io import atomic_write_text
    from mmalign.rewards import score

    def measure(model) -> dict:
        return dict(evaluate(model)) if evaluate is not None else _evaluate(model, cfg, reward, heldout)

    output_dir = Path(cfg.output_dir)
    resume = cfg.training.resume_from_checkpoint
    rows = finished_rounds(output_dir, resume, cfg.training.overwrite_output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    training = replace(cfg.training, resume_from_checkpoint=None)  # each round's trainer is told explicitly

    def round_config(r: int, data_path: str) -> ImageTrainConfig:
        return ImageTrainConfig(output_dir=str(output_dir / f"round-{r:02d}"), model=cfg.model, lora=cfg.lora,
                                data=ImageDataConfig(train=data_path, resolution=cfg.resolution, allow_ragged_groups=True),
                                objective=cfg.objective, diffusion=cfg.diffusion, training=training)

    set_seed(cfg.training.seed)  # the LoRA initialisation: a run is a function of its config
    model = build_preference_model(round_config(0, "<generated>"))
    if torch.cuda.is_available():
        model.to("cuda")
    if rows and rows[-1]["round"] > 0:
        load_policy(model, output_dir / f"round-{rows[-1]['round']:02d}" / "policy.safetensors")
        if cfg.reference == "previous":
            use_policy_as_reference(model)
    if not rows:
        rows = [{"round": 0, **measure(model)}]
        atomic_write_text(output_dir / "rounds.jsonl", json.dumps(rows[0]) + "\n")
        logger.info("round 0: %s", rows[0])
    resuming_round = rows[-1]["round"] + 1 if resume not in (None, False) else None
    for r in range(rows[-1]["round"] + 1, cfg.rounds + 1):
        directory = output_dir / f"round-{r:02d}"
        if (directory / "scores.json").is_file() and (directory / "data.jsonl").is_file():
            data_path, stats = directory / "data.jsonl", json.loads((directory / "scores.json").read_text())
        else:
            prompts = [p for p in cfg.prompts for _ in range(cfg.k)]
            images = _generate(model, prompts, cfg, cfg.seed + 100_003 * r)
            arrays = [np.asarray(im.convert("RGB")) for im in images]
            rewards = score(reward, prompts, arrays, group_ids=[i // cfg.k for i in range(len(prompts))])
            data_path, stats = _write_round_data(directory, cfg.prompts, images,
                                                 rewards.reshape(len(cfg.prompts), cfg.k), cfg)
        fault_point("round_data", r)
        train_cfg = round_config(r, str(data_path))
        dataset = build_dataset(train_cfg, model)
        objective = build_objective(train_cfg, dataset)
        trainer = Trainer(model, config=training, output_dir=directory, train_dataset=dataset,
                          collate_fn=collate_groups, compute_loss=make_compute_loss(objective),
                          save_model=save_trained_unet, resolved_config=train_cfg)
        summary = trainer.train(resume_from_checkpoint="latest" if r == resuming_round else None)
        model = trainer.model
        save_policy(model, directory / "policy.safetensors")
        if cfg.reference == "previous" and r < cfg.rounds:
            use_policy_as_reference(model)
        row = {"round": r, "train_reward": stats["reward_mean"], "groups": stats["groups"],
               "loss": summary["metrics"].get("loss"), "global_step": summary["global_step"],
               "train_runtime_s": summary["train_runtime_s"], **measure(model)}
        rows.append(row)
        logger.info("round %d: %s", r, row)
        atomic_write_text(output_dir / "rounds.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
        fault_point("round_done", r)
    plot = _plot_rounds(rows, output_dir / "rounds.png")
    log = [{**row, "round": r} for r in range(1, cfg.rounds + 1)
           for row in read_metric_rows(output_dir / f"round-{r:02d}" / "metrics.jsonl")]
    last = output_dir / f"round-{cfg.rounds:02d}"
    return TrainResult(model=model, output_dir=output_dir, log=log, metrics={**(log[-1] if log else {}), **rows[-1]},
                       global_step=sum(int(x.get("global_step", 0)) for x in rows[1:]),
                       epoch=float(cfg.rounds), train_runtime_s=sum(float(x.get("train_runtime_s", 0.0)) for x in rows[1:]),
                       final_dir=last / "final", plot_path=plot, details={"rounds": rows, "plot": str(plot) if plot else None})


DESCRIPTION = (
    "Online rounds for a text-to-image diffusion model: generate k images per prompt with the LoRA policy, score "
    "them with the image reward (reward: section, e.g. a face classifier's balance), form chosen/rejected groups, "
    "train (any image objective), evaluate the held-out prompts; repeat. Writes round-NN/ (images, data.jsonl, "
    "scores.json, the round's training run, policy.safetensors), rounds.jsonl and rounds.png to output_dir; "
    "--resume continues an interrupted run exactly.")


def _run(cfg: ImageOnlineConfig, args) -> int:
    result = online(cfg)
    print(f"done: {len(result['rounds']) - 1} rounds, {result.global_step} steps; last round: "
          + json.dumps(result["rounds"][-1]))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from mmalign.cli import run_command

    return run_command(prog="python -m mmalign.image.online", description=DESCRIPTION, config_cls=ImageOnlineConfig,
                       run=_run, argv=argv)


from mmalign.entrypoints import make_module_callable  # noqa: E402

make_module_callable(__name__, online)  # mmalign.image.online(config) after the submodule is imported

if __name__ == "__main__":
    import sys

    sys.exit(main())
