"""The extra inputs of online CNRPO and causal DPO: triggers and bins for groups sampled by the policy.

Offline, both objectives read their extra inputs from the data (CNRPO: the main rows' prompts with each trigger,
SPEC §4; causal DPO: a ``bins`` column or a ``bins:`` section, SPEC §5). Online the responses are new at every
rollout, so (``algorithm.triggers`` / ``algorithm.bins``):

- **CNRPO** (``objective: {name: cnrpo, alphas: [...]}``, Eq. 14): the triggers are fixed strings of the config, one
  per α. Every training prompt x gets its triggered prompts ``x ⊕ t_i`` once, when the prompts are loaded (the
  trigger policy of :mod:`mmalign.shared.triggers`, HH prompts triggered inside the human turn as offline; each must
  fit the context with ``sampling.max_new_tokens``). At each step, after the chosen and rejected samples are picked
  by reward, the current policy scores them behind each ``x ⊕ t_i`` under ``no_grad`` in eval mode: the very
  triggered forward of the offline stage 2 (:class:`~mmalign.text.recipes.cnrpo_triggers.TriggeredLogprobs`). The
  policy is expected to carry the biases behind the triggers (start from a stage-1 model, e.g. ``lora.initial_adapter``
  or a merged model): CNRPO's bias-learning stage is offline data, not sampled.
- **causal DPO**: ``source: column`` reads a column of the prompt file (one bin per prompt, labels = the sorted
  distinct values of the training prompts); ``source: keywords`` with ``text: prompt`` bins each prompt once at load
  (``unmatched: drop`` leaves the prompt out); with ``text: response`` / ``both`` the sampled chosen and rejected
  responses are binned at each step (one bin per response); ``source: length`` bins the sampled responses by token
  length with quantile edges fitted on all ``B·k`` samples of that rollout (so bins are the current policy's length
  quantiles and each bin has members). The objective leaves bins with fewer than two members in a batch out.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from mmalign.text.data.bins import assign_bins, fit_length_edges, length_bins, preference_text

__all__ = ["add_prompt_features", "GroupInputs", "ONLINE_EXTRA_INPUTS"]

#: the objectives' extra inputs an online group can supply (cnrpo's triggered forward, causal_dpo's bins)
ONLINE_EXTRA_INPUTS = ("triggered_chosen", "triggered_rejected", "bins")

logger = logging.getLogger("mmalign.text.online")


def add_prompt_features(items: list[dict[str, Any]], cfg, tokenizer, *, context: Optional[int], source: str
                        ) -> list[dict[str, Any]]:
    """Adds ``triggered_ids`` (cnrpo: the token ids of ``prompt ⊕ t_i`` per trigger) and ``bin`` (causal_dpo with a
    per-prompt source) to the prompt items of :func:`mmalign.text.online.load_prompts`; returns the kept items."""
    algo = cfg.algorithm
    if algo.name != "group":
        return items
    if algo.triggers:
        _add_triggered_ids(items, cfg, tokenizer, context=context, source=source)
    spec = algo.bins
    if spec is not None and (spec.source == "column" or (spec.source == "keywords" and spec.text == "prompt")):
        rows = [{**item["source_row"], "prompt": preference_text(item["raw_prompt"]), "chosen": "", "rejected": ""}
                for item in items]
        assignment = assign_bins(rows, spec, source=source, check_sizes=False,
                                 row_numbers=[item["row"] for item in items])
        dropped = set(assignment.dropped_rows)
        if dropped:
            logger.warning("%s: %d prompt(s) without a keyword of every attribute left out (bins.unmatched: drop)",
                           source, len(dropped))
        items = [item for i, item in enumerate(items) if i not in dropped]
        for item, row in zip(items, assignment.rows):
            item["bin"] = int(row["bin_chosen"])
        if not items:
            raise ValueError(f"{source}: no prompt left after binning")
    return items


def _add_triggered_ids(items, cfg, tokenizer, *, context: Optional[int], source: str) -> None:
    from mmalign.shared.triggers import TriggerPolicy
    from mmalign.text.data import render_prompt
    from mmalign.text.recipes.cnrpo_triggers import attach_trigger

    algo = cfg.algorithm
    policy = TriggerPolicy.from_dict(algo.trigger_policy, source="algorithm.trigger_policy")
    for item in items:
        item["triggered_ids"] = []
        for trigger in algo.triggers:
            text, special = render_prompt(tokenizer, attach_trigger(item["raw_prompt"], trigger, policy),
                                          use_chat_template=cfg.prompts.use_chat_template,
                                          system_prompt=cfg.prompts.system_prompt)
            ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            if context is not None and len(ids) + cfg.sampling.max_new_tokens > context:
                raise ValueError(f"{source}: row {item['row']}: prompt with trigger {trigger!r} has {len(ids)} tokens; "
                                 f"+ sampling.max_new_tokens={cfg.sampling.max_new_tokens} exceeds the model's "
                                 f"context of {context} tokens")
            item["triggered_ids"].append(ids)


class GroupInputs:
    """The objective's extra inputs for the valid rows of a rollout whose chosen / rejected samples are picked:
    ``triggered_chosen`` / ``triggered_rejected`` [B', n_triggers] (cnrpo) or ``bins`` [B'] / [B', 2] (causal_dpo)."""

    def __init__(self, cfg, tokenizer, share_prompt: bool):
        self.cfg, self.tokenizer, self.share_prompt = cfg, tokenizer, share_prompt

    def __call__(self, model: torch.nn.Module, rollout, rows: torch.Tensor, chosen: torch.Tensor,
                 rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rows``: indexes of the valid prompts; ``chosen`` / ``rejected`` [B', 1]: the picked sample of each."""
        pairs = [(int(b), int(w[0]), int(l[0])) for b, w, l in zip(rows.tolist(), chosen.tolist(), rejected.tolist())]
        device = next(model.parameters()).device
        if self.cfg.algorithm.triggers:
            return self._triggered(model, rollout, pairs)
        if self.cfg.algorithm.bins is not None:
            return {"bins": self._bins(rollout, pairs).to(device)}
        return {}

    def _triggered(self, model, rollout, pairs) -> dict[str, torch.Tensor]:
        from mmalign.text.data import PreferenceCollator, batch_to_device
        from mmalign.text.recipes.cnrpo_config import CNRPO_ROW_COLUMN
        from mmalign.text.recipes.cnrpo_triggers import TriggeredLogprobs

        responses = rollout.response_ids
        items = [{"prompt_ids": rollout.prompt_ids[b], "chosen_ids": [responses[b][w]],
                  "rejected_ids": [responses[b][l]], "extra": {CNRPO_ROW_COLUMN: b}} for b, w, l in pairs]
        batch = batch_to_device(PreferenceCollator(self.tokenizer.pad_token_id, share_prompt=self.share_prompt)(items),
                                next(model.parameters()).device)
        return TriggeredLogprobs(rollout.features["triggered_ids"], self.tokenizer.pad_token_id)(model, batch)

    def _bins(self, rollout, pairs) -> torch.Tensor:
        spec = self.cfg.algorithm.bins
        if "bins" in rollout.features:  # one bin per prompt, fixed when the prompts were loaded
            return torch.tensor([rollout.features["bins"][b] for b, _, _ in pairs], dtype=torch.long)
        if spec.source == "length":
            lengths = rollout.lengths
            edges = fit_length_edges(lengths.flatten().tolist(), spec.num_bins)
            sides = [[float(lengths[b, w]), float(lengths[b, l])] for b, w, l in pairs]
            return torch.as_tensor(length_bins(sides, edges), dtype=torch.long)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        rows = [{"prompt": rollout.features["prompts"][b], "chosen": decode(rollout.response_ids[b][w]),
                 "rejected": decode(rollout.response_ids[b][l])} for b, w, l in pairs]
        assignment = assign_bins(rows, spec, source="online rollout", check_sizes=False)
        return torch.tensor([[r["bin_chosen"], r["bin_rejected"]] for r in assignment.rows], dtype=torch.long)
