"""Training recipes of the text backend: ``preference`` (every objective), ``sft``, ``reward`` (reward models and
causal reward models) and ``cnrpo`` (the two-stage CNRPO run)."""
