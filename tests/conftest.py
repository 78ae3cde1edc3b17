import os

# Tests build every model from a config; nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores on CI: more threads than that only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny offline text tokenizer (with a pad token) of the objects-in, seam and evaluate tests."""
    from mmalign.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny Stable-Diffusion-layout pipeline folder (tests/image/conftest.py has its own for the image tests)."""
    from mmalign.image.testing import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))
