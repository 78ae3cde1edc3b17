"""Memory-side behaviour of the Diffusion-DPO step: sliced VAE encoding, no stray pixel copy during the UNet forwards."""

import gc

import pytest
import torch

from mmalign.image.diffusion import DiffusionPreferenceModel
from mmalign.image.models import add_lora, load_diffusion_components


def _model(path, **kwargs):
    components = load_diffusion_components(str(path))
    add_lora(components.unet, rank=4)
    return DiffusionPreferenceModel(components.unet, components.noise_scheduler, components.conditioner,
                                    components.vae, **kwargs).eval()


def _batch(pairs=4, k=1, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompts": [f"prompt {i}" for i in range(pairs)],
        "chosen": torch.rand(pairs, k, 3, size, size, generator=generator) * 2 - 1,
        "rejected": torch.rand(pairs, k, 3, size, size, generator=generator) * 2 - 1,
    }


@pytest.fixture(scope="module")
def models(tiny_sd_path):
    """The same UNet/VAE weights wrapped with different VAE slicings (3 does not divide 8 images)."""
    whole = _model(tiny_sd_path, vae_batch_size=None)
    sliced = {size: DiffusionPreferenceModel(whole.unet, whole.noise_scheduler, whole.conditioner, whole.vae,
                                             vae_batch_size=size).eval() for size in (1, 3, 4)}
    return whole, sliced


@pytest.mark.parametrize("size", [1, 3, 4])
def test_sliced_latent_parameters_equal_unsliced(models, size):
    whole, sliced = models
    images = _batch()["chosen"][:, 0].repeat(2, 1, 1, 1)
    torch.testing.assert_close(sliced[size].latent_parameters(images), whole.latent_parameters(images),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", ["sample", "mode"])
@pytest.mark.parametrize("size", [1, 3, 4])
def test_sliced_encode_equals_unsliced_with_one_posterior_draw(models, size, sampling):
    whole, sliced = models
    images = torch.cat([_batch()["chosen"][:, 0], _batch()["rejected"][:, 0]])
    results = []
    for model in (whole, sliced[size]):
        model.latent_sampling = sampling
        torch.manual_seed(7)
        results.append(model.encode_images(images))
    # same posterior AND the same draw: the noise is drawn once for the whole batch, as vae.encode(...).sample()
    torch.manual_seed(7)
    posterior = whole.vae.encode(images).latent_dist
    reference = posterior.sample() if sampling == "sample" else posterior.mode()
    reference = reference * whole.vae.config.scaling_factor
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0], reference, rtol=1e-6, atol=1e-6)


def test_forward_surrogates_do_not_depend_on_vae_slicing(models):
    whole, sliced = models
    batch = _batch()
    batch["timesteps"] = torch.tensor([10, 300, 600, 990])
    batch["noise"] = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    outputs = []
    for model in (whole, sliced[3]):
        model.latent_sampling = "sample"
        torch.manual_seed(11)
        with torch.no_grad():
            outputs.append(model(batch))
    for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
        torch.testing.assert_close(getattr(outputs[1], name), getattr(outputs[0], name), rtol=1e-5, atol=1e-6)


def _pixel_copies_alive(shape) -> int:
    count = 0
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and tuple(obj.shape) == shape:
                count += 1
        except ReferenceError:
            continue
    return count


def test_no_pixel_batch_copy_alive_during_unet_forwards(models):
    """The concatenated [members, C, H, W] pixel batch is dropped once encoded: at real image sizes it is as big
    as several latent batches and must not sit in memory through the UNet forwards."""
    whole, _ = models
    batch = _batch()
    members_shape = (8, 3, 64, 64)
    seen = []

    def count_before_forward(module, args, kwargs):
        seen.append(_pixel_copies_alive(members_shape))

    # the probe itself finds such a tensor when one is alive (the test can fail)
    held = torch.zeros(members_shape)
    assert _pixel_copies_alive(members_shape) == 1
    del held
    handle = whole.unet.register_forward_pre_hook(count_before_forward, with_kwargs=True)
    try:
        with torch.no_grad():
            whole(batch)
    finally:
        handle.remove()
    assert seen == [0, 0]  # reference forward, then policy forward


def test_ragged_groups_still_select_valid_members(models):
    """Padding slots are dropped before the VAE (the all-valid fast path must not change ragged batches)."""
    whole, sliced = models
    batch = _batch(pairs=2, k=2)
    batch["chosen_mask"] = torch.tensor([[True, True], [True, False]])
    batch["rejected_mask"] = torch.tensor([[True, False], [True, True]])
    encoded = []
    original = whole.encode_images

    def spy(images, inputs="pixels"):
        encoded.append(images.shape[0])
        return original(images, inputs)

    whole.encode_images = spy
    try:
        with torch.no_grad():
            out = whole(batch)
    finally:
        del whole.encode_images
    assert encoded == [6]
    assert out.policy_chosen[1, 1].item() == 0.0 and out.policy_rejected[0, 1].item() == 0.0


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_vae_batch_size_is_validated(tiny_sd_path, bad):
    with pytest.raises(ValueError, match="vae_batch_size"):
        _model(tiny_sd_path, vae_batch_size=bad)
