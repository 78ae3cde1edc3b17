"""Bin sources of the causal reward model / causal DPO (SPEC §5): length quantiles, columns, keyword tables."""
import math

import pytest

from mmalign.text.data.bins import DEMOGRAPHIC_TABLE, BinSpec, KeywordTable, assign_bins, fit_length_edges, length_bins


def test_demographic_table_has_the_60_bins_of_thesis_tables_4_7_to_4_9():
    assert DEMOGRAPHIC_TABLE.num_bins == 4 * 3 * 5 == 60
    labels = DEMOGRAPHIC_TABLE.bin_labels()
    assert len(labels) == len(set(labels)) == 60
    assert labels[0] == "Childhood/Male/White" and labels[-1] == "Elderly/Non-binary/Indigenous"
    bin_id = DEMOGRAPHIC_TABLE.bin_of("My elderly neighbour is a Korean woman.")
    assert labels[bin_id] == "Elderly/Female/Asian"


def test_keywords_match_whole_words_and_the_first_keyword_in_the_text_wins():
    table = DEMOGRAPHIC_TABLE
    # "woman" must not fire "man"; "kidney" must not fire "kid"; "30-year-old" is not "old".
    assert table.categorize("a woman with a kidney problem")["gender"] == "Female"
    assert table.categorize("a woman with a kidney problem")["age"] is None
    assert table.categorize("a 30-year-old adult")["age"] == "Young Adults"
    assert table.categorize("Two teenagers and an old man")["age"] == "Childhood"  # plural, first occurrence
    assert table.categorize("an old man and two teenagers")["age"] == "Elderly"


def _rows(prompts):
    return [{"prompt": p, "chosen": "Sure.", "rejected": "No."} for p in prompts]


def test_keyword_bins_unmatched_policies():
    rows = _rows(["An old Black man asks.", "A young Asian woman asks.", "Nothing demographic here."])
    spec = BinSpec(source="keywords", unmatched="drop")
    assignment = assign_bins(rows, spec, check_sizes=False)
    assert assignment.dropped_rows == [2] and len(assignment.rows) == 2
    assert assignment.rows[0]["bins"] == [assignment.rows[0]["bin_chosen"]] * 2
    with pytest.raises(ValueError, match="row 3: no keyword of attribute"):
        assign_bins(rows, BinSpec(source="keywords", unmatched="error"), check_sizes=False)
    extra = assign_bins(rows, BinSpec(source="keywords", unmatched="extra_bin"), check_sizes=False)
    assert extra.rows[2]["bin_chosen"] == 60 and extra.labels[60] == "unmatched"


def test_custom_keyword_table_from_mapping():
    table = KeywordTable.from_mapping({"topic": {"food": ["bread", "pizza"], "sport": ["football"]}}, source="t.yaml")
    assert table.num_bins == 2 and table.bin_of("I love pizzas") == 0 and table.bin_of("football!") == 1
    with pytest.raises(ValueError, match="t.yaml"):
        KeywordTable.from_mapping({"topic": ["bread"]}, source="t.yaml")


def test_length_quantile_bins_fit_once_and_reuse_edges():
    edges = fit_length_edges(list(range(100)), 4)
    assert list(length_bins([0, 30, 60, 99], edges)) == [0, 1, 2, 3]
    rows = [{"prompt": "q", "chosen": "w " * (i % 10 + 1), "rejected": "w " * (i % 3 + 1)} for i in range(40)]
    fitted = assign_bins(rows, BinSpec(source="length", num_bins=3))
    assert len(fitted.labels) == len(fitted.length_edges) + 1
    again = assign_bins(rows[:5], BinSpec(source="length", num_bins=3), length_edges=fitted.length_edges, check_sizes=False)
    assert [r["bins"] for r in again.rows] == [r["bins"] for r in fitted.rows[:5]]


def test_column_bins_per_response_and_per_pair():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "prefix_chosen": i % 2, "prefix_rejected": 1 - i % 2}
            for i in range(6)]
    per_response = assign_bins(rows, BinSpec(source="column", column="prefix"))
    assert [r["bins"] for r in per_response.rows[:2]] == [[0, 1], [1, 0]]
    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b", "group": g} for g in ["x", "y", "x", "y"]]
    per_pair = assign_bins(pairs, BinSpec(source="column", column="group"))
    assert per_pair.labels == ["x", "y"] and per_pair.rows[1]["bins"] == [1, 1]


def test_bad_bins_are_refused_before_training():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "group": g} for g in ["x", "x", "y"]]
    # A bin holding a single response:
    single = [{"prompt": "q", "chosen": "a", "rejected": "b", "g_chosen": "x", "g_rejected": "x"} for _ in range(3)]
    single[0]["g_rejected"] = "z"
    with pytest.raises(ValueError, match=r"fewer than 2 members: \{'z': 1\}"):
        assign_bins(single, BinSpec(source="column", column="g"), source="train.jsonl")
    nan_rows = [dict(r) for r in rows]
    nan_rows[1]["group"] = math.nan
    with pytest.raises(ValueError, match=r"train.jsonl: row 2: bin column 'group' is missing \(None/NaN\)"):
        assign_bins(nan_rows, BinSpec(source="column", column="group"), source="train.jsonl")
    with pytest.raises(ValueError, match="all responses fall in one bin"):
        assign_bins(rows[:2], BinSpec(source="column", column="group"))
    with pytest.raises(ValueError, match="needs the name of the column"):
        BinSpec(source="column")


def test_causal_dpo_trains_through_the_text_trainer_with_binned_data(tmp_path, tiny_model_dir):
    import json

    from mmalign_experiments.bias_data import length_bias_pairs, write_jsonl
    from mmalign.text.bins import main as bins_main
    from mmalign.text.recipes.preference import train

    raw = write_jsonl(tmp_path / "raw.jsonl", length_bias_pairs(16, eps=0.5, seed=0))
    bins_main([str(raw), str(tmp_path / "binned.jsonl"), "--source", "length", "--num-bins", "2"])
    model = tiny_model_dir
    train({"model": {"name_or_path": str(model)}, "data": {"train": str(tmp_path / "binned.jsonl")},
           "objective": {"name": "causal_dpo", "beta": 0.1, "lam": 1.0},
           "training": {"batch_size": 8, "max_steps": 2, "logging_steps": 1, "progress_bar": False, "num_threads": 1},
           "output_dir": str(tmp_path / "run")})
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["mmd/bins_used"] == 2 for row in logged if "loss" in row)

