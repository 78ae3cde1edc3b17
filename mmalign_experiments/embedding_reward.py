"""A cheap reward the f-DPO frontier can measure: a logistic probe on frozen all-MiniLM-L6-v2 embeddings.

The frontier's SmolLM2 reward model, trained on 64 pairs, scored at chance on held-out pairs; a sequence
classifier trained long enough to do better costs more CPU than the experiment has. This probe is the
Bradley-Terry model of SPEC §1 with a linear reward on fixed features: r(x, y) = w · e(x, y), where e is the
mean-pooled, unit-norm MiniLM embedding of the last human turn and the response, and
P(y_w ≻ y_l) = σ(r(x, y_w) − r(x, y_l)) (no intercept: swapping a pair flips the probability). It trains on HH pairs
that no slice of the experiment uses and reports its held-out pairwise accuracy with a one-sided binomial p-value
against chance, so a reader can see whether its scores mean anything.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

EMBED_MAX_TOKENS = 128


def dialogue_text(prompt: str, response: str) -> str:
    """The last human turn and the response (what the reward judges), in one plain string."""
    turn = prompt.rsplit("Human:", 1)[-1].replace("Assistant:", "").strip()
    return f"Human: {turn}\nAssistant: {response.strip()}"


class MiniLMEmbedder:
    """Texts -> mean-pooled, unit-norm all-MiniLM-L6-v2 embeddings (left-truncated, so the response is kept)."""

    def __init__(self, model_path: str | None = None, max_tokens: int = EMBED_MAX_TOKENS):
        from mmalign.image.text_encoders import FrozenTextEncoder

        self.encoder = FrozenTextEncoder(model_path, max_length=max_tokens)
        self.encoder.tokenizer.truncation_side = "left"
        self.max_tokens = max_tokens

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        tok = self.encoder.tokenizer
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together: less padding
        out = torch.empty(len(texts), self.encoder.hidden_size)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_tokens,
                        return_tensors="pt")
            hidden = self.encoder.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1)
        return out


def fit_probe(diff: torch.Tensor, *, l2: float = 1e-3, steps: int = 200) -> torch.Tensor:
    """w minimising mean(−log σ(w · d)) + l2 |w|² over rows d = e(x, y_w) − e(x, y_l) (L-BFGS, deterministic)."""
    if diff.ndim != 2 or diff.shape[0] < 2:
        raise ValueError(f"fit_probe: need a (pairs, features) matrix with >= 2 pairs, got {tuple(diff.shape)}")
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    d = diff.to(torch.float64)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(d @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().to(torch.float32)


def binomial_p_above_half(correct: int, n: int) -> float:
    """One-sided P(X >= correct) for X ~ Binomial(n, 1/2): how often chance does at least this well."""
    if not 0 <= correct <= n:
        raise ValueError(f"binomial_p_above_half: need 0 <= correct <= n, got {correct}, {n}")
    return sum(math.comb(n, k) for k in range(correct, n + 1)) / 2 ** n


class ProbeReward:
    """The fitted probe: ``score(prompts, responses)`` -> rewards; ``report`` holds its held-out accuracy."""

    def __init__(self, embedder: MiniLMEmbedder, weight: torch.Tensor, report: dict[str, Any]):
        self.embedder, self.weight, self.report = embedder, weight, report

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        emb = self.embedder([dialogue_text(p, r) for p, r in zip(prompts, responses)])
        return (emb @ self.weight).tolist()


def _pair_diffs(embedder: MiniLMEmbedder, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    chosen = embedder([dialogue_text(r["prompt"], r["chosen"]) for r in rows])
    rejected = embedder([dialogue_text(r["prompt"], r["rejected"]) for r in rows])
    return chosen - rejected


def train_probe(train_rows: Sequence[dict[str, Any]], heldout_rows: Sequence[dict[str, Any]], *,
                embedder: MiniLMEmbedder | None = None, l2: float = 1e-3) -> ProbeReward:
    """Fit on ``train_rows``, report pairwise accuracy (and its p-value against chance) on ``heldout_rows``."""
    held = {r["prompt"] for r in heldout_rows}
    if any(r["prompt"] in held for r in train_rows):
        raise ValueError("train_probe: a held-out prompt is also in the training pairs")
    embedder = embedder or MiniLMEmbedder()
    weight = fit_probe(_pair_diffs(embedder, train_rows), l2=l2)
    margins = _pair_diffs(embedder, heldout_rows) @ weight
    correct = int((margins > 0).sum())
    train_acc = float(((_pair_diffs(embedder, train_rows[:256]) @ weight) > 0).float().mean())
    report = {"train_pairs": len(train_rows), "heldout_pairs": len(heldout_rows), "heldout_correct": correct,
              "pairwise_accuracy": correct / len(heldout_rows), "p_vs_chance": binomial_p_above_half(correct, len(heldout_rows)),
              "train_accuracy_first256": train_acc, "l2": l2, "embed_max_tokens": embedder.max_tokens}
    return ProbeReward(embedder, weight, report)
