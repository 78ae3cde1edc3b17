"""Model rewards on text: a reward-model folder and an LM judge.

- :class:`RewardModelReward` — the project's Bradley–Terry or causal reward models (``python -m mmalign.text.reward``'s
  ``final/`` folders: the text is rendered as in their training) or any transformers sequence-classification model
  with one logit.
- :class:`JudgeReward` — a causal LM asked whether the answer is good: ``log p(yes) − log p(no)`` for its next
  token after a question template.

Both refuse outputs their tokenizer cannot encode (unknown tokens) with an error naming the reward: a reward
model that reads ``<unk>`` for the policy's words scores something else than the text.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from mmalign.rewards.base import Reward, RewardError

__all__ = ["RewardModelReward", "JudgeReward", "check_encodable"]

DEFAULT_JUDGE_TEMPLATE = "Question: {prompt}\nAnswer: {output}\nIs this answer good? Reply yes or no.\nReply:"


def check_encodable(tokenizer, texts: Sequence[str], name: str) -> None:
    """Raises when ``tokenizer`` maps some text to its unknown token (it cannot represent the text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    for index, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        if unk in ids:
            raise RewardError(f"reward {name!r}: its tokenizer cannot encode output {index} ({texts[index][:60]!r} "
                              f"becomes {tokenizer.unk_token!r}); use a reward model whose tokenizer covers the "
                              "policy's vocabulary")


class RewardModelReward(Reward):
    """Scores with a sequence-classification model (one logit) from ``path``, or a loaded ``model`` + ``tokenizer``."""

    def __init__(self, path: Optional[str | os.PathLike] = None, *, model=None, tokenizer=None, batch_size: int = 16,
                 max_length: int = 1024, use_chat_template: Optional[bool] = None, device: Optional[str] = None,
                 name: Optional[str] = None):
        from mmalign.text.evaluation.reward_probes import RewardScorer

        if path is not None:
            path = Path(os.path.expanduser(str(path)))
            if not path.is_dir():
                raise FileNotFoundError(f"reward model {str(path)!r}: not a folder (expected a saved "
                                        "sequence-classification model, e.g. <reward run>/final)")
            kwargs = {"batch_size": batch_size, "max_length": max_length}
            if use_chat_template is not None:
                kwargs["use_chat_template"] = use_chat_template
            scorer = RewardScorer.from_pretrained(str(path), **kwargs)
        elif model is not None and tokenizer is not None:
            scorer = RewardScorer(model.eval(), tokenizer, batch_size=batch_size, max_length=max_length,
                                  use_chat_template=bool(use_chat_template))
        else:
            raise ValueError("RewardModelReward: give a path or both model and tokenizer")
        labels = getattr(scorer.model.config, "num_labels", 1)
        if labels != 1:
            raise ValueError(f"reward model {path or type(scorer.model).__name__}: needs num_labels=1 (one reward "
                             f"logit), has {labels}")
        if scorer.tokenizer.pad_token_id is None:
            scorer.tokenizer.pad_token = scorer.tokenizer.eos_token
        if scorer.model.config.pad_token_id is None:
            scorer.model.config.pad_token_id = scorer.tokenizer.pad_token_id
        if device is not None:
            scorer.model.to(device)
        self.scorer = scorer
        self.name = name or (f"reward_model:{path.name if path.name != 'final' else path.parent.name}" if path
                             else "reward_model")

    def __call__(self, prompts, outputs, *, group_ids=None):
        check_encodable(self.scorer.tokenizer, outputs, self.name)
        return self.scorer.score(prompts, outputs)


class JudgeReward(Reward):
    """``log p(positive) − log p(negative)`` of a causal LM's next token after ``template`` (``{prompt}`` and
    ``{output}`` filled in). ``positive``/``negative`` must each be one token of the judge's tokenizer."""

    def __init__(self, path: Optional[str] = None, *, model=None, tokenizer=None, template: str = DEFAULT_JUDGE_TEMPLATE,
                 positive: str = " yes", negative: str = " no", batch_size: int = 8, max_length: int = 1024,
                 name: Optional[str] = None):
        if path is not None:
            from mmalign.text.modeling.loading import load_causal_lm, load_tokenizer

            tokenizer, model = load_tokenizer(path), load_causal_lm(path)
        elif model is None or tokenizer is None:
            raise ValueError("JudgeReward: give a path or both model and tokenizer")
        if "{output}" not in template:
            raise ValueError(f"judge template must contain '{{output}}'; got {template!r}")
        self.token_ids = []
        for word in (positive, negative):
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"judge: {word!r} is {len(ids)} tokens for the judge's tokenizer; use one-token answers")
            self.token_ids.append(ids[0])
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template, self.batch_size, self.max_length = template, batch_size, max_length
        self.name = name or f"judge:{Path(path).name if path else type(model).__name__}"

    @torch.no_grad()
    def __call__(self, prompts, outputs, *, group_ids=None):
        check_encodable(self.tokenizer, outputs, self.name)
        device = next(self.model.parameters()).device
        texts = [self.template.format(prompt=p, output=o) for p, o in zip(prompts, outputs)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            ids = [s[-self.max_length:] for s in
                   self.tokenizer(texts[start:start + self.batch_size], add_special_tokens=False)["input_ids"]]
            length = max(len(s) for s in ids)
            input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            attention = torch.zeros((len(ids), length), dtype=torch.long)
            for row, seq in enumerate(ids):  # left padding: every row's last token sits in the last column
                input_ids[row, length - len(seq):] = torch.tensor(seq)
                attention[row, length - len(seq):] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                position_ids=positions.to(device)).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            scores.append((logp[:, self.token_ids[0]] - logp[:, self.token_ids[1]]).cpu())
        return torch.cat(scores)
