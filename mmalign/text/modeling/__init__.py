"""Causal LMs for the text backend: ``loading`` (models, tokenizers, LoRA), ``references`` (adapter-disabled,
frozen-copy and precomputed references), ``logprobs`` (memory-efficient response log-likelihoods),
``fast_layers``, ``sampling`` and ``smollm`` (the offline SmolLM2-135M-Instruct)."""
