"""training.deterministic: deterministic kernels for the run, the previous settings restored after; runs under it
on the CPU give the losses they give without it (no operation of the text or image step lacks a deterministic
kernel there). Whether it makes CUDA runs repeat is checked by the reliability tests on a GPU machine."""
import os

import pytest
import torch

import mmalign.text
from mmalign.engine import read_metrics
from mmalign.engine.determinism import CUBLAS_WORKSPACE, deterministic_kernels
from mmalign.testing import tiny_preference_rows, write_jsonl


def test_the_switch_sets_the_kernels_for_the_block_and_restores_them(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own setting is kept
    with deterministic_kernels(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    with pytest.raises(RuntimeError, match="boom"), deterministic_kernels(True):
        raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()  # restored on an error too
    with deterministic_kernels(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_a_text_run_under_deterministic_kernels_gives_the_same_losses(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "groups.jsonl", tiny_preference_rows(8, kind="groups", seed=3))
    losses = {}
    for deterministic in (False, True):
        summary = mmalign.text.train({
            "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(data)},
            "objective": {"name": "mdpo", "beta": 0.1}, "lora": {"enabled": True, "r": 4, "dropout": 0.0},
            "training": {"batch_size": 4, "max_steps": 2, "logging_steps": 1, "progress_bar": False, "plot": False,
                         "num_threads": 1, "deterministic": deterministic},
            "output_dir": str(tmp_path / str(deterministic))})
        losses[deterministic] = [r["loss"] for r in read_metrics(summary["metrics_path"]) if "loss" in r]
    assert len(losses[True]) == 2 and losses[True] == losses[False]
    assert not torch.are_deterministic_algorithms_enabled()
