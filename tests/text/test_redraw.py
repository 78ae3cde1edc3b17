"""Per-visit re-drawing of group members from pools (mmalign.text.redraw): shapes, determinism, resume."""
import shutil

import pytest

import mmalign.text
from mmalign.engine import read_metrics
from mmalign.testing import write_jsonl
from mmalign.text.data import TokenizedPreferenceDataset
from mmalign.text.data.redraw import RedrawGroups, maybe_redraw

from .test_train import run_config


def _pools():
    items = [
        {"prompt_ids": [1, 2], "chosen_ids": [[10], [11], [12], [13], [14]], "rejected_ids": [[20], [21]],
         "ref_chosen": [-1.0, -1.1, -1.2, -1.3, -1.4], "ref_rejected": [-2.0, -2.1], "row": 0, "extra": {}},
        {"prompt_ids": [3], "chosen_ids": [[30]], "rejected_ids": [[40], [41], [42]],
         "ref_chosen": [-3.0], "ref_rejected": [-4.0, -4.1, -4.2], "row": 1, "extra": {}},
    ]
    return TokenizedPreferenceDataset(items, data_format="groups")


def test_shapes_ragged_pools_and_references_follow_members():
    ds = RedrawGroups(_pools(), members=4, seed=0)
    assert ds.max_group_sizes == (4, 4) and len(ds) == 2
    for index in range(2):
        item, pool = ds[index], ds.pools[index]
        assert len(item["chosen_ids"]) == len(item["rejected_ids"]) == 4  # more than a pool of 1 or 3: with replacement
        for ids, ref, key in ((item["chosen_ids"], item["ref_chosen"], "chosen"),
                              (item["rejected_ids"], item["ref_rejected"], "rejected")):
            for member, value in zip(ids, ref):
                position = pool[f"{key}_ids"].index(member)
                assert pool[f"ref_{key}"][position] == value
    assert ds.pools[0]["chosen_ids"] == [[10], [11], [12], [13], [14]]  # pools untouched
    assert maybe_redraw(ds.pools, None, 0) is ds.pools


def test_draws_deterministic_under_seed_and_fresh_each_epoch():
    a, b, other = RedrawGroups(_pools(), 3, seed=5), RedrawGroups(_pools(), 3, seed=5), RedrawGroups(_pools(), 3, seed=6)
    per_epoch = []
    for epoch in range(6):
        for ds in (a, b, other):
            ds.set_epoch(epoch)
        assert a[0] == b[0] and a[1] == b[1]
        per_epoch.append((tuple(map(tuple, a[0]["chosen_ids"])), tuple(map(tuple, other[0]["chosen_ids"]))))
    assert len({mine for mine, _ in per_epoch}) > 1  # re-drawn across epochs
    assert any(mine != theirs for mine, theirs in per_epoch)  # and the seed matters
    a.set_epoch(2)
    first = a[0]
    a.set_epoch(2)
    assert a[0] == first  # no hidden state: the same (seed, epoch, index) gives the same draw


def test_invalid_members_refused():
    with pytest.raises(ValueError, match="redraw_members"):
        RedrawGroups(_pools(), 0, seed=0)


def _pool_rows(n=8):
    good = [" Sure, glad to help.", " The capital is Paris.", " The answer is 7.", " hello thanks", " yes please"]
    bad = [" no", " never", " bad bad", " maybe no"]
    return [{"prompt": f"Question {i}?", "chosen": good[: 2 + i % 4], "rejected": bad[: 1 + i % 3]} for i in range(n)]


def test_training_with_redraw_resumes_exactly_across_epochs(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    original = RedrawGroups.__getitem__
    monkeypatch.setattr(RedrawGroups, "__getitem__", lambda self, i: seen.append(self.epoch) or original(self, i))
    data = str(write_jsonl(tmp_path / "pools.jsonl", _pool_rows()))
    cfg = run_config(tiny_model_dir, data, tmp_path / "full",
                     data={"redraw_members": 3},
                     objective={"name": "mipo", "beta": 0.1},
                     lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
                     reference={"mode": "precomputed"},
                     training={"max_steps": 6, "num_epochs": 3, "save_steps": 3, "logging_steps": 1,
                               "save_total_limit": None})
    full = mmalign.text.train(cfg)
    assert sorted(set(seen)) == [0, 1, 2]  # the trainer told the dataset each epoch: fresh members per epoch
    seen.clear()
    a = [r for r in read_metrics(full["metrics_path"]) if "loss" in r]
    # step 1 runs before any update: the policy is the reference, so the precomputed references picked with the
    # re-drawn members must cancel the policy's log-probs exactly
    assert abs(a[0]["rewards/chosen"]) < 1e-4 and abs(a[0]["rewards/rejected"]) < 1e-4
    # as if the run had died after step 5: the last checkpoint is step 3, mid-epoch 2 of 3
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "checkpoint-6")
    resumed = mmalign.text.train(cfg, resume_from_checkpoint="latest")
    b = [r for r in read_metrics(resumed["metrics_path"]) if "loss" in r]
    assert {1, 2} <= set(seen)  # (epoch 0 only from the share_prompt probe before training)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
