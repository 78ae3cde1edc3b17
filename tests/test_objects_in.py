"""Objects in, one result out: models, tokenizers, pipelines and in-memory datasets go straight into
``mmalign.text.train`` / ``mmalign.image.train`` / ``mmalign.train``, every row is checked as a file's rows are, and
both backends return the same ``TrainResult``."""
import numpy as np
import pytest
import torch

import mmalign
from mmalign.config import ConfigError
from mmalign.engine import TrainResult
from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows

TRAINING = {"batch_size": 4, "max_steps": 4, "logging_steps": 1, "learning_rate": 2e-3, "lr_scheduler": "constant",
            "progress_bar": False, "plot": False, "num_threads": 1, "max_prompt_length": 32, "max_response_length": 24}


def _margins(result: TrainResult) -> list[float]:
    return [row["rewards/margins"] for row in result.log if "rewards/margins" in row]


def _text_config(tmp_path, **sections):
    return {"objective": {"name": "dpo", "beta": 0.1}, "training": dict(TRAINING), "output_dir": str(tmp_path / "run"),
            **sections}


def test_text_in_memory_dataset_and_model_objects_train_and_return_a_result(tokenizer, tmp_path):
    from datasets import Dataset

    torch.manual_seed(0)
    model = build_tiny_causal_lm(vocab_size=len(tokenizer))
    dataset = Dataset.from_list(tiny_preference_rows(16, kind="pairs", seed=3))
    result = mmalign.text.train(_text_config(tmp_path), model=model, tokenizer=tokenizer, train_dataset=dataset,
                                eval_dataset=tiny_preference_rows(8, kind="pairs", seed=4))
    assert isinstance(result, TrainResult)
    assert result.model is not None and result.tokenizer is tokenizer and result.output_dir == tmp_path / "run"
    assert result.global_step == 4 and len(_margins(result)) == 4 and result.log[0]["step"] == 1
    assert result.metrics["eval_rewards/margins"] > 0.005 and _margins(result)[-1] > _margins(result)[0]
    assert (result.final_dir / "model.safetensors").exists()
    assert result["global_step"] == 4 and result.details["num_train_examples"] == 16
    # the trained object is the one returned, with the trained weights
    assert torch.equal(next(result.model.parameters()), next(model.parameters()))


def test_text_messages_groups_and_a_lora_model_object(tokenizer, tmp_path):
    from datasets import DatasetDict, Dataset
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = build_tiny_causal_lm(vocab_size=len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    groups = DatasetDict({"train": Dataset.from_list(tiny_preference_rows(12, kind="groups", seed=5))})
    result = mmalign.text.train(_text_config(tmp_path / "g", objective={"name": "mdpo", "beta": 0.1}),
                                model=model, tokenizer=tokenizer, train_dataset=groups)
    assert result.details["reference_mode"] == "adapter"  # the object's adapters, disabled, are the reference
    assert _margins(result)[-1] > _margins(result)[0] and (result.final_dir / "adapter_config.json").exists()
    messages = tiny_preference_rows(12, kind="conversational", seed=6)
    chat = mmalign.text.train(_text_config(tmp_path / "m", data={"train": messages}), model=base, tokenizer=tokenizer)
    assert chat.global_step == 4 and chat.details["num_train_examples"] == 12


def test_in_memory_rows_are_checked_like_file_rows(tokenizer, tmp_path):
    rows = tiny_preference_rows(4, kind="pairs")
    rows[2] = {**rows[2], "rejected": 7}
    with pytest.raises(ValueError, match=r"train_dataset \(list\): row 3: field 'rejected'"):
        mmalign.text.train(_text_config(tmp_path), model=build_tiny_causal_lm(vocab_size=len(tokenizer)),
                           tokenizer=tokenizer, train_dataset=rows)
    with pytest.raises(ValueError, match=r"train_dataset: row 2: expected a mapping"):
        mmalign.text.train(_text_config(tmp_path), model=build_tiny_causal_lm(vocab_size=len(tokenizer)),
                           tokenizer=tokenizer, train_dataset=[rows[0], "not a row"])
    with pytest.raises(ConfigError, match=r"model.name_or_path: required; set it in the config or pass model="):
        mmalign.text.train(_text_config(tmp_path), train_dataset=rows)


def test_sft_and_reward_models_take_objects(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from mmalign.text.recipes.reward import train_reward_model

    torch.manual_seed(0)
    rows = [{"prompt": "Say hello.", "response": " hello thanks please"}] * 8
    sft = mmalign.text.sft({"training": {**TRAINING, "learning_rate": 3e-2}, "output_dir": str(tmp_path / "sft")},
                           model=build_tiny_causal_lm(vocab_size=len(tokenizer)), tokenizer=tokenizer,
                           train_dataset=rows)
    nll = [row["nll"] for row in sft.log if "nll" in row]
    assert isinstance(sft, TrainResult) and nll[-1] < nll[0]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    report = train_reward_model({"training": TRAINING, "output_dir": str(tmp_path / "rm")},
                                model=LlamaForSequenceClassification(config), tokenizer=tokenizer,
                                train_dataset=tiny_preference_rows(8, kind="pairs"))
    assert report["train"]["global_step"] == 4 and report["model"] is not None


# ------------------------------------------------------------------------------------------------------------ image
def _image_rows(n: int, size: int = 16) -> list[dict]:
    """Bright chosen vs dark rejected images as PIL images and uint8 arrays (the toy "brighter is better" task)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        bright = (180 + rng.integers(0, 60, (size, size, 3))).astype(np.uint8)
        dark = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        rows.append({"prompt": f"a photo of object {i % 2}", "chosen": [Image.fromarray(bright)], "rejected": [dark]})
    return rows


def _image_config(tmp_path, **sections):
    return {"data": {"resolution": 32}, "objective": {"name": "dpo", "beta_d": 1000}, "lora": {"r": 4, "alpha": 8},
            "diffusion": {"latent_sampling": "mode"},
            "training": {**{k: v for k, v in TRAINING.items() if not k.startswith("max_")}, "max_steps": 3},
            "output_dir": str(tmp_path / "img"), **sections}


def test_image_pipeline_object_and_a_list_of_dicts_with_pil_images(tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    result = mmalign.image.train(_image_config(tmp_path), pipeline=pipe, train_dataset=_image_rows(8))
    assert isinstance(result, TrainResult) and result.model is pipe and result.global_step == 3
    assert len([r for r in result.log if "loss" in r]) == 3 and "rewards/margins" in result.metrics
    assert hasattr(pipe.unet, "peft_config")  # the pipeline's own UNet was trained (LoRA added in place)
    assert (result.final_dir / "pytorch_lora_weights.safetensors").exists()


def test_image_config_errors_come_before_any_model_loads(tmp_path, monkeypatch):
    import mmalign.image.training as training

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(training, "build_preference_model", no_loading)
    base = {"model": {"name_or_path": str(tmp_path / "no-model")}, "output_dir": str(tmp_path / "x")}
    with pytest.raises(ConfigError, match=r"objective.name: invalid value 'dop'"):
        mmalign.image.train({**base, "data": {"train": "x.jsonl"}, "objective": {"name": "dop"}})
    with pytest.raises(ConfigError, match=r"objective: rdpo: .*eps"):
        mmalign.image.train({**base, "data": {"train": "x.jsonl"}, "objective": {"name": "rdpo", "eps": 0.7}})
    # the source check (mmalign.hub) names the key and the missing file before anything loads
    with pytest.raises(ValueError, match=r"data.train: .*missing.jsonl' is not an existing file"):
        mmalign.image.train({**base, "data": {"train": str(tmp_path / "missing.jsonl")}})
    pick = [{"caption": "a cat", "jpg_0": b"", "jpg_1": b"", "label_0": 1.0}]
    with pytest.raises(ValueError, match=r"Pick-a-Pic's columns .* set data.format: pick_a_pic"):
        mmalign.image.train(base, train_dataset=pick)
    rows = _image_rows(2)
    del rows[1]["rejected"]
    with pytest.raises(ValueError, match=r"train_dataset \(list\) row 2: missing field 'rejected'"):
        mmalign.image.train(base, train_dataset=rows)
    with pytest.raises(ValueError, match=r"train_dataset: the data has groups \(up to 2 chosen, 1 rejected\) but objective 'dpo' is pairwise"):
        mmalign.image.train(base, train_dataset=[{**_image_rows(1)[0], "chosen": _image_rows(2)[0]["chosen"] * 2}])


def test_mmalign_train_picks_the_backend_from_objects_or_modality(tokenizer, tmp_path, monkeypatch):
    calls = []
    import mmalign.image.training as image_training
    import mmalign.text.recipes.preference as text_preference

    monkeypatch.setattr(text_preference, "train", lambda config, **objects: calls.append(("text", config, objects)))
    monkeypatch.setattr(image_training, "train", lambda config, **objects: calls.append(("image", config, objects)))
    mmalign.train({"objective": {"name": "mdpo"}}, model="M", train_dataset=[])
    mmalign.train({"modality": "image", "objective": {"name": "mdpo"}}, train_dataset=[])
    mmalign.train({"objective": {"name": "mdpo"}}, pipeline="P")
    assert [c[0] for c in calls] == ["text", "image", "image"] and "modality" not in calls[1][1]
    with pytest.raises(ConfigError, match="modality: required when no model, tokenizer or pipeline"):
        mmalign.train({"objective": {"name": "mdpo"}}, train_dataset=[])
    with pytest.raises(ConfigError, match="disagree"):
        mmalign.train({"modality": "text"}, pipeline="P")
    with pytest.raises(ConfigError, match="disagree"):
        mmalign.train({"modality": "image"}, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="an image job takes eval_dataset, overrides, pipeline, train_dataset; got epochs"):
        mmalign.train({"modality": "image"}, epochs=3)
