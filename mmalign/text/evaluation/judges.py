"""Judges of sampled answers: any callable ``(prompts, responses) -> scores``, a local reward-model folder, or
``'package.module:function'`` (SPEC §5)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import torch


__all__ = ["Judge", "RewardModelJudge", "load_judge"]

Judge = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class RewardModelJudge:
    """A local reward model (``AutoModelForSequenceClassification``, one logit) scoring ``prompt + response``."""

    def __init__(self, path: str, *, batch_size: int = 8, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model needs num_labels=1, got {self.model.config.num_labels}")
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores: list[float] = []
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def load_judge(spec: Union[str, Judge], *, allow_code_hooks: bool = False) -> Judge:
    """A judge from a callable, a reward-model folder, or the code hook ``'package.module:function'`` (see
    ``mmalign.code_hooks``: modules outside mmalign need ``allow_code_hooks``)."""
    if callable(spec):
        return spec
    if Path(spec).is_dir():
        return RewardModelJudge(spec)
    if ":" in spec:
        from mmalign.code_hooks import import_code_hook

        return import_code_hook(spec, key="judge", allow=allow_code_hooks)
    raise ValueError(f"judge {spec!r}: expected a reward-model folder or 'package.module:function'")
