"""One seam (issue #14 item 4): the adapter-disabled reference, CNRPO's triggered forward, the objective/data check and
the sharded evaluation loop exist once (``mmalign.engine.targets``, ``mmalign.shared.compatibility``,
``mmalign.engine.evaluation``), and the text and the image backends both go through each of them."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mmalign
from mmalign.engine import targets
from mmalign.engine.evaluation import ShardedEvaluation
from mmalign.shared.compatibility import DataFacts, check_objective_fits_data
from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows
from tests.test_objects_in import TRAINING as OBJECTS_TRAINING

TRAINING = {**OBJECTS_TRAINING, "max_steps": 2, "learning_rate": 1e-3}


def _text_config(tmp_path, **sections):
    return {"objective": {"name": "dpo", "beta": 0.1}, "training": dict(TRAINING), "output_dir": str(tmp_path / "text"),
            **sections}


def _image_config(tmp_path, **sections):
    return {"data": {"resolution": 32}, "objective": {"name": "dpo", "beta_d": 1000}, "lora": {"r": 4, "alpha": 8},
            "diffusion": {"latent_sampling": "mode"},
            "training": {k: v for k, v in TRAINING.items() if not k.startswith("max_")} | {"max_steps": 2},
            "output_dir": str(tmp_path / "image"), **sections}


def _image_rows(n: int, chosen: int = 1, seed: int = 0, size: int = 16) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": f"a photo of object {i % 2}",
             "chosen": [(180 + rng.integers(0, 60, (size, size, 3))).astype(np.uint8) for _ in range(chosen)],
             "rejected": [rng.integers(0, 60, (size, size, 3)).astype(np.uint8)]} for i in range(n)]


def _refusal(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


# ---------------------------------------------------------------------------------------- the objective/data check
def test_the_objective_data_check_says_what_does_not_fit():
    facts = DataFacts(source="d.jsonl")
    check_objective_fits_data(mmalign.objective("dpo", beta=0.1), facts)
    with pytest.raises(ValueError, match=r"d.jsonl: the data has groups \(up to 3 chosen, 1 rejected\) but objective "
                                         r"'ipo' is pairwise; use objective.name mdpo or mipo"):
        check_objective_fits_data(mmalign.objective("ipo", beta=0.1), DataFacts("d.jsonl", group_sizes=(3, 1)))
    check_objective_fits_data(mmalign.objective("mdpo", beta=0.1), DataFacts("d.jsonl", group_sizes=(3, 1)))
    with pytest.raises(ValueError, match=r"1 CNRPO trigger\(s\) \['<T>'\] but objective 'dpo' takes no triggered"):
        check_objective_fits_data(mmalign.objective("dpo", beta=0.1), DataFacts("d.jsonl", triggers=("<T>",)))
    cnrpo = mmalign.objective("cnrpo", beta=0.1, alphas=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"has 2 alpha\(s\) \[0.1, 0.2\] for 1 trigger\(s\) \['<T>'\]"):
        check_objective_fits_data(cnrpo, DataFacts("d.jsonl", triggers=("<T>",)))
    check_objective_fits_data(cnrpo, DataFacts("d.jsonl", triggers=("<T>", "<U>")))  # the forward supplies them
    with pytest.raises(ValueError, match=r"needs input\(s\) \['triggered_chosen', 'triggered_rejected'\]"):
        check_objective_fits_data(cnrpo, facts)
    causal = mmalign.objective("causal_dpo", beta=0.1)
    with pytest.raises(ValueError, match=r"^d.jsonl: objective 'causal_dpo' needs input\(s\) \['bins'\] that the data "
                                         r"does not provide; any hint; write bins$"):
        check_objective_fits_data(causal, DataFacts("d.jsonl", hints={"*": "any hint", "bins": "write bins"}))
    check_objective_fits_data(causal, DataFacts("d.jsonl", inputs=frozenset({"bins"})))


def test_text_and_image_refuse_the_same_mismatch_with_the_same_message(tokenizer, tiny_sd_path, tmp_path, monkeypatch):
    import mmalign.image.training as image_training

    def no_loading(*args, **kwargs):
        raise AssertionError("the image model was loaded before the objective was checked against the data")

    monkeypatch.setattr(image_training, "build_preference_model", no_loading)
    model = build_tiny_causal_lm(vocab_size=len(tokenizer))
    text_groups = [{"prompt": "Say hello.", "chosen": [" hello thanks", " hello please"], "rejected": [" no"]}] * 4
    text = _refusal(lambda: mmalign.text.train(_text_config(tmp_path), model=model, tokenizer=tokenizer,
                                               train_dataset=text_groups))
    image = _refusal(lambda: mmalign.image.train(_image_config(tmp_path), train_dataset=_image_rows(4, chosen=2),
                                                 pipeline=object()))
    assert text == image == ("train_dataset: the data has groups (up to 2 chosen, 1 rejected) but objective 'dpo' is "
                             "pairwise; use objective.name mdpo or mipo, or objective.pairs: members to train 'dpo' "
                             "on the member pairs (chosen_i, rejected_i) of equal-size groups")
    # a missing input: the same words, then how each backend's config supplies it
    causal = {"objective": {"name": "causal_dpo", "beta": 0.1}}
    text = _refusal(lambda: mmalign.text.train(_text_config(tmp_path, **causal), model=model, tokenizer=tokenizer,
                                               train_dataset=tiny_preference_rows(4)))
    image = _refusal(lambda: mmalign.image.train(_image_config(tmp_path, **causal), train_dataset=_image_rows(4),
                                                 pipeline=object()))
    shared = "train_dataset: objective 'causal_dpo' needs input(s) ['bins'] that the data does not provide; "
    assert text.startswith(shared) and image.startswith(shared)
    assert "add a bins: section" in text and "set data.bin_field" in image


# ---------------------------------------------------------------------------------------- the target forwards
def test_target_forwards_are_no_grad_deterministic_and_restore_the_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    assert targets.has_active_dropout(model)
    x = torch.randn(3, 4)

    def score():
        assert not model.training and not torch.is_grad_enabled()
        out = model(x)  # [3, 4]: 3 groups, the 4 columns as 2 triggers x 2 members
        return out.view(3, 2, 2), out.view(3, 2, 2)[..., :1]

    mask = torch.tensor([[True, False], [True, True], [True, True]])
    got = targets.triggered_log_likelihoods(model, score, n_triggers=2, chosen_mask=mask)
    assert model.training and not got["triggered_chosen"].requires_grad
    expected = model.eval()(x).view(3, 2, 2)
    model.train()
    torch.testing.assert_close(got["triggered_chosen"][0], expected[0, :, 0])  # the padding member left out
    torch.testing.assert_close(got["triggered_chosen"][1:], expected[1:].mean(-1))
    torch.testing.assert_close(got["triggered_rejected"], expected[..., 0])
    with pytest.raises(ValueError, match=r"triggered_chosen: the triggered forward must give \[B, 3, k\]"):
        targets.triggered_log_likelihoods(model, score, n_triggers=3)
    with pytest.raises(ValueError, match="has no LoRA adapters to disable"):
        with targets.reference_forward(model, deterministic=True):
            pass


class _Spy:
    """Records the calls of a function of :mod:`mmalign.engine.targets` (the backends call it through the module)."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        original = getattr(targets, name)

        def spy(*args, **kwargs):
            self.calls.append(type(args[0]).__name__)
            return original(*args, **kwargs)

        monkeypatch.setattr(targets, name, spy)


def _text_lora_batch(tokenizer):
    from peft import LoraConfig, get_peft_model

    from mmalign.text.data import PreferenceCollator, PreferenceTokenizer, parse_preference_rows
    from mmalign.text.recipes.cnrpo_config import CNRPO_ROW_COLUMN

    rows = [dict(r, **{CNRPO_ROW_COLUMN: i}) for i, r in enumerate(tiny_preference_rows(3))]
    examples, _ = parse_preference_rows(rows, fmt="pairs")
    encoder = PreferenceTokenizer(tokenizer)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(encoder(examples))
    model = get_peft_model(build_tiny_causal_lm(vocab_size=len(tokenizer), seed=1),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model, batch, examples, encoder


def _image_lora_model(tiny_sd_path, triggers=()):
    from mmalign.image.diffusion import DiffusionPreferenceModel
    from mmalign.image.models import add_lora, load_diffusion_components

    components = load_diffusion_components(str(tiny_sd_path))
    add_lora(components.unet, rank=4)
    model = DiffusionPreferenceModel(components.unet, components.noise_scheduler, components.conditioner,
                                     components.vae, latent_sampling="mode", triggers=triggers)
    generator = torch.Generator().manual_seed(0)
    batch = {"prompts": ["a", "b"], "chosen": torch.rand(2, 2, 3, 32, 32, generator=generator) * 2 - 1,
             "rejected": torch.rand(2, 1, 3, 32, 32, generator=generator) * 2 - 1}
    return model, batch


def test_both_backends_take_the_adapter_disabled_reference_from_the_engine(tokenizer, tiny_sd_path, monkeypatch):
    from mmalign.text.modeling.logprobs import batch_logprobs
    from mmalign.text.modeling.references import AdapterReference

    spy = _Spy(monkeypatch, "reference_forward")
    model, batch, _, _ = _text_lora_batch(tokenizer)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    reference = AdapterReference(model)(model, batch)
    with torch.no_grad(), model.disable_adapter():  # peft's own switch gives the same numbers
        torch.testing.assert_close(reference, batch_logprobs(model, batch)[0], rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(reference, batch_logprobs(model, batch)[0])  # the adapters are back on
    image_model, image_batch = _image_lora_model(tiny_sd_path)
    record = image_model.train()(image_batch)
    assert record.ref_chosen.shape == (2, 2) and not record.ref_chosen.requires_grad
    assert spy.calls == ["PeftModel", "UNet2DConditionModel"]


def test_both_backends_compute_cnrpo_triggered_inputs_in_the_engine(tokenizer, tiny_sd_path, monkeypatch):
    from mmalign.shared.triggers import TriggerPolicy
    from mmalign.text.recipes.cnrpo_triggers import TriggeredLogprobs, triggered_prompt_ids

    spy = _Spy(monkeypatch, "triggered_log_likelihoods")
    model, batch, examples, encoder = _text_lora_batch(tokenizer)
    hook = TriggeredLogprobs(triggered_prompt_ids(examples, ["<T>", "<U>"], TriggerPolicy(), encoder),
                             tokenizer.pad_token_id)
    text = hook(model.train(), batch)
    image_model, image_batch = _image_lora_model(tiny_sd_path, triggers=("<T>", "<U>"))
    image = image_model.train()(image_batch).extra
    for triggered in (text, image):
        assert set(triggered) == {"triggered_chosen", "triggered_rejected"}
        assert not triggered["triggered_chosen"].requires_grad
    assert text["triggered_chosen"].shape == (3, 2) and image["triggered_chosen"].shape == (2, 2)
    assert spy.calls == ["PeftModel", "UNet2DConditionModel"]
    assert model.training and image_model.unet.training  # train mode restored after the eval-mode forward


# ---------------------------------------------------------------------------------------- the sharded evaluation
class _Pass:
    def __init__(self):
        self.seen = 0

    def batch(self, model, batch):
        self.seen += 1
        return {"value": batch.float().sum(), "count": torch.tensor(float(batch.numel()))}

    def result(self, reduced, accelerator):
        return {**reduced, "batches": self.seen}


def test_sharded_evaluation_reduces_once_and_prepares_the_loader_once():
    class Accelerator:
        num_processes, process_index, device = 2, 0, torch.device("cpu")

        def __init__(self):
            self.prepared, self.reductions = 0, []

        def prepare(self, loader):
            self.prepared += 1
            return loader

        def reduce(self, tensor, reduction):  # the other process saw the same numbers
            self.reductions.append(reduction)
            return tensor * 2 if reduction == "sum" else tensor

    trainer = SimpleNamespace(accelerator=Accelerator())
    data = [torch.tensor(v) for v in (1, 2, 3, 4, 5)]
    collate = torch.stack
    mean = ShardedEvaluation(trainer, data, collate, 2, _Pass)
    assert mean(None) == {"count": pytest.approx(5 / 3), "value": pytest.approx(5.0), "batches": 3}
    assert mean(None)["batches"] == 3  # a fresh pass per evaluation
    total = ShardedEvaluation(trainer, data, collate, 2, _Pass, reduction="sum")
    assert total(None) == {"count": 10.0, "value": 30.0, "batches": 3}
    assert trainer.accelerator.prepared == 2 and trainer.accelerator.reductions == ["mean", "mean", "sum"]
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        ShardedEvaluation(trainer, data, collate, 2, _Pass, reduction="max")


def test_both_backends_evaluate_held_out_data_through_the_engine_loop(tokenizer, tiny_sd_path, tmp_path, monkeypatch):
    calls = []
    original = ShardedEvaluation.__call__

    def spy(self, model):
        calls.append(type(getattr(model, "module", model)).__name__)
        return original(self, model)

    monkeypatch.setattr(ShardedEvaluation, "__call__", spy)
    text = mmalign.text.train(_text_config(tmp_path), model=build_tiny_causal_lm(vocab_size=len(tokenizer)),
                              tokenizer=tokenizer, train_dataset=tiny_preference_rows(8, seed=1),
                              eval_dataset=tiny_preference_rows(4, seed=2))
    image = mmalign.image.train(_image_config(tmp_path, training={**_image_config(tmp_path)["training"],
                                                                   "eval_steps": 1}),
                                train_dataset=_image_rows(8), eval_dataset=_image_rows(4, seed=1),
                                pipeline=_pipeline(tiny_sd_path))
    assert calls == ["LlamaForCausalLM", "DiffusionPreferenceModel", "DiffusionPreferenceModel"]
    for result in (text, image):
        assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(result.metrics)
    assert "eval_implicit_acc" in image.metrics and "eval_ece" in text.metrics


def test_image_held_out_evaluation_uses_fixed_draws_and_leaves_training_alone(tiny_sd_path, tmp_path):
    def run(name, **data):
        config = _image_config(tmp_path / name, training={**_image_config(tmp_path)["training"], "max_steps": 2,
                                                           "eval_steps": 1 if data else 0})
        return mmalign.image.train(config, train_dataset=_image_rows(8), pipeline=_pipeline(tiny_sd_path), **data)

    plain = run("plain")
    evaluated = run("evaluated", eval_dataset=_image_rows(4, seed=1))
    # the evaluation draws from its own seeded generator: the training losses are those of a run without it
    assert [r["loss"] for r in plain.log if "loss" in r] == [r["loss"] for r in evaluated.log if "loss" in r]
    evaluations = [r for r in evaluated.log if "eval_loss" in r]
    assert len(evaluations) == 2 and all(np.isfinite(r["eval_loss"]) for r in evaluations)
    from mmalign.image.data.dataset import collate_groups
    from mmalign.image.evaluation import held_out_evaluation
    from mmalign.image.training import build_dataset, load_records, make_compute_loss
    from mmalign.image.config import ImageTrainConfig
    from mmalign.config import load_config

    config = load_config(ImageTrainConfig, _image_config(tmp_path))
    model = evaluated.details["preference_model"].eval()
    dataset = build_dataset(config, model, load_records(config, _image_rows(4, seed=1), split="eval"), evaluation=True)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"),
                                                          prepare=lambda loader: loader))
    evaluate = held_out_evaluation(trainer, dataset, collate_groups, 2, make_compute_loss(mmalign.objective(
        "dpo", beta=0.5)), seed=0)
    with torch.no_grad():
        first, second = evaluate(model), evaluate(model)
    assert first == second and first["loss"] > 0


def _pipeline(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
