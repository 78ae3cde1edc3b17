"""Issue #15 on the image trainer: seeded runs repeat bit for bit, every image is checked before step 1, settings
that do nothing are refused, the face model's training state loads without pickle."""
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.config import ConfigError
from mmalign.image import train
from mmalign.image.data import ImagePreferenceDataset, load_group_records
from mmalign.image.validation import check_image_records
from tests.image.test_image_training import _config as _training_config


def _config(tiny_sd_path, data, output_dir, **training):
    return _training_config(tiny_sd_path, data, output_dir, **{"batch_size": 2, "plot": False, **training})


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("deterministic", [False, True])
def test_seeded_image_runs_repeat_bit_for_bit(tiny_sd_path, toy_data, tmp_path, deterministic):
    if torch.cuda.is_available() and not deterministic:
        pytest.skip("on CUDA seeded runs repeat only with training.deterministic (bench/RESULTS.md 'GPU')")
    torch.manual_seed(1)  # the global RNG state before each run differs: the seed alone must decide
    first = train(_config(tiny_sd_path, toy_data, tmp_path / "a", max_steps=3, deterministic=deterministic))
    torch.manual_seed(2)
    second = train(_config(tiny_sd_path, toy_data, tmp_path / "b", max_steps=3, deterministic=deterministic))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a, b = first["model"].unet.state_dict(), second["model"].unet.state_dict()
    lora = [k for k in a if "lora" in k]
    assert lora
    for key in lora:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ validation
def _write_rows(directory, rows):
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rgb = np.full((16, 16, 3), 120, np.uint8)
    Image.fromarray(rgb).save(folder / "good.png")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "good.jpg")  # large enough that half of it keeps the whole header
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) - 20])
    jpeg = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    return folder


@pytest.mark.parametrize("bad,message", [
    ("missing.png", "does not exist"),
    ("truncated.png", "truncated PNG"),
    ("truncated.jpg", "truncated JPEG"),
    ("text.png", "not a readable image"),
    ("gray.png", r"1 channel\(s\) \(mode L\).*convert_images"),
])
def test_every_bad_image_is_found_up_front(images, bad, message):
    rows = [{"prompt": f"p{i}", "chosen": ["good.png"], "rejected": ["good.jpg"]} for i in range(6)]
    rows[4]["rejected"] = [bad]
    records = load_group_records(str(_write_rows(images, rows)))
    dataset = ImagePreferenceDataset(records, resolution=16)
    with pytest.raises(ValueError, match=rf"(?s)1 bad image.*row 5, field 'rejected'\[0\] \({bad}\): .*{message}"):
        check_image_records(dataset)


def test_grayscale_passes_with_convert_images_and_all_problems_are_counted(images):
    rows = [{"prompt": "p", "chosen": ["gray.png"], "rejected": ["good.png"]} for _ in range(8)]
    records = load_group_records(str(_write_rows(images, rows)))
    check_image_records(ImagePreferenceDataset(records, resolution=16, convert_images=True))
    with pytest.raises(ValueError, match=r"(?s)^8 bad image\(s\).*and 3 more"):
        check_image_records(ImagePreferenceDataset(records, resolution=16))


def test_a_bad_image_stops_the_run_before_step_one(tiny_sd_path, toy_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy_data.parent, data)
    rows = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    (data / rows[-1]["chosen"][0]).write_bytes((data / rows[-1]["chosen"][0]).read_bytes()[:-30])  # the last row
    with pytest.raises(ValueError, match=r"(?s)row 8, field 'chosen'\[0\].*truncated PNG"):
        train(_config(tiny_sd_path, data / "data.jsonl", tmp_path / "run", max_steps=8, save_steps=1))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_steps_without_held_out_data_or_generation_prompts_is_refused(tiny_sd_path, toy_data, tmp_path,
                                                                             monkeypatch):
    import mmalign.image.training as training

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(training, "build_preference_model", no_loading)
    with pytest.raises(ConfigError, match="training.eval_steps.*data.eval .*generation.prompts"):
        train(_config(tiny_sd_path, toy_data, tmp_path, eval_steps=5))


def test_face_model_train_state_loads_without_pickle(tmp_path):
    from mmalign.image.face_model.train import load_train_state, rng_from_state

    rng = np.random.default_rng(7)
    rng.random(3)
    path = tmp_path / "train_state.pt"
    torch.save({"unet": {"w": torch.ones(2)}, "rng_state": json.dumps(rng.bit_generator.state), "step": 3,
                "loss_ema": None, "torch_rng": torch.get_rng_state()}, path)
    state = load_train_state(path)
    assert rng_from_state(state["rng_state"]).random() == rng.random()

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (tmp_path / "pwned",))

    torch.save({"rng": Payload()}, path)
    with pytest.raises(Exception):
        load_train_state(path)
    assert not (tmp_path / "pwned").exists()
