"""What online image rounds keep between rounds: each finished round's policy tensors, the rows of finished rounds,
and the reference the next round trains against (``reference: initial`` or ``previous``)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_policy", "load_policy", "finished_rounds", "use_policy_as_reference"]

logger = logging.getLogger("mmalign.image.online")


def save_policy(model, path: Path) -> None:
    """The trainable tensors of the policy UNet after a round (the LoRA tensors, or the whole UNet under full
    fine-tuning), written atomically: the round's resume point."""
    from safetensors.torch import save_file

    state = {name: p.detach().cpu().contiguous() for name, p in model.unet.named_parameters() if p.requires_grad}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_policy(model, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: the policy of a finished round is missing; cannot resume the rounds")
    state = load_file(str(path))
    trainable = {name for name, p in model.unet.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(f"{path}: its tensors do not match the policy's trainable parameters (another lora config?)")
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if name in state:
                p.copy_(state[name].to(p.device, p.dtype))


def use_policy_as_reference(model) -> None:
    """``reference: previous``: the reference of the next round becomes a frozen copy of the policy as it is now.
    Under LoRA that is a second UNet in memory (the adapter-disabled base is then no longer used); under full
    fine-tuning it replaces the frozen copy of the initial UNet."""
    from mmalign.image.models import frozen_copy

    model.reference_unet = frozen_copy(model.unet)


def finished_rounds(output_dir: Path, resume: Any, overwrite: bool) -> list[dict]:
    """The rows of the rounds a resumed run keeps (``rounds.jsonl``); [] for a fresh run, which refuses a folder
    that already holds rounds unless ``training.overwrite_output_dir``."""
    path = output_dir / "rounds.jsonl"
    if resume in (None, False):
        if path.exists() and not overwrite:
            raise ValueError(f"output_dir {str(output_dir)!r} holds the rounds of another run ({path}); resume it "
                             "(--resume / training.resume_from_checkpoint: latest), choose another output_dir or "
                             "set training.overwrite_output_dir: true")
        return []
    if resume not in (True, "latest"):
        raise ValueError(f"training.resume_from_checkpoint={resume!r}: image rounds resume from their output_dir "
                         "only; use 'latest'")
    if not path.exists():
        logger.warning("resume: no rounds.jsonl in %s; starting from scratch", output_dir)
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
