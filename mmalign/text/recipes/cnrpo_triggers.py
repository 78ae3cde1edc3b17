"""CNRPO's triggers on prompts and the stop-gradient triggered log-likelihoods of stage 2 (SPEC §4)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from mmalign.engine import targets
from mmalign.shared.triggers import TriggerPolicy
from mmalign.text.data import HH_ASSISTANT, PreferenceCollator, PreferenceExample, PreferenceTokenizer, batch_response_ids, batch_to_device, truncate_prompt
from mmalign.text.modeling.logprobs import batch_logprobs
from mmalign.text.recipes.cnrpo_config import CNRPO_ROW_COLUMN


__all__ = ["attach_trigger", "TriggeredLogprobs", "triggered_prompt_ids"]


def attach_trigger(prompt: Any, trigger: str, policy: TriggerPolicy) -> Any:
    """``prompt ⊕ trigger``; for an HH prompt (text ending in "\\n\\nAssistant:") the trigger goes into the text
    before that final marker, i.e. into the human turn, not after "Assistant:"."""
    if isinstance(prompt, str) and prompt.endswith(HH_ASSISTANT):
        return policy.apply(prompt[: -len(HH_ASSISTANT)], trigger) + HH_ASSISTANT
    return policy.apply(prompt, trigger)


# ------------------------------------------------------------------------------------------------------------
# The stop-gradient triggered log-likelihoods (the extra_inputs_hook of stage 2).


class TriggeredLogprobs:
    """``extra_inputs_hook`` of stage 2: the current policy's log-likelihoods of each batch's responses behind
    each triggered prompt, ``triggered_chosen`` / ``triggered_rejected`` [B, n_triggers], under ``no_grad``.

    ``triggered_prompt_ids[row][i]``: token ids of main row ``row``'s prompt with trigger ``i`` (tokenised
    exactly as the trainer tokenises prompts). The batch's rows are found through the ``cnrpo_row`` column; the
    responses are the very tokens the trainer scores (read from the batch, in either collator layout).
    ``max_length``: a triggered prompt is cut from the left so it + the longer of the two appended responses
    fits (a leading token in ``special_ids``, e.g. BOS, is kept), as the trainer cuts a pair's shared prompt.
    The forward is the engine's :func:`~mmalign.engine.targets.triggered_log_likelihoods` (no grad, eval mode: fixed
    targets, like the reference's log-likelihoods), shared with the image backend.
    """

    def __init__(self, triggered_prompt_ids: Sequence[Sequence[Sequence[int]]], pad_token_id: int, *,
                 max_length: Optional[int] = None, special_ids: Sequence[int] = ()):
        self.triggered_prompt_ids = triggered_prompt_ids
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.special_ids = frozenset(special_ids)
        self.n_triggers = len(triggered_prompt_ids[0]) if triggered_prompt_ids else 0

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        rows = batch["extra"][CNRPO_ROW_COLUMN].tolist()
        responses = batch_response_ids(batch)
        chosen_index, rejected_index = batch["chosen_index"].tolist(), batch["rejected_index"].tolist()
        items, owners = [], []
        for b, row in enumerate(rows):
            for i in range(self.n_triggers):
                prompt = list(self.triggered_prompt_ids[int(row)][i])
                pair = [responses[chosen_index[b][0]], responses[rejected_index[b][0]]]
                if self.max_length is not None:  # one prompt for both sides, cut as the trainer cuts it
                    prompt = truncate_prompt(prompt, max(1, self.max_length - max(map(len, pair))),
                                             keep_first_token=prompt[0] in self.special_ids)
                items.append({"prompt_ids": prompt, "chosen_ids": pair[:1], "rejected_ids": pair[1:]})
                owners.append((b, i))
        device = batch["input_ids"].device
        # the trainer's layout: with a shared prompt, one row holds the triggered prompt and both responses
        collate = PreferenceCollator(self.pad_token_id, share_prompt="segment_ids" in batch)
        triggered = batch_to_device(collate(items), device)

        def score() -> tuple[torch.Tensor, torch.Tensor]:  # one forward over every (row, trigger) pair
            logps, _ = batch_logprobs(model, triggered)
            out = torch.zeros(len(rows), self.n_triggers, 2, dtype=logps.dtype, device=device)
            for n, (b, i) in enumerate(owners):
                out[b, i, 0] = logps[triggered["chosen_index"][n, 0]]
                out[b, i, 1] = logps[triggered["rejected_index"][n, 0]]
            return out[..., :1], out[..., 1:]  # [B, n_triggers, 1]: the pair's one member per side

        return targets.triggered_log_likelihoods(model, score, n_triggers=self.n_triggers)


def triggered_prompt_ids(examples: Sequence[PreferenceExample], triggers: Sequence[str], policy: TriggerPolicy,
                          encoder: PreferenceTokenizer) -> list[list[list[int]]]:
    triggered = []
    for trigger in triggers:
        items = encoder([PreferenceExample(attach_trigger(e.prompt, trigger, policy), e.chosen[:1], e.rejected[:1], e.row)
                         for e in examples])
        triggered.append([item["prompt_ids"] for item in items])
    return [[triggered[i][r] for i in range(len(triggers))] for r in range(len(examples))]
