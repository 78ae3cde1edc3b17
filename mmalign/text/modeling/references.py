"""The three kinds of reference policy (SPEC §0: ``ρ = logp_θ − logp_ref``), all returning per-sequence response
log-likelihoods [N]:

- :class:`AdapterReference` — under LoRA, the same model with its adapters disabled (the engine's
  :func:`~mmalign.engine.targets.reference_forward`, shared with the image backend): the frozen base IS the
  initial policy, so no second copy of the weights is held.
- :class:`FrozenModelReference` — a separate frozen model (a different SFT model, or a copy of the initial
  policy for full fine-tuning).
- precomputed — :func:`precompute_reference_logps` runs one of the above once over the dataset before training
  and caches the result on disk, keyed by the tokenised data and the reference weights; the training step then
  reads ``ref_chosen``/``ref_rejected`` from the batch and runs no reference forward.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mmalign.engine import targets
from mmalign.engine.targets import adapters_disabled, eval_mode
from mmalign.text.data import batch_to_device
from mmalign.text.modeling.loading import unwrap
from mmalign.text.modeling.logprobs import batch_logprobs

__all__ = [
    "eval_mode",
    "adapters_disabled",
    "AdapterReference",
    "FrozenModelReference",
    "model_fingerprint",
    "precompute_reference_logps",
    "reference_cache_name",
]

logger = logging.getLogger("mmalign.text.models")


class AdapterReference:
    """The LoRA model with adapters disabled, under ``no_grad``: the base model as the reference, no copy (the
    engine's :func:`~mmalign.engine.targets.reference_forward`, scoring with the response log-probabilities)."""

    def __init__(self, model: torch.nn.Module):
        if not hasattr(unwrap(model), "disable_adapter"):
            raise ValueError("reference mode 'adapter' needs a PEFT (LoRA) model")
        self._dropout = targets.has_active_dropout(unwrap(model))

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with targets.reference_forward(unwrap(model), deterministic=self._dropout, mode_of=model):
            logps, _ = batch_logprobs(model, batch)
        return logps


class FrozenModelReference:
    """A separate frozen model in eval mode."""

    def __init__(self, model: torch.nn.Module):
        model.requires_grad_(False)
        model.eval()
        self.model = model

    def __call__(self, policy: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            logps, _ = batch_logprobs(self.model, batch)
        return logps


def model_fingerprint(model: torch.nn.Module, identity: str = "", *, skip_adapters: bool = False) -> str:
    """A digest of the weights (names, shapes, dtypes and float64 moments of every tensor) plus ``identity``.
    ``skip_adapters`` leaves LoRA tensors out (the adapter-disabled reference does not depend on them).

    Two different checkpoints collide only if every tensor has the same sum and the same weighted sum; reading the
    weights once is cheap next to the forward passes whose results it keys.
    """
    digest = hashlib.sha256(identity.encode())
    with torch.no_grad():
        for name, tensor in unwrap(model).state_dict().items():
            if skip_adapters and "lora_" in name:
                continue
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            if flat.numel() and not tensor.dtype.is_complex:  # ints/bools hash by value too; complex has no .double()
                values = flat.double()
                ramp = torch.linspace(0.5, 1.5, values.numel(), dtype=torch.float64, device=values.device)
                digest.update(f"{values.sum().item():.12e}|{(values * ramp).sum().item():.12e}".encode())
    return digest.hexdigest()


def precompute_reference_logps(
    reference: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor],
    model: torch.nn.Module,
    dataset,
    collate_fn: Callable,
    *,
    batch_size: int,
    device: torch.device,
    cache_path: Optional[str | os.PathLike] = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Computes the reference log-likelihood of every chosen/rejected member once and stores it in the items
    (``ref_chosen``, ``ref_rejected`` lists), reading/writing ``cache_path`` when given (atomic write)."""
    from tqdm.auto import tqdm

    if cache_path is not None and Path(cache_path).exists():
        cached = torch.load(cache_path, weights_only=True)
        if len(cached["chosen"]) == len(dataset):
            for item, chosen, rejected in zip(dataset.items, cached["chosen"], cached["rejected"]):
                item["ref_chosen"], item["ref_rejected"] = chosen.tolist(), rejected.tolist()
            logger.info("reference log-probs loaded from %s", cache_path)
            return {"cache_hit": True, "cache_path": str(cache_path)}
    chosen_all: list[torch.Tensor] = []
    rejected_all: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc="reference log-probs", disable=not show_progress):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            for item in items:
                item.pop("ref_chosen", None)
                item.pop("ref_rejected", None)
            batch = collate_fn(items)
            logps = reference(model, batch_to_device(batch, device)).float().cpu()
            for b, item in enumerate(items):
                chosen = logps[batch["chosen_index"][b][batch["chosen_mask"][b]]]
                rejected = logps[batch["rejected_index"][b][batch["rejected_mask"][b]]]
                item["ref_chosen"], item["ref_rejected"] = chosen.tolist(), rejected.tolist()
                chosen_all.append(chosen)
                rejected_all.append(rejected)
    finally:
        model.train(was_training)
    if cache_path is not None:
        cache_path = Path(cache_path)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.tmp")
        torch.save({"chosen": chosen_all, "rejected": rejected_all}, tmp)
        os.replace(tmp, cache_path)
    return {"cache_hit": False, "cache_path": str(cache_path) if cache_path else None}


def reference_cache_name(data_fingerprint: str, model_digest: str, extra: dict[str, Any] | None = None) -> str:
    """File name of a precomputed-reference cache: a digest of the tokenised data, the weights and settings."""
    key = hashlib.sha256(json.dumps({"data": data_fingerprint, "model": model_digest, **(extra or {})},
                                    sort_keys=True).encode()).hexdigest()
    return f"ref-logps-{key[:24]}.pt"
