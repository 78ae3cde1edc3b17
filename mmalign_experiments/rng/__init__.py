"""Making an LLM's random numbers uniform: the RNG experiment of thesis §3.6.1 (Table 3.1), SPEC §3 and §6.

Asked for "a random integer between a and b", instruction-tuned LLMs answer a few favourite numbers. The
experiment builds, for training intervals ``[a, a+m]``, a *chosen group* of ``k`` distinct integers drawn
uniformly from the interval and a *rejected group* of ``k`` answers sampled from the model itself (skewed),
then fine-tunes with LoRA:

- DPO and IPO on pairs ``(chosen_i, rejected_i)`` cut from the groups (the same sequences, pairwise), and
- mDPO and mIPO on the groups (SPEC §3: the group reward is the mean log-ratio of its members),

optionally with the NLL term of SPEC §1 (thesis footnote 3: it keeps answers in range). Evaluation samples
``n`` answers per *held-out* interval (disjoint from every training interval), parses the first integer and
reports per interval the entropy of the in-range answer distribution, its KL to uniform and the out-of-range
rate; win rates compare two models' entropies prompt by prompt (SPEC §6), e.g. mDPO vs DPO.

    python -m mmalign                                           # the quickstart (SmolLM2-135M-Instruct, CPU)
    python -m mmalign_experiments.rng --config configs/text/rng-full.yaml

Outputs in ``output_dir``: ``data/`` (the preference data as JSONL), one training run per method, ``samples.jsonl``
(every sampled answer), ``results.json``, ``results.md`` and ``histograms.png``.
"""

from mmalign_experiments.rng.config import RngConfig, RngDataConfig, RngMethodConfig, RngSamplingConfig
from mmalign_experiments.rng.data import build_preference_rows, format_prompt, make_intervals
from mmalign_experiments.rng.report import plot_histograms, results_table, win_rates
from mmalign_experiments.rng.run import QUICKSTART_CONFIG, main, resolve_model_path, run_rng

__all__ = [
    "RngDataConfig", "RngSamplingConfig", "RngMethodConfig", "RngConfig", "make_intervals", "format_prompt",
    "build_preference_rows", "win_rates", "results_table", "plot_histograms", "resolve_model_path", "run_rng",
    "main", "QUICKSTART_CONFIG",
]
