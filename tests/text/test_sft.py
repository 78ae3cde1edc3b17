"""Supervised fine-tuning on the same engine."""
from pathlib import Path

import pytest

import mmalign.text
from mmalign.engine import read_metrics
from mmalign.testing import write_jsonl
from mmalign.text.recipes.sft import main, parse_sft_rows


def test_sft_lowers_the_response_nll(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Say hello.", "response": " hello thanks please"}] * 8
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    summary = mmalign.text.sft({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(path), "eval": str(path)},
        "training": {"batch_size": 4, "max_steps": 6, "learning_rate": 3e-2, "lr_scheduler": "constant",
                     "logging_steps": 2, "progress_bar": False, "plot": False, "num_threads": 1},
        "output_dir": str(tmp_path / "out"),
    })
    rows = [r for r in read_metrics(summary["metrics_path"]) if "loss" in r]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert summary["metrics"]["eval_nll"] < rows[0]["loss"]
    assert (Path(summary["final_dir"]) / "model.safetensors").exists()


def test_sft_row_schemas_and_errors():
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (example,) = parse_sft_rows([{"messages": convo}])
    assert example.prompt == convo[:1] and example.chosen == [convo[1:]]
    (example,) = parse_sft_rows([{"prompt": "a", "completion": " b"}])
    assert example.chosen == [" b"]
    (example,) = parse_sft_rows([{"prompt": "a", "chosen": " good", "rejected": " bad"}])
    assert example.chosen == [" good"] and example.rejected == []
    with pytest.raises(ValueError, match=r"sft.jsonl: row 2: field 'response': expected a non-empty string"):
        parse_sft_rows([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}], source="sft.jsonl")
    with pytest.raises(ValueError, match=r"row 1: field 'messages': the last message must be the assistant's"):
        parse_sft_rows([{"messages": convo[:1]}])


def test_sft_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m mmalign.text.sft" in out and "data.format" in out and "training.max_response_length" in out


def test_sft_objective_in_the_preference_trainer_is_the_per_token_nll(tiny_model_dir, tiny_tokenizer):
    """objective: sft through the DPO trainer's loss gets the chosen responses' token counts (per-token NLL)."""
    import torch

    from mmalign.shared.objectives import objective
    from mmalign.testing import build_tiny_causal_lm
    from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
    from mmalign.text.recipes.preference import PolicyReference, PreferenceLoss

    rows = [{"prompt": "Say hi.", "chosen": " hello there friend", "rejected": " no"},
            {"prompt": "Count.", "chosen": " one", "rejected": " two three four five"}]
    examples, _ = parse_preference_rows(rows, fmt="pairs")
    batch = PreferenceCollator(pad_token_id=tiny_tokenizer.pad_token_id)(PreferenceTokenizer(tiny_tokenizer)(examples))
    model = build_tiny_causal_lm(tokenizer=tiny_tokenizer, seed=1)
    loss_fn = PreferenceLoss(objective("sft"), PolicyReference())
    loss = loss_fn(model, batch).loss
    policy_chosen = loss_fn.log_likelihoods(model, batch).policy_chosen.squeeze(-1)
    lengths = batch["chosen_lengths"].squeeze(-1)
    assert not torch.equal(lengths, torch.ones_like(lengths))
    torch.testing.assert_close(loss, (-policy_chosen / lengths).mean())
