"""A small KL-VAE (diffusers ``AutoencoderKL``) for 64x64 audio images and video frames, on CPU.

MM-LDM (section 3.1) compresses audio images and video frames with a KL-VAE before its
modal-specific encoders. Pretrained KL-VAE weights are not installable here (they download at run
time), so the project trains a small one on its cached images, or loads a user's pretrained
``AutoencoderKL`` from a local folder (``load_pretrained_vae``; never downloaded).

    from models.vae import VaeConfig, build_vae, encode, decode
    vae = build_vae(VaeConfig())                  # 3 blocks: 64x64x3 -> 16x16x4
    z = encode(vae, images_uint8)                 # posterior means, float32 [N, 4, 16, 16]
    back = decode(vae, z)                         # uint8 [N, 64, 64, 3]

Images are uint8 [N, H, W, 3] outside and float [-1, 1] NCHW (channels_last) inside. The latent
scaling factor depends on data: stages.vae.train computes it (1 / std of the training latents).

No dagster, nothing from stages or assets: usable from a notebook.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from models.constants import DEFAULT_BATCH
from models.devices import fitting_batch, to_device

# diffusers' save_pretrained names (safe_serialization=True is its default).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
# Rough peak activation bytes per image pixel while encoding or decoding: float32, up to 64 channels,
# a few layers alive at once. Only sizes GPU batches; CPU batches stay DEFAULT_BATCH.
ACTIVATION_BYTES_PER_PIXEL = 4 * 64 * 4


class PretrainedVaeError(ValueError):
    """A pretrained VAE folder cannot be used; ``str(err)`` is one line naming the folder."""


@dataclass(frozen=True)
class VaeConfig:
    """The architecture of a small AutoencoderKL; each entry of ``block_out_channels`` is one
    resolution level, so ``len(block_out_channels) - 1`` halvings: 3 levels turn 64x64 into 16x16."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    # 4 channels per group at the first level: with 1 channel per group (diffusers' usual 32 groups
    # on narrow layers) GroupNorm is an instance norm that erases flat levels before the decoder's
    # last conv. Measured on the demo audio images, 300 steps: val PSNR 27.7 dB vs 24.9 dB.
    norm_num_groups: int = 4
    mid_block_attention: bool = True
    in_channels: int = 3

    def __post_init__(self) -> None:
        channels = tuple(int(c) for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", channels)
        if not 1 <= len(channels) <= 5:
            raise ValueError(f"block_out_channels needs 1 to 5 levels, got {len(channels)}")
        if any(c % self.norm_num_groups for c in channels):
            raise ValueError(f"every block_out_channels entry {channels} must be a multiple of norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("layers_per_block and latent_channels must be at least 1")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        if size % self.downsample:
            raise ValueError(f"image size {size} is not a multiple of the VAE's downsampling factor {self.downsample}")
        return (self.latent_channels, size // self.downsample, size // self.downsample)

    def diffusers_config(self) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "mid_block_add_attention": self.mid_block_attention,
        }

    def params(self) -> dict:
        return {**asdict(self), "block_out_channels": list(self.block_out_channels)}


def _quiet_diffusers() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def build_vae(config: VaeConfig | None = None, seed: int = 0):
    """A freshly initialised AutoencoderKL (seeded), channels_last (faster convolutions on CPU)."""
    from diffusers import AutoencoderKL

    _quiet_diffusers()
    torch.manual_seed(seed)
    return AutoencoderKL(**(config or VaeConfig()).diffusers_config()).to(memory_format=torch.channels_last)


def vae_from_config(config: dict[str, Any], state: dict[str, torch.Tensor] | None = None):
    """Rebuild an AutoencoderKL from its diffusers config dict (as stored in a checkpoint sidecar)."""
    from diffusers import AutoencoderKL

    _quiet_diffusers()
    vae = AutoencoderKL.from_config(config)
    if state is not None:
        vae.load_state_dict(state)
    return vae.to(memory_format=torch.channels_last).eval()


# ---- a pretrained folder --------------------------------------------------------------------------

def check_pretrained_dir(path: str | os.PathLike) -> tuple[str, str, list[str]]:
    """(folder, subfolder, weight files) of a diffusers AutoencoderKL folder, or one clear line.

    Accepts the VAE folder itself (config.json + diffusion_pytorch_model.safetensors) or a whole
    pipeline folder with a ``vae/`` subfolder. Pickled ``.bin`` weights are refused.
    """
    folder = os.path.abspath(os.path.expanduser(str(path)))
    if not str(path):
        raise PretrainedVaeError("pretrained VAE folder is empty: set it to a local AutoencoderKL folder")
    if not os.path.exists(folder):
        raise PretrainedVaeError(f"pretrained VAE folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise PretrainedVaeError(f"pretrained VAE folder {folder!r} is not a directory")
    subfolder = ""
    if not os.path.exists(os.path.join(folder, CONFIG_FILE)) and os.path.exists(os.path.join(folder, "vae", CONFIG_FILE)):
        subfolder = "vae"
    where = os.path.join(folder, subfolder)
    present = set(os.listdir(where))
    missing = []
    if CONFIG_FILE not in present:
        missing.append(CONFIG_FILE)
    else:
        try:
            with open(os.path.join(where, CONFIG_FILE), encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError) as exc:
            raise PretrainedVaeError(f"pretrained VAE folder {folder!r}: unreadable {CONFIG_FILE} ({_one_line(exc)})") from None
        kind = config.get("_class_name", "AutoencoderKL") if isinstance(config, dict) else None
        if kind != "AutoencoderKL":
            raise PretrainedVaeError(f"pretrained VAE folder {folder!r}: {CONFIG_FILE} describes {kind!r}, not an AutoencoderKL")
    weights: list[str] = []
    if WEIGHTS_FILE in present:
        weights = [WEIGHTS_FILE]
    elif WEIGHTS_INDEX_FILE in present:
        try:
            with open(os.path.join(where, WEIGHTS_INDEX_FILE), encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PretrainedVaeError(f"pretrained VAE folder {folder!r}: unreadable {WEIGHTS_INDEX_FILE} ({_one_line(exc)})") from None
        absent = [name for name in shards if name not in present]
        if absent:
            missing.append(f"weight shard(s) {', '.join(absent)}")
        weights = [WEIGHTS_INDEX_FILE, *shards]
    elif present & set(PICKLE_WEIGHTS):
        missing.append(f"{WEIGHTS_FILE} (found only pickled .bin weights, which this project never loads: convert them to safetensors)")
    else:
        missing.append(WEIGHTS_FILE)
    if missing:
        raise PretrainedVaeError(f"pretrained VAE folder {folder!r} is missing {'; '.join(missing)}")
    return folder, subfolder, [os.path.join(subfolder, w) if subfolder else w for w in weights]


def load_pretrained_vae(path: str | os.PathLike):
    """``AutoencoderKL.from_pretrained(path, local_files_only=True)`` (safetensors only), eval mode."""
    from diffusers import AutoencoderKL

    folder, subfolder, _ = check_pretrained_dir(path)
    _quiet_diffusers()
    try:
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder=subfolder or None, local_files_only=True, use_safetensors=True
        )
    except Exception as exc:  # noqa: BLE001 - a damaged folder fails in many ways; one line for all of them
        raise PretrainedVaeError(f"pretrained VAE folder {folder!r} cannot be loaded: {type(exc).__name__}: {_one_line(exc)}") from None
    return vae.to(memory_format=torch.channels_last).eval()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:240] or type(exc).__name__


# ---- images <-> tensors, encode, decode -----------------------------------------------------------

def images_to_tensor(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] (an array, or a tensor on the host or the device) -> float32 [N, 3, H, W]
    in [-1, 1], channels_last, on ``device``. Host images travel as uint8 (a quarter of the bytes)
    through pinned memory, and are converted on the device."""
    x = to_device(images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images)), device)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous(memory_format=torch.channels_last)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (clipped, rounded)."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _device_of(vae) -> torch.device:
    return next(vae.parameters()).device


def _posteriors(vae, images: np.ndarray, batch_size: int):
    """The diagonal-Gaussian posterior of each batch of uint8 images (in eval mode, on the VAE's device)."""
    vae.eval()
    device = _device_of(vae)
    batch_size = fitting_batch(device, batch_size, ACTIVATION_BYTES_PER_PIXEL * int(np.prod(images.shape[1:3])))
    if not len(images):
        raise ValueError("encode needs at least one image")
    for start in range(0, len(images), batch_size):
        yield vae.encode(images_to_tensor(images[start : start + batch_size], device)).latent_dist


@torch.no_grad()
def encode(vae, images: np.ndarray, batch_size: int = DEFAULT_BATCH, sample: bool = False, seed: int = 0) -> torch.Tensor:
    """Unscaled latents of uint8 images: posterior means (default) or one seeded sample each."""
    generator = torch.Generator(device=_device_of(vae)).manual_seed(seed) if sample else None
    out = [(p.sample(generator) if sample else p.mean).float().cpu() for p in _posteriors(vae, images, batch_size)]
    return torch.cat(out).contiguous()


@torch.no_grad()
def encode_posterior(vae, images: np.ndarray, batch_size: int = DEFAULT_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the unscaled diagonal-Gaussian posterior of each uint8 image, [N, C, h, w] each."""
    means, stds = [], []
    for posterior in _posteriors(vae, images, batch_size):
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


@torch.no_grad()
def decode(vae, latents: torch.Tensor | np.ndarray, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """uint8 [N, H, W, 3] images of unscaled latents [N, C, h, w]."""
    vae.eval()
    device = _device_of(vae)
    z = torch.as_tensor(np.asarray(latents, np.float32) if isinstance(latents, np.ndarray) else latents).float()
    upscale = 2 ** (len(vae.config.block_out_channels) - 1)  # latent side -> image side
    batch_size = fitting_batch(device, batch_size, ACTIVATION_BYTES_PER_PIXEL * int(np.prod(z.shape[2:])) * upscale**2)
    out = []
    for start in range(0, len(z), batch_size):
        chunk = to_device(z[start : start + batch_size], device).contiguous(memory_format=torch.channels_last)
        out.append(tensor_to_images(vae.decode(chunk).sample))
    if not out:
        raise ValueError("decode needs at least one latent")
    return np.concatenate(out)


def spectral_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between log(1 + |FFT2|) of two image batches: a perceptual-free term that rewards the
    fine horizontal/vertical lines of an audio image (harmonics, onsets) that pixel L1 blurs."""
    fx = torch.fft.rfft2(x.float(), norm="ortho").abs()
    fy = torch.fft.rfft2(y.float(), norm="ortho").abs()
    return (torch.log1p(fx) - torch.log1p(fy)).abs().mean()


def gradient_l1(x: torch.Tensor, y: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """L1 between the finite differences of two image batches along height and width, at ``scales``
    resolutions (each a 2x average pool of the last): on an audio image (rows = mel bins, columns =
    frames) the frequency differences carry harmonics and formants and the time differences carry
    onsets, the texture a pixel L1 lets a VAE smooth away at little cost."""
    total = x.new_zeros(())
    for level in range(scales):
        if level:
            if min(x.shape[-2:]) < 4:
                break
            x, y = torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(y, 2)
        for dim in (-2, -1):
            total = total + (torch.diff(x, dim=dim) - torch.diff(y, dim=dim)).abs().mean()
    return total


def vae_forward_loss(vae, x: torch.Tensor, kl_weight: float, spectral_weight: float = 0.0, gradient_weight: float = 0.0,
                     gradient_scales: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``vae_loss`` and the reconstruction it scored (with its graph: an adversarial term uses it)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    y = vae.decode(z).sample
    l1 = (y - x).abs().mean()
    kl = posterior.kl().mean() / z[0].numel()
    loss = l1 + kl_weight * kl
    parts = {"l1": l1.detach(), "kl": kl.detach()}
    if spectral_weight:
        spectral = spectral_l1(y, x)
        loss = loss + spectral_weight * spectral
        parts["spectral"] = spectral.detach()
    if gradient_weight:
        gradient = gradient_l1(x, y, gradient_scales)
        loss = loss + gradient_weight * gradient
        parts["gradient"] = gradient.detach()
    return loss, parts, y


def vae_loss(vae, x: torch.Tensor, kl_weight: float, spectral_weight: float = 0.0, gradient_weight: float = 0.0,
             gradient_scales: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 reconstruction (of a posterior sample) + kl_weight * KL per latent element (+ spectral,
    + multi-scale gradient L1). The parts are detached 0-d tensors: ``float()`` them when needed
    (on CUDA that waits for the step)."""
    loss, parts, _ = vae_forward_loss(vae, x, kl_weight, spectral_weight, gradient_weight, gradient_scales)
    return loss, parts


# ---- an adversarial patch loss (LDM / taming's AutoencoderKL training) ----------------------------

class PatchDiscriminator(torch.nn.Module):
    """A PatchGAN discriminator (pix2pix; taming's ``NLayerDiscriminator``): strided 4x4 convolutions,
    one real/fake logit per overlapping patch. ``layers`` strided levels (2: patches of 34 px, about
    0.4 s x 34 mel bins of an 80-row audio image). GroupNorm instead of BatchNorm, so a patch's
    logit does not depend on the rest of its batch."""

    def __init__(self, channels: int = 32, layers: int = 2, in_channels: int = 3):
        super().__init__()
        if channels < 4 or channels % 4 or layers < 1:
            raise ValueError(f"discriminator channels must be a multiple of 4 (>= 4) and layers >= 1, got {channels}, {layers}")
        act = lambda: torch.nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        blocks: list[torch.nn.Module] = [torch.nn.Conv2d(in_channels, channels, 4, 2, 1), act()]
        width = channels
        for level in range(1, layers + 1):
            out = channels * min(2**level, 8)
            stride = 2 if level < layers else 1
            blocks += [torch.nn.Conv2d(width, out, 4, stride, 1, bias=False), torch.nn.GroupNorm(4, out), act()]
            width = out
        blocks.append(torch.nn.Conv2d(width, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*blocks)
        for module in self.modules():  # pix2pix's init: N(0, 0.02) convolutions, N(1, 0.02) norms
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, torch.nn.GroupNorm):
                torch.nn.init.normal_(module.weight, 1.0, 0.02)
                torch.nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), as LDM trains its discriminator."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def adaptive_adversarial_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor,
                                limit: float = 1e4) -> torch.Tensor:
    """||d rec / d W|| / (||d g / d W|| + 1e-4) at the decoder's last layer W (LDM's adaptive
    weight): the adversarial gradient there is scaled to the size of the reconstruction gradient."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.0, limit).detach()
