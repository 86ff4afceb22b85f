"""The latent diffusion generator: shapes, classifier-free guidance, schedulers, learning a toy task."""

import numpy as np
import pytest
import torch

from models.generator import (GeneratorConfig, LatentGenerator, diffusion_loss, make_sample_scheduler,
                              make_train_scheduler, sample_latents)

TINY = GeneratorConfig(cond_dim=6, latent_channels=2, latent_size=8, block_out_channels=(8, 16), norm_num_groups=4)


def test_shapes_and_null_condition():
    torch.manual_seed(0)
    model = LatentGenerator(TINY)
    z, t, c = torch.randn(3, 2, 8, 8), torch.tensor([0, 500, 999]), torch.randn(3, 6)
    assert model(z, t, c).shape == (3, 2, 8, 8)
    drop = torch.tensor([True, False, True])
    mixed = model.conditions(c, drop)
    assert torch.equal(mixed[1], c[1]) and torch.equal(mixed[0], model.null_condition)
    # a dropped condition gives exactly the unconditional prediction, whatever the condition was
    out_a = model(z, t, c, torch.ones(3, dtype=torch.bool))
    out_b = model(z, t, torch.randn(3, 6), torch.ones(3, dtype=torch.bool))
    assert torch.allclose(out_a, out_b)


def test_bad_config_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="norm_num_groups"):
        GeneratorConfig(block_out_channels=(10, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="latent sides"):
        GeneratorConfig(latent_size=9, block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="latent sides"):
        GeneratorConfig(latent_size=8, latent_width=9, block_out_channels=(8, 16), norm_num_groups=4)


def test_non_square_latents_train_and_sample_at_their_own_shape():
    # An 80 x 344 audio image encodes to 20 x 86 latents: sampling must not fall back to a square.
    torch.manual_seed(0)
    config = GeneratorConfig(cond_dim=6, latent_channels=2, latent_size=4, latent_width=10, block_out_channels=(8, 16),
                             norm_num_groups=4)
    model = LatentGenerator(config)
    z0, c = torch.randn(3, 2, 4, 10), torch.randn(3, 6)
    loss = diffusion_loss(model, make_train_scheduler(config), z0, c, 0.1, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    out = sample_latents(model, c, steps=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == (3, 2, 4, 10)
    assert sample_latents(model, c[:0], steps=2).shape == (0, 2, 4, 10)


def test_guidance_scale_one_equals_conditional_and_zero_equals_unconditional():
    torch.manual_seed(0)
    model = LatentGenerator(TINY)
    c = torch.randn(2, 6)
    cond = sample_latents(model, c, steps=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    guided = sample_latents(model, c, steps=5, guidance_scale=1.0 + 1e-12, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(cond, guided, atol=1e-5)
    uncond = sample_latents(model, c, steps=5, guidance_scale=0.0, generator=torch.Generator().manual_seed(1))
    other_c = sample_latents(model, torch.randn(2, 6), steps=5, guidance_scale=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(uncond, other_c, atol=1e-5)


@pytest.mark.parametrize("steps", [50, 20, 5])
def test_ddim_trailing_schedule_starts_from_pure_noise(steps):
    scheduler = make_sample_scheduler(TINY)
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == steps and int(scheduler.timesteps[0]) == TINY.num_train_timesteps - 1


def test_learns_a_conditional_toy_distribution():
    """Latents are +1 or -1 everywhere depending on the condition's sign: after a short training,
    DDIM samples carry the sign of their condition."""
    torch.manual_seed(0)
    config = GeneratorConfig(cond_dim=2, latent_channels=1, latent_size=4, block_out_channels=(8, 16), norm_num_groups=4)
    model = LatentGenerator(config)
    scheduler = make_train_scheduler(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        sign = torch.randint(0, 2, (32,), generator=gen).float() * 2 - 1
        z0 = sign[:, None, None, None].expand(32, 1, 4, 4).clone()
        cond = torch.stack([sign, torch.ones(32)], dim=1)
        loss = diffusion_loss(model, scheduler, z0, cond, 0.1, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cond = torch.tensor([[1.0, 1.0], [-1.0, 1.0]]).repeat(4, 1)
    out = sample_latents(model, cond, steps=20, guidance_scale=2.0, generator=torch.Generator().manual_seed(3))
    means = out.mean(dim=(1, 2, 3)).numpy()
    assert np.all(means[0::2] > 0.3) and np.all(means[1::2] < -0.3), means


def test_patched_generator_keeps_the_latent_shape_and_its_positions():
    """patch 2 (the f = 4 audio VAE's 20 x 88): the UNet runs on 10 x 44 x 16 and the model's input
    and output stay 20 x 88 x 4, the 2 x 2 blocks of the latent as the UNet's channels (an exact
    space-to-depth, not a resize); auto picks 2 only where the latent is large enough."""
    from stages.generation.train import GeneratorTrainConfig

    config = GeneratorTrainConfig(block_out_channels=(8, 16), norm_num_groups=4)
    assert config.generator_config(6, 2, 20, 88).patch == 2 and config.generator_config(6, 2, 10, 44).patch == 1
    assert "patch" not in config.params() and GeneratorTrainConfig(patch=1).params()["patch"] == 1  # auto keeps old keys
    assert "patch" not in GeneratorConfig(patch=1).params()
    torch.manual_seed(0)
    model = LatentGenerator(GeneratorConfig(cond_dim=6, latent_channels=2, latent_size=8, latent_width=16, patch=2,
                                            block_out_channels=(8,), norm_num_groups=4))
    assert model.unet.config.in_channels == 8 and tuple(model.unet.config.sample_size) == (4, 8)
    z, t, c = torch.randn(2, 2, 8, 16), torch.tensor([10, 900]), torch.randn(2, 6)
    with torch.no_grad():
        out = model(z, t, c)
        blocks = z.reshape(2, 2, 4, 2, 8, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 8, 4, 8)  # [C, dy, dx] channels
        inner = model.unet(blocks, t, class_labels=model.cond_proj(c)).sample
    assert out.shape == z.shape
    assert torch.allclose(out, inner.reshape(2, 2, 2, 2, 4, 8).permute(0, 1, 4, 2, 5, 3).reshape(2, 2, 8, 16))
    with pytest.raises(ValueError, match="patch"):
        GeneratorConfig(latent_size=10, latent_width=44, patch=2, block_out_channels=(8, 16), norm_num_groups=4)
