"""The engine on a toy regression problem: logging, accumulation, checkpoints, exact resume, plots."""
import json

import pytest
import torch

from mmalign.engine import StepOutput, Trainer, TrainingConfig, find_latest_checkpoint, read_metrics


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n=24, dim=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.arange(1.0, dim + 1) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


class ToyModel(torch.nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.hidden = torch.nn.Linear(dim, 16)
        self.dropout = torch.nn.Dropout(0.3)  # randomness that must replay identically after a resume
        self.out = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.dropout(torch.tanh(self.hidden(x)))).squeeze(-1)


def compute_loss(model, batch):
    pred = model(batch["x"])
    loss = torch.nn.functional.mse_loss(pred, batch["y"])
    return StepOutput(loss=loss, metrics={"abs_err": (pred - batch["y"]).abs().mean().detach()}, num_tokens=len(pred))


def make_trainer(tmp_path, name="run", **overrides):
    torch.manual_seed(0)
    cfg = dict(batch_size=4, learning_rate=1e-2, max_steps=8, logging_steps=1, lr_scheduler="cosine",
               warmup_steps=2, progress_bar=False, seed=3)
    cfg.update(overrides)
    saved = []
    return Trainer(
        ToyModel(),
        config=TrainingConfig(**cfg),
        output_dir=tmp_path / name,
        train_dataset=ToyDataset(),
        collate_fn=collate,
        compute_loss=compute_loss,
        save_model=lambda m, d: (torch.save(m.state_dict(), d / "model.pt"), saved.append(d)),
        evaluate=lambda m: {"abs_err": 0.5},
        resolved_config={"training": cfg},
    )


def test_train_logs_metrics_saves_and_plots(tmp_path):
    summary = make_trainer(tmp_path, max_steps=6, gradient_accumulation_steps=2, logging_steps=3, eval_steps=3).train()
    rows = read_metrics(summary["metrics_path"])
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6]
    for key in ("loss", "abs_err", "grad_norm", "learning_rate", "tokens/s", "epoch"):
        assert key in train_rows[0], key
    assert [r["step"] for r in rows if "eval_abs_err" in r] == [3, 6]
    # 24 samples / batch 4 = 6 micro-batches per epoch = 3 optimizer steps with accumulation 2
    assert train_rows[-1]["epoch"] == pytest.approx(2.0)
    assert summary["global_step"] == 6
    final = tmp_path / "run" / "final"
    assert (final / "model.pt").exists() and (final / "config.yaml").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0
    assert not list((tmp_path / "run").glob(".tmp*"))


def test_loss_decreases(tmp_path):
    summary = make_trainer(tmp_path, max_steps=30, logging_steps=10, lr_scheduler="constant", warmup_steps=0,
                           learning_rate=5e-2).train()
    rows = [r for r in read_metrics(summary["metrics_path"]) if "loss" in r]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    # save_steps=3 with logging_steps=2: the checkpoint falls inside a logging window, so the partial window must
    # be restored too; 5 batches per epoch with accumulation 2 puts a short accumulation at every epoch end.
    common = dict(max_steps=9, save_steps=3, logging_steps=2, gradient_accumulation_steps=2, save_total_limit=None)
    full = make_trainer(tmp_path, "full", **common).train()
    interrupted = make_trainer(tmp_path, "resumed", **{**common, "max_steps": 9})
    # Simulate a crash after step 6: train the whole run, then cut the log and delete later checkpoints.
    interrupted.train()
    run_dir = tmp_path / "resumed"
    for ckpt in (run_dir / "checkpoints").glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > 6:
            import shutil

            shutil.rmtree(ckpt)
    assert find_latest_checkpoint(run_dir).name == "checkpoint-6"
    resumed = make_trainer(tmp_path, "resumed", **common)
    with torch.no_grad():  # scramble the fresh weights: the checkpoint must overwrite them
        for p in resumed.model.parameters():
            p.add_(1.0)
    summary = resumed.train(resume_from_checkpoint="latest")
    assert summary["global_step"] == 9
    full_rows = [r for r in read_metrics(full["metrics_path"]) if "loss" in r]
    resumed_rows = [r for r in read_metrics(summary["metrics_path"]) if "loss" in r]
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in full_rows]
    for a, b in zip(full_rows, resumed_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-9)
        assert a["epoch"] == b["epoch"]


def test_checkpoint_rotation_and_contents(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, save_steps=2, save_total_limit=2)
    trainer.train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_resume_from_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        make_trainer(tmp_path).train(resume_from_checkpoint=tmp_path / "nope")


def test_frozen_parameters_are_not_checkpointed_but_resume_works(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, save_steps=2)
    trainer.model.hidden.requires_grad_(False)
    trainer = Trainer(trainer.model, config=trainer.config, output_dir=tmp_path / "frozen", train_dataset=ToyDataset(),
                      collate_fn=collate, compute_loss=compute_loss)
    trainer.train()
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "frozen" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert set(weights) == {"out.weight", "out.bias"}
    # resuming loads the partial state without complaining about the frozen keys
    again = Trainer(trainer.model, config=TrainingConfig(**{**trainer.config.__dict__, "max_steps": 5}),
                    output_dir=tmp_path / "frozen", train_dataset=ToyDataset(), collate_fn=collate,
                    compute_loss=compute_loss)
    assert again.train(resume_from_checkpoint="latest")["global_step"] == 5


def test_plot_metrics_draws_train_and_eval_and_skips_missing(tmp_path):
    from mmalign.engine import plot_metrics

    log = tmp_path / "m.jsonl"
    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6, "rewards/margins": 0.1}, {"step": 2, "eval_loss": 0.65}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = plot_metrics(log, ["loss", "rewards/margins", "absent"], tmp_path / "p.png")
    assert png == tmp_path / "p.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(log, ["absent"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_optional_sinks_fail_clearly_when_missing(tmp_path):
    import importlib.util

    from mmalign.engine.reporting import MetricsWriter

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsWriter(tmp_path, ["jsonl", "tensorboard"])


def test_optimizer_is_the_fused_adamw_and_steps_like_the_reference_loop(tmp_path):
    trainer = make_trainer(tmp_path)
    optimizer = trainer._build_optimizer()
    assert optimizer.defaults["fused"] is True
    # one AdamW step of the fused kernel equals the per-tensor loop's
    torch.manual_seed(1)
    params = [p.detach().clone().requires_grad_() for p in trainer.model.parameters()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True).step()
    torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False).step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
