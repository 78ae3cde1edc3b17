"""Causal DPO bins computed by the text trainer (``bins:`` section, SPEC §5): the same bins as
``python -m mmalign.text.bins``, for every bin source and row schema, and clear refusals."""
import json
import math
from collections import Counter
from unittest import mock

import pytest

from mmalign.config import from_dict, load_config
from mmalign.testing import tiny_preference_rows
from mmalign_experiments.bias_data import biased_decision_pairs, decision_prompts, length_bias_pairs, write_jsonl
from mmalign.text.data.bins import BinSpec, assign_bins
from mmalign.text.config import TextTrainConfig

CAUSAL_DPO = {"name": "causal_dpo", "beta": 0.1, "lam": 1.0}
TRAINING = {"batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1, "progress_bar": False, "num_threads": 1,
            "seed": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model shared by the issue-4 test modules (building it trains a tokenizer)."""
    from mmalign.testing import save_tiny_model_and_tokenizer

    folder = tmp_path_factory.getbasetemp() / "issue4-tiny-model"
    if not (folder / "config.json").exists():
        save_tiny_model_and_tokenizer(folder)
    return str(folder)


def _config(tiny, train, out, bins=None, **extra):
    cfg = {"model": {"name_or_path": tiny}, "data": {"train": str(train)}, "objective": CAUSAL_DPO,
           "training": dict(TRAINING), "output_dir": str(out), **extra}
    if bins is not None:
        cfg["bins"] = bins
    return cfg


def _loaded(cfg):
    """(train, eval, bins summary) exactly as the trainer loads them."""
    from mmalign.text.modeling.loading import load_tokenizer
    from mmalign.text.recipes.preference import _load_datasets

    cfg = from_dict(TextTrainConfig, cfg)
    return _load_datasets(cfg, load_tokenizer(cfg.model.name_or_path))


def test_causal_dpo_trains_with_length_bins_computed_at_load_time_like_the_bins_cli(tiny, tmp_path):
    from mmalign.text.bins import main as bins_main
    from mmalign.text.recipes.preference import PreferenceLoss, train

    raw = write_jsonl(tmp_path / "raw.jsonl", length_bias_pairs(16, eps=0.5, seed=0))
    bins_main([str(raw), str(tmp_path / "binned.jsonl"), "--source", "length", "--num-bins", "2", "--tokenizer", tiny])
    written = [json.loads(line)["bins"] for line in (tmp_path / "binned.jsonl").read_text().splitlines()]

    seen = []
    log_likelihoods = PreferenceLoss.log_likelihoods

    def spy(self, model, batch):
        seen.extend(map(tuple, batch["extra"]["bins"].tolist()))
        return log_likelihoods(self, model, batch)

    cfg = _config(tiny, raw, tmp_path / "run", bins={"source": "length", "num_bins": 2},
                  training={**TRAINING, "max_steps": 2})
    with mock.patch.object(PreferenceLoss, "log_likelihoods", spy):
        summary = train(cfg)
    # one epoch (2 steps x 8 of 16 pairs, shuffled): the objective saw exactly the CLI's bins
    assert summary["global_step"] == 2 and Counter(seen) == Counter(map(tuple, written))
    train_ds, _, bins = _loaded(cfg)
    assert [item["extra"]["bins"] for item in train_ds.items] == written  # row by row
    saved = json.loads((tmp_path / "run" / "bins.json").read_text())
    assert saved == json.loads(json.dumps(bins)) and saved["spec"]["source"] == "length"
    assert len(saved["train"]["labels"]) == 2 and sum(saved["train"]["responses_per_bin"].values()) == 32
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["mmd/bins_used"] for row in logged if "loss" in row] == [2, 2]


def test_column_keyword_and_hh_bins_match_the_bins_module_and_eval_reuses_the_train_bins(tiny, tmp_path):
    from mmalign.text.modeling.loading import load_tokenizer
    from mmalign.text.data.reward_rows import load_reward_rows

    tokenizer = load_tokenizer(tiny)
    # column (a demographic group per pair) with an eval split whose label order comes from the train split
    decisions = biased_decision_pairs(decision_prompts()[:40], attribute="race", favoured="white", seed=0)
    train = write_jsonl(tmp_path / "decisions.jsonl", decisions[:30])
    first_label = min(r["race"] for r in decisions)  # left out of the eval split: its own sorted labels would shift
    held = write_jsonl(tmp_path / "decisions-eval.jsonl", [r for r in decisions[30:] if r["race"] != first_label])
    train_ds, eval_ds, bins = _loaded(_config(tiny, train, tmp_path, bins={"source": "column", "column": "race"},
                                              data={"train": str(train), "eval": str(held)}))
    fitted = assign_bins(load_reward_rows(str(train)), BinSpec(source="column", column="race"))
    assert [i["extra"]["bins"] for i in train_ds.items] == [r["bins"] for r in fitted.rows]
    expected_eval = assign_bins(load_reward_rows(str(held)), BinSpec(source="column", column="race"),
                                column_labels=fitted.labels, check_sizes=False)
    assert [i["extra"]["bins"] for i in eval_ds.items] == [r["bins"] for r in expected_eval.rows]
    assert bins["train"]["labels"] == fitted.labels == sorted({r["race"] for r in decisions[:30]})

    # keywords (the 60 demographic bins) on the prompt; rows without a keyword of every attribute are dropped
    prompts = ["An old Black man asks.", "A young Asian woman asks.", "Nothing demographic here.",
               "An elderly African man asks.", "A young Korean woman asks."]
    rows = [{"prompt": p, "chosen": "Sure.", "rejected": "No."} for p in prompts]
    path = write_jsonl(tmp_path / "keywords.jsonl", rows)
    train_ds, _, bins = _loaded(_config(tiny, path, tmp_path, bins={"source": "keywords"}))
    expected = assign_bins(rows, BinSpec(source="keywords"))
    assert [i["extra"]["bins"] for i in train_ds.items] == [r["bins"] for r in expected.rows]
    assert [i["row"] for i in train_ds.items] == [1, 2, 4, 5] and bins["train"]["dropped_rows"] == [3]

    # HH dialogues: length of the last assistant turn, as python -m mmalign.text.bins measures it
    path = write_jsonl(tmp_path / "hh.jsonl", tiny_preference_rows(12, kind="hh", seed=3))
    train_ds, _, bins = _loaded(_config(tiny, path, tmp_path, bins={"source": "length", "num_bins": 2}))
    expected = assign_bins(load_reward_rows(str(path)), BinSpec(source="length", num_bins=2), tokenizer=tokenizer)
    assert train_ds.data_format == "hh" and bins["train"]["length_edges"] == expected.length_edges
    assert [i["extra"]["bins"] for i in train_ds.items] == [r["bins"] for r in expected.rows]


def test_bad_bins_are_refused_before_the_model_is_loaded(tiny, tmp_path):
    from mmalign.text.recipes.preference import train

    def refused(rows, match, bins=None, **extra):
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with mock.patch("mmalign.text.recipes.preference.load_causal_lm", side_effect=AssertionError("model loaded")):
            with pytest.raises(ValueError, match=match):
                train(_config(tiny, path, tmp_path / "run", bins=bins, **extra))

    pairs = [{"prompt": "q", "chosen": "a b", "rejected": "c", "group": g} for g in ["x", "x", "y", "y", "z"]]
    column = {"source": "column", "column": "group"}
    single = [dict(p, group_chosen=p["group"], group_rejected=p["group"]) for p in pairs[:4]]
    single[0]["group_rejected"] = "lonely"
    refused(single, r"bad.jsonl: bins with fewer than 2 members: \{'lonely': 1\}", bins=column)
    refused([dict(p, group="x") for p in pairs], "bad.jsonl: all responses fall in one bin", bins=column)
    with_nan = [dict(p) for p in pairs]
    with_nan[1]["group"] = math.nan
    refused(with_nan, r"bad.jsonl: row 2: bin column 'group' is missing \(None/NaN\)", bins=column)
    refused([dict(p, bins=[0, 1]) for p in pairs], r"row 1: the data already has bin column\(s\) \['bins'\]", bins=column)
    groups = tiny_preference_rows(6, kind="groups", seed=1)
    refused(groups, "bins: need pairs", bins={"source": "length", "num_bins": 2})
    # the precomputed column is checked as strictly
    refused([dict(p, bins=[0, 1.5]) for p in pairs], r"row 1: field 'bins': bin ids must be integers")
    refused([dict(p, bins=[0, 1]) for p in pairs[:4]] + [dict(pairs[4], bins=[2, 0])],
            r"bins with fewer than 2 members: \{'bin 2': 1\}")
    refused(pairs, r"needs input\(s\) \['bins'\].*add a bins: section")
    with pytest.raises(ValueError, match="bins: objective 'dpo' takes no bins"):
        from_dict(TextTrainConfig, _config(tiny, "x.jsonl", tmp_path, bins={"source": "length"},
                                           objective={"name": "dpo"}))
    with pytest.raises(ValueError, match="bins.num_bins: invalid value 1"):
        from_dict(TextTrainConfig, _config(tiny, "x.jsonl", tmp_path, bins={"source": "length", "num_bins": 1}))


def test_bins_section_can_be_set_from_the_command_line(tiny, tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tiny, "x.jsonl", tmp_path)))
    cfg = load_config(TextTrainConfig, path, ["bins.source=column", "bins.column=race"])
    assert cfg.bins == BinSpec(source="column", column="race")
