"""Issue #15 on the engine: no code from checkpoints, run identity, atomic re-save + manifests, exact-or-refused
resume, non-finite stops."""
import json
import pathlib
import shutil

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.engine import StepOutput, TrainingConfig, find_latest_checkpoint, read_metrics
from mmalign.engine.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    checkpoint_problem,
    recover_interrupted_replace,
    replace_folder,
    write_manifest,
)
from mmalign.engine.guards import NonFiniteError
from mmalign.engine.run_identity import RunConflictError

from tests.engine.test_trainer import compute_loss, make_trainer


class Payload:
    """Unpickling this touches ``marker``: the stand-in for arbitrary code in a planted file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _rewrite_manifest(folder):
    if (folder / MANIFEST_NAME).exists():  # an attacker who plants files can rewrite the manifest too
        write_manifest(folder)


def _checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def test_planted_pickle_payloads_never_execute(tmp_path):
    make_trainer(tmp_path, "src", max_steps=2, save_steps=2).train()
    clean = tmp_path / "src" / "checkpoints" / "checkpoint-2"
    names = sorted(p.name for p in clean.iterdir() if p.name != MANIFEST_NAME)
    # the names accelerate's own checkpoints use, which a loader might still look for
    names += ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt"]
    assert "optimizer.pt" in names and "scheduler.json" in names
    marker = tmp_path / "pwned"
    for name in names:
        run_dir = tmp_path / f"victim-{name}"
        folder = run_dir / "checkpoints" / "checkpoint-2"
        shutil.copytree(clean, folder)
        torch.save(Payload(marker), folder / name)  # a torch zip archive whose pickle runs code
        _rewrite_manifest(folder)
        try:
            make_trainer(tmp_path, run_dir.name, max_steps=3).train(resume_from_checkpoint=str(folder))
        except Exception:
            pass  # refusing the file is fine; running it is not
        assert not marker.exists(), f"a payload planted in {name} was executed on resume"


def test_a_new_run_refuses_another_runs_output_dir(tmp_path):
    make_trainer(tmp_path, "run", max_steps=4, save_steps=1, save_total_limit=2).train()
    assert _checkpoints(tmp_path / "run") == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(RunConflictError, match="holds checkpoints of another run.*overwrite_output_dir"):
        make_trainer(tmp_path, "run", max_steps=2, save_steps=1, learning_rate=5e-3).train()
    assert _checkpoints(tmp_path / "run") == ["checkpoint-3", "checkpoint-4"]  # nothing was touched
    # explicit overwrite: A's checkpoints go, B's stay (rotation no longer deletes B's at once)
    make_trainer(tmp_path, "run", max_steps=2, save_steps=1, learning_rate=5e-3, overwrite_output_dir=True).train()
    assert _checkpoints(tmp_path / "run") == ["checkpoint-1", "checkpoint-2"]


def test_resume_only_picks_checkpoints_of_its_own_run(tmp_path):
    make_trainer(tmp_path, "other", max_steps=6, save_steps=6).train()
    make_trainer(tmp_path, "run", max_steps=4, save_steps=2, save_total_limit=None).train()
    # a (complete) checkpoint of another run with a higher step lands in this run's folder
    shutil.copytree(tmp_path / "other" / "checkpoints" / "checkpoint-6", tmp_path / "run" / "checkpoints" / "checkpoint-6")
    assert find_latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    summary = make_trainer(tmp_path, "run", max_steps=5).train(resume_from_checkpoint="latest")
    assert summary["global_step"] == 5
    assert [r["step"] for r in read_metrics(summary["metrics_path"]) if "loss" in r] == [1, 2, 3, 4, 5]


def test_resume_skips_an_incomplete_checkpoint(tmp_path):
    make_trainer(tmp_path, "run", max_steps=4, save_steps=2, save_total_limit=None).train()
    # the state a kill inside the old in-place re-save left: a newer folder holding only trainer_state.json
    broken = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    broken.mkdir()
    shutil.copy(tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json", broken)
    assert "no manifest.json" in checkpoint_problem(broken)
    assert find_latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    # a truncated file is caught by the manifest's sizes
    weights = tmp_path / "run" / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "model.safetensors has" in checkpoint_problem(weights.parent)
    assert find_latest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        make_trainer(tmp_path, "run", max_steps=5).train(resume_from_checkpoint=str(weights.parent))


def test_replacing_a_checkpoint_is_atomic_under_a_kill(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    final, tmp = root / "checkpoint-4", root / ".tmp-checkpoint-4"
    for folder, text in ((final, "old"), (tmp, "new")):
        folder.mkdir(parents=True)
        (folder / "weights").write_text(text)
        write_manifest(folder)
    import mmalign.engine.checkpoints as module

    real_replace = module.os.replace
    calls = []

    def killed_after_moving_aside(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # between moving the old folder aside and renaming the new one in
        return real_replace(src, dst)

    monkeypatch.setattr(module.os, "replace", killed_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(tmp, final)
    monkeypatch.setattr(module.os, "replace", real_replace)
    assert not final.exists()
    recover_interrupted_replace(root)  # what every resume does first
    assert (final / "weights").read_text() == "old" and checkpoint_problem(final) is None
    replace_folder(tmp, final)
    assert (final / "weights").read_text() == "new" and not list(root.glob(".old-*"))


def test_resaving_an_existing_step_keeps_a_complete_checkpoint(tmp_path):
    make_trainer(tmp_path, "run", max_steps=4, save_steps=2, save_total_limit=None).train()
    summary = make_trainer(tmp_path, "run", max_steps=4, save_steps=2, save_total_limit=None).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "checkpoint-2"))
    assert summary["global_step"] == 4
    assert checkpoint_problem(tmp_path / "run" / "checkpoints" / "checkpoint-4") is None
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))


def test_unreadable_rng_state_stops_resume_unless_allowed(tmp_path):
    make_trainer(tmp_path, "run", max_steps=4, save_steps=2, save_total_limit=None).train()
    rng = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "rng_state_0.safetensors"
    rng.write_bytes(b"\0" * rng.stat().st_size)  # same size: the manifest does not notice, the reader must
    with pytest.raises(CheckpointError, match="random generator state.*allow_inexact_resume"):
        make_trainer(tmp_path, "run", max_steps=4).train(resume_from_checkpoint=str(rng.parent))
    summary = make_trainer(tmp_path, "run", max_steps=4, allow_inexact_resume=True).train(
        resume_from_checkpoint=str(rng.parent))
    assert summary["global_step"] == 4


@pytest.mark.parametrize("logging_steps", [1, 5])
def test_non_finite_loss_stops_the_run_before_any_checkpoint_from_it(tmp_path, logging_steps):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = compute_loss(model, batch)
        if calls["n"] == 3:  # the third optimizer step (no accumulation)
            return StepOutput(loss=out.loss * float("nan"), metrics=out.metrics)
        return out

    trainer = make_trainer(tmp_path, "run", max_steps=6, save_steps=1, save_total_limit=None,
                           logging_steps=logging_steps)
    trainer.compute_loss = poisoned
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is not finite.*checkpoint-2.*learning_rate"):
        trainer.train()
    assert _checkpoints(tmp_path / "run") == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("key,value", [("learning_rate", ".inf"), ("adam_epsilon", ".nan"), ("max_grad_norm", ".inf"),
                                       ("weight_decay", "-.inf"), ("num_epochs", ".inf")])
def test_non_finite_hyperparameters_are_refused_at_config_time(tmp_path, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError, match=f"{key}.*not finite"):
        load_config(TrainingConfig, path)
    with pytest.raises(ValueError, match="not finite"):
        TrainingConfig(**{key: float(value.replace(".", ""))})


def test_non_finite_values_inside_free_form_mappings_are_refused():
    from mmalign.text.config import TextTrainConfig

    with pytest.raises(ConfigError, match=r"objective\.(hyperparameters\.)?beta.*not finite"):
        load_config(TextTrainConfig, {"model": {"name_or_path": "x"}, "data": {"train": "x.jsonl"},
                                      "objective": {"name": "dpo", "beta": float("inf")}})


def test_eval_steps_without_anything_to_evaluate_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, "run", eval_steps=2)
    trainer.evaluate_fn = None
    with pytest.raises(ValueError, match="training.eval_steps.*nothing to evaluate"):
        trainer.train()


def test_checkpoint_files_hold_no_pickle(tmp_path):
    make_trainer(tmp_path, "run", max_steps=2, save_steps=2).train()
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {MANIFEST_NAME}
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.bin"))
    torch.load(folder / "optimizer.pt", weights_only=True)  # loads under the restricted unpickler


class Counter:
    def __init__(self):
        self.calls = 0

    def state_dict(self):
        return {"calls": self.calls, "history": torch.arange(self.calls)}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


def test_registered_state_is_checkpointed_without_pickle(tmp_path):
    trainer = make_trainer(tmp_path, "run", max_steps=2, save_steps=2)
    counter = Counter()
    counter.calls = 5
    trainer.accelerator.register_for_checkpointing(counter)  # as the online trainer registers its rollout state
    trainer.train()
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert (folder / "custom_state_0.pt").exists() and not list(folder.glob("*.pkl"))
    resumed = make_trainer(tmp_path, "run", max_steps=3)
    fresh = Counter()
    resumed.register_state(fresh)
    resumed.train(resume_from_checkpoint="latest")
    assert fresh.calls == 5
    torch.save(Payload(tmp_path / "pwned"), folder / "custom_state_0.pt")
    _rewrite_manifest(folder)
    again = make_trainer(tmp_path, "run", max_steps=3)
    again.register_state(Counter())
    with pytest.raises(CheckpointError, match="custom_state_0.pt: unreadable"):
        again.train(resume_from_checkpoint=str(folder))
    assert not (tmp_path / "pwned").exists()
