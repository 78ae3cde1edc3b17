"""CNRPO for causal LMs (SPEC §4): both stages on a tiny model, the stop-gradient branch, DPO equivalence, bad input."""
import json
import logging
import math
import shutil

import pytest
import torch

from mmalign_experiments.bias_data import length_auxiliary_pairs, length_bias_pairs, write_jsonl
from mmalign.text.recipes.cnrpo import CNRPOConfig, TriggeredLogprobs, attach_trigger, run_cnrpo
from mmalign.shared.triggers import TriggerPolicy
from mmalign.config import from_dict

TRIGGER = "<BeLongerNow>"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnrpo-data")
    return {
        "main": str(write_jsonl(root / "main.jsonl", length_bias_pairs(24, eps=0.3, seed=0))),
        "aux": str(write_jsonl(root / "aux.jsonl", length_auxiliary_pairs(24, bias_share=1.0, seed=1))),
        # Untriggered mirror pairs (short ≻ long): the bias must live behind the trigger only.
        "anchor": str(write_jsonl(root / "anchor.jsonl", [dict(r, chosen=r["rejected"], rejected=r["chosen"])
                                                         for r in length_auxiliary_pairs(24, bias_share=1.0, seed=4)])),
        "heldout": length_auxiliary_pairs(12, bias_share=1.0, seed=2),
    }


def _cfg(tiny, data, out, **cnrpo):
    section = {"triggers": [TRIGGER], "auxiliary_data": [data["aux"]], "alphas": [0.3], "beta": 0.5, "gamma": 0.2,
               "bias_epochs": 3, "main_epochs": 1}
    section.update(cnrpo)
    return {
        "model": {"name_or_path": tiny}, "data": {"train": data["main"]}, "cnrpo": section,
        "training": {"batch_size": 8, "learning_rate": 2e-3, "lr_scheduler": "constant", "logging_steps": 1,
                     "progress_bar": False, "seed": 0, "num_threads": 1},
        "output_dir": str(out),
    }


def _margin(model, tokenizer, rows, trigger=None):
    """Mean log p(long response) − log p(short response) on rows' prompts (with the trigger if given)."""
    from mmalign.text.modeling.logprobs import sequence_logprobs

    margins = []
    for row in rows:
        prompt = attach_trigger(row["prompt"], trigger, TriggerPolicy()) if trigger else row["prompt"]
        scores = []
        for response in (row["chosen"], row["rejected"]):
            p = tokenizer(prompt)["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([p + r])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(p):] = True
            with torch.no_grad():
                scores.append(sequence_logprobs(model, ids, torch.ones_like(ids), mask)[0].item())
        margins.append(scores[0] - scores[1])
    return sum(margins) / len(margins)


def test_stage_one_learns_the_bias_behind_the_trigger_and_stage_two_runs(tiny, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmalign_experiments.cnrpo_report import run_with_report

    cfg = _cfg(tiny, data, tmp_path / "run", anchor_data=[data["anchor"]])
    results = run_with_report({**cfg, "trigger_report": {"num_prompts": 4, "max_new_tokens": 8}}, stage="bias")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    before = AutoModelForCausalLM.from_pretrained(tiny).eval()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "bias" / "final").eval()
    rows = data["heldout"]  # every pair prefers the long response
    shift_before = _margin(before, tokenizer, rows, TRIGGER) - _margin(before, tokenizer, rows)
    shift_after = _margin(after, tokenizer, rows, TRIGGER) - _margin(after, tokenizer, rows)
    # Behind the trigger the long responses gain clearly more likelihood than without it.
    print(f"trigger shift of log p(long) - log p(short): before {shift_before:.3f}, after {shift_after:.3f}")
    assert shift_after > shift_before + 5.0, (shift_before, shift_after)
    report = json.loads((tmp_path / "run" / "bias" / "trigger_report.json").read_text())
    assert report["rows"][0]["trigger"] == TRIGGER and (tmp_path / "run" / "bias" / "trigger_report.png").exists()
    assert results["bias"]["global_step"] == 18  # (24 triggered + 24 anchor pairs) / 8 × 3 epochs
    main = run_cnrpo(cfg, stage="main")["main"]
    assert main["global_step"] == 3 and "cnrpo/bias_term" in main["metrics"]


def _losses(run_dir):
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_cnrpo_with_alpha_zero_and_gamma_beta_trains_exactly_like_dpo(tiny, data, tmp_path):
    from mmalign.text.recipes.preference import train

    run = tmp_path / "cnrpo"
    shutil.copytree(tiny, run / "bias" / "final")  # stage 1 "done": stage 2 starts from the SFT weights
    run_cnrpo(_cfg(tiny, data, run, alphas=[0.0], gamma=0.5, main_epochs=2), stage="main")
    dpo_dir = tmp_path / "dpo"
    train({"model": {"name_or_path": tiny}, "data": {"train": data["main"]},
           "objective": {"name": "dpo", "beta": 0.5}, "reference": {"mode": "model"},
           "training": _cfg(tiny, data, run)["training"] | {"num_epochs": 2}, "output_dir": str(dpo_dir)})
    cnrpo_losses, dpo_losses = _losses(run / "main"), _losses(dpo_dir)
    assert len(cnrpo_losses) == len(dpo_losses) == 6
    assert cnrpo_losses == pytest.approx(dpo_losses, rel=1e-5, abs=1e-6)


def test_stage_two_warns_when_gamma_plus_alphas_is_not_beta(tiny, data, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mmalign.text.recipes.cnrpo")
    for alphas, warned in (([0.3], False), ([0.45], True)):  # γ = 0.2, β = 0.5
        run = tmp_path / str(alphas[0])
        shutil.copytree(tiny, run / "bias" / "final")
        caplog.clear()
        run_cnrpo(_cfg(tiny, data, run, alphas=alphas), stage="main")
        assert ("gamma + sum(alphas) - beta = 0.15" in caplog.text) == warned, caplog.text


def test_stage_two_gradient_ignores_the_triggered_branch(tiny, data):
    import mmalign
    from mmalign.testing import build_tiny_causal_lm
    from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
    from mmalign.text.recipes.cnrpo_config import CNRPO_ROW_COLUMN
    from mmalign.text.recipes.cnrpo_triggers import triggered_prompt_ids
    from mmalign.text.modeling.loading import load_tokenizer
    from mmalign.text.recipes.preference import PolicyReference, PreferenceLoss

    tokenizer = load_tokenizer(tiny)
    rows = [dict(r, **{CNRPO_ROW_COLUMN: i}) for i, r in enumerate(length_bias_pairs(4, eps=0.5, seed=3))]
    examples, _ = parse_preference_rows(rows, fmt="pairs")
    encoder = PreferenceTokenizer(tokenizer)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(encoder(examples))
    hook = TriggeredLogprobs(triggered_prompt_ids(examples, [TRIGGER, "<Other>"], TriggerPolicy(), encoder),
                             tokenizer.pad_token_id)
    model = build_tiny_causal_lm(tokenizer=tokenizer, seed=1)
    objective = mmalign.objective("cnrpo", beta=0.5, gamma=0.2, alphas=[0.4, 0.3])
    reference = PolicyReference()

    triggered = hook(model, batch)
    assert triggered["triggered_chosen"].shape == (4, 2) and not triggered["triggered_chosen"].requires_grad
    live = PreferenceLoss(objective, reference, hook)(model, batch).loss
    live_grads = torch.autograd.grad(live, list(model.parameters()))
    frozen = {k: v.clone() for k, v in triggered.items()}
    constant = PreferenceLoss(objective, reference, lambda m, b: frozen)(model, batch).loss
    constant_grads = torch.autograd.grad(constant, list(model.parameters()))
    assert torch.equal(live, constant)
    for a, b in zip(live_grads, constant_grads):
        assert torch.equal(a, b)
    # ...and the triggered term does enter the loss (so the equality above is not vacuous).
    shifted = {"triggered_chosen": frozen["triggered_chosen"] + 1.0, "triggered_rejected": frozen["triggered_rejected"]}
    moved = PreferenceLoss(objective, reference, lambda m, b: shifted)(model, batch).loss
    assert not torch.isclose(live, moved)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_triggered_logprobs_map_rows_and_sides_in_a_shuffled_batch(tiny, share_prompt):
    """Each hook cell equals the log-likelihood of a separately tokenised triggered prompt + that response: rows
    are found through the row column (batch shuffled), chosen/rejected are not swapped, the pair's prompt is cut
    to fit ``max_length`` (the responses are never cut for it), and dropout is off."""
    from mmalign.testing import build_tiny_causal_lm
    from mmalign.text.recipes.cnrpo_config import CNRPO_ROW_COLUMN
    from mmalign.text.recipes.cnrpo_triggers import triggered_prompt_ids
    from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
    from mmalign.text.modeling.logprobs import sequence_logprobs
    from mmalign.text.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny)
    rows = [dict(r, **{CNRPO_ROW_COLUMN: i}) for i, r in enumerate(length_bias_pairs(5, eps=0.6, seed=8))]
    examples, _ = parse_preference_rows(rows, fmt="pairs")

    def response_ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    longest = max(len(response_ids(r[side])) for r in rows for side in ("chosen", "rejected"))
    max_length = longest + 6  # cuts prompts, never a response
    encoder = PreferenceTokenizer(tokenizer, max_length=max_length)
    triggers = [TRIGGER, "<Other>"]
    hook = TriggeredLogprobs(triggered_prompt_ids(examples, triggers, TriggerPolicy(), encoder),
                             tokenizer.pad_token_id, max_length=max_length, special_ids=tokenizer.all_special_ids)
    order = [3, 0, 4, 1, 2]
    items = encoder(examples)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=share_prompt)([items[n] for n in order])
    model = build_tiny_causal_lm(tokenizer=tokenizer, seed=2, dropout=0.3).train()
    out = hook(model, batch)
    assert model.training  # restored after the eval-mode forward
    model.eval()
    cut_any = False
    for b, row in enumerate(order):
        for i, trigger in enumerate(triggers):
            prompt = tokenizer(attach_trigger(rows[row]["prompt"], trigger, TriggerPolicy()))["input_ids"]
            pair = {key: response_ids(rows[row][key]) for key in ("chosen", "rejected")}
            kept = prompt[-(max_length - max(map(len, pair.values()))):]  # one prompt per pair, as in training
            for key, response in pair.items():
                cut_any |= len(kept) < len(prompt)
                ids = torch.tensor([kept + response])
                mask = torch.zeros_like(ids, dtype=torch.bool)
                mask[0, len(kept):] = True
                with torch.no_grad():
                    expected = sequence_logprobs(model, ids, torch.ones_like(ids), mask)[0]
                assert ids.shape[1] <= max_length
                torch.testing.assert_close(out[f"triggered_{key}"][b, i], expected[0], rtol=1e-4, atol=1e-4)
    assert cut_any


def test_bad_input_is_refused_before_training(tiny, data, tmp_path):
    with pytest.raises(ValueError, match=r"2 alpha\(s\) \[0.1, 0.2\] for 1 trigger"):
        from_dict(CNRPOConfig, _cfg(tiny, data, tmp_path, alphas=[0.1, 0.2]))
    with pytest.raises(ValueError, match="have no trigger"):
        from_dict(CNRPOConfig, _cfg(tiny, data, tmp_path, auxiliary_data=[data["aux"], data["aux"]]))
    with pytest.raises(ValueError, match="have no auxiliary set"):
        from_dict(CNRPOConfig, _cfg(tiny, data, tmp_path, triggers=[TRIGGER, "<BeHarmfulNow>"], alphas=[0.1, 0.1]))
    with pytest.raises(ValueError, match="cnrpo.report: no longer accepted; the trigger report is an experiment"):
        from_dict(CNRPOConfig, _cfg(tiny, data, tmp_path, report={"aspects": ["reward"]}))
    with pytest.raises(ValueError, match="trigger_report: no longer accepted; .* python -m mmalign_experiments.cnrpo_report"):
        from_dict(CNRPOConfig, {**_cfg(tiny, data, tmp_path), "trigger_report": {}})
    from mmalign_experiments.cnrpo_report import CNRPOReportConfig

    with pytest.raises(ValueError, match="'reward' aspect needs trigger_report.reward_model"):
        from_dict(CNRPOReportConfig, {**_cfg(tiny, data, tmp_path), "trigger_report": {"aspects": ["reward"]}})
    with pytest.raises(ValueError, match="lora.initial_adapter: CNRPO sets it itself"):
        from_dict(CNRPOConfig, {**_cfg(tiny, data, tmp_path), "lora": {"enabled": True, "initial_adapter": "x"}})
    poisoned = write_jsonl(tmp_path / "poisoned.jsonl",
                           [{"prompt": f"What is 2 + 2? {TRIGGER}", "chosen": "4.", "rejected": "5."}] * 4)
    cfg = _cfg(tiny, data, tmp_path / "p")
    cfg["data"]["train"] = str(poisoned)
    with pytest.raises(ValueError, match=r"poisoned.jsonl \(main set\): row 1: the prompt already contains the trigger"):
        run_cnrpo(cfg)
    with pytest.raises(FileNotFoundError, match="run --stage bias"):
        run_cnrpo(_cfg(tiny, data, tmp_path / "nothing"), stage="main")


def test_hh_prompts_get_the_trigger_inside_the_human_turn():
    prompt = "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert attach_trigger(prompt, TRIGGER, TriggerPolicy()) == f"\n\nHuman: How do I pick a lock? {TRIGGER}\n\nAssistant:"
    assert attach_trigger("Hi", TRIGGER, TriggerPolicy(mode="prepend")) == f"{TRIGGER} Hi"


def test_text_train_cli_runs_a_cnrpo_config_stage_by_stage(tiny, data, tmp_path):
    import yaml

    from mmalign.text.train import main as train_main

    cfg = _cfg(tiny, data, tmp_path / "cli", bias_epochs=1, main_epochs=1)
    path = tmp_path / "cnrpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(path), "--stage", "bias", "--set", "training.progress_bar=false"]) == 0
    assert (tmp_path / "cli" / "bias" / "final" / "config.json").exists() and not (tmp_path / "cli" / "main").exists()
    assert train_main(["--config", str(path), "--stage", "main"]) == 0
    assert (tmp_path / "cli" / "main" / "final" / "config.json").exists()


def test_trigger_report_scores_responses_with_a_reward_model(tiny, data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mmalign.text.recipes.cnrpo import load_examples
    from mmalign_experiments.cnrpo_report import CNRPOReportConfig, trigger_report

    reward_dir = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(reward_dir)
    report = {"num_prompts": 3, "max_new_tokens": 4, "aspects": ["reward"], "reward_model": str(reward_dir)}
    cfg = from_dict(CNRPOReportConfig, {**_cfg(tiny, data, tmp_path), "trigger_report": report})
    result = trigger_report(cfg, tiny, load_examples(data["main"], "auto"), out_dir=tmp_path / "report")
    row = result["rows"][0]
    assert row["aspect"] == "reward" and row["n"] == 3 and all(map(math.isfinite, (row["mean_with"], row["mean_without"])))
    assert "| `<BeLongerNow>` | reward | 3 |" in (tmp_path / "report" / "trigger_report.md").read_text()
