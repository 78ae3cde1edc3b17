"""``mmalign.text.evaluate`` takes objects as ``mmalign.text.train`` does: a model and a tokenizer built in Python, and
the evaluation data as a ``datasets.Dataset``, a list of dicts or a plain list of prompt strings; rows are checked
and errors name the row and the field."""
import json

import pytest
import torch

import mmalign
from mmalign.config import ConfigError
from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows

SAMPLING = {"num_samples": 2, "max_new_tokens": 4, "batch_size": 4, "seed": 3}


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_causal_lm(vocab_size=len(tokenizer))


def _config(tmp_path, **keys):
    return {"sampling": SAMPLING, "output_dir": str(tmp_path / "eval"), **keys}


def test_a_model_object_and_a_list_of_prompt_strings(model, tokenizer, tmp_path):
    model.train()
    results = mmalign.text.evaluate(_config(tmp_path), model=model, tokenizer=tokenizer,
                                    prompts=["Say hello.", "Pick a random number."])
    assert results["model"] == "<LlamaForCausalLM>" and results["avg_length_tokens"] > 0
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["Say hello.", "Pick a random number."]
    assert all(len(s["answers"]) == 2 for s in samples)
    assert model.training  # its mode is restored


def test_a_dataset_of_prompts_and_in_memory_pairs_give_the_file_results(model, tokenizer, tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "Pick a number from 1 to 5.", "low": 1, "high": 5}, {"prompt": "Say hello.", "low": 1, "high": 9}]
    pairs = tiny_preference_rows(6, seed=2)
    from_objects = mmalign.text.evaluate(_config(tmp_path / "objects"), model=model, tokenizer=tokenizer,
                                         prompts=Dataset.from_list(rows), preference_data=pairs)
    files = tmp_path / "files"
    files.mkdir()
    (files / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (files / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    from_files = mmalign.text.evaluate(_config(tmp_path / "paths", model=str(model_dir),
                                               prompts=str(files / "prompts.jsonl"),
                                               preference_data=str(files / "pairs.jsonl")))
    assert "rng/entropy" in from_objects and from_objects["preference/num_pairs"] == 6
    for key, value in from_files.items():
        if key != "model":
            assert from_objects[key] == pytest.approx(value), key
    # objects may also stand in the config where a path would go; a model loaded from a folder brings its tokenizer
    again = mmalign.text.evaluate(_config(tmp_path / "in-config", model=model, preference_data=pairs),
                                  tokenizer=tokenizer)
    assert again["preference/accuracy"] == from_objects["preference/accuracy"]


def test_rows_are_checked_and_errors_name_the_row_and_the_field(model, tokenizer, tmp_path):
    def refused(match, **objects):
        with pytest.raises((ValueError, ConfigError), match=match):
            mmalign.text.evaluate(_config(tmp_path), **objects)

    refused(r"prompts \(list\): row 2: expected a prompt string or a mapping with a 'prompt' string, got int",
            model=model, tokenizer=tokenizer, prompts=["ok", 5])
    refused(r"prompts \(list\): row 1: field 'prompt': expected a string, got 3", model=model, tokenizer=tokenizer,
            prompts=[{"prompt": 3}])
    refused(r"prompts \(list\): row 2: field 'high': expected an integer, got '9'", model=model, tokenizer=tokenizer,
            prompts=[{"prompt": "a"}, {"prompt": "b", "low": 1, "high": "9"}])
    pairs = tiny_preference_rows(3)
    del pairs[1]["rejected"]
    refused(r"preference_data \(list\): row 2: field .rejected.", model=model, tokenizer=tokenizer,
            preference_data=pairs)
    refused(r"model: required; set it in the config or pass model=", prompts=["a"])
    refused(r"nothing to evaluate", model=model, tokenizer=tokenizer)
    refused(r"tokenizer: required with a model object", model=build_tiny_causal_lm(vocab_size=len(tokenizer)),
            prompts=["a"])
    refused(r"model: expected a causal LM object", model=object(), tokenizer=tokenizer, prompts=["a"])
