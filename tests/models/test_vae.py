"""The small AutoencoderKL: shapes, loss, and loading a pretrained one from a local folder (never downloaded)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.vae import (
    PatchDiscriminator,
    PretrainedVaeError,
    VaeConfig,
    adaptive_adversarial_weight,
    build_vae,
    decode,
    encode,
    gradient_l1,
    hinge_discriminator_loss,
    images_to_tensor,
    load_pretrained_vae,
    spectral_l1,
    tensor_to_images,
    vae_forward_loss,
    vae_loss,
)

TINY = VaeConfig(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4)


def _images(n: int = 3, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_config_shapes_and_validation():
    assert VaeConfig().latent_shape(64) == (4, 16, 16)
    assert VaeConfig(block_out_channels=(16, 32, 64, 64)).latent_shape(64) == (4, 8, 8)
    assert TINY.downsample == 2
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        VaeConfig(block_out_channels=(12, 16), norm_num_groups=8)
    with pytest.raises(ValueError, match="not a multiple"):
        VaeConfig().latent_shape(30)


def test_encode_decode_shapes_and_pixel_range():
    images = _images()
    x = images_to_tensor(images)
    assert x.shape == (3, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(tensor_to_images(x), images)  # exact inverse on uint8
    vae = build_vae(TINY, seed=0)
    z = encode(vae, images, batch_size=2)
    assert z.shape == (3, 4, 16, 16) and z.dtype == torch.float32
    back = decode(vae, z, batch_size=2)
    assert back.shape == images.shape and back.dtype == np.uint8
    # posterior means are deterministic; samples are seeded. Across batch sizes oneDNN
    # may pick another conv kernel, so that comparison is up to float rounding.
    assert torch.equal(z, encode(vae, images, batch_size=2))
    assert torch.allclose(z, encode(vae, images), atol=1e-5)
    assert torch.equal(encode(vae, images, sample=True, seed=1), encode(vae, images, sample=True, seed=1))
    assert not torch.equal(encode(vae, images, sample=True, seed=1), z)


def test_loss_backpropagates_with_every_term():
    vae = build_vae(TINY, seed=0)
    x = images_to_tensor(_images(4))
    loss, parts = vae_loss(vae, x, kl_weight=1e-5, spectral_weight=0.1)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"l1", "kl", "spectral"}
    assert all(p.grad is not None for p in vae.encoder.conv_in.parameters())
    assert float(spectral_l1(x, x)) == 0.0
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    assert float(spectral_l1(x, blurred)) > 0.01


def test_gradient_loss_sees_blur_that_costs_little_pixel_l1():
    x = images_to_tensor(_images(2))
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert float(gradient_l1(x, x)) == 0.0
    # on noise, a 3x3 blur moves the differences more than the pixels themselves
    assert float(gradient_l1(x, blurred, scales=1)) > 2 * float((x - blurred).abs().mean())
    assert float(gradient_l1(x, blurred, scales=3)) > float(gradient_l1(x, blurred, scales=1))
    vae = build_vae(TINY, seed=0)
    loss, parts, y = vae_forward_loss(vae, x, kl_weight=1e-5, gradient_weight=0.5)
    assert set(parts) == {"l1", "kl", "gradient"} and y.shape == x.shape
    assert float(loss.detach()) == pytest.approx(float(parts["l1"] + 1e-5 * parts["kl"] + 0.5 * parts["gradient"]), rel=1e-5)
    assert set(vae_loss(vae, x, kl_weight=1e-5)[1]) == {"l1", "kl"}  # off by default


def test_patch_discriminator_and_its_losses():
    disc = PatchDiscriminator(channels=8, layers=2)
    x = images_to_tensor(_images(2, size=32))
    logits = disc(x)
    assert logits.shape == (2, 1, 6, 6)  # one logit per overlapping patch
    confident = torch.full((4,), 2.0)
    assert float(hinge_discriminator_loss(confident, -confident)) == 0.0  # both sides past the margin
    assert float(hinge_discriminator_loss(-confident, confident)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        PatchDiscriminator(channels=6)
    # the adaptive weight scales the adversarial gradient at the last layer to the reconstruction's
    vae = build_vae(TINY, seed=0)
    loss, _, y = vae_forward_loss(vae, x, kl_weight=1e-5)
    generator = -disc(y).mean()
    weight = adaptive_adversarial_weight(loss, generator, vae.decoder.conv_out.weight)
    doubled = adaptive_adversarial_weight(loss, 2 * generator, vae.decoder.conv_out.weight)
    assert float(weight) > 0 and float(doubled) == pytest.approx(float(weight) / 2, rel=1e-3)


def test_pretrained_folder_round_trip(tmp_path):
    vae = build_vae(TINY, seed=3)
    vae.save_pretrained(tmp_path / "tiny_vae")
    assert (tmp_path / "tiny_vae" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_pretrained_vae(tmp_path / "tiny_vae")
    images = _images()
    assert torch.allclose(encode(loaded, images), encode(vae, images), atol=1e-6)
    # A whole pipeline folder works too: its VAE is in vae/.
    shutil.copytree(tmp_path / "tiny_vae", tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert torch.allclose(encode(load_pretrained_vae(tmp_path / "pipeline"), images), encode(vae, images), atol=1e-6)


def test_pretrained_folder_problems_are_one_line(tmp_path):
    def message(path) -> str:
        with pytest.raises(PretrainedVaeError) as info:
            load_pretrained_vae(path)
        text = str(info.value)
        assert "\n" not in text and str(path) in text
        return text

    assert "does not exist" in message(tmp_path / "nowhere")
    build_vae(TINY).save_pretrained(tmp_path / "good")

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tmp_path / "good" / "config.json", config_only)
    assert "is missing diffusion_pytorch_model.safetensors" in message(config_only)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(tmp_path / "good" / "diffusion_pytorch_model.safetensors", no_config)
    assert "is missing config.json" in message(no_config)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tmp_path / "good" / "config.json", pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    assert "pickled .bin weights" in message(pickled)

    unet = tmp_path / "unet"
    shutil.copytree(tmp_path / "good", unet)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert "not an AutoencoderKL" in message(unet)

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "good", truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot be loaded" in message(truncated)
