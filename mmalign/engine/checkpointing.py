"""The trainer's checkpoint save, rotation and resume (the file formats and atomic writes are in ``checkpoints``)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from mmalign.config import save_config
from mmalign.engine import checkpoints as ckpt
from mmalign.engine.checkpoints import CHECKPOINT_PREFIX, TRAINER_STATE_NAME, CheckpointError
from mmalign.engine.faults import fault_point
from mmalign.engine.metric_window import WINDOW_STATE_NAME

logger = logging.getLogger("mmalign.engine")


class CheckpointingMixin:
    """The checkpoint methods of :class:`mmalign.engine.trainer.Trainer` (it owns the state they read and write)."""

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

    def _final_save(self, model: torch.nn.Module) -> Optional[Path]:
        """Writes ``final/`` atomically (a temp folder, then a rename) on the main process; None without ``save_model``."""
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
