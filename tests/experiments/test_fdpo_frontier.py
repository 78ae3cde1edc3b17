"""The f-DPO frontier driver (thesis ch. 2): divergence specs, data slices, a tiny end-to-end run with ECE logged."""
import gzip
import json

import pytest

from mmalign.config import ConfigError, load_config
from mmalign_experiments.fdpo_frontier import (FrontierConfig, divergence_kwargs, label, make_splits, probe_split,
                                               run_frontier)


def _write_hh(path, n):
    with gzip.open(path, "wt") as fh:
        for i in range(n):
            prompt = f"\n\nHuman: question {i} about topic {i % 7}?"
            fh.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: a kind answer {i}",
                                 "rejected": f"{prompt}\n\nAssistant: rude reply {i} go away"}) + "\n")
        # a multi-turn and a too-long row: filtered out
        fh.write(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                             "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"}) + "\n")
        fh.write(json.dumps({"chosen": "\n\nHuman: long\n\nAssistant: " + "x" * 400,
                             "rejected": "\n\nHuman: long\n\nAssistant: y"}) + "\n")
    return path


def test_divergence_specs():
    assert divergence_kwargs("js") == {"divergence": "js"}
    assert divergence_kwargs("alpha:0.3") == {"divergence": "alpha", "alpha": 0.3}
    assert label("reverse_kl") == "RKL (DPO)" and label("alpha:0.7") == "α=0.7"
    for bad in ("alpha:1.5", "alpha:x", "tv", "js:1"):
        with pytest.raises(ValueError):
            divergence_kwargs(bad)
    with pytest.raises(ConfigError, match="divergences"):
        load_config(FrontierConfig, {"divergences": ["chi2"]})


def test_splits_are_disjoint_filtered_and_fail_clearly_when_too_small(tmp_path):
    hh = _write_hh(tmp_path / "hh.jsonl.gz", 30)
    cfg = load_config(FrontierConfig, {"hh": str(hh), "rm_train": 8, "rm_eval": 4, "train": 8, "eval": 4, "prompts": 4})
    files = make_splits(cfg, tmp_path / "out")
    prompts = [json.loads(line)["prompt"] for f in files.values() for line in f.read_text().splitlines()]
    assert len(prompts) == 28 == len(set(prompts)) and not any("long" in p or "\n\nHuman: c" in p for p in prompts)
    big = load_config(FrontierConfig, {"hh": str(hh), "train": 100})
    with pytest.raises(ValueError, match="pass the length filters"):
        make_splits(big, tmp_path / "big")


def test_probe_split_holds_out_unused_short_pairs_and_trains_on_the_rest(tmp_path):
    hh = _write_hh(tmp_path / "hh.jsonl.gz", 30)
    cfg = load_config(FrontierConfig, {"hh": str(hh), "rm_train": 8, "rm_eval": 4, "train": 8, "eval": 4, "prompts": 4})
    files = make_splits(cfg, tmp_path / "out")
    train, heldout = probe_split(cfg)
    rm_eval = [json.loads(line)["prompt"] for line in files["rm_eval"].read_text().splitlines()]
    sliced = {json.loads(line)["prompt"] for f in files.values() for line in f.read_text().splitlines()}
    # held out: the reward model's eval slice + the 2 short pairs no slice uses; trained on: the filtered-out pairs
    assert [r["prompt"] for r in heldout[:4]] == rm_eval and len(heldout) == 6
    assert not {r["prompt"] for r in heldout[4:]} & sliced
    assert len(train) == 2 and not {r["prompt"] for r in train} & ({r["prompt"] for r in heldout} | sliced)


@pytest.mark.slow  # ~50 s on a quiet box, 4-5 min under load
def test_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    hh = _write_hh(tmp_path / "hh.jsonl.gz", 40)
    config = {"model": str(tiny_model_dir), "hh": str(hh), "output_dir": str(tmp_path / "fr"),
              "rm_train": 8, "rm_eval": 4, "train": 8, "eval": 4, "prompts": 2, "num_samples": 2,
              "max_new_tokens": 6, "divergences": ["reverse_kl", "alpha:0.5"], "batch_size": 4, "ece_eval_steps": 1,
              "max_length": 32, "rm_top_layers": 1}
    results = run_frontier(config)
    out = tmp_path / "fr"
    assert (out / "frontier.png").is_file() and (out / "results.md").is_file()
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["SFT", "RKL (DPO)", "α=0.5"]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and len(row["samples"]) == 2
        assert isinstance(row["reward"], float)
    # ECE logged during training at every step (2 steps), none for the untrained SFT row.
    assert rows[0]["ece_curve"] == [] and [s for s, _ in rows[1]["ece_curve"]] == [1, 2]
    assert 0 <= results["reward_model"]["pairwise_accuracy"] <= 1
    # sft=false (a second process sharing the grid): the finished cells are reused and no SFT row is made
    again = run_frontier({**config, "sft": False, "divergences": ["alpha:0.5"]})
    assert [r["method"] for r in again["rows"]] == ["α=0.5"] and again["rows"][0] == json.loads(json.dumps(rows[2]))
    # only_finished tabulates the finished cells and trains nothing (α = 0.7 never ran)
    tab = run_frontier({**config, "only_finished": True, "divergences": ["reverse_kl", "alpha:0.5", "alpha:0.7"]})
    assert [r["method"] for r in tab["rows"]] == ["SFT", "RKL (DPO)", "α=0.5"] and not (out / "seed0" / "alpha0.7").exists()
    assert (out / "ece_curves.png").is_file() and "Paired by seed" in (out / "results.md").read_text()
    # The divergences train differently: the same seed, data and steps give different adapters' answers or scores.
    assert (rows[1]["accuracy"], rows[1]["ece"], rows[1]["reward"]) != (rows[2]["accuracy"], rows[2]["ece"], rows[2]["reward"])
