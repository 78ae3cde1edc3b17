"""`python -m mmalign`: the embedded default job, the RNG-uniformity quickstart on SmolLM2-135M-Instruct.

Trains DPO, mDPO, IPO and mIPO with LoRA to make a real LLM's random integers uniform (thesis §3.6.1) and
prints the entropy table and win rates; see docs/rng.md. The experiment lives in `mmalign_experiments.rng`
(`python -m mmalign_experiments.rng` takes the same arguments); this module is its documented entry point.
"""

from mmalign_experiments.rng.run import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m mmalign"))
