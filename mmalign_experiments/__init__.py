"""The experiments built on mmalign: each imports the library, and the library never imports them.

- ``rng`` — making an LLM's random numbers uniform (thesis §3.6.1); ``python -m mmalign`` runs its quickstart.
- ``debias`` — demographic debiasing of a text-to-image model (thesis §3.6.2); ``python -m mmalign.image.debias``,
  with ``debias.seeds`` / ``debias.pool`` / ``debias.pair_draws`` for the multi-seed analysis.
- ``bias_data`` — preference sets with a known spurious factor (``python -m mmalign_experiments.bias_data``).
- ``cnrpo_report`` — CNRPO's two stages with the trigger report after stage 1.
- ``length_bias``, ``hh_harm`` — the CNRPO length-bias and HH-RLHF harmfulness experiments.
- ``online_divergence`` — the online divergence trade-off (thesis ch. 2, §2.8.1) on the tiny model.
- ``sim`` — toy simulations (the cnrpo paper's 20-arm bandit: ``python -m mmalign_experiments.sim.bandit``).

The data they need (FairFace 32x32, winogenerated occupations, HH-RLHF) is found in ``$MMALIGN_DATA_DIR``
(default ``../shared/data`` from the current directory).
"""
