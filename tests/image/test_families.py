"""SDXL / SD3 / FLUX on tiny pipelines built from configs: detection, the surrogate against a hand computation with
the pipeline's own components, shared t and ε within a group, the LoRA reference, learning, LoRA reload."""

import json
import shutil

import pytest
import torch

from mmalign.config import load_config
from mmalign.image.config import ImageTrainConfig

FAMILIES = ("sdxl", "sd3", "flux")


@pytest.fixture(scope="session")
def tiny_family_paths(tmp_path_factory):
    from mmalign.image.families.tiny import save_tiny_pipeline

    return {family: save_tiny_pipeline(family, tmp_path_factory.mktemp(f"tiny-{family}")) for family in FAMILIES}


def _config(path, **model):
    return load_config(ImageTrainConfig, {"model": {"name_or_path": str(path), **model}, "lora": {"r": 4},
                                          "data": {"train": "unused", "resolution": 64}})


def _model(path, **model):
    from mmalign.image.families.build import build_family_model

    return build_family_model(_config(path, **model))


def _pipeline(family, path):
    from mmalign.image.families import get_family

    pipe = get_family(family).pipeline_class.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latent_batch(model, groups=2, k=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels = model.vae.config.latent_channels
    shape = (groups, k, channels, 16, 16)
    batch = {"prompts": [f"a photo of thing {i}" for i in range(groups)], "inputs": "latents",
             "chosen": torch.randn(shape, generator=generator), "rejected": torch.randn(shape, generator=generator),
             "noise": torch.randn((groups, channels, 16, 16), generator=generator)}
    batch["timesteps"] = torch.tensor([700.0, 250.0][:groups]) if model.family.flow else torch.tensor([700, 250][:groups])
    return batch


def _hand_errors(family, pipe, batch):
    """−mean((target − model(x_t, t, c))²) per chosen member, from the pipeline's own encode_prompt/backbone."""
    from diffusers import FluxPipeline

    x0, noise, t = batch["chosen"][:, 0], batch["noise"], batch["timesteps"]
    with torch.no_grad():
        if family == "sdxl":
            states, _, pooled, _ = pipe.encode_prompt(batch["prompts"], device="cpu", do_classifier_free_guidance=False)
            alpha_bar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
            kind = pipe.scheduler.config.prediction_type
            target = noise if kind == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
            ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(len(t), 6)
            prediction = pipe.unet(noisy, t, encoder_hidden_states=states,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        else:
            sigma = (t / 1000).view(-1, 1, 1, 1)
            noisy, target = (1 - sigma) * x0 + sigma * noise, noise - x0
            if family == "sd3":
                states, _, pooled, _ = pipe.encode_prompt(batch["prompts"], None, None, device="cpu",
                                                          do_classifier_free_guidance=False)
                prediction = pipe.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=states,
                                              pooled_projections=pooled).sample
            else:
                states, pooled, text_ids = pipe.encode_prompt(batch["prompts"], None, device="cpu")
                n, c, h, w = noisy.shape
                prediction = pipe.transformer(
                    hidden_states=FluxPipeline._pack_latents(noisy, n, c, h, w), timestep=t / 1000,
                    guidance=torch.full((n,), 1.0), pooled_projections=pooled, encoder_hidden_states=states,
                    txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu",
                                                                                     torch.float32)).sample
                prediction = FluxPipeline._unpack_latents(prediction, h * 4, w * 4, 4)  # tiny VAE: 4x
    return -(prediction - target).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_detects_each_family_from_folder_and_object(family, tiny_family_paths):
    from mmalign.image.families import detect_family

    assert detect_family(tiny_family_paths[family]) == family
    assert detect_family(_pipeline(family, tiny_family_paths[family])) == family


def test_unsupported_family_and_missing_component_errors(tiny_family_paths, tmp_path, tiny_sd_path):
    from mmalign.image.families import UnsupportedFamilyError, detect_family
    from mmalign.image.families.build import build_family_model

    index = {"_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    with pytest.raises(UnsupportedFamilyError, match="QwenImagePipeline.*QwenImageTransformer2DModel"):
        detect_family(index)
    assert detect_family(tiny_sd_path) == "sd"
    broken = tmp_path / "sdxl-no-te2"
    shutil.copytree(tiny_family_paths["sdxl"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks component.*text_encoder_2"):
        _model(broken)
    with pytest.raises(ValueError, match="model.family is 'flux'.*'sd3'"):
        _model(tiny_family_paths["sd3"], family="flux")
    config = _config(tiny_family_paths["sd3"])
    config.diffusion.timestep_min = 100
    with pytest.raises(ValueError, match="timestep_min/timestep_max are for DDPM"):
        build_family_model(config)
    with pytest.raises(ValueError, match="xformers is for sd UNets"):
        _model(tiny_family_paths["sd3"], attention="xformers")
    with pytest.raises(ValueError, match="model.weights_dtype, model.vae_tiling: for sdxl, sd3 and flux"):
        from mmalign.image.training import build_preference_model

        build_preference_model(_config(tiny_sd_path, weights_dtype="bfloat16", vae_tiling=True))
    with pytest.raises(ValueError, match="FLUX needs its T5"):
        _model(tiny_family_paths["flux"], use_t5=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_surrogate_equals_hand_computation_and_reference_is_the_base(family, tiny_family_paths):
    path = tiny_family_paths[family]
    model = _model(path)
    for name, parameter in model.unet.named_parameters():  # a LoRA that is not the identity
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    batch = _latent_batch(model)
    out = model(batch)
    pipe = _pipeline(family, path)
    base = _hand_errors(family, pipe, batch)
    torch.testing.assert_close(out.ref_chosen[:, 0], base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.policy_chosen[:, 0], base, atol=1e-5)  # the policy is base + LoRA
    assert out.policy_chosen.requires_grad and not out.ref_chosen.requires_grad


def test_sdxl_v_prediction_target(tiny_family_paths, tmp_path):
    path = tmp_path / "sdxl-v"
    shutil.copytree(tiny_family_paths["sdxl"], path)
    model = _model(path, prediction_type="v_prediction")
    batch = _latent_batch(model)
    pipe = _pipeline("sdxl", path)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    torch.testing.assert_close(model(batch).ref_chosen[:, 0], _hand_errors("sdxl", pipe, batch), rtol=1e-4, atol=1e-5)


def test_sdxl_time_ids_come_from_each_image(tiny_family_paths):
    model = _model(tiny_family_paths["sdxl"])
    batch = _latent_batch(model)
    plain = model(batch).ref_chosen
    batch["chosen_original_sizes"] = torch.tensor([[[512, 384]], [[64, 64]]])
    batch["chosen_crops_top_left"] = torch.tensor([[[10, 0]], [[0, 0]]])
    sized = model(batch).ref_chosen
    assert not torch.isclose(plain[0, 0], sized[0, 0]) and torch.isclose(plain[1, 0], sized[1, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_group_members_share_timestep_and_noise(family, tiny_family_paths):
    model = _model(tiny_family_paths[family])
    image = torch.randn(1, 1, model.vae.config.latent_channels, 16, 16)
    batch = {"prompts": ["same", "same"], "inputs": "latents", "chosen": image.expand(2, 3, -1, -1, -1).clone(),
             "rejected": image.expand(2, 2, -1, -1, -1).clone()}
    torch.manual_seed(3)
    out = model(batch)
    errors = torch.cat([out.ref_chosen, out.ref_rejected], dim=1)
    # same image, prompt, t and ε within a group -> identical errors; groups draw their own t and ε
    torch.testing.assert_close(errors, errors[:, :1].expand_as(errors))
    assert not torch.isclose(errors[0, 0], errors[1, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_move_the_margin(family, tiny_family_paths):
    from mmalign.image.testing import margin_before_and_after_steps

    model = _model(tiny_family_paths[family])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before, after = margin_before_and_after_steps(model, _latent_batch(model, seed=1), optimizer)
    assert after > before + 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_reloads_with_load_lora_weights_and_changes_the_image(family, tiny_family_paths, tmp_path):
    from mmalign.image.families.sampling import generate_family_images
    from mmalign.image.training import save_trained_unet

    path = tiny_family_paths[family]
    model = _model(path)
    for name, parameter in model.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    save_trained_unet(model, tmp_path / "final")
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "guidance_scale": 1.0, "output_type": "np",
              "generator": torch.Generator().manual_seed(0)}
    pipe = _pipeline(family, path)
    base = pipe(prompt="a red cube", **kwargs).images
    pipe.load_lora_weights(str(tmp_path / "final"))
    kwargs["generator"] = torch.Generator().manual_seed(0)
    reloaded = pipe(prompt="a red cube", **kwargs).images
    assert abs(reloaded - base).max() > 1e-3
    # the reloaded pipeline is our policy: same backbone output on the same input
    batch = _latent_batch(model)
    with torch.no_grad():
        ours = model(batch).policy_chosen
        model.unet = getattr(pipe, model.family.backbone_name)
        theirs = model(batch).policy_chosen
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    grid = generate_family_images(_model(path), ["a red cube"], seeds=[0], num_inference_steps=2, height=64,
                                  width=64, guidance_scale=1.0)
    assert grid[0].size == (64, 64)


def test_flow_timestep_sampling_follows_scheduler_table_and_shift(tiny_family_paths):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmalign.image.families.flow import FlowTimestepSampler, timestep_density

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sampler = FlowTimestepSampler(scheduler, "uniform")
    override = FlowTimestepSampler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), "uniform", shift=3.0)
    torch.testing.assert_close(sampler.table, override.table)
    torch.manual_seed(0)
    sigmas = FlowTimestepSampler(scheduler, "logit_normal")(20000, "cpu") / 1000
    assert abs(sigmas.median().item() - 0.75) < 0.02  # median u = 0.5, shifted 3·0.5/(1 + 2·0.5)
    for scheme in ("logit_normal", "mode", "uniform"):
        u = timestep_density(scheme, 1000, generator=torch.Generator().manual_seed(0))
        assert u.min() >= 0 and u.max() <= 1
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowTimestepSampler(scheduler, "cosmap")


@pytest.mark.parametrize("name,family", [("mdpo", "sd3"), ("cnrpo", "flux"), ("causal_dpo", "sd3")])
def test_group_objectives_triggers_and_bins_on_flow_models(name, family, tiny_family_paths):
    import mmalign
    from mmalign.image.families.build import build_family_model

    triggers = ("ink",) if name == "cnrpo" else ()
    model = build_family_model(_config(tiny_family_paths[family]), triggers=triggers)
    batch = _latent_batch(model, k=2 if name == "mdpo" else 1)
    params = {"cnrpo": {"alphas": [0.5]}, "causal_dpo": {}}.get(name, {})
    if name == "causal_dpo":
        batch["bins"] = torch.tensor([0, 1])
    out = model(batch)
    if name == "cnrpo":
        assert out.extra["triggered_chosen"].shape == (2, 1)
    loss = mmalign.objective(name, beta=10.0, **params)(**out.objective_inputs()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_text_embedding_cache_matches_live_encoders_and_unloads_them(tiny_family_paths):
    model = _model(tiny_family_paths["sd3"])
    batch = _latent_batch(model)
    live = model(batch).ref_chosen
    count = model.cache_text_embeddings(batch["prompts"])
    assert count == 3  # two prompts and ""
    assert not any("text_encoder" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model(batch).ref_chosen, live)
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        model.encode_prompts(["never seen"])


def test_dtypes_fp16_safe_vae_and_bf16_weights_with_fp32_lora(tiny_family_paths):
    model = _model(tiny_family_paths["sdxl"], dtype="float16")
    assert next(model.vae.parameters()).dtype == torch.float32  # force_upcast VAE stays float32 under fp16
    model = _model(tiny_family_paths["sd3"], weights_dtype="bfloat16")
    lora = [p for n, p in model.unet.named_parameters() if "lora" in n]
    base = [p for n, p in model.unet.named_parameters() if "lora" not in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert "bfloat16_weights_fp32_lora" in model.memory_features
    out = model(_latent_batch(model))
    out.policy_chosen.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    from mmalign.image.families.sampling import generate_family_images

    assert next(model.vae.parameters()).dtype == torch.float32  # bf16 backbone, float32 VAE: sampling decodes
    assert generate_family_images(model, ["a"], num_inference_steps=1, height=64, width=64)[0].size == (64, 64)


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(tiny_family_paths):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="adamw_8bit needs bitsandbytes"):
        _model(tiny_family_paths["sd3"], optimizer="adamw_8bit")
