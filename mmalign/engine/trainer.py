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

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from mmalign.config import save_config, to_dict
from mmalign.engine import checkpoints as ckpt
from mmalign.engine.checkpoints import CHECKPOINT_PREFIX, TRAINER_STATE_NAME, CheckpointError
from mmalign.engine.config import TrainingConfig
from mmalign.engine.faults import fault_point
from mmalign.engine.guards import NonFiniteGuard
from mmalign.engine.run_identity import clear_checkpoints, find_latest_checkpoint, resolve_run, write_run_id
from mmalign.engine.plots import DEFAULT_PLOT_KEYS, plot_metrics
from mmalign.engine.reporting import MetricsWriter, format_metrics, truncate_jsonl

__all__ = ["StepOutput", "Trainer", "EpochSampler", "find_latest_checkpoint", "torch_threads", "TRAINER_STATE_NAME"]

logger = logging.getLogger("mmalign.engine")

# parameter dtypes torch's fused AdamW kernel takes (CPU and CUDA)
_FUSED_ADAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)



def fused_adamw_blocker(params: Sequence[torch.nn.Parameter]) -> Optional[str]:
    """Why torch's fused AdamW cannot take ``params`` (None: it can): it needs CPU/CUDA floating-point tensors."""
    if not params:
        return "no trainable parameters"
    odd = sorted({f"{p.device.type}/{str(p.dtype).replace('torch.', '')}" for p in params
                  if p.device.type not in ("cpu", "cuda") or p.dtype not in _FUSED_ADAM_DTYPES})
    return f"parameters on {', '.join(odd)} (the fused kernel takes CPU/CUDA floating point)" if odd else None


WINDOW_STATE_NAME = "metric_window_{}.json"
CONSOLE_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "learning_rate", "tokens/s")


@dataclass
class StepOutput:
    """What ``compute_loss`` returns for one micro-batch.

    ``loss`` is the scalar to back-propagate; ``metrics`` are scalars (0-dim tensors preferred: they are averaged
    on device without a sync); ``num_tokens`` is the number of tokens processed (for tokens/s), a host int.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    num_tokens: Optional[int] = None


class EpochSampler(Sampler[int]):
    """A permutation of the dataset per epoch from ``seed + epoch`` (or the identity when not shuffling).

    Its own generator keeps the data order independent of the global RNG, so resuming mid-epoch replays the
    same order, and model-side randomness (dropout) never shifts the data order.
    """

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class _MetricWindow:
    """Running sums of metric tensors over a logging window, kept on device (no sync until ``reduce``)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        previous = self.sums.get(name)
        self.sums[name] = value if previous is None else previous + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def __bool__(self) -> bool:
        return bool(self.sums)

    def state(self) -> dict[str, Any]:
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "counts": dict(self.counts),
        }

    def load(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, device=device) for k, v in state.get("sums", {}).items()}
        self.counts = dict(state.get("counts", {}))

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()


@contextlib.contextmanager
def torch_threads(num_threads: Optional[int]):
    """``torch.set_num_threads(num_threads)`` for the duration of the block (None: leave as is), then restore."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


class Trainer:
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
        cfg = self.config
        decay = [p for p in self._params if p.ndim >= 2]
        no_decay = [p for p in self._params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        kwargs = {}
        blocker = fused_adamw_blocker(self._params)
        if blocker is None:
            # one kernel over all parameters (CPU too: 4x faster than the per-tensor loop, the CPU default)
            kwargs["fused"] = True
        elif self._params:
            logger.warning("fast path fused AdamW not taken: %s", blocker)
        return torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **kwargs
        )

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

    # ------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoints/checkpoint-<step>`` atomically (temp folder, manifest last, then a rename that
        replaces an existing folder of that step only once the new one is complete); see ``checkpoints.py``."""
        acc = self.accelerator
        self._guard.check(acc, last_checkpoint=self._last_checkpoint, learning_rate=self.config.learning_rate)
        root = self._checkpoint_root()
        final = root / f"{CHECKPOINT_PREFIX}{self.global_step}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{self.global_step}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = acc.unwrap_model(self._prepared_model)
            state = model.state_dict()
            if self._partial_checkpoint:
                # frozen weights (a LoRA base model) are reloaded from their source: keep only what trains
                trainable = {name for name, p in model.named_parameters() if p.requires_grad}
                state = {k: v for k, v in state.items() if k in trainable}
            ckpt.save_model_state(state, tmp / ckpt.MODEL_NAME)
            ckpt.save_optimizer_state(self._optimizer, tmp / ckpt.OPTIMIZER_NAME)
            ckpt.save_json_state(ckpt.scheduler_state(self._scheduler), tmp / ckpt.SCHEDULER_NAME)
            if acc.scaler is not None:
                ckpt.save_json_state(acc.scaler.state_dict(), tmp / ckpt.SCALER_NAME)
            for index, obj in enumerate(self._registered_states()):
                ckpt.save_custom_state(obj, tmp / ckpt.CUSTOM_NAME.format(index))
        fault_point("checkpoint_files", self.global_step)
        ckpt.save_rng_state(tmp / ckpt.RNG_NAME.format(acc.process_index))
        # Each process's partial metric window (sums since the last log), so a resume mid-window logs the same
        # averages as an uninterrupted run.
        window = {"window": self._window.state(), "window_tokens": self._window_tokens,
                  "window_steps": self._window_steps}
        with open(tmp / WINDOW_STATE_NAME.format(acc.process_index), "w") as fh:
            json.dump(window, fh)
        # every process writes its own RNG/window state into tmp: all must finish before the main process renames it
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch,
                "batches_per_epoch": self._batches_per_epoch,
                "total_steps": self._total_steps,
                "num_processes": acc.num_processes,
                "run_id": self.run_id,
            }
            with open(tmp / TRAINER_STATE_NAME, "w") as fh:
                json.dump(state, fh, indent=1)
            ckpt.write_manifest(tmp, {"run_id": self.run_id, "global_step": self.global_step})
            fault_point("checkpoint_manifest", self.global_step)
            ckpt.replace_folder(tmp, final)
            fault_point("before_rotation", self.global_step)
            self._rotate_checkpoints()
        acc.wait_for_everyone()
        self._last_checkpoint = str(final)
        return final

    def register_state(self, obj: Any) -> None:
        """Checkpoints ``obj`` (``state_dict`` / ``load_state_dict`` of tensors and plain values) with the run."""
        self._extra_states.append(obj)

    def _registered_states(self) -> list:
        # objects given to accelerate's register_for_checkpointing are kept too, but stored without pickle
        return self._extra_states + list(getattr(self.accelerator, "_custom_objects", []))

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if limit is None:
            return
        # only this run's checkpoints exist here (run_identity refuses to share a folder)
        checkpoints = ckpt.list_checkpoints(self._checkpoint_root())
        for _, path in checkpoints[: max(0, len(checkpoints) - limit)]:
            (path / ckpt.MANIFEST_NAME).unlink(missing_ok=True)  # first: a folder half deleted is never "complete"
            fault_point("mid_rotation", self.global_step)
            shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = ckpt.read_trainer_state(path)
        if state["batches_per_epoch"] != self._batches_per_epoch:
            raise ValueError(
                f"{path}: the checkpoint was written with {state['batches_per_epoch']} batches per epoch, this run has "
                f"{self._batches_per_epoch}; resume with the same data, batch_size and number of processes"
            )
        model = acc.unwrap_model(self._prepared_model)
        weights = ckpt.load_model_state(path / ckpt.MODEL_NAME)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or (missing and not self._partial_checkpoint):
            raise CheckpointError(f"{path}: the weights do not fit this model (missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}); resume with the model the checkpoint was written from")
        ckpt.load_optimizer_state(self._optimizer, path / ckpt.OPTIMIZER_NAME)
        ckpt.load_scheduler_state(self._scheduler, ckpt.load_json_state(path / ckpt.SCHEDULER_NAME))
        if acc.scaler is not None and (path / ckpt.SCALER_NAME).exists():
            acc.scaler.load_state_dict(ckpt.load_json_state(path / ckpt.SCALER_NAME))
        for index, obj in enumerate(self._registered_states()):
            custom = path / ckpt.CUSTOM_NAME.format(index)
            if not custom.is_file():
                raise CheckpointError(f"{custom}: missing; the checkpoint was written without the state of "
                                      f"{type(obj).__name__}, so the run cannot resume exactly")
            ckpt.load_custom_state(obj, custom)
        rng_file = path / ckpt.RNG_NAME.format(acc.process_index)
        try:
            ckpt.load_rng_state(rng_file)
        except CheckpointError as err:
            if not self.config.allow_inexact_resume:
                raise CheckpointError(
                    f"{err}: the random generator state cannot be restored, so the resumed run would not repeat "
                    "the uninterrupted one (other dropout masks, noise); resume from another checkpoint, or set "
                    "training.allow_inexact_resume: true to continue with fresh randomness"
                ) from None
            logger.warning("%s; training.allow_inexact_resume: continuing with the current random state (the run "
                           "will not repeat an uninterrupted one)", err)
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.batches_in_epoch = state["batches_in_epoch"]
        window_file = path / WINDOW_STATE_NAME.format(acc.process_index)
        window = json.loads(window_file.read_text()) if window_file.exists() else {}
        self._window.load(window.get("window", {}), acc.device)
        self._window_tokens = window.get("window_tokens", 0)
        self._window_steps = window.get("window_steps", 0)

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
        with torch_threads(self.config.num_threads):
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
            _lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps),
        )
        # Not acc.prepare'd: accelerate would step it num_processes times per step; it is checkpointed explicitly.
        self._prepared_model, self._optimizer, self._scheduler = model, optimizer, scheduler
        self._guard = NonFiniteGuard(acc.device)
        self._last_checkpoint: Optional[str] = None

        self._window = _MetricWindow()
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

    def _final_save(self, model: torch.nn.Module) -> Optional[Path]:
        acc = self.accelerator
        self._check_finite()
        fault_point("before_final", self.global_step)
        acc.wait_for_everyone()
        if self.save_model_fn is None:
            return None
        final = self.output_dir / "final"
        tmp = self.output_dir / ".tmp-final"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            self.save_model_fn(acc.unwrap_model(model), tmp)
            if self.resolved_config is not None:
                save_config(self.resolved_config, tmp / "config.yaml")
            fault_point("final_tmp", self.global_step)
            ckpt.replace_folder(tmp, final)
        acc.wait_for_everyone()
        return final
