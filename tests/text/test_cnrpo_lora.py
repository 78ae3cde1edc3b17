"""CNRPO under LoRA (SPEC §4): one SFT base model serves the policy (base + adapter), the stop-gradient triggered
forward (same model, adapter on) and the reference (same model, adapter off = the SFT model)."""
import json
import shutil
from unittest import mock

import pytest
import torch

from mmalign.config import from_dict
from mmalign_experiments.bias_data import length_auxiliary_pairs, length_bias_pairs, write_jsonl
from mmalign.text.recipes.cnrpo import CNRPOConfig, TriggeredLogprobs, run_cnrpo
from mmalign.text.modeling.references import FrozenModelReference

TRIGGER = "<BeLongerNow>"
LORA = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnrpo-lora-data")
    return {
        "main": str(write_jsonl(root / "main.jsonl", length_bias_pairs(16, eps=0.3, seed=0))),
        "aux": str(write_jsonl(root / "aux.jsonl", length_auxiliary_pairs(16, bias_share=1.0, seed=1))),
    }


def _cfg(tiny, data, out, *, lora=True, reference=None, **cnrpo):
    section = {"triggers": [TRIGGER], "auxiliary_data": [data["aux"]], "alphas": [0.3], "beta": 0.5, "gamma": 0.2,
               "bias_epochs": 2, "main_epochs": 1}
    section.update(cnrpo)
    cfg = {
        "model": {"name_or_path": tiny}, "data": {"train": data["main"]}, "cnrpo": section,
        "training": {"batch_size": 8, "learning_rate": 5e-3, "lr_scheduler": "constant", "logging_steps": 1,
                     "progress_bar": False, "seed": 0, "num_threads": 1},
        "output_dir": str(out),
    }
    if lora:
        cfg["lora"] = dict(LORA)
    if reference:
        cfg["reference"] = reference
    return cfg


class _LoadCounter:
    """Counts ``AutoModelForCausalLM.from_pretrained`` calls (every model the library loads goes through it)."""

    def __init__(self):
        from transformers import AutoModelForCausalLM

        self.calls = []
        original = AutoModelForCausalLM.from_pretrained.__func__

        def counted(cls, *args, **kwargs):
            self.calls.append(str(args[0]) if args else kwargs.get("pretrained_model_name_or_path"))
            return original(cls, *args, **kwargs)

        self.patch = mock.patch.object(AutoModelForCausalLM, "from_pretrained", classmethod(counted))

    def __enter__(self):
        self.patch.start()
        return self

    def __exit__(self, *exc):
        self.patch.stop()


@pytest.fixture(scope="module")
def stage_one(tiny, data, tmp_path_factory):
    """Stage 1 under LoRA, run once: (run folder, from_pretrained calls, summary)."""
    out = tmp_path_factory.mktemp("cnrpo-lora-stage1")
    with _LoadCounter() as loads, mock.patch("mmalign.text.recipes.preference.FrozenModelReference", wraps=FrozenModelReference) as frozen:
        summary = run_cnrpo(_cfg(tiny, data, out), stage="bias")["bias"]
    return {"out": out, "loads": loads.calls, "frozen_references": frozen.call_count, "summary": summary}


def _sequence_logps(model, batch):
    from mmalign.text.modeling.logprobs import batch_logprobs

    model = model.to(batch["input_ids"].device)  # the trainer's batches sit on its device (CUDA where there is one)
    with torch.no_grad():
        logps, _ = batch_logprobs(model.eval(), batch)
    return logps


def _stage_one_policy(tiny, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(adapter_dir)).eval()


def test_lora_stage_two_continues_the_stage_one_adapter_on_one_sft_base(tiny, data, stage_one, tmp_path):
    from transformers import AutoModelForCausalLM

    from mmalign.text.modeling.references import AdapterReference

    # Stage 1: one model loaded (the SFT base), reference = the same model with the adapter disabled.
    assert stage_one["loads"] == [tiny] and stage_one["frozen_references"] == 0
    assert stage_one["summary"]["reference_mode"] == "adapter" and stage_one["summary"]["global_step"] == 4
    adapter = stage_one["out"] / "bias" / "final"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()

    # Stage 2 alone (the --stage main path) resumes from the stage-1 adapter saved on disk.
    out = tmp_path / "run"
    shutil.copytree(adapter, out / "bias" / "final")
    references, triggered = [], []
    reference_call, hook_call = AdapterReference.__call__, TriggeredLogprobs.__call__

    def spy_reference(self, model, batch):
        logps = reference_call(self, model, batch)
        references.append(({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}, logps.clone()))
        return logps

    def spy_hook(self, model, batch):
        out_ = hook_call(self, model, batch)
        triggered.append((self, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()},
                          {k: v.clone() for k, v in out_.items()}))
        return out_

    with _LoadCounter() as loads, mock.patch("mmalign.text.recipes.preference.FrozenModelReference", wraps=FrozenModelReference) as frozen, \
            mock.patch.object(AdapterReference, "__call__", spy_reference), \
            mock.patch.object(TriggeredLogprobs, "__call__", spy_hook):
        summary = run_cnrpo(_cfg(tiny, data, out, main_epochs=2), stage="main")["main"]
    assert loads.calls == [tiny] and frozen.call_count == 0  # policy, triggered and reference: one base model
    assert summary["reference_mode"] == "adapter" and summary["global_step"] == 4 and len(references) == 4

    sft = AutoModelForCausalLM.from_pretrained(tiny).eval()
    stage_one_policy = _stage_one_policy(tiny, adapter)
    # The reference is the SFT model at every step, also after stage 2 has moved the adapter...
    for batch, logps in (references[0], references[-1]):
        torch.testing.assert_close(logps, _sequence_logps(sft, batch), rtol=1e-5, atol=1e-5)
    # ...and not the stage-1 policy, which stage 2 starts from:
    batch, logps = references[0]
    assert (logps - _sequence_logps(stage_one_policy, batch)).abs().max() > 1e-2
    # The first triggered forward is the policy = SFT base + the stage-1 adapter (nothing trained yet).
    hook, hook_batch, hook_out = triggered[0]
    expected = hook_call(hook, stage_one_policy, hook_batch)
    for key in ("triggered_chosen", "triggered_rejected"):
        torch.testing.assert_close(hook_out[key], expected[key], rtol=1e-5, atol=1e-5)


def _losses(run_dir):
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_lora_cnrpo_with_alpha_zero_and_gamma_beta_equals_dpo_from_the_same_adapter(tiny, data, stage_one, tmp_path):
    from mmalign.text.recipes.preference import train

    adapter = stage_one["out"] / "bias" / "final"
    run = tmp_path / "cnrpo"
    shutil.copytree(adapter, run / "bias" / "final")
    run_cnrpo(_cfg(tiny, data, run, alphas=[0.0], gamma=0.5, main_epochs=2), stage="main")
    dpo_dir = tmp_path / "dpo"
    train({"model": {"name_or_path": tiny}, "data": {"train": data["main"]},
           "objective": {"name": "dpo", "beta": 0.5},
           "lora": {**LORA, "initial_adapter": str(adapter)},
           "training": _cfg(tiny, data, run)["training"] | {"num_epochs": 2}, "output_dir": str(dpo_dir)})
    cnrpo_losses, dpo_losses = _losses(run / "main"), _losses(dpo_dir)
    assert len(cnrpo_losses) == len(dpo_losses) == 4
    assert cnrpo_losses[0] != pytest.approx(0.6931, abs=1e-3)  # starts from the trained adapter, not from ρ = 0
    assert cnrpo_losses == pytest.approx(dpo_losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_modes_give_the_same_stage_two(tiny, data, stage_one, tmp_path, lora):
    """adapter (LoRA only), a separate frozen SFT model, and precomputed SFT log-probs: the same reference."""
    modes = ["auto", "model", "precomputed"]
    losses = {}
    for mode in modes:
        run = tmp_path / mode
        if lora:
            shutil.copytree(stage_one["out"] / "bias" / "final", run / "bias" / "final")
        else:  # a full-model "stage 1" that differs from the SFT model
            from mmalign.testing import build_tiny_causal_lm
            from mmalign.text.modeling.loading import load_tokenizer

            tokenizer = load_tokenizer(tiny)
            build_tiny_causal_lm(tokenizer=tokenizer, seed=5).save_pretrained(run / "bias" / "final")
            tokenizer.save_pretrained(run / "bias" / "final")
        summary = run_cnrpo(_cfg(tiny, data, run, lora=lora, reference={"mode": mode}), stage="main")["main"]
        assert summary["reference_mode"] == {"auto": "adapter" if lora else "model"}.get(mode, mode)
        losses[mode] = _losses(run / "main")
        assert len(losses[mode]) == 2 and losses[mode][0] != pytest.approx(0.6931, abs=1e-3)
    for mode in modes[1:]:
        assert losses[mode] == pytest.approx(losses["auto"], rel=1e-4, abs=1e-5), mode


def test_lora_misconfigurations_are_refused_clearly(tiny, data, stage_one, tmp_path):
    with pytest.raises(ValueError, match="lora.initial_adapter: CNRPO sets it itself"):
        from_dict(CNRPOConfig, {**_cfg(tiny, data, tmp_path), "lora": {**LORA, "initial_adapter": "x"}})
    with pytest.raises(ValueError, match="reference.mode: 'adapter' needs lora.enabled"):
        from_dict(CNRPOConfig, _cfg(tiny, data, tmp_path, lora=False, reference={"mode": "adapter"}))
    full = tmp_path / "full"
    shutil.copytree(tiny, full / "bias" / "final")
    with pytest.raises(ValueError, match="is a full model \\(stage 1 ran without LoRA\\)"):
        run_cnrpo(_cfg(tiny, data, full), stage="main")
    adapter = tmp_path / "adapter"
    shutil.copytree(stage_one["out"] / "bias" / "final", adapter / "bias" / "final")
    with pytest.raises(ValueError, match="is a LoRA adapter; set lora.enabled: true"):
        run_cnrpo(_cfg(tiny, data, adapter, lora=False), stage="main")
    with pytest.raises(FileNotFoundError, match="stage-1 adapter .* does not exist; run --stage bias"):
        run_cnrpo(_cfg(tiny, data, tmp_path / "nothing"), stage="main")


def test_trigger_report_samples_from_the_sft_base_plus_the_stage_one_adapter(tiny, data, stage_one, tmp_path):
    from mmalign.text.recipes.cnrpo import load_examples
    from mmalign_experiments.cnrpo_report import CNRPOReportConfig, trigger_report

    cfg = from_dict(CNRPOReportConfig, {**_cfg(tiny, data, tmp_path), "trigger_report": {"num_prompts": 2, "max_new_tokens": 4}})
    result = trigger_report(cfg, stage_one["out"] / "bias" / "final", load_examples(data["main"], "auto"),
                            out_dir=tmp_path / "report")
    assert result["rows"][0]["trigger"] == TRIGGER and result["rows"][0]["n"] == 2
    assert (tmp_path / "report" / "trigger_report.png").exists()
