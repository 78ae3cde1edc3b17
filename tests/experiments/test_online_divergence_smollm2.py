"""Demonstration 2 in demonstration 1's setting (SmolLM2 + the vanilla sycophancy RM): the summary on hand-made
cells, and the driver end to end on the tiny model (reward model, warm start, cells, reuse, --finished-only)."""
import json

import pytest

from mmalign_experiments.online_divergence_smollm2 import (algorithm_section, main, markdown_table, mean_over_questions,
                                                           summary)


def test_algorithm_section_names_the_divergence_and_its_placement():
    assert algorithm_section("forward_kl", "reward", 0.05) == {
        "name": "rloo", "beta": 0.05, "divergence": "forward_kl", "divergence_in": "reward"}
    assert algorithm_section("alpha=0.5", "loss", 0.1)["alpha"] == 0.5


def test_mean_over_questions_skips_questions_where_the_metric_is_undefined():
    from mmalign.shared.metrics import distinct_n

    answers = [["Yes.", "No."], ["a b a b", "a b c"]]  # the first question has no bigram
    assert mean_over_questions(lambda row: distinct_n(row, 2), answers) == pytest.approx(3 / 5)
    assert mean_over_questions(lambda row: distinct_n(row, 2), answers[:1]) is None


def test_summary_is_mean_sd_and_per_seed_values_per_cell():
    class Args:
        model, steps, batch_size, k, max_new_tokens, lr, lora_top_layers, beta = "m", 10, 2, 4, 16, 1e-3, 4, 0.05
        eval_prompts, eval_samples, chat, sft_steps, sft_lr, rm_set, seeds = 16, 4, True, 16, 1e-4, [], [0, 1]

    warm = {"divergence": None, "placement": None, "seed": 0, "reward": 0.1}
    runs = [{"divergence": "forward_kl", "placement": "reward", "seed": s, "reward": r, "reverse_kl": kl,
             "penalty_last": p} for s, r, kl, p in ((1, 3.0, 2.0, 0.5), (0, 1.0, 1.0, 1.5))]
    runs.append({"divergence": "js", "placement": "loss", "seed": 0, "reward": 7.0, "reverse_kl": 0.5})
    result = summary([warm] + runs, warm, Args)
    assert result["warm_start"] == warm  # the warm start is not a cell; cells in CELL_ORDER, then by seed
    assert [(r["divergence"], r["seed"]) for r in result["runs"]] == [("forward_kl", 0), ("forward_kl", 1), ("js", 0)]
    cells = {(row["divergence"], row["placement"]): row for row in result["summary"]}
    fkl = cells[("forward_kl", "reward")]
    assert fkl["seeds"] == 2 and fkl["reward"] == 2.0 and fkl["reward_sd"] == pytest.approx(2 ** 0.5)
    assert fkl["penalty_last"] == 1.0 and "penalty_last" not in cells[("js", "loss")]
    # per seed, in seed order whatever the order the cells finished in
    assert result["per_seed"]["forward_kl in reward"]["reward"] == [1.0, 3.0]
    assert result["per_seed"]["forward_kl in reward"]["penalty_last"] == [1.5, 0.5]
    assert result["per_seed"]["js in loss"] == {"reward": [7.0], "reverse_kl": [0.5]}
    table = markdown_table(result).splitlines()
    assert len(table) == 2 + 1 + 2 and table[2].startswith("| warm start | – | – | 0.1 |")
    assert table[3].startswith("| forward_kl | reward | 2 | 2 ± 1.4 (1, 3) | ")  # mean ± sd (per seed)
    assert "| 1 ± 0.71 (1.5, 0.5) |" in table[3] and table[4].startswith("| js | loss | 1 | 7 (7) | ")


@pytest.mark.slow
def test_driver_runs_cells_reuses_them_and_summarises_the_finished_ones(tiny_model_dir, tmp_path):
    out, plot, work = tmp_path / "div.json", tmp_path / "frontier.png", tmp_path / "work"
    args = ["--model", str(tiny_model_dir), "--seeds", "0", "1", "--steps", "2", "--k", "2", "--max-new-tokens", "6",
            "--eval-prompts", "2", "--eval-samples", "3", "--sft-steps", "2", "--lr", "1e-2",
            "--rm-set", "trainable_top_layers=1", "--rm-set", "training.num_epochs=1", "--rm-set", "probe_samples=4",
            "--cells", "reverse_kl-loss", "forward_kl-reward", "--jobs", "1",
            "--pieces", str(tmp_path / "pieces"), "--work", str(work), "--plot", str(plot)]
    assert main(args + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["divergence"], r["placement"], r["seed"]) for r in result["runs"]] == [
        ("reverse_kl", "loss", 0), ("reverse_kl", "loss", 1), ("forward_kl", "reward", 0), ("forward_kl", "reward", 1)]
    assert result["warm_start"]["reverse_kl"] == pytest.approx(0.0, abs=1e-5)  # the reference against itself
    for run in result["runs"] + [result["warm_start"]]:
        assert 0.0 <= run["sycophancy"] <= 1.0 and 0.0 <= run["accuracy"] <= 1.0 and run["entropy"] > 0
        assert run["reward"] == run["reward"] and len(run["examples"]) == 4
    cells = {(row["divergence"], row["placement"]): row for row in result["summary"]}
    assert cells[("forward_kl", "reward")]["seeds"] == 2 and cells[("forward_kl", "reward")]["max_penalty"] >= 0
    assert "max_penalty" not in cells[("reverse_kl", "loss")] and cells[("reverse_kl", "loss")]["grad_norm_max"] > 0
    assert len(result["per_seed"]["forward_kl in reward"]["penalty_last"]) == 2
    assert plot.stat().st_size > 10_000
    # A second call reuses every finished cell (their files untouched) and the pieces.
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("cells/*/result.json")}
    assert len(stamps) == 5  # four cells and the warm start
    assert main(args + ["--out", str(tmp_path / "again.json")]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.glob("cells/*/result.json")} == stamps
    assert json.loads((tmp_path / "again.json").read_text())["runs"] == result["runs"]
    # --finished-only summarises what finished under the same settings, and nothing under other settings.
    assert main(args + ["--finished-only", "--out", str(tmp_path / "done.json")]) == 0
    done = json.loads((tmp_path / "done.json").read_text())
    assert done["summary"] == result["summary"] and done["warm_start"] == result["warm_start"]
    cells = args.index("--cells") + 1
    subset = args[:cells] + ["forward_kl-reward"] + args[cells + 2:] + ["--finished-only", "--out", str(tmp_path / "sub.json")]
    assert main(subset) == 0
    sub = json.loads((tmp_path / "sub.json").read_text())
    assert {r["divergence"] for r in sub["runs"]} == {"forward_kl"} and sub["warm_start"] == result["warm_start"]
    steps = args.index("--steps") + 1
    other = args[:steps] + ["3"] + args[steps + 1:] + ["--finished-only", "--out", str(tmp_path / "none.json")]
    assert main(other) == 0 and json.loads((tmp_path / "none.json").read_text())["runs"] == []


def test_comparisons_claim_a_direction_only_when_every_seed_agrees():
    from mmalign_experiments.online_divergence_smollm2 import comparisons

    def cell(divergence, placement, seed, **values):
        return {"divergence": divergence, "placement": placement, "seed": seed, **values}

    runs = [cell("reverse_kl", "loss", 0, entropy=1.0, reward=2.0, reverse_kl=1.0),
            cell("reverse_kl", "loss", 1, entropy=1.5, reward=2.5, reverse_kl=1.0),
            cell("forward_kl", "loss", 0, entropy=2.0, reward=1.0, reverse_kl=0.5),
            cell("forward_kl", "loss", 1, entropy=1.2, reward=1.0, reverse_kl=0.5),  # seed 1 disagrees on entropy
            cell("js", "loss", 0, entropy=3.0), cell("js", "loss", 1, entropy=3.0),
            cell("reverse_kl", "reward", 0, reward=1.0, reverse_kl=2.0, penalty_last=0.1, max_penalty=0.3),
            cell("reverse_kl", "reward", 1, reward=2.0, reverse_kl=1.5, penalty_last=0.2, max_penalty=0.1),
            cell("forward_kl", "reward", 0, reward=0.5, reverse_kl=0.7, penalty_last=0.4, max_penalty=0.2),
            cell("forward_kl", "reward", 1, reward=0.5, reverse_kl=0.1, penalty_last=0.3, max_penalty=0.9)]
    result = comparisons(runs)
    entropy = result["diversity_in_loss"]["entropy"]
    assert entropy["reverse_kl vs forward_kl"] == "not resolved"  # seed 1 disagrees
    assert entropy["reverse_kl vs js"] == "reverse_kl in loss < js in loss"
    assert entropy["forward_kl vs js"] == "forward_kl in loss < js in loss"
    assert entropy["reverse_kl vs alpha=0.5"] is None  # no α cell
    # reverse KL: the loss placement has more reward and less drift in every seed; forward KL: more reward but
    # more drift in seed 1 — not resolved.
    assert result["placement"]["reverse_kl"] == "loss dominates"
    assert result["placement"]["forward_kl"].startswith("not resolved")
    assert "js" not in result["placement"]  # no in-reward JS cell
    order = result["penalty_order_largest_first"]
    assert order["penalty_last"] == {0: ["forward_kl", "reverse_kl"], 1: ["forward_kl", "reverse_kl"]}
    assert order["max_penalty"] == {0: ["reverse_kl", "forward_kl"], 1: ["forward_kl", "reverse_kl"]}


def test_reuse_stores_an_earlier_files_cells_but_not_its_warm_start_nor_over_a_cell_measured_here(tmp_path):
    from mmalign_experiments.online_divergence_smollm2 import finished_cells, restore_cells

    class Args:
        model, steps, batch_size, k, max_new_tokens, lr, lora_top_layers, beta = "m", 5, 2, 4, 16, 1e-3, 4, 0.05
        eval_prompts, eval_samples, chat, sft_steps, sft_lr, rm_set, cells = 16, 4, True, 16, 1e-4, [], None

    settings = {key: getattr(Args, key) for key in ("model", "steps", "batch_size", "k", "max_new_tokens", "lr",
                                                     "lora_top_layers", "beta", "eval_prompts", "eval_samples",
                                                     "chat", "sft_steps", "sft_lr", "rm_set")}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({
        "settings": settings, "warm_start": {"divergence": None, "placement": None, "seed": 0, "reward": 9.0},
        "runs": [{"divergence": "js", "placement": "loss", "seed": s, "reward": float(s)} for s in (0, 1)]}))
    work = tmp_path / "work"
    here = work / "cells" / "js-loss-seed1"
    here.mkdir(parents=True)
    (here / "result.json").write_text(json.dumps({"settings": settings, "result": {
        "divergence": "js", "placement": "loss", "seed": 1, "reward": 5.0}}))
    assert restore_cells(earlier, work, Args) == 1
    rows = {r["seed"]: r for r in finished_cells(work, Args)}
    assert rows[0] == {"divergence": "js", "placement": "loss", "seed": 0, "reward": 0.0,
                       "reused_from": str(earlier)}
    assert rows[1]["reward"] == 5.0 and "reused_from" not in rows[1]  # measured here: kept
    assert sorted(rows) == [0, 1]  # no warm start taken
    assert restore_cells(earlier, work, Args) == 0  # idempotent
    Args.steps = 10
    with pytest.raises(SystemExit, match="are not this run's"):
        restore_cells(earlier, work, Args)
