"""``python -m mmalign_experiments.sim <simulation> [options]``: run one of the toy simulations (``bandit``)."""

from __future__ import annotations

import sys

SIMULATIONS = {
    "bandit": "CNRPO vs DPO on the 20-arm bandit of cnrpo §6.1 (see python -m mmalign_experiments.sim bandit --help)",
    "theory": "Props 1-2 (Fig. 3.2), f-DPO Theorem 1, the ECE bound, CNRPO Theorem 2 (mmalign_experiments.sim.theory)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mmalign_experiments.sim {" + ",".join(SIMULATIONS) + "} [options]\n\nsimulations:")
        for name, text in SIMULATIONS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SIMULATIONS:
        print(f"unknown simulation {name!r}; choose from {', '.join(SIMULATIONS)}", file=sys.stderr)
        return 2
    if name == "theory":
        from mmalign_experiments.sim.theory import main as theory_main

        return theory_main(rest)
    from mmalign_experiments.sim.bandit import main as bandit_main

    return bandit_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
