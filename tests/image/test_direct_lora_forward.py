"""``lora.direct_forward`` on the image backbones (SD 1.x UNet, SDXL UNet, SD3 / FLUX transformers): the same
denoising errors and LoRA gradients as peft's own forward, the adapter-disabled reference equal to the base model,
every LoRA layer on the shortcut (no peft forward call), and the switch off giving peft's forward back."""

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from mmalign.config import load_config
from mmalign.engine import fast_path_log
from mmalign.engine.lora_forward import lora_layer_count, runs_direct_forward
from mmalign.image.config import ImageTrainConfig

LAYOUTS = ("sd", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    from mmalign.image.families.tiny import save_tiny_pipeline
    from mmalign.image.testing import save_tiny_sd_pipeline

    paths = {family: save_tiny_pipeline(family, tmp_path_factory.mktemp(f"direct-{family}"))
             for family in LAYOUTS if family != "sd"}
    paths["sd"] = save_tiny_sd_pipeline(tmp_path_factory.mktemp("direct-sd"))
    return paths


def _model(path, *, lora: dict):
    from mmalign.image.training import build_preference_model

    config = load_config(ImageTrainConfig, {"model": {"name_or_path": str(path)}, "lora": {"r": 4, **lora},
                                            "data": {"train": "unused", "resolution": 64}})
    model = build_preference_model(config)
    torch.manual_seed(5)  # nonzero B, so the adapters matter; the same values in every model
    for name, parameter in sorted(model.unet.named_parameters()):
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return model


def _batch(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = model.vae.config.latent_channels
    shape = (2, 1, channels, 16, 16)
    flow = getattr(getattr(model, "family", None), "flow", False)
    return {"prompts": ["a red cube", "a blue ball"], "inputs": "latents",
            "chosen": torch.randn(shape, generator=generator), "rejected": torch.randn(shape, generator=generator),
            "noise": torch.randn((2, channels, 16, 16), generator=generator),
            "timesteps": torch.tensor([700.0, 250.0]) if flow else torch.tensor([700, 250])}


def _run(model, batch):
    """``(−e_θ, −e_ref)`` per member and the LoRA gradients of one loss."""
    out = model(batch)
    policy = torch.cat([out.policy_chosen, out.policy_rejected], 1)
    reference = torch.cat([out.ref_chosen, out.ref_rejected], 1)
    loss = (policy - reference).sum() * 1e3  # any function of both halves
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.unet.named_parameters() if p.requires_grad}
    return policy.detach(), reference.detach(), grads


@pytest.mark.parametrize("layout", LAYOUTS)
def test_direct_forward_gives_peft_errors_and_gradients(layout, tiny_paths):
    peft_model = _model(tiny_paths[layout], lora={"direct_forward": False})
    direct_model = _model(tiny_paths[layout], lora={})  # the default: on
    direct_model.unet.load_state_dict(peft_model.unet.state_dict())  # the same LoRA A (drawn at add_lora)
    base_model = _model(tiny_paths[layout], lora={"enabled": False})  # reference = a frozen copy of the base
    layers = lora_layer_count(direct_model.unet)
    assert layers > 0
    assert sum(runs_direct_forward(m) for m in direct_model.unet.modules()) == layers
    assert not any(runs_direct_forward(m) for m in peft_model.unet.modules())
    batch = _batch(direct_model)
    expected_policy, expected_reference, expected_grads = _run(peft_model, batch)
    fast_path_log.reset_warnings()
    policy, reference, grads = _run(direct_model, batch)
    # every LoRA layer runs the direct forward, and none of its calls fell back: no peft forward ran
    assert not fast_path_log.LORA_FALLBACK_CALLS
    assert (policy - reference).abs().max() > 1e-4  # the adapters matter in this comparison
    torch.testing.assert_close(policy, expected_policy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference, expected_reference, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        error, scale = (grad - expected_grads[name]).abs().max(), expected_grads[name].abs().max()
        assert error <= 1e-4 * scale + 1e-7, (name, float(error), float(scale))
    # adapter disabled = the base model: the reference equals the frozen base copy's errors
    with torch.no_grad():
        base = base_model(batch)
    torch.testing.assert_close(reference, torch.cat([base.ref_chosen, base.ref_rejected], 1), rtol=1e-5, atol=1e-6)


def test_sdxl_text_encoder_lora_takes_the_direct_forward_with_peft_errors_and_gradients(tiny_paths):
    def model(lora):
        from mmalign.image.training import build_preference_model

        config = load_config(ImageTrainConfig, {"model": {"name_or_path": str(tiny_paths["sdxl"]),
                                                          "text_encoder_lora": True},
                                                "lora": {"r": 4, **lora}, "data": {"train": "unused", "resolution": 64}})
        return build_preference_model(config)

    peft_model, direct_model = model({"direct_forward": False}), model({})
    direct_model.load_state_dict(peft_model.state_dict())  # the same LoRA A (drawn at injection)
    torch.manual_seed(5)
    for name, parameter in sorted(direct_model.named_parameters()):
        if "lora_B" in name and "encoders" in name:  # nonzero text-encoder B: the adapters matter
            torch.nn.init.normal_(parameter, std=0.2)
    peft_model.load_state_dict(direct_model.state_dict())
    encoders = direct_model.conditioner.encoders
    layers = lora_layer_count(encoders)
    assert layers > 0 and sum(runs_direct_forward(m) for m in encoders.modules()) == layers
    assert not any(runs_direct_forward(m) for m in peft_model.conditioner.encoders.modules())

    def run(model):
        out = model(_batch(model))
        policy, reference = torch.cat([out.policy_chosen, out.policy_rejected], 1), torch.cat([out.ref_chosen,
                                                                                             out.ref_rejected], 1)
        ((policy - reference).sum() * 1e3).backward()
        # (SDXL reads the penultimate layer of the first encoder: its last layer's LoRA gets no gradient)
        grads = {n: p.grad.clone() for n, p in model.conditioner.named_parameters() if p.grad is not None}
        return policy.detach(), reference.detach(), grads

    expected_policy, expected_reference, expected_grads = run(peft_model)
    fast_path_log.reset_warnings()
    policy, reference, grads = run(direct_model)
    assert not fast_path_log.LORA_FALLBACK_CALLS
    torch.testing.assert_close(policy, expected_policy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference, expected_reference, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    assert max(float(g.abs().max()) for g in expected_grads.values()) > 0  # the encoders' LoRA gets gradients
    for name, grad in grads.items():
        error, scale = (grad - expected_grads[name]).abs().max(), expected_grads[name].abs().max()
        assert error <= 1e-4 * scale + 1e-7, (name, float(error), float(scale))


def test_a_call_the_shortcut_does_not_cover_takes_peft_forward_counted_and_warned(tiny_paths, caplog):
    import logging

    model = _model(tiny_paths["sd3"], lora={})
    batch = _batch(model)
    with torch.no_grad():
        expected = model(batch).policy_chosen
    fast_path_log.reset_warnings()
    layers = lora_layer_count(model.unet)
    with caplog.at_level(logging.WARNING, logger="mmalign"), torch.no_grad():
        for layer in model.unet.modules():  # a changed LoRA scale (diffusers' scale_lora_layers does this)
            if isinstance(layer, LoraLinear):
                layer.scaling["default"] *= 2.0
                break
        changed = model(batch).policy_chosen
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(batch)
    assert not torch.allclose(changed, expected)  # the shortcut reads the layer's scaling at call time
    # the reference runs adapter-disabled (no autocast check needed); the policy forward under autocast falls back
    assert fast_path_log.LORA_FALLBACK_CALLS == {"autocast": layers}
    warnings = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert warnings == ["fast path lora.direct_forward not taken: autocast; this call goes through peft's forward"]


def test_lora_layers_over_a_convolution_keep_peft_forward_with_one_warning(caplog):
    import logging

    from mmalign.image.models import use_direct_lora

    from peft import LoraConfig, inject_adapter_in_model

    net = torch.nn.Sequential()
    net.add_module("to_q", torch.nn.Linear(4, 4))
    net.add_module("conv", torch.nn.Conv2d(4, 4, 1))

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "conv"]), net)
    fast_path_log.reset_warnings()
    with caplog.at_level(logging.WARNING, logger="mmalign"):
        assert use_direct_lora(net) == 1
    warnings = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage()]
    assert warnings == ["fast path lora.direct_forward not taken: 1 of 2 LoRA layers of the Sequential are not over "
                        "a plain nn.Linear; they keep peft's forward"]
