"""Prompt conditioning of SDXL / SD3 / FLUX: ``prompts -> dict of tensors``, computed by the pipeline's own
``encode_prompt`` (so training sees exactly what sampling sees), and a cache that replaces the encoders.

Keys: ``states`` ``[B, L, D]`` (cross-attention / joint-attention tokens) and ``pooled`` ``[B, P]`` (the pooled
CLIP embedding(s)). SDXL: penultimate hidden states of both CLIP encoders concatenated, pooled = the second
encoder's projection. SD3: CLIP-L ‖ CLIP-G padded and joined with T5's tokens (zeros when T5 is absent), pooled =
both projections. FLUX: T5 tokens, pooled = CLIP's pooled output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PipelinePromptEncoder", "CachedPromptEncoder", "cache_prompt_embeddings"]


class PipelinePromptEncoder(nn.Module):
    """Frozen tokenizers + text encoders of a family, encoding with ``pipeline_class.encode_prompt``.

    ``encoders``: the pipeline's text-encoder components by name (``text_encoder``, ``text_encoder_2``, ...; None
    for an absent optional one); ``tokenizers`` likewise. ``backbone`` is only read for its config (SD3 sizes the
    T5 zeros by ``joint_attention_dim``) and is not registered as a submodule.
    """

    def __init__(self, family: str, pipeline_class, encoders: dict[str, Any], tokenizers: dict[str, Any],
                 backbone: nn.Module, max_sequence_length: int | None = None):
        super().__init__()
        self.family = family
        self.encoders = nn.ModuleDict({name: module for name, module in encoders.items() if module is not None})
        self.encoders.requires_grad_(False).eval()
        self.max_sequence_length = max_sequence_length
        parts = dict(tokenizers)
        parts.update(encoders)
        parts["transformer" if family in ("sd3", "flux") else "unet"] = backbone
        # the encoding pipeline only borrows these modules: a plain attribute, not a registered submodule
        self.__dict__["_pipeline"] = _encoding_pipeline(pipeline_class, parts)

    def train(self, mode: bool = True):  # frozen: dropout stays off
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(prompts, str):
            raise TypeError("a prompt encoder expects a list of prompts, got a single string")
        # gradients only into trainable adapters (SDXL text-encoder LoRA); frozen encoders build no graph
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoders.parameters())
        with torch.set_grad_enabled(trainable):
            return self._encode(list(prompts))

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        pipe, device = self._pipeline, self.device
        extra = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        if self.family == "sdxl":
            states, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        elif self.family == "sd3":
            states, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False, **extra)
        elif self.family == "flux":
            states, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device, **extra)
        else:
            raise ValueError(f"no prompt encoder for family {self.family!r}")
        return {"states": states, "pooled": pooled}


def _encoding_pipeline(pipeline_class, parts: dict[str, Any]):
    """The family's pipeline holding only what ``encode_prompt`` reads (no VAE, no scheduler)."""
    import inspect

    accepted = inspect.signature(pipeline_class.__init__).parameters
    kwargs = {name: parts.get(name) for name in accepted if name != "self"}
    return pipeline_class(**kwargs)


class CachedPromptEncoder(nn.Module):
    """Prompt embeddings computed once (encoders unloaded afterwards); unknown prompts are an error."""

    def __init__(self, table: dict[str, dict[str, Tensor]]):
        super().__init__()
        self.table = table

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        missing = [prompt for prompt in prompts if prompt not in self.table]
        if missing:
            raise KeyError(f"{len(missing)} prompt(s) are not in the text-embedding cache (encoders were unloaded), "
                           f"e.g. {missing[0]!r}; cache them before unloading or set cache_text_embeddings: false")
        keys = next(iter(self.table.values())).keys()
        return {key: torch.stack([self.table[prompt][key] for prompt in prompts]) for key in keys}


@torch.no_grad()
def cache_prompt_embeddings(encoder: nn.Module, prompts: Iterable[str], batch_size: int = 16) -> CachedPromptEncoder:
    """Encodes every distinct prompt once with ``encoder`` (on CPU storage) into a :class:`CachedPromptEncoder`."""
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ValueError("no prompts to cache")
    table: dict[str, dict[str, Tensor]] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start: start + batch_size]
        encoded = encoder(chunk)
        for row, prompt in enumerate(chunk):
            table[prompt] = {key: value[row].detach().to("cpu") for key, value in encoded.items()}
    return CachedPromptEncoder(table)
