"""The modality-agnostic training engine on ``accelerate`` (used by ``mmalign.text`` and ``mmalign.image``)."""
from mmalign.engine.checkpoints import CheckpointError
from mmalign.engine.config import TrainingConfig
from mmalign.engine.guards import NonFiniteError
from mmalign.engine.plots import plot_metrics, read_metrics
from mmalign.engine.run_identity import RunConflictError
from mmalign.engine.result import TrainResult
from mmalign.engine.run_identity import find_latest_checkpoint
from mmalign.engine.sampling import EpochSampler
from mmalign.engine.step import StepOutput
from mmalign.engine.threads import torch_threads
from mmalign.engine.trainer import Trainer

__all__ = [
    "TrainingConfig",
    "TrainResult",
    "Trainer",
    "StepOutput",
    "EpochSampler",
    "find_latest_checkpoint",
    "torch_threads",
    "plot_metrics",
    "read_metrics",
    "CheckpointError",
    "RunConflictError",
    "NonFiniteError",
]
