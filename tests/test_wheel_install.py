"""Installs like a library: ``pip install .`` (not editable) into a fresh venv outside the checkout, then the
package imports, ``python -m mmalign`` answers and loads its shipped default config, with no ``../shared`` folder.

The fresh venv sees the already-installed dependencies (torch, transformers, ...) through a ``.pth`` line, so
nothing is downloaded; ``--no-deps --no-build-isolation`` keeps pip offline. Slow (a wheel build): run by .ci/run.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_runs_without_the_checkout(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "*.egg-info", "outputs",
                                                  "runs"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies already installed here, without their .pth hooks (so no editable mmalign leaks in)
    (purelib / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PIP_NO_INDEX": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    # the venv's bundled setuptools is older than the project's build needs: build with the one installed here
    _run([str(python), "-m", "pip", "uninstall", "-y", "setuptools"], env=env, cwd=tmp_path)
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(source)],
         env=env, cwd=tmp_path)
    shutil.rmtree(source)  # nothing may come from the checkout any more
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    assert not (elsewhere.parent / "shared").exists()

    where = _run([str(python), "-c", "import mmalign, mmalign_experiments, mmalign.text, mmalign.image; "
                  "print(mmalign.__file__); print(mmalign_experiments.__file__)"], env=env, cwd=elsewhere).stdout
    assert all(line.startswith(str(purelib)) for line in where.split()), where
    usage = _run([str(python), "-m", "mmalign", "--help"], env=env, cwd=elsewhere).stdout
    assert usage.startswith("usage: python -m mmalign ") and "rng-quickstart.yaml" in usage
    config = _run([str(python), "-m", "mmalign", "--print-config"], env=env, cwd=elsewhere).stdout
    assert "model: smollm2" in config and "label: mIPO" in config  # the shipped default job's config
    missing = subprocess.run([str(python), "-c", "from mmalign.image.face_model.prompts import load_occupations; "
                              "load_occupations()"], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert missing.returncode != 0 and "MMALIGN_DATA_DIR" in missing.stderr
    assert os.path.isdir(purelib / "mmalign" / "configs" / "image")
