"""One training loop on ``accelerate`` for every modality.

The backend (text, image) supplies the model, a dataset + collate function and ``compute_loss(model, batch)``
returning a :class:`StepOutput`; the engine owns everything else: AdamW + LR schedule, gradient accumulation,
mixed precision, clipping, metric averaging and logging, evaluation, atomic resumable checkpoints, the final
save and the training-curve plot. Works unchanged under ``accelerate launch`` (DDP, DeepSpeed): objects go
through ``accelerator.prepare``, metrics are reduced across processes, files are written by the main process.

Hot-loop rules (the per-step overhead is benchmarked against a bare torch loop): no ``.item()`` or other
device sync per step; metric tensors are summed on device and reduced once per logging window.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from mmalign.config import save_config, to_dict
from mmalign.engine.allocator import release_freed_memory
from mmalign.engine.checkpoints import TRAINER_STATE_NAME
from mmalign.engine.checkpointing import CheckpointingMixin
from mmalign.engine.config import TrainingConfig
from mmalign.engine.determinism import deterministic_kernels
from mmalign.engine.guards import NonFiniteGuard
from mmalign.engine.metric_window import MetricWindow
from mmalign.engine.optim import build_adamw, fused_adamw_blocker, lr_lambda
from mmalign.engine.run_identity import clear_checkpoints, find_latest_checkpoint, resolve_run, write_run_id
from mmalign.engine.plots import DEFAULT_PLOT_KEYS, plot_metrics
from mmalign.engine.reporting import MetricsWriter, format_metrics, truncate_jsonl
from mmalign.engine.sampling import EpochSampler
from mmalign.engine.step import StepOutput
from mmalign.engine.threads import torch_threads

# StepOutput, EpochSampler, torch_threads and fused_adamw_blocker live in their own modules; kept importable here.
__all__ = ["StepOutput", "Trainer", "EpochSampler", "find_latest_checkpoint", "torch_threads", "TRAINER_STATE_NAME",
           "fused_adamw_blocker"]

logger = logging.getLogger("mmalign.engine")

CONSOLE_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "learning_rate", "tokens/s")


class Trainer(CheckpointingMixin):
    """Trains ``model`` on ``train_dataset`` with ``compute_loss``; see the module docstring.

    Args:
        model: the ``torch.nn.Module`` to optimise (its trainable parameters, or ``trainable_parameters``).
        config: the :class:`TrainingConfig`.
        output_dir: run folder: ``metrics.jsonl``, ``metrics.png``, ``config.yaml``, ``checkpoints/``, ``final/``.
        train_dataset: a map-style dataset (``len`` + ``__getitem__``).
        collate_fn: list of dataset items -> batch (tensors are moved to the device by accelerate).
        compute_loss: ``(model, batch) -> StepOutput``.
        save_model: ``(unwrapped_model, directory) -> None`` writes the final model; None skips the final save.
        evaluate: ``(model) -> dict[str, float]``, called every ``eval_steps`` and at the end (on every process;
            reduce inside if the evaluation is sharded); logged with the prefix ``eval_``.
        trainable_parameters: parameters to optimise; default: those with ``requires_grad``.
        resolved_config: the full run config (dataclass or dict), saved as ``config.yaml`` and in ``final/``.
        shuffle: shuffle the data each epoch (seeded).
        accelerator: an existing ``accelerate.Accelerator``; by default one is built from ``config``.
        plot_keys: metrics drawn in ``metrics.png``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        config: TrainingConfig,
        output_dir: str | os.PathLike,
        train_dataset: Any,
        collate_fn: Callable[[list], Any],
        compute_loss: Callable[[torch.nn.Module, Any], StepOutput],
        save_model: Optional[Callable[[torch.nn.Module, Path], None]] = None,
        evaluate: Optional[Callable[[torch.nn.Module], Mapping[str, float]]] = None,
        trainable_parameters: Optional[Iterable[torch.nn.Parameter]] = None,
        resolved_config: Any = None,
        shuffle: bool = True,
        accelerator: Any = None,
        plot_keys: Sequence[str] = DEFAULT_PLOT_KEYS,
    ):
        from accelerate import Accelerator

        self.config = config
        self.output_dir = Path(output_dir)
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn
        self.compute_loss = compute_loss
        self.save_model_fn = save_model
        self.evaluate_fn = evaluate
        self.resolved_config = resolved_config
        self.shuffle = shuffle
        self.plot_keys = tuple(plot_keys)
        if accelerator is None:
            # Under torchrun/accelerate launch on a machine without CUDA, accelerate only forms the multi-process
            # (gloo) group when told it runs on CPU; otherwise every process would train alone.
            cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
            from accelerate.utils import DataLoaderConfiguration

            accelerator = Accelerator(
                gradient_accumulation_steps=config.gradient_accumulation_steps,
                mixed_precision=config.mixed_precision,
                cpu=cpu_distributed,
                # pinned host batches + non-blocking copies overlap the transfer with compute on GPU
                dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
            )
        self.accelerator = accelerator
        self.model = model
        params = list(trainable_parameters) if trainable_parameters is not None else [
            p for p in model.parameters() if p.requires_grad
        ]
        if not params:
            raise ValueError("Trainer: the model has no trainable parameters (all requires_grad=False)")
        self._trainable_ids = {id(p) for p in params}
        self._partial_checkpoint = len(self._trainable_ids) < sum(1 for _ in model.parameters())
        self._params = params
        self._extra_states: list = []
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def prepare_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """Puts an inference-only module (e.g. a separate reference model) on the device, frozen, in eval mode."""
        module.requires_grad_(False)
        module.eval()
        return module.to(self.device)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # a hook: the 8-bit AdamW trainer of mmalign.image.families.memory overrides it
        return build_adamw(self._params, self.config)

    def _build_dataloader(self) -> DataLoader:
        cfg = self.config
        self._sampler = EpochSampler(len(self.train_dataset), seed=cfg.seed, shuffle=self.shuffle)
        # A private generator: DataLoader draws a base seed per iterator, which must not consume the global RNG
        # (otherwise a resumed run's dropout masks would differ from an uninterrupted run's).
        generator = torch.Generator()
        generator.manual_seed(cfg.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=cfg.batch_size,
            sampler=self._sampler,
            collate_fn=self.collate_fn,
            num_workers=cfg.dataloader_num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
            generator=generator,
        )

    # ------------------------------------------------------------------------------------------ logging
    def _flush_window(self, elapsed: float) -> dict[str, float]:
        """Reduces the window's metric sums across processes (one collective, one host sync)."""
        acc = self.accelerator
        names = sorted(self._window.sums)
        values = []
        for name in names:
            value = self._window.sums[name]
            value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            values.append(value.to(acc.device).reshape(()) / self._window.counts[name])
        values.append(torch.tensor(float(self._window_tokens), device=acc.device))
        stacked = torch.stack(values)
        if acc.num_processes > 1:
            stacked = acc.reduce(stacked, reduction="mean")
        host = stacked.tolist()
        row: dict[str, float] = dict(zip(names, host[:-1]))
        tokens = host[-1] * acc.num_processes
        if tokens > 0 and elapsed > 0:
            row["tokens/s"] = tokens / elapsed
        self._window.clear()
        self._window_tokens = 0
        self._window_steps = 0
        return row

    def _log(self, row: Mapping[str, Any]) -> None:
        full = {"step": self.global_step, "epoch": round(self._epoch_progress(), 4), **row}
        if self.accelerator.is_main_process:
            self._writer.write(full)
            from tqdm.auto import tqdm

            # tqdm.write keeps the progress bar intact; it prints whether or not a bar is shown.
            tqdm.write(format_metrics(full, ("step", "epoch") + CONSOLE_KEYS + tuple(k for k in full if k.startswith("eval_"))))
        self.last_metrics.update(full)

    def _epoch_progress(self) -> float:
        return self.epoch + self.batches_in_epoch / max(1, self._batches_per_epoch)

    def _run_evaluation(self, model: torch.nn.Module) -> None:
        if self.evaluate_fn is None:
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = self.evaluate_fn(model)
        model.train(was_training)
        row = {}
        for key, value in dict(result or {}).items():
            value = float(value.item()) if isinstance(value, torch.Tensor) else float(value)
            row[key if key.startswith("eval_") else f"eval_{key}"] = value
        if row:
            self._log(row)
        self._last_eval_step = self.global_step

    # ------------------------------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: Any = None) -> dict[str, Any]:
        """Runs to ``max_steps`` (or ``num_epochs``); returns a summary (steps, runtime, last metrics, paths).

        ``resume_from_checkpoint``: None (fresh run), ``"latest"`` (the newest checkpoint in ``output_dir``, or a
        fresh run when there is none) or a checkpoint folder. A resumed run reproduces the losses of an
        uninterrupted one (same data order, RNG states, optimizer/scheduler state and partial metric window).
        """
        release_freed_memory(self.config.release_freed_memory)
        with torch_threads(self.config.num_threads), deterministic_kernels(self.config.deterministic):
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint: Any = None) -> dict[str, Any]:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        acc = self.accelerator
        cfg = self.config
        if cfg.eval_steps and self.evaluate_fn is None:
            raise ValueError(f"training.eval_steps: {cfg.eval_steps} but this run has nothing to evaluate (no eval "
                             "data / generation prompts); set training.eval_steps: 0 or give evaluation data")
        # every process decides from the files before the main process changes any
        resume_path, self.run_id, clear_old = resolve_run(self.output_dir, resume_from_checkpoint,
                                                          overwrite=cfg.overwrite_output_dir)
        acc.wait_for_everyone()
        if resume_path is None:
            set_seed(cfg.seed)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if clear_old:
                logger.warning("training.overwrite_output_dir: deleting the checkpoints of another run in %s",
                               self._checkpoint_root())
                clear_checkpoints(self._checkpoint_root())
            self._checkpoint_root().mkdir(parents=True, exist_ok=True)
            write_run_id(self._checkpoint_root(), self.run_id)
            if self.resolved_config is not None:
                save_config(self.resolved_config, self.output_dir / "config.yaml")
            if resume_path is None and (self.output_dir / "metrics.jsonl").exists():
                (self.output_dir / "metrics.jsonl").unlink()  # a fresh run starts a fresh log

        dataloader = self._build_dataloader()
        optimizer = self._build_optimizer()
        model, optimizer, dataloader = acc.prepare(self.model, optimizer, dataloader)
        self._batches_per_epoch = len(dataloader)
        if self._batches_per_epoch == 0:
            raise ValueError("Trainer: the training dataset is empty")
        steps_per_epoch = math.ceil(self._batches_per_epoch / cfg.gradient_accumulation_steps)
        total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
        self._total_steps = total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
            lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps),
        )
        # Not acc.prepare'd: accelerate would step it num_processes times per step; it is checkpointed explicitly.
        self._prepared_model, self._optimizer, self._scheduler = model, optimizer, scheduler
        self._guard = NonFiniteGuard(acc.device)
        self._last_checkpoint: Optional[str] = None

        self._window = MetricWindow()
        self._window_tokens = 0
        self._window_steps = 0
        self._last_eval_step = -1
        self.last_metrics: dict[str, Any] = {}
        if resume_path is not None:
            self._load_checkpoint(resume_path)
            if acc.is_main_process:
                truncate_jsonl(self.output_dir / "metrics.jsonl", self.global_step)
                logger.info("resumed from %s at step %d", resume_path, self.global_step)
            self._last_checkpoint = str(resume_path)
        self._writer = MetricsWriter(self.output_dir, cfg.report_to, to_dict(self.resolved_config)) if acc.is_main_process else None
        self._progress = tqdm(
            total=total_steps,
            initial=self.global_step,
            desc="train",
            disable=not (acc.is_main_process and cfg.progress_bar),
            dynamic_ncols=True,
        )
        clip = cfg.max_grad_norm is not None and cfg.max_grad_norm > 0
        params = self._params
        model.train()
        start_time = time.perf_counter()
        window_start, paused = start_time, 0.0
        start_step = self.global_step
        try:
            while self.global_step < total_steps:
                self._sampler.set_epoch(self.epoch)
                if hasattr(dataloader, "set_epoch"):
                    dataloader.set_epoch(self.epoch)
                skip = self.batches_in_epoch
                batches = acc.skip_first_batches(dataloader, skip) if skip else dataloader
                finished = False
                for batch in batches:
                    with acc.accumulate(model):
                        out = self.compute_loss(model, batch)
                        acc.backward(out.loss)
                        self._guard.observe_loss(out.loss, self.global_step + 1)
                        self._window.add("loss", out.loss)
                        for name, value in out.metrics.items():
                            if name != "loss":
                                self._window.add(name, value)
                        if out.num_tokens:
                            self._window_tokens += out.num_tokens
                        if acc.sync_gradients:
                            if clip:
                                grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
                                if grad_norm is not None:
                                    self._guard.observe_grad_norm(grad_norm, self.global_step + 1)
                                    self._window.add("grad_norm", grad_norm)
                            optimizer.step()
                            if not acc.optimizer_step_was_skipped:
                                scheduler.step()
                            optimizer.zero_grad(set_to_none=True)
                    self.batches_in_epoch += 1
                    if not acc.sync_gradients:
                        continue
                    self.global_step += 1
                    self._window_steps += 1
                    self._progress.update(1)
                    if self.global_step % cfg.logging_steps == 0:
                        self._check_finite()
                        now = time.perf_counter()
                        row = self._flush_window(now - window_start - paused)
                        row["learning_rate"] = scheduler.get_last_lr()[0]
                        window_start, paused = now, 0.0
                        self._log(row)
                    if cfg.eval_steps and self.global_step % cfg.eval_steps == 0:
                        pause_start = time.perf_counter()
                        self._run_evaluation(model)
                        paused += time.perf_counter() - pause_start  # tokens/s measures training only
                    if cfg.save_steps and self.global_step % cfg.save_steps == 0:
                        pause_start = time.perf_counter()
                        self.save_checkpoint()
                        paused += time.perf_counter() - pause_start
                    if self.global_step >= total_steps:
                        finished = True
                        break
                if not finished:
                    self.epoch += 1
                    self.batches_in_epoch = 0
            self._check_finite()
            if self._window:
                row = self._flush_window(time.perf_counter() - window_start - paused)
                row["learning_rate"] = scheduler.get_last_lr()[0]
                self._log(row)
            if self._last_eval_step != self.global_step:
                self._run_evaluation(model)
            runtime = time.perf_counter() - start_time
            final_dir = self._final_save(model)
        finally:
            self._progress.close()
            if self._writer is not None:
                self._writer.close()
        plot_path = None
        if acc.is_main_process and cfg.plot:
            plot_path = plot_metrics(self.output_dir / "metrics.jsonl", self.plot_keys, self.output_dir / "metrics.png")
        steps_run = self.global_step - start_step
        self.model = acc.unwrap_model(model)
        return {
            "global_step": self.global_step,
            "epoch": self._epoch_progress(),
            "train_runtime_s": runtime,
            "steps_per_second": steps_run / runtime if runtime > 0 else float("nan"),
            "metrics": dict(self.last_metrics),
            "metrics_path": str(self.output_dir / "metrics.jsonl"),
            "plot_path": str(plot_path) if plot_path else None,
            "final_dir": str(final_dir) if final_dir else None,
        }

    def _check_finite(self) -> None:
        self._guard.check(self.accelerator, last_checkpoint=self._last_checkpoint,
                          learning_rate=self.config.learning_rate)
