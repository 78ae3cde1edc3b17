"""SDXL micro-conditioning from the data: each image's original size and the crop the loader applied reach the
UNet's ``add_time_ids`` per image (on the fly and through the latent cache)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.image.data.decoding import micro_conditioning

# (h, w) of each file -> (original h, w, crop top, left) after resizing the shorter side to 64 and a center crop
SIZES = {"a": (96, 64), "b": (64, 128), "c": (128, 128), "d": (80, 100)}
EXPECTED = {"a": (96, 64, 16, 0), "b": (64, 128, 0, 32), "c": (128, 128, 0, 0), "d": (80, 100, 0, 8)}
ROWS = [("a red square", "a", "b"), ("a blue circle", "c", "d")]


def test_micro_conditioning_is_the_crop_the_loader_applies():
    for name, (height, width) in SIZES.items():
        assert micro_conditioning(height, width, 64, True, False) == list(map(float, EXPECTED[name]))
    # top-left crop, and a flip that mirrors the crop's left edge in the resized image (width 64 -> 32 wide crop)
    assert micro_conditioning(64, 128, 32, False, False) == [64.0, 128.0, 0.0, 0.0]
    assert micro_conditioning(64, 128, 32, False, True) == [64.0, 128.0, 0.0, 32.0]


@pytest.fixture(scope="module")
def sized_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sized")
    rng = np.random.default_rng(0)
    for name, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"{name}.png")
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": [f"{c}.png"], "rejected": [f"{r}.png"]}) + "\n"
                            for p, c, r in ROWS))
    return path


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from mmalign.image.families.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("micro-sdxl"))


@pytest.mark.parametrize("cache_latents", [False, True])
def test_sdxl_time_ids_come_from_each_images_size_and_crop(cache_latents, sized_data, tiny_sdxl, tmp_path,
                                                           monkeypatch):
    from diffusers import UNet2DConditionModel

    from mmalign.image.training import train

    seen = []
    original = UNet2DConditionModel.forward

    def forward(self, *args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    train({"output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_sdxl)}, "lora": {"r": 4},
           "data": {"train": str(sized_data), "resolution": 64, "cache_latents": cache_latents},
           "training": {"max_steps": 1, "batch_size": 2, "progress_bar": False, "save_steps": 0}})
    assert len(seen) == 2  # the reference forward and the policy forward of the one step
    by_prompt_order = []
    for rows in seen:
        assert rows.shape == (4, 6)
        # members: chosen of both groups, then rejected of both; each row (orig h, w, top, left, 64, 64)
        names = {tuple(v[:4]): k for k, v in EXPECTED.items()}
        members = [names[tuple(int(x) for x in row[:4].tolist())] for row in rows]
        assert rows[:, 4:].eq(64).all()
        assert sorted(members[:2]) == ["a", "c"] and sorted(members[2:]) == ["b", "d"]
        pairs = {c: r for _, c, r in ROWS}
        assert [pairs[c] for c in members[:2]] == members[2:]  # each group's rejected follows its chosen's order
        by_prompt_order.append(members)
    assert by_prompt_order[0] == by_prompt_order[1]


def test_other_models_get_no_geometry_keys(sized_data):
    from mmalign.image.data import load_group_records
    from mmalign.image.data.dataset import ImagePreferenceDataset, collate_groups

    records = load_group_records(str(sized_data))
    plain = ImagePreferenceDataset(records, resolution=64)
    assert not any(key.endswith(("_original_sizes", "_crops_top_left")) for key in collate_groups([plain[0]]))
    sized = ImagePreferenceDataset(records, resolution=64, record_geometry=True)
    batch = collate_groups([sized[0], sized[1]])
    assert batch["chosen_original_sizes"].tolist() == [[[96.0, 64.0]], [[128.0, 128.0]]]
    assert batch["rejected_crops_top_left"].tolist() == [[[0.0, 32.0]], [[0.0, 8.0]]]
