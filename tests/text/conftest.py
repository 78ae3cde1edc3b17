import pytest

from mmalign.testing import save_tiny_model_and_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-layout causal LM + byte-level tokenizer with a chat template, saved once per session."""
    return save_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from mmalign.text.modeling.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))
