"""Latent diffusion audio generator: a small conditional UNet in the KL-VAE latent space of audio
images, with classifier-free guidance (AudioLDM / Diff-Foley style, sized for a CPU).

The condition is one embedding vector (CLAP or CAVP space). As AudioLDM does, it is projected to
the UNet's time-embedding width and added to the timestep embedding (diffusers ``UNet2DModel``
with ``class_embed_type="identity"``). A learned null embedding stands for "no condition":
training replaces the condition by it with probability ``condition_dropout``, and sampling mixes
the two predictions, ``out = out_null + g * (out_cond - out_null)`` (g = guidance scale). The model
predicts the noise (default) or v (``GeneratorConfig.prediction_type``).

    from models.generator import GeneratorConfig, LatentGenerator, sample_latents
    model = LatentGenerator(GeneratorConfig(cond_dim=256))
    z = sample_latents(model, cond, steps=20, guidance_scale=3.0)   # [B, 4, 16, 16] scaled latents

No dagster, nothing from stages: usable from a notebook.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.devices import device_of, to_device, to_host

SAMPLE_STEPS = (50, 20, 5)


@dataclass(frozen=True)
class GeneratorConfig:
    cond_dim: int = 256
    latent_channels: int = 4
    latent_size: int = 16  # latent height (and width when latent_width is 0)
    latent_width: int = 0  # 0: square latents; else the width (an 80 x 352 audio image: 10 x 44 through the audio VAE)
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention: bool = False  # self-attention in the lowest-resolution blocks
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # Stable Diffusion / AudioLDM latent schedule
    beta_start: float = 0.00085
    beta_end: float = 0.012
    clip_sample_range: float = 6.0  # DDIM clamps each x0 estimate to +-this (latents have unit std); 0 = off
    # epsilon (AudioLDM's choice) or v. On a toy task v learns to follow its condition in 300 steps
    # where eps needs ~1000 (at high noise eps hides the condition behind sqrt(abar / (1 - abar)));
    # on the demo's held-out clips eps generalised better after 3000 steps (see the README).
    prediction_type: str = "epsilon"
    # Space-to-depth before the UNet (pixel_unshuffle by `patch`, pixel_shuffle after): a 20 x 88 x 4
    # latent (the f = 4 audio VAE) enters as 10 x 44 x 16, so a step costs what a 10 x 44 latent's
    # did (a training step, batch 32, one thread: 0.58 s patched, 2.35 unpatched, 0.54 on 10 x 44).
    patch: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.patch < 1:
            raise ValueError(f"patch must be >= 1, got {self.patch}")
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry {self.block_out_channels}")
        factor = self.patch * 2 ** (len(self.block_out_channels) - 1)
        if any(side % factor for side in self.latent_shape) or self.latent_width < 0:
            raise ValueError(f"latent sides {self.latent_shape} must be divisible by patch x 2^(levels-1) = {factor}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.cond_dim < 1 or self.latent_channels < 1:
            raise ValueError("cond_dim and latent_channels must be >= 1")

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(height, width) of one latent channel."""
        return self.latent_size, self.latent_width or self.latent_size

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def params(self) -> dict:
        params = {**asdict(self), "block_out_channels": list(self.block_out_channels)}
        if self.patch == 1:  # unpatched: the params of a config from before the field
            params.pop("patch")
        return params


def _quiet() -> None:
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()


class LatentGenerator(nn.Module):
    """eps_theta(z_t, t, c) (or v_theta): UNet2DModel + a condition MLP + a learned null condition."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        _quiet()
        from diffusers import UNet2DModel

        self.config = config
        levels = len(config.block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if config.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        p = config.patch
        self.unet = UNet2DModel(
            sample_size=tuple(side // p for side in config.latent_shape),
            in_channels=config.latent_channels * p * p,
            out_channels=config.latent_channels * p * p,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=config.norm_num_groups,
            attention_head_dim=8,
            class_embed_type="identity",
        )
        width = config.time_embed_dim
        self.cond_proj = nn.Sequential(nn.Linear(config.cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.null_condition = nn.Parameter(torch.zeros(config.cond_dim))

    def conditions(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Conditions with the rows in ``drop`` (bool [B]) replaced by the null condition."""
        if drop is None:
            return cond
        return torch.where(drop[:, None], self.null_condition.expand_as(cond), cond)

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.cond_proj(self.conditions(cond, drop))
        p = self.config.patch
        if p == 1:
            return self.unet(z, t, class_labels=emb).sample
        out = self.unet(nn.functional.pixel_unshuffle(z, p), t, class_labels=emb).sample
        return nn.functional.pixel_shuffle(out, p)


def make_train_scheduler(config: GeneratorConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         beta_start=config.beta_start, beta_end=config.beta_end, clip_sample=False,
                         prediction_type=config.prediction_type)


def make_sample_scheduler(config: GeneratorConfig, sampler: str = "ddim"):
    """DDIM (eta 0, deterministic) or DDPM over the training schedule; "trailing" spacing so that
    even 5 steps start from pure noise (t = T - 1)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                  beta_start=config.beta_start, beta_end=config.beta_end, timestep_spacing="trailing",
                  clip_sample=config.clip_sample_range > 0, clip_sample_range=config.clip_sample_range or 1.0,
                  prediction_type=config.prediction_type)
    if sampler == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    if sampler == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")


def diffusion_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model predicts at (z0, noise, t): the noise, or v = sqrt(abar) eps - sqrt(1 - abar) z0."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    return noise


def diffusion_loss(model: LatentGenerator, scheduler, z0: torch.Tensor, cond: torch.Tensor,
                   condition_dropout: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE of the eps / v prediction at uniform timesteps; the condition is dropped (-> null) with
    probability ``condition_dropout`` (classifier-free guidance training)."""
    batch = z0.shape[0]
    # Drawn on the host from ``generator`` and then copied (models.devices): the same numbers on any device.
    t = to_device(torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator), z0.device)
    noise = to_device(torch.randn(z0.shape, generator=generator), z0.device)
    zt = scheduler.add_noise(z0, noise, t)
    drop = to_device(torch.rand(batch, generator=generator) < condition_dropout, z0.device)
    return torch.nn.functional.mse_loss(model(zt, t, cond, drop), diffusion_target(scheduler, z0, noise, t))


@torch.no_grad()
def sample_latents(
    model: LatentGenerator, cond: torch.Tensor, steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
    generator: torch.Generator | None = None, batch: int = 64,
) -> torch.Tensor:
    """Scaled latents [B, C, h, w] (on the host) for conditions [B, cond_dim]; guidance_scale 1 =
    conditional only, 0 = unconditional. Runs on the model's device; the noise is drawn on the host
    from ``generator``, so a batch samples the same latents on any device (up to float error)."""
    model.eval()
    config = model.config
    device = device_of(model)
    cond = torch.as_tensor(cond, dtype=torch.float32)
    outs = []
    for start in range(0, len(cond), batch):
        c = to_device(cond[start : start + batch], device)
        n = len(c)
        scheduler = make_sample_scheduler(config, sampler)
        scheduler.set_timesteps(steps)
        z = to_device(torch.randn((n, config.latent_channels, *config.latent_shape), generator=generator), device)
        z = z * scheduler.init_noise_sigma
        guided = guidance_scale != 1.0
        for t in scheduler.timesteps:
            tt = torch.full((2 * n if guided else n,), int(t), dtype=torch.long, device=device)
            if guided:
                drop = torch.cat([torch.zeros(n, dtype=torch.bool, device=device), torch.ones(n, dtype=torch.bool, device=device)])
                out_c, out_u = model(torch.cat([z, z]), tt, torch.cat([c, c]), drop).chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)  # eps and v are both linear in (z, x0): same mix
            else:
                out = model(z, tt, c)
            kwargs = {"generator": generator} if sampler == "ddpm" else {"eta": 0.0}
            z = scheduler.step(out, t, z, **kwargs).prev_sample
        outs.append(to_host(z))
    if not outs:
        return torch.zeros((0, config.latent_channels, *config.latent_shape))
    return torch.cat(outs)
