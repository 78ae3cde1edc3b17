"""Collation: pairs and ragged groups of tokenised examples into one padded batch, or one packed row per example
with the prompt encoded once (``share_prompt``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

__all__ = ["PreferenceCollator", "batch_to_device", "batch_response_ids"]


@dataclass
class PreferenceCollator:
    """Builds ONE padded batch holding every chosen and rejected member of every example.

    Batch keys: ``input_ids``, ``attention_mask`` [N, T] (right-padded); ``loss_mask`` [N, T] bool marking
    response tokens (prompt and padding are never scored); ``chosen_index`` [B, k_w] / ``rejected_index``
    [B, k_l] (row of each member in the N sequences, -1 for a missing member of a ragged group);
    ``chosen_mask`` / ``rejected_mask`` (index >= 0); ``chosen_lengths`` [B, k_w] (response tokens);
    ``ragged`` (bool); ``num_tokens`` (int); ``logits_start`` (int); ``extra`` (dict of tensors from numeric columns);
    ``ref_chosen`` / ``ref_rejected`` [B, k] when reference log-probs were precomputed.

    ``share_prompt=True`` packs each example into ONE row instead — the prompt once, then every chosen and rejected
    response — so the prompt is encoded once per example rather than once per member (see
    :func:`mmalign.text.modeling.logprobs.shared_prompt_logprobs`). The row keys then are ``input_ids``, ``segment_ids``
    (0 prompt, 1.. response number within the row, -1 padding), ``position_ids`` (each response continues the
    prompt's positions) and the scoring plan ``score_rows`` / ``score_positions`` (the position whose logits predict
    the token) / ``score_labels`` / ``score_members`` (member index, as in ``chosen_index``) [M], ``logit_positions``
    [K] (sorted positions whose logits are needed) with ``score_logit_index`` [M] into it, and ``num_members``.
    The member indexes, masks, lengths, extras and precomputed references are the same as in the padded layout.
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    share_prompt: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._shared_prompt_batch(items) if self.share_prompt else self._padded_batch(items)
        batch.update(_member_tables(items))
        return batch

    def _row_length(self, longest: int) -> int:
        if self.pad_to_multiple_of:
            return int(math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        return longest

    def _padded_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        # one row per member, in member order (see _member_tables)
        sequences = [(item["prompt_ids"], response) for item in items
                     for response in item["chosen_ids"] + item["rejected_ids"]]
        n, length = len(sequences), self._row_length(max(len(p) + len(r) for p, r in sequences))
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        loss_mask = torch.zeros((n, length), dtype=torch.bool)
        for row, (prompt, response) in enumerate(sequences):
            end = len(prompt) + len(response)
            input_ids[row, :end] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[row, :end] = 1
            loss_mask[row, len(prompt) : end] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "num_tokens": int(attention_mask.sum()),
            # logits before the shortest prompt's last token are never needed (see sequence_logprobs)
            "logits_start": min(len(p) for p, _ in sequences) - 1,
        }

    def _shared_prompt_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rows: list[tuple[list[int], list[int], list[int]]] = []  # (token ids, segment ids, position ids)
        score_rows, score_positions, score_labels, score_members = [], [], [], []
        member = 0  # numbered as in _member_tables
        for b, item in enumerate(items):
            prompt = item["prompt_ids"]
            ids, segments, positions = list(prompt), [0] * len(prompt), list(range(len(prompt)))
            for segment, response in enumerate(item["chosen_ids"] + item["rejected_ids"], start=1):
                start = len(ids)
                # the first response token is predicted by the prompt's last position, the others by their left
                # neighbour in the row
                score_positions += ([len(prompt) - 1] + list(range(start, start + len(response) - 1)))[: len(response)]
                score_labels += response
                score_rows += [b] * len(response)
                score_members += [member] * len(response)
                ids += response
                segments += [segment] * len(response)
                positions += range(len(prompt), len(prompt) + len(response))
                member += 1
            rows.append((ids, segments, positions))
        length = self._row_length(max(len(r[0]) for r in rows))
        # padded in Python, one tensor per field: cheaper than a tensor per row (collation runs every step)
        input_ids = torch.tensor([r[0] + [self.pad_token_id] * (length - len(r[0])) for r in rows], dtype=torch.long)
        segment_ids = torch.tensor([r[1] + [-1] * (length - len(r[1])) for r in rows], dtype=torch.long)
        position_ids = torch.tensor([r[2] + [0] * (length - len(r[2])) for r in rows], dtype=torch.long)
        score_positions_t = torch.tensor(score_positions, dtype=torch.long)
        logit_positions, score_logit_index = torch.unique(score_positions_t, sorted=True, return_inverse=True)
        return {
            "input_ids": input_ids,
            "segment_ids": segment_ids,
            "position_ids": position_ids,
            "score_rows": torch.tensor(score_rows, dtype=torch.long),
            "score_positions": score_positions_t,
            "score_labels": torch.tensor(score_labels, dtype=torch.long),
            "score_members": torch.tensor(score_members, dtype=torch.long),
            "logit_positions": logit_positions,
            "score_logit_index": score_logit_index,
            "num_members": member,
            "num_tokens": int(sum(len(r[0]) for r in rows)),
        }


def _member_tables(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The layout-independent keys: members numbered example by example, chosen before rejected."""
    batch_size = len(items)
    k_w = max(len(i["chosen_ids"]) for i in items)
    k_l = max(len(i["rejected_ids"]) for i in items)
    chosen_index = torch.full((batch_size, k_w), -1, dtype=torch.long)
    rejected_index = torch.full((batch_size, k_l), -1, dtype=torch.long)
    chosen_lengths = torch.ones((batch_size, k_w), dtype=torch.float32)
    member = 0
    for b, item in enumerate(items):
        for j, response in enumerate(item["chosen_ids"]):
            chosen_index[b, j], chosen_lengths[b, j] = member, len(response)
            member += 1
        for j in range(len(item["rejected_ids"])):
            rejected_index[b, j] = member
            member += 1
    batch: dict[str, Any] = {
        "chosen_index": chosen_index,
        "rejected_index": rejected_index,
        "chosen_mask": chosen_index >= 0,
        "rejected_mask": rejected_index >= 0,
        "chosen_lengths": chosen_lengths,
        "ragged": bool((chosen_index < 0).any() or (rejected_index < 0).any()),
        "extra": _collate_extra(items),
    }
    if all("ref_chosen" in i for i in items):
        ref_chosen = torch.zeros((batch_size, k_w), dtype=torch.float32)
        ref_rejected = torch.zeros((batch_size, k_l), dtype=torch.float32)
        for b, item in enumerate(items):
            ref_chosen[b, : len(item["ref_chosen"])] = torch.tensor(item["ref_chosen"], dtype=torch.float32)
            ref_rejected[b, : len(item["ref_rejected"])] = torch.tensor(item["ref_rejected"], dtype=torch.float32)
        batch["ref_chosen"] = ref_chosen
        batch["ref_rejected"] = ref_rejected
    return batch


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_response_ids(batch: Mapping[str, Any]) -> list[list[int]]:
    """The scored response tokens of every member of a :class:`PreferenceCollator` batch (either layout), in member
    order (the numbering of ``chosen_index`` / ``rejected_index``)."""
    if "segment_ids" in batch:
        responses: list[list[int]] = [[] for _ in range(int(batch["num_members"]))]
        for member, token in zip(batch["score_members"].tolist(), batch["score_labels"].tolist()):
            responses[member].append(token)
        return responses
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    return [input_ids[n][loss_mask[n]].tolist() for n in range(input_ids.shape[0])]


def _collate_extra(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    names = set(items[0].get("extra", {}))
    for item in items[1:]:
        names &= set(item.get("extra", {}))
    out = {}
    for name in sorted(names):
        values = [item["extra"][name] for item in items]
        try:
            out[name] = torch.tensor(values)
        except (ValueError, TypeError):  # ragged lists: not a tensor input
            continue
    return out

