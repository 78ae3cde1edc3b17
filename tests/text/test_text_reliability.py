"""Issue #15 on the text side and the shared config/data layer: hub names offline, non-UTF-8 rows, settings that do
nothing, chosen == rejected, code hooks."""
import gzip
import json
import logging
import time

import pytest

import mmalign.text
from mmalign.config import ConfigError, config_help, load_config
from mmalign.io import read_jsonl
from mmalign.testing import tiny_preference_rows, write_jsonl
from mmalign.text.config import TextTrainConfig
from mmalign.text.data import load_rows, parse_preference_rows

from tests.text.test_train import run_config


# ------------------------------------------------------------------------------------------ 5: hub names offline
def test_hub_name_offline_fails_fast_naming_key_and_value(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", tiny_preference_rows(8, seed=1))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = run_config(tiny_model_dir, str(data), tmp_path / "out", model={"name_or_path": "no-such-org/no-such-model"})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"model.name_or_path: 'no-such-org/no-such-model' .*HF_HUB_OFFLINE"):
        mmalign.text.train(cfg)
    assert time.perf_counter() - start < 5


def test_unreachable_hub_is_checked_once_and_fails_fast(tmp_path, monkeypatch):
    from mmalign import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(hub.SourceError, match=r"data.train: 'someone/some-data' .*cannot be reached"):
        hub.check_sources([("data.train", "someone/some-data", "dataset")])
    with pytest.raises(hub.SourceError, match=r"model.pretrained: 'someone/model'"):
        hub.check_sources([("model.pretrained", "someone/model", "model")])
    assert time.perf_counter() - start < 5
    assert list(hub._REACHABLE) == ["http://127.0.0.1:9"]  # one check for both


def test_a_mistyped_local_folder_is_reported_missing_not_sent_to_the_hub(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", tiny_preference_rows(8, seed=1))
    cfg = run_config(tiny_model_dir, str(data), tmp_path / "out", model={"name_or_path": "models/tiny-lama"})
    with pytest.raises(ValueError, match=r"model.name_or_path: 'models/tiny-lama' is not an existing folder.*"
                                         r"'tiny-llama'"):
        mmalign.text.train(cfg)
    cfg = run_config(tiny_model_dir, "data/train.jsonl", tmp_path / "out")
    with pytest.raises(ValueError, match=r"data.train: 'data/train.jsonl' is not an existing file"):
        mmalign.text.train(cfg)


# ------------------------------------------------------------------------------------------ 6: non-UTF-8 bytes
@pytest.mark.parametrize("compressed", [False, True])
def test_non_utf8_bytes_name_the_row_and_line(tmp_path, compressed):
    rows = [json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}).encode() + b"\n" for i in range(5000)]
    rows[4999] = rows[4999].replace(b'"a"', b'"caf\xe9"')  # latin-1, as a spreadsheet export writes it
    rows.insert(10, b"\n")  # a blank line: rows and lines differ
    raw = b"".join(rows)
    path = tmp_path / ("d.jsonl.gz" if compressed else "d.jsonl")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    with pytest.raises(ValueError, match=r"row 5000 \(line 5001\), column \d+: bytes b'\\xe9' are not valid UTF-8"):
        load_rows(str(path))
    if not compressed:
        with pytest.raises(ValueError, match=r"row 5000 \(line 5001\)"):
            read_jsonl(path)  # the reader of image JSONL files


# ------------------------------------------------------------------------------------------ 10: inert settings
def test_initial_adapter_without_lora_is_refused(tiny_model_dir, tmp_path):
    cfg = run_config(tiny_model_dir, "x.jsonl", tmp_path, lora={"enabled": False, "initial_adapter": "nowhere"})
    with pytest.raises(ConfigError, match="lora.initial_adapter: 'nowhere' does nothing with lora.enabled: false"):
        load_config(TextTrainConfig, cfg)


def test_eval_steps_without_eval_data_is_refused(tiny_model_dir, tmp_path):
    cfg = run_config(tiny_model_dir, "x.jsonl", tmp_path, training={"eval_steps": 10})
    with pytest.raises(ConfigError, match="training.eval_steps: 10 does nothing without data.eval"):
        load_config(TextTrainConfig, cfg)


# ------------------------------------------------------------------------------------------ 11: chosen == rejected
def test_identical_chosen_and_rejected_warn_with_count_and_rows(caplog):
    rows = [{"prompt": f"p{i}", "chosen": "same" if i in (2, 5) else "good", "rejected": "same" if i in (2, 5)
             else "bad"} for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        examples, _ = parse_preference_rows(rows, source="d.jsonl")
    assert len(examples) == 8
    assert "d.jsonl: 2 of 8 row(s) have a chosen response identical to a rejected one (rows 3, 6)" in caplog.text


def test_a_file_of_only_identical_pairs_is_refused():
    rows = [{"prompt": f"p{i}", "chosen": "x", "rejected": "x"} for i in range(4)]
    with pytest.raises(ValueError, match=r"d.jsonl: every row \(4\) has a chosen response identical"):
        parse_preference_rows(rows, source="d.jsonl")
    groups = [{"prompt": "p", "chosen": ["x", "y"], "rejected": ["z", "x"]}]
    with pytest.raises(ValueError, match="every row"):
        parse_preference_rows(groups, fmt="groups", source="g.jsonl")


# ------------------------------------------------------------------------------------------ 12: code hooks
def test_code_hooks_are_named_in_help_and_refused_outside_the_allow_list(tmp_path, caplog):
    from mmalign.code_hooks import import_code_hook
    from mmalign.image.config import ImageTrainConfig
    from mmalign.text.evaluation.evaluate import EvaluateConfig, load_judge

    assert "[CODE HOOK" in config_help(ImageTrainConfig).split("model.text_conditioner")[1].split("\n")[0]
    assert "[CODE HOOK" in config_help(EvaluateConfig).split("judge (")[1].split("\n")[0]
    base = {"model": {"name_or_path": "x"}, "data": {"train": "y"}}
    with pytest.raises(ConfigError, match=r"model.text_conditioner: 'os:system' would import and run code from "
                                          r"module 'os'.*model.allow_code_hooks: true"):
        load_config(ImageTrainConfig, {**base, "model": {"name_or_path": "x", "text_conditioner": "os:system"}})
    load_config(ImageTrainConfig, {**base, "model": {"name_or_path": "x", "text_conditioner": "os:system",
                                                     "allow_code_hooks": True}})
    with pytest.raises(ConfigError, match="judge: 'subprocess:run' would import"):
        load_config(EvaluateConfig, {"model": "m", "prompts": "p.jsonl", "judge": "subprocess:run"})
    with pytest.raises(ValueError, match="judge: 'json:dumps' would import"):
        load_judge("json:dumps")
    with caplog.at_level(logging.WARNING, logger="mmalign.code_hooks"):
        hook = import_code_hook("mmalign.image.text_encoders:load_text_encoder", key="model.text_conditioner",
                                allow=False)
    assert callable(hook)
    assert "code hook model.text_conditioner = 'mmalign.image.text_encoders:load_text_encoder': imported " \
           "load_text_encoder from" in caplog.text and "text_encoders.py" in caplog.text


def test_the_reward_model_trainer_checks_its_sources_before_loading(tmp_path, monkeypatch):
    from mmalign.text.recipes.reward import train_reward_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"model.name_or_path: 'someone/reward-base'"):
        train_reward_model({"model": {"name_or_path": "someone/reward-base"}, "data": {"train": str(data)},
                            "output_dir": str(tmp_path / "rm")})
    assert time.perf_counter() - start < 5
