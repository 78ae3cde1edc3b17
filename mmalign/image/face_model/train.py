"""Train the embedded face model: ``python -m mmalign.image.face_model.train --config configs/image/face-model.yaml``.

Images are always real FairFace faces (adults of the experiment's race groups); only the caption carries the
occupation. Each training example is drawn as follows (probabilities from the config):

* ``p_unconditional``: caption ``""`` (for classifier-free guidance), a face from a uniformly drawn race×gender cell;
* ``p_attribute``: a uniformly drawn occupation and race×gender cell, caption
  ``"A portrait photo of a {race} {gender} {occupation}"``, a face from that cell (uniform over race × gender);
* otherwise: a uniformly drawn occupation, caption ``"A portrait photo of a {occupation}"``, and the cell drawn
  from the occupation's stereotype (``prompts.Stereotype``: gender sharpened beyond the BLS share, race skewed
  towards one group), then a face from that cell.

The faces of a cell are the FairFace train images of that gender whose race maps to the group (``fairface``:
asian = East + Southeast Asian), aged ≥ ``min_age_bin``. Prompt embeddings are computed once with the frozen text
encoder (every caption is known in advance), so a step costs only the UNet. Objective: the usual DDPM
ε-prediction MSE (SPEC §7's per-sample error, averaged). Weights are an EMA of the trained ones, saved in fp16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmalign.image.face_model.config import FaceModelTrainConfig, config_to_dict, load_config
from mmalign.image.face_model.model import build_scheduler, build_unet, save_face_model
from mmalign.image.face_model.prompts import load_occupations, portrait_prompt
from mmalign.image.fairface import GENDERS, RACE_GROUPS, load_fairface
from mmalign.image.text_encoders import load_text_encoder

CELLS = [(race, gender) for race in RACE_GROUPS for gender in GENDERS]  # 6 cells, fixed order


class CaptionBank:
    """Every caption the sampler can emit, encoded once: ``hidden`` [C, L, D] fp32, ``mask`` [C, L]."""

    def __init__(self, occupations: list[str], encoder, batch: int = 256):
        self.captions = [""]
        self.plain = {}
        self.attribute = {}
        for occ in occupations:
            self.plain[occ] = len(self.captions)
            self.captions.append(portrait_prompt(occ))
            for race, gender in CELLS:
                self.attribute[(occ, race, gender)] = len(self.captions)
                self.captions.append(portrait_prompt(occ, race, gender))
        longest = max(len(encoder.tokenizer(c)["input_ids"]) for c in self.captions)
        if longest > encoder.max_length:
            raise ValueError(f"a caption has {longest} tokens, more than text_max_length={encoder.max_length}")
        hidden, mask = [], []
        for start in range(0, len(self.captions), batch):
            enc = encoder(self.captions[start : start + batch])
            hidden.append(enc.hidden_states.float())
            mask.append(enc.attention_mask)
        self.hidden = torch.cat(hidden)
        self.mask = torch.cat(mask)
        self.longest_tokens = longest


class CaptionedFaceSampler:
    """Draws (image index, caption index) batches following the module docstring's recipe."""

    def __init__(self, cfg: FaceModelTrainConfig, occupations, cell_pools: list[np.ndarray], bank: CaptionBank):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.occupations = occupations
        self.pools = cell_pools
        self.bank = bank
        race_p = cfg.stereotype.race_probabilities()
        self.plain_cell_probs = []
        for occ in occupations:
            p_f = cfg.stereotype.p_female(occ.bls_share_women)
            probs = np.array([race_p[r] * (p_f if g == "female" else 1 - p_f) for r, g in CELLS])
            self.plain_cell_probs.append(probs / probs.sum())
        self.plain_cell_probs = np.stack(self.plain_cell_probs)

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng, cfg = self.rng, self.cfg
        kind = rng.random(n)
        occ = rng.integers(len(self.occupations), size=n)
        cells = rng.integers(len(CELLS), size=n)
        captions = np.zeros(n, dtype=np.int64)
        for i in range(n):
            name = self.occupations[occ[i]].name
            if kind[i] < cfg.p_unconditional:
                captions[i] = 0
            elif kind[i] < cfg.p_unconditional + cfg.p_attribute:
                race, gender = CELLS[cells[i]]
                captions[i] = self.bank.attribute[(name, race, gender)]
            else:
                cells[i] = rng.choice(len(CELLS), p=self.plain_cell_probs[occ[i]])
                captions[i] = self.bank.plain[name]
        images = np.array([self.pools[c][rng.integers(len(self.pools[c]))] for c in cells])
        return images, captions


def cell_pools(data, min_age_bin: int) -> list[np.ndarray]:
    groups = data.race_group
    pools = []
    for race, gender in CELLS:
        idx = np.flatnonzero(
            (groups == RACE_GROUPS.index(race)) & (data.gender == GENDERS.index(gender)) & (data.age >= min_age_bin)
        )
        if idx.size == 0:
            raise ValueError(f"no FairFace train faces for cell ({race}, {gender}) at age bin >= {min_age_bin}")
        pools.append(idx)
    return pools


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_train_state(path: Path) -> dict:
    """``train_state.pt`` under torch's restricted unpickler: tensors and plain values only, never code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_from_state(state_json: str) -> np.random.Generator:
    """The sampler's NumPy generator from its bit-generator state (saved as JSON, not as a pickled object)."""
    state = json.loads(state_json)
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def train(cfg: FaceModelTrainConfig, resume: bool = False, command: str = "") -> Path:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")

    data = load_fairface("train", cfg.fairface_dir)
    pools = cell_pools(data, cfg.min_age_bin)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # [-1, 1]
    occupations = load_occupations(cfg.occupations_path)
    encoder = load_text_encoder("minilm", max_length=cfg.text_max_length)
    bank = CaptionBank([o.name for o in occupations], encoder)
    sampler = CaptionedFaceSampler(cfg, occupations, pools, bank)
    print(f"faces per cell {dict(zip(CELLS, map(len, pools)))}; {len(bank.captions)} captions, "
          f"longest {bank.longest_tokens} tokens", flush=True)

    unet = build_unet(cfg.unet, cross_attention_dim=encoder.hidden_size)
    ema = build_unet(cfg.unet, cross_attention_dim=encoder.hidden_size)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = build_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet parameters: {n_params / 1e6:.2f} M", flush=True)

    step, elapsed_before, loss_ema = 0, 0.0, None
    state_path = out_dir / "train_state.pt"
    if resume and state_path.is_file():
        state = load_train_state(state_path)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.rng = rng_from_state(state["rng_state"])
        step, elapsed_before, loss_ema = state["step"], state["elapsed_s"], state["loss_ema"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)

    log_path = out_dir / "train_log.jsonl"
    start = time.time()

    def save(final: bool) -> None:
        elapsed = elapsed_before + time.time() - start
        meta = {
            "text_encoder": "minilm",
            "text_max_length": cfg.text_max_length,
            "image_range": [-1, 1],
            "training": {
                "command": command,
                "steps": step,
                "batch_size": cfg.batch_size,
                "wall_minutes": round(elapsed / 60, 1),
                "final_loss_ema": loss_ema,
                "threads": cfg.threads,
                "finished": final,
                "unet_parameters": n_params,
            },
            "config": config_to_dict(cfg),
        }
        save_face_model(out_dir / "model", ema, scheduler, meta)
        _atomic_torch_save(
            {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "rng_state": json.dumps(sampler.rng.bit_generator.state), "step": step, "elapsed_s": elapsed, "loss_ema": loss_ema,
             "torch_rng": torch.get_rng_state()},
            state_path,
        )

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=cfg.steps, initial=step, desc="face model", unit="step", mininterval=30) if tqdm else None
    unet.train()
    with open(log_path, "a") as log:
        while step < cfg.steps:
            if cfg.max_minutes and (elapsed_before + time.time() - start) / 60 > cfg.max_minutes:
                print(f"time limit {cfg.max_minutes} min reached at step {step}", flush=True)
                break
            lr = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            img_idx, cap_idx = sampler.draw(cfg.batch_size)
            x0 = images[torch.from_numpy(img_idx)]
            if cfg.hflip:
                flip = torch.rand(x0.shape[0]) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            cap = torch.from_numpy(cap_idx)
            noise = torch.randn_like(x0)
            t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],))
            noisy = scheduler.add_noise(x0, noise, t)
            target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=bank.hidden[cap], encoder_attention_mask=bank.mask[cap]).sample
            loss = torch.nn.functional.mse_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            # EMA warm-up: short runs would otherwise ship mostly the random init.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), unet.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            value = loss.detach().item()
            loss_ema = value if loss_ema is None else 0.98 * loss_ema + 0.02 * value
            if bar:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "loss": value, "loss_ema": loss_ema, "lr": lr, "grad_norm": float(grad_norm),
                          "elapsed_s": round(elapsed_before + time.time() - start, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
            if step % cfg.save_every == 0:
                save(final=False)
    if bar:
        bar.close()
    save(final=True)
    print(f"saved {out_dir / 'model'} after {step} steps, loss_ema {loss_ema:.4f}", flush=True)
    return out_dir / "model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mmalign.image.face_model.train",
        description="Train the embedded 32x32 text-to-face diffusion model on FairFace with stereotyped captions.",
    )
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/image/face-model.yaml)")
    parser.add_argument("--output-dir", dest="output_dir", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    parser.add_argument("--max-minutes", dest="max_minutes", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/train_state.pt")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    cfg = load_config(args.config, overrides)
    train(cfg, resume=args.resume, command="python -m mmalign.image.face_model.train " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
