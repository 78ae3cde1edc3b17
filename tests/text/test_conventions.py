"""Conventions a TRL user expects: implicit-prompt rows, the logged `learning_rate`, optional metric sinks checked
when the config is read."""
import importlib.util

import pytest

from mmalign.config import ConfigError, load_config
from mmalign.text.config import TextTrainConfig
from mmalign.text.data import parse_preference_rows
from mmalign.text.data.reward_rows import load_reward_rows


def test_implicit_prompt_rows_split_at_the_common_prefix(tmp_path):
    rows = [{"chosen": "What colour is the sky? It is blue.", "rejected": "What colour is the sky? It is green."},
            {"chosen": "Say hi. Hello there!", "rejected": "Say hi. Go away."}]
    examples, fmt = parse_preference_rows(rows, source="trl.jsonl")
    assert fmt == "implicit"
    assert (examples[0].prompt, examples[0].chosen, examples[0].rejected) == (
        "What colour is the sky? It is", [" blue."], [" green."])
    assert (examples[1].prompt, examples[1].chosen, examples[1].rejected) == ("Say hi.", [" Hello there!"], [" Go away."])
    # HH dialogues keep their own reading
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    assert parse_preference_rows([hh])[1] == "hh"
    with pytest.raises(ValueError, match=r"trl.jsonl: row 2: field 'rejected': chosen and rejected share no prefix"):
        parse_preference_rows([rows[0], {"chosen": "Yes.", "rejected": "No."}], source="trl.jsonl")
    with pytest.raises(ValueError, match=r"row 1: field 'rejected': one text is a prefix of the other"):
        parse_preference_rows([{"chosen": "Hi there", "rejected": "Hi there, friend"}])
    reward_rows = load_reward_rows(rows)
    assert reward_rows[0]["prompt"] == "What colour is the sky? It is" and reward_rows[1]["rejected"] == " Go away."


def test_implicit_prompt_rows_train(tiny_model_dir, tmp_path):
    import mmalign

    rows = [{"chosen": f"Question {i}: say thanks. thanks please", "rejected": f"Question {i}: say thanks. go away"}
            for i in range(8)]
    result = mmalign.text.train({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"format": "implicit"},
                                 "training": {"batch_size": 4, "max_steps": 2, "logging_steps": 1, "progress_bar": False,
                                              "plot": False, "num_threads": 1, "learning_rate": 1e-3,
                                              "lr_scheduler": "constant"},
                                 "output_dir": str(tmp_path / "run")}, train_dataset=rows)
    assert result.global_step == 2
    assert [row["learning_rate"] for row in result.log if "loss" in row] == [1e-3, 1e-3]  # TRL's name, not "lr"


@pytest.mark.parametrize("sink", ["tensorboard", "trackio", "wandb"])
def test_a_missing_metric_sink_is_reported_when_the_config_is_read(sink):
    if importlib.util.find_spec(sink) is not None:
        config = load_config(TextTrainConfig, {"training": {"report_to": ["jsonl", sink]}})
        assert sink in config.training.report_to
        return
    with pytest.raises(ConfigError, match=rf"training.report_to: '{sink}' needs the package '{sink}'.*"
                                          rf"pip install 'mmalign\[{sink}\]'"):
        load_config(TextTrainConfig, {"training": {"report_to": ["jsonl", sink]}})
    with pytest.raises(ConfigError, match="training.report_to"):
        load_config(TextTrainConfig, {"training": {"report_to": ["neptune"]}})
