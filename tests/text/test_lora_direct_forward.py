"""LoRA layers' direct forward (base + in-place scaling·(x Aᵀ)Bᵀ): peft's function and gradients, peft's own
forward wherever the shortcut does not apply."""
import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

import mmalign.text
from mmalign.engine import fast_path_log, read_metrics
from mmalign.engine.lora_function import LORA_FUNCTION
from mmalign.testing import build_tiny_causal_lm, tiny_preference_rows, write_jsonl
from mmalign.text.modeling.loading import apply_lora, use_direct_lora_forward
from mmalign.text.modeling.references import adapters_disabled


def _pair(tiny_tokenizer, arch, dropout=0.0):
    """The same LoRA model twice (nonzero B, so the adapters matter): peft's forward, and the direct one."""
    models = []
    for direct in (False, True):
        base = build_tiny_causal_lm(arch=arch, tokenizer=tiny_tokenizer, seed=3)
        targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "up_proj", "down_proj"]
        model = apply_lora(base, r=4, alpha=8, dropout=dropout, target_modules=targets, direct_forward=direct)
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.2)
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    return models


class _PeftForwardCalls:
    """Counts calls of peft's own ``lora.Linear.forward`` (the direct forward falls back to it by name)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = LoraLinear.forward

        def counted(layer, *args, **kwargs):
            self.count += 1
            return original(layer, *args, **kwargs)

        monkeypatch.setattr(LoraLinear, "forward", counted)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D and nn.Linear bases
def test_direct_forward_gives_peft_outputs_and_gradients(tiny_tokenizer, arch, monkeypatch):
    peft_model, direct_model = _pair(tiny_tokenizer, arch)
    assert use_direct_lora_forward(torch.nn.Linear(2, 2)) == 0
    ids = torch.randint(0, len(tiny_tokenizer), (3, 19))
    expected = peft_model(ids).logits
    expected.square().mean().backward()
    calls = _PeftForwardCalls(monkeypatch)
    fast_path_log.reset_warnings()
    got = direct_model(ids).logits
    got.square().mean().backward()
    assert calls.count == 0  # the shortcut ran in every layer
    # ... as the LoRA autograd function (mmalign.engine.lora_function), whose gradients are compared below
    assert fast_path_log.FAST_PATH_CALLS[LORA_FUNCTION] == sum(isinstance(m, LoraLinear) for m in direct_model.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    want = _lora_grads(peft_model)
    assert want and all(g.abs().sum() > 0 for g in want.values())
    for name, grad in _lora_grads(direct_model).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


def test_dropout_draws_the_same_masks(tiny_tokenizer):
    peft_model, direct_model = _pair(tiny_tokenizer, "llama", dropout=0.3)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))
    outputs = []
    for model in (peft_model, direct_model):
        model.train()
        torch.manual_seed(5)
        fast_path_log.reset_warnings()
        outputs.append(model(ids).logits)
        outputs[-1].square().mean().backward()
    # the direct model's layers ran the function with the dropout's output as its separate LoRA input
    assert fast_path_log.FAST_PATH_CALLS[LORA_FUNCTION] == sum(isinstance(m, LoraLinear) for m in direct_model.modules())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    want = _lora_grads(peft_model)  # the gradients through the dropout masks (the function's separate LoRA input)
    for name, grad in _lora_grads(direct_model).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)
    torch.manual_seed(6)
    assert (direct_model(ids).logits - outputs[0]).abs().max() > 1e-4  # dropout is live


def test_disabled_adapters_give_the_base_model(tiny_tokenizer):
    _, direct_model = _pair(tiny_tokenizer, "gpt2")
    base = build_tiny_causal_lm(arch="gpt2", tokenizer=tiny_tokenizer, seed=3)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    with torch.no_grad(), adapters_disabled(direct_model):
        disabled = direct_model(ids).logits
    torch.testing.assert_close(disabled, base(ids).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (direct_model(ids).logits - disabled).abs().max() > 1e-3  # and on again afterwards


def test_unusual_states_go_through_peft(tiny_tokenizer, monkeypatch):
    peft_model, direct_model = _pair(tiny_tokenizer, "llama")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    with torch.no_grad():
        expected = peft_model(ids).logits
    calls = _PeftForwardCalls(monkeypatch)
    # a forward hook on a base layer must still run
    layer = next(m for m in direct_model.modules() if isinstance(m, LoraLinear))
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(direct_model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert seen and calls.count == 1
    # autocast: peft's own dtype handling
    calls.count = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct_model(ids)
    assert calls.count > 0
    # merged adapters
    calls.count = 0
    direct_model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(direct_model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert calls.count > 0


def test_training_losses_match_peft_forward(tiny_model_dir, tmp_path):
    train_file = str(write_jsonl(tmp_path / "pairs.jsonl", tiny_preference_rows(12, kind="pairs", seed=2)))
    losses = {}
    for direct in (True, False):
        summary = mmalign.text.train({
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": train_file},
            "objective": {"name": "dpo", "beta": 0.1},
            "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "direct_forward": direct},
            "training": {"batch_size": 4, "max_steps": 4, "logging_steps": 1, "learning_rate": 5e-3,
                         "lr_scheduler": "constant", "progress_bar": False, "plot": False, "num_threads": 1},
            "output_dir": str(tmp_path / str(direct)),
        })
        losses[direct] = [r["loss"] for r in read_metrics(summary["metrics_path"]) if "loss" in r]
    assert len(losses[True]) == 4 and losses[True][-1] != losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


def test_an_in_place_lora_dropout_goes_through_peft(tiny_tokenizer):
    _, direct_model = _pair(tiny_tokenizer, "llama", dropout=0.3)
    layer = next(m for m in direct_model.modules() if isinstance(m, LoraLinear))
    layer.lora_dropout["default"].inplace = True  # would overwrite the base layer's input in the direct forward
    fast_path_log.reset_warnings()
    direct_model.train()
    direct_model(torch.randint(0, len(tiny_tokenizer), (2, 7)))
    assert fast_path_log.LORA_FALLBACK_CALLS == {"in-place LoRA dropout": 1}
