"""The engine's preference step: an objective and a :class:`~mmalign.shared.records.LogLikelihoods` record in, the
loss and the logged metrics out. Both backends' ``compute_loss`` end here."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from mmalign.engine.step import StepOutput
from mmalign.shared.records import LogLikelihoods

__all__ = ["preference_step"]


def preference_step(objective: Any, record: LogLikelihoods, *, num_tokens: Any = None,
                    metrics: Optional[Mapping[str, Any]] = None) -> StepOutput:
    """``objective(**record.objective_inputs())`` as a :class:`StepOutput`: the loss, the objective's metrics
    (``rewards/*``, objective-specific terms) plus the backend's own ``metrics``."""
    output = objective(**record.objective_inputs())
    logged = dict(output.metric_tensors)
    if metrics:
        logged.update(metrics)
    return StepOutput(loss=output.loss, metrics=logged, num_tokens=num_tokens)
