"""Prints the resolved versions of mmalign's main dependencies beside the tested ones in constraints.txt.

    .venv/bin/python scripts/versions.py          # CI runs it after setup; exit 0 either way
    .venv/bin/python scripts/versions.py --all    # every package pinned in constraints.txt

A line marked "differs" means the environment is not the one the benchmarks were measured on (e.g. after
``scripts/setup.sh --latest``): speed figures in bench/RESULTS.md need not hold there.
"""
from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

MAIN = ("torch", "transformers", "peft", "accelerate", "datasets", "diffusers", "safetensors", "tokenizers",
        "huggingface_hub", "numpy", "trl")


def pinned(path: Path) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a constraints file (names normalised)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def main(argv: list[str]) -> int:
    pins = pinned(Path(__file__).resolve().parents[1] / "constraints.txt")
    names = sorted(pins) if "--all" in argv else [normalise(n) for n in MAIN]
    print(f"python {platform.python_version()} on {platform.machine()}; resolved versions (vs constraints.txt):")
    differing = 0
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        want = pins.get(name)
        same = want is not None and version.split("+")[0] == want
        differing += want is not None and not same and version != "not installed"
        if same or version == "not installed":
            mark = ""
        else:
            mark = f"  differs (pinned {want})" if want else "  (not pinned)"
        print(f"  {name:18s} {version}{mark}")
    if differing:
        print(f"{differing} package(s) differ from constraints.txt: not the measured set")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
