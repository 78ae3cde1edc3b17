"""``objective.pairs: members`` in the text backend (issue #17): a pairwise objective on a groups file trains on the
member pairs of each group with the prompt encoded once per group, and its first step equals the same objective on
the equivalent pairs file (one batch holding every row, so the batch composition is the same)."""

import pytest

import mmalign
import mmalign.text
from mmalign.testing import save_tiny_model_and_tokenizer, write_jsonl

GOOD = [" thanks a lot", " yes please", " sure, happy to help", " of course"]
BAD = [" no", " go away", " whatever", " not now"]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """Another tiny model as the reference, so that the log-ratios (and the first loss) are not all zero."""
    return save_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny-reference"), seed=1)


def group_rows():
    rows = []
    for i in range(5):
        k = 3 if i % 2 == 0 else 2  # ragged groups, equal in size within each row
        rows.append({"prompt": f"Question {i}: can you help me with task number {i}?",
                     "chosen": [GOOD[(i + j) % 4] for j in range(k)],
                     "rejected": [BAD[(2 * i + j) % 4] for j in range(k)]})
    return rows


def pair_rows(groups):
    return [{"prompt": g["prompt"], "chosen": c, "rejected": r} for g in groups for c, r in zip(g["chosen"], g["rejected"])]


def config(model_dir, train, out, batch_size, objective, share_prompt, reference=None):
    return {
        "model": {"name_or_path": str(model_dir)},
        "reference": {"name_or_path": str(reference)} if reference else {},
        "data": {"train": str(train)},
        "objective": objective,
        "training": {"batch_size": batch_size, "max_steps": 1, "logging_steps": 1, "learning_rate": 1e-3,
                     "lr_scheduler": "constant", "progress_bar": False, "plot": False, "num_threads": 1,
                     "max_prompt_length": 32, "max_response_length": 16, "share_prompt": share_prompt},
        "output_dir": str(out),
    }


def first_step(summary):
    return [r for r in summary["log"] if "loss" in r and r.get("step") == 1][0]


@pytest.mark.parametrize("name, hparams", [("dpo", {"beta": 0.5, "nll": 0.3}), ("ipo", {"beta": 0.5})])
def test_member_pairs_on_groups_equal_the_pairs_file_at_the_first_step(name, hparams, tiny_model_dir, reference_dir,
                                                                       tmp_path):
    groups = group_rows()
    pairs = pair_rows(groups)
    assert len(pairs) == 13
    groups_file = write_jsonl(tmp_path / "groups.jsonl", groups)
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    on_groups = mmalign.text.train(config(tiny_model_dir, groups_file, tmp_path / "groups", len(groups),
                                          {"name": name, "pairs": "members", **hparams}, "on", reference_dir))
    on_pairs = mmalign.text.train(config(tiny_model_dir, pairs_file, tmp_path / "pairs", len(pairs),
                                         {"name": name, **hparams}, "off", reference_dir))
    a, b = first_step(on_groups), first_step(on_pairs)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert abs(a["rewards/margins"]) > 1e-3  # a reference unlike the policy: non-trivial log-ratios
    metrics = ["grad_norm", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    metrics += ["nll"] if "nll" in hparams else []
    for key in metrics:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    # fewer tokens: the prompt once per group (5 prompts) instead of once per pair (13)
    if "num_tokens" in a and "num_tokens" in b:
        assert a["num_tokens"] < b["num_tokens"]
    # the same objective as mdpo would not give this loss: groups enter as pairs, not group means
    mdpo = mmalign.text.train(config(tiny_model_dir, groups_file, tmp_path / "mdpo", len(groups),
                                     {"name": "mdpo" if name == "dpo" else "mipo", **hparams}, "on", reference_dir))
    assert abs(first_step(mdpo)["loss"] - a["loss"]) > 1e-4


def test_group_data_needs_the_option_and_equal_groups(tiny_model_dir, tmp_path):
    groups = group_rows()
    path = write_jsonl(tmp_path / "groups.jsonl", groups)
    with pytest.raises(ValueError, match=r"'dpo' is pairwise; use objective.name mdpo or mipo, or objective.pairs: "
                                         r"members"):
        mmalign.text.train(config(tiny_model_dir, path, tmp_path / "a", 2, {"name": "dpo", "beta": 0.1}, "auto"))
    groups[0] = {**groups[0], "rejected": groups[0]["rejected"][:2]}
    groups[1] = {**groups[1], "chosen": groups[1]["chosen"][:1]}
    uneven = write_jsonl(tmp_path / "uneven.jsonl", groups)
    # the largest groups still match (3 and 3), so the data check lets it through; the first batch with a row of
    # 3 chosen and 2 rejected pads both to 3 and pairs only the members present on both sides
    summary = mmalign.text.train(config(tiny_model_dir, uneven, tmp_path / "b", 5,
                                        {"name": "dpo", "beta": 0.1, "pairs": "members"}, "auto"))
    assert first_step(summary)["loss"] > 0
    groups[2] = {**groups[2], "rejected": groups[2]["rejected"] + [" nope"]}
    bigger = write_jsonl(tmp_path / "bigger.jsonl", groups)
    with pytest.raises(ValueError, match=r"bigger.jsonl: objective.pairs: members pairs member i .* up to 3 chosen "
                                         r"and 4 rejected; it needs groups of equal size"):
        mmalign.text.train(config(tiny_model_dir, bigger, tmp_path / "c", 2,
                                  {"name": "dpo", "beta": 0.1, "pairs": "members"}, "auto"))
    with pytest.raises(ValueError, match=r"objective: objective.pairs: members .* 'mdpo' takes groups itself"):
        mmalign.text.train(config(tiny_model_dir, path, tmp_path / "d", 2,
                                  {"name": "mdpo", "beta": 0.1, "pairs": "members"}, "auto"))
