"""Reward models (sequence classifiers with one output): prompt + response rendered as the policy's data pipeline
renders them, right padding, and the forward that reads the reward and the last hidden state at the scored token."""
from __future__ import annotations

from typing import Sequence

import torch

from mmalign.text.data import as_messages

__all__ = ["render_pair", "pad_sequences", "score_positions", "reward_forward"]


def render_pair(tokenizer, prompt: str, response: str, use_chat_template: bool) -> str:
    """prompt + response as the policy's data pipeline renders them (HH dialogues split into turns for chat)."""
    if use_chat_template:
        messages = as_messages(prompt) + [{"role": "assistant", "content": response.strip()}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    # HH responses keep their leading space (split_hh_dialogue): join as the dialogue was written
    if response[:1].isspace() or prompt[-1:].isspace():
        return prompt + response
    return f"{prompt} {response}"


def pad_sequences(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` [N, T]."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def score_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The position whose hidden state the sequence-classification head scores, by transformers' own rule: the
    rightmost token that is not ``pad_token_id`` (so a trailing EOS equal to the pad token is skipped), or the
    last position when the model has no pad token."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pad = config.pad_token_id
    if pad is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    indices = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (indices * (input_ids != pad)).argmax(-1)


def reward_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [N] and the last-layer hidden state [N, d] at the position the reward is read from."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    last = score_positions(model, input_ids)
    hidden = out.hidden_states[-1][torch.arange(input_ids.shape[0], device=input_ids.device), last]
    return out.logits.squeeze(-1).float(), hidden.float()
