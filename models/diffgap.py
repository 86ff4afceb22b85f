"""DiffGAP's contrastive diffusion module (CDM): a small denoiser eps_theta(z_n, n, F_c) over
embeddings of a contrastive space, and its DDPM/DDIM samplers (diffusers schedulers).

Embeddings are unit vectors. The denoiser works on z = sqrt(d) * embedding so each coordinate has
about unit variance, like the Gaussian noise it is mixed with. With a cosine schedule the first
sampling step divides by sqrt(alpha_bar_T) (~5e-5), so the model's error there decides the
sample; each step's x0 estimate is therefore projected back onto the sphere of radius sqrt(d)
before the scheduler uses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Direction ids: which modality is the target. A model per space learns both (BST).
from models.constants import FROM_AUDIO, TO_AUDIO  # noqa: F401 (defined there, torch-free, for stage configs)
from models.devices import device_of, to_device, to_host


@dataclass(frozen=True)
class DenoiserConfig:
    embed_dim: int = 256  # dimension of the contrastive space
    width: int = 280  # with depth 2: 1.36M parameters = 5.4 MB in float32, the paper's size
    depth: int = 2  # residual blocks
    time_dim: int = 128
    dropout: float = 0.0
    direction_embedding: bool = True  # tell the model which way it denoises (both directions share weights)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def params(self) -> dict:
        return asdict(self)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width * 2), nn.GELU(), nn.Dropout(dropout), nn.Linear(width * 2, width))
        self.film = nn.Linear(width, width * 2)  # scale/shift from (time + condition)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(context).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class Denoiser(nn.Module):
    """eps_theta(z_n, n, F_c): MLP with FiLM-conditioned residual blocks."""

    def __init__(self, config: DenoiserConfig = DenoiserConfig()):
        super().__init__()
        self.config = config
        width = config.width
        self.input = nn.Linear(config.embed_dim, width)
        self.time = nn.Sequential(nn.Linear(config.time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.condition = nn.Sequential(nn.Linear(config.embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.direction = nn.Embedding(2, width) if config.direction_embedding else None
        # A learned "no condition" vector for classifier-free dropout / guidance.
        self.null_condition = nn.Parameter(torch.zeros(config.embed_dim))
        self.blocks = nn.ModuleList(_ResidualBlock(width, config.dropout) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, config.embed_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        context = self.time(timestep_embedding(timesteps, self.config.time_dim)) + self.condition(condition)
        if self.direction is not None:
            context = context + self.direction(direction)
        context = F.silu(context)
        h = self.input(z)
        for block in self.blocks:
            h = block(h, context)
        return self.output(self.out_norm(h))

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def make_train_scheduler(config: DenoiserConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type="epsilon", clip_sample=False)


def make_sampler(config: DenoiserConfig, kind: str):
    """A fresh diffusers scheduler for sampling: "ddim" (deterministic, eta=0) or "ddpm"."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                  prediction_type="epsilon", clip_sample=False)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"unknown sampler {kind!r}: ddim or ddpm")


def diffusion_loss(model: Denoiser, scheduler, target: torch.Tensor, condition: torch.Tensor, direction: torch.Tensor,
                   condition_dropout: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (2): || eps - eps_theta(z_n, n, F_c) ||^2 on z_0 = sqrt(d) * target."""
    d = target.shape[-1]
    z0 = math.sqrt(d) * target
    # Drawn on the host from ``generator`` and then copied (models.devices): the same numbers on any device.
    noise = to_device(torch.randn(z0.shape, generator=generator), z0.device)
    timesteps = to_device(torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator), z0.device)
    noisy = scheduler.add_noise(z0, noise, timesteps)
    if condition_dropout > 0:
        drop = to_device(torch.rand(len(z0), generator=generator) < condition_dropout, z0.device)
        condition = torch.where(drop[:, None], model.null_condition.expand_as(condition), condition)
    return F.mse_loss(model(noisy, timesteps, condition, direction), noise)


@torch.no_grad()
def sample(
    model: Denoiser,
    condition: torch.Tensor,
    direction: int,
    steps: int = 50,
    sampler: str = "ddim",
    samples_per_condition: int = 1,
    project: bool = True,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Target-modality embeddings for each condition: [B, k, d] unit vectors (k = samples_per_condition),
    on the host. Runs on the model's device; the noise is drawn on the host from ``generator``."""
    model.eval()
    config = model.config
    device = device_of(model)
    d = config.embed_dim
    radius = math.sqrt(d)
    scheduler = make_sampler(config, sampler)
    scheduler.set_timesteps(steps)
    batch = to_device(condition, device).repeat_interleave(samples_per_condition, dim=0)
    directions = torch.full((len(batch),), direction, dtype=torch.long, device=device)
    z = to_device(torch.randn((len(batch), d), generator=generator), device)
    alphas = scheduler.alphas_cumprod
    for t in scheduler.timesteps:
        timesteps = torch.full((len(batch),), int(t), dtype=torch.long, device=device)
        eps = model(z, timesteps, batch, directions)
        if guidance_scale != 1.0:
            unconditional = model(z, timesteps, model.null_condition.expand_as(batch), directions)
            eps = unconditional + guidance_scale * (eps - unconditional)
        if project:
            alpha_bar = alphas[int(t)]
            x0 = (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            x0 = radius * F.normalize(x0, dim=-1)
            eps = (z - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt().clamp(min=1e-8)
        z = scheduler.step(eps, t, z, generator=generator).prev_sample if sampler == "ddpm" else scheduler.step(eps, t, z).prev_sample
    return to_host(F.normalize(z, dim=-1).reshape(len(condition), samples_per_condition, d))
