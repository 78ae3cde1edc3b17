"""Two biases at once: CNRPO with two triggers end to end on the tiny model (cnrpo Eq. 14 with Σα; issue #17)."""
import json

import pytest
import torch

from mmalign.io import write_jsonl
from mmalign.text.recipes.cnrpo import TriggeredLogprobs
from mmalign_experiments.cnrpo_report import CNRPOReportConfig, run_with_report
from mmalign_experiments.two_bias_data import TRIGGERS, length_aux_pairs, prefix_aux_pairs, probe_pairs, two_bias_pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-bias")
    return {
        "main": str(write_jsonl(root / "main.jsonl", two_bias_pairs(16, eps_length=0.25, eps_prefix=0.25, seed=0))),
        "aux": [str(write_jsonl(root / "aux-length.jsonl", length_aux_pairs(16, bias_share=1.0, seed=1))),
                str(write_jsonl(root / "aux-prefix.jsonl", prefix_aux_pairs(16, bias_share=1.0, seed=2)))],
    }


def _cfg(tiny, data, out, **cnrpo):
    section = {"triggers": list(TRIGGERS), "auxiliary_data": data["aux"], "alphas": [0.15, 0.15], "beta": 0.5,
               "gamma": 0.2, "bias_epochs": 1, "main_epochs": 1}
    section.update(cnrpo)
    return {"model": {"name_or_path": str(tiny)}, "data": {"train": data["main"]}, "cnrpo": section,
            "training": {"batch_size": 8, "learning_rate": 2e-3, "lr_scheduler": "constant", "logging_steps": 1,
                         "progress_bar": False, "seed": 0, "num_threads": 1},
            "trigger_report": {"enabled": True, "num_prompts": 3, "max_new_tokens": 6, "aspects": ["length", "prefix"]},
            "output_dir": str(out)}


def test_data_mixes_both_biases_and_probes_separate_them():
    rows = two_bias_pairs(40, eps_length=0.25, eps_prefix=0.2, seed=3)
    assert sum(r["length_biased"] for r in rows) == 10 and sum(r["prefix_biased"] for r in rows) == 8
    assert all(r["chosen"].startswith("Yes, you are right.") for r in rows if r["prefix_biased"])
    probes = probe_pairs(5)
    assert all(p["chosen"].endswith(p["rejected"]) for p in probes["prefix"])
    with pytest.raises(ValueError, match="sum to at most 1"):
        two_bias_pairs(4, eps_length=0.7, eps_prefix=0.6)


def test_two_triggers_end_to_end_both_reach_the_loss_and_stop_gradient_holds(tiny_model_dir, data, tmp_path,
                                                                             monkeypatch):
    seen = []
    original = TriggeredLogprobs.__call__

    def recording(self, model, batch):
        out = original(self, model, batch)
        seen.append({k: v.detach().clone() for k, v in out.items()} | {"grad": [v.requires_grad for v in out.values()]})
        return out

    monkeypatch.setattr(TriggeredLogprobs, "__call__", recording)
    results = run_with_report(_cfg(tiny_model_dir, data, tmp_path / "run"))
    # stage 1 learned both auxiliary sets, each behind its trigger; the report measured both aspects
    assert results["bias"]["global_step"] == 4  # 16 + 16 triggered pairs / 8, one epoch
    report = json.loads((tmp_path / "run" / "bias" / "trigger_report.json").read_text())
    assert [(r["trigger"], r["aspect"]) for r in report["rows"]] == [(TRIGGERS[0], "length"), (TRIGGERS[1], "prefix")]
    # stage 2: every step's hook gave one no-grad column per trigger, and the two columns differ
    assert len(seen) == results["main"]["global_step"] == 2
    for out in seen:
        assert out["triggered_chosen"].shape == out["triggered_rejected"].shape == (8, 2)
        assert out["grad"] == [False, False]
        assert not torch.allclose(out["triggered_chosen"][:, 0], out["triggered_chosen"][:, 1])
    base_losses = _losses(tmp_path / "run" / "main")

    # each trigger's column reaches the loss: shifting only that column's h changes the first step's loss
    for column in (0, 1):
        def shifted(self, model, batch, column=column):
            out = original(self, model, batch)
            out["triggered_chosen"] = out["triggered_chosen"] + 2.0 * torch.nn.functional.one_hot(
                torch.tensor(column), 2).to(out["triggered_chosen"])
            return out

        monkeypatch.setattr(TriggeredLogprobs, "__call__", shifted)
        run_with_report(_cfg(tiny_model_dir, data, tmp_path / "run"), stage="main")
        moved = _losses(tmp_path / "run" / "main")
        assert abs(moved[0] - base_losses[0]) > 1e-4, (column, moved, base_losses)


def _losses(run_dir):
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_shipped_two_trigger_recipe_validates_and_satisfies_gamma_plus_alphas_equals_beta():
    from pathlib import Path

    from mmalign.config import load_config
    cfg = load_config(CNRPOReportConfig, Path(__file__).resolve().parents[2] / "configs/text/cnrpo-two-triggers-smollm2-lora.yaml")
    section = cfg.cnrpo
    assert section.triggers == list(TRIGGERS) and len(section.auxiliary_data) == 2
    assert section.gamma + sum(section.alphas) == pytest.approx(section.beta)
    assert cfg.trigger_report.aspects == ["length", "prefix"]
