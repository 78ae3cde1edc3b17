"""Fixtures of the experiments' tests: the text and image tiny models (built from configs, nothing downloaded)."""

import pytest
import torch

from mmalign.testing import save_tiny_model_and_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from mmalign.image.testing import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_pixel_path(tmp_path_factory):
    from mmalign.image.testing import save_tiny_pixel_model

    return save_tiny_pixel_model(tmp_path_factory.mktemp("tiny-pixel"))


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # One thread, as in the image tests: idle OpenMP threads on a busy 2-core box multiply wall time.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
