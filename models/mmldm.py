"""MM-LDM (Sun et al., MM '24): a hierarchical multi-modal autoencoder over KL-VAE latents, and a
DiT that generates sounding video in its latent space (joint, audio -> video, video -> audio).

    KL-VAE (perceptual, factor f)          audio image -> x_a [4, 10, 44]; each frame -> x_v[i] [4, 16, 16]
    MmldmAutoencoder                        (the paper's Fig. 3)
      AudioEncoder  (factor f_a)            x_a -> z_a [C, 5, 22]         posterior (mean, logvar), KL loss
      VideoEncoder  (factor f_v, temporal)  x_v [T, 4, 16, 16] -> z_v [C, 8, 8]: the whole clip in one latent
      Projector x 2 (not shared)            z -> semantic tokens s [N, D]
      ClassHead f_cl (s_a, s_v) -> logits;  ContrastiveHead f_co: Eq. (1), learnable temperature
      SignalDecoder (shared by both)        epsilon-prediction diffusion U-Net over x (one frame or the
                                            audio image's latent) conditioned on its own z (multi-scale
                                            features added to the encoder levels, a pooled content
                                            feature added to the time embedding), the frame index
                                            (video), and through cross-attention on [the other
                                            modality's s, a modality embedding, a class embedding]
      Discriminator (Eq. 2, off by default) real (a, v_i, v_j) against four kinds of fake triples
    JointDiT                                tokens [EOS_a, z_a..., EOS_v, z_v...] with each modality's
                                            positional embedding; adaLN-Zero blocks; epsilon (Eq. 8);
                                            conditions (null latents = 0) through zero-initialised
                                            layers; cross-modal guidance (Eq. 9, ``guided_noise``)

The paper leaves decoder sizes, the discriminator, the class embedding's source and the factors
at this scale open; the choices are config fields (``AutoencoderConfig``, ``DitConfig``), said
where they are made. The DiT is generic over the two token grids: the signal-space baseline of the
efficiency table is the same class over pixels (``DitConfig`` with other shapes and patches).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.cmmd import _zero, ddim_timesteps, timestep_embedding

AUDIO, VIDEO = 0, 1


def _tuple(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


# ---- the autoencoder --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AutoencoderConfig:
    kl_channels: int = 4  # channels of the KL-VAE latents (both modalities)
    audio_hw: tuple[int, int] = (10, 44)  # the audio image's KL latent (80 x 352 image: 10 x 44 at f = 8, 20 x 88 at f = 4)
    frame_hw: tuple[int, int] = (16, 16)  # one frame's KL latent (64 x 64 frame, f = 8)
    frames: int = 16  # frames per clip (the paper: F = 16)
    latent_channels: int = 8  # C of z_a and z_v (the paper: 16 at 8^2 / 16^2; half here: 5 x 22 and 8 x 8 positions)
    # f_a and f_v: the paper's 4 and 2 at 32 x 32 KL latents; here 4 on the f = 4 audio VAE's 20 x 88 and 2 on
    # 16 x 16 frames (stages.mmldm.train picks f_a so z_a is 5 x 22; on an f = 8 VAE's 10 x 44 that is 2).
    audio_factor: int = 2
    video_factor: int = 2
    encoder_channels: int = 48  # the video encoder sees every frame: its width is most of a step's cost
    semantic_dim: int = 64  # D of the semantic tokens s_a, s_v
    contrastive_dim: int = 64  # f_co's output
    classes: int = 0  # 0: no class head (a dataset without labels)
    decoder_channels: tuple[int, ...] = (48, 96)  # the signal decoder's U-Net levels (2: one downsampling)
    # Cross-attention at U-Net levels >= this (and in the middle): at the top level it attends from every
    # position of the latent (440 audio, 256 frame) and costs most of a step; LDM also skips its top level.
    attention_from_level: int = 1
    context_dim: int = 64
    heads: int = 4
    time_dim: int = 128
    norm_groups: int = 8
    # Where the class embedding comes from at decoding: "predicted" = the class head's softmax over (s_a, s_v)
    # times a learnable table (no label is needed to decode a generated latent); "none" = no class token.
    class_embedding: str = "predicted"
    # Ablations of Table 5: semantic = False drops the shared semantic space (no projectors in the decoder's
    # context, no classification or contrastive loss: each modality decodes from its own latent alone);
    # shared_decoder = False gives each modality its own signal decoder.
    semantic: bool = True
    shared_decoder: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # LDM's (the paper initialises its decoder from LDM)
    discriminator_channels: int = 32

    def __post_init__(self) -> None:
        for name in ("audio_hw", "frame_hw", "decoder_channels"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if self.class_embedding not in ("predicted", "none"):
            raise ValueError(f"class_embedding must be 'predicted' or 'none', got {self.class_embedding!r}")
        if any(c % self.norm_groups for c in (*self.decoder_channels, self.encoder_channels)):
            raise ValueError(f"norm_groups {self.norm_groups} must divide the encoder and decoder channels")
        for hw, f, what in ((self.audio_hw, self.audio_factor, "audio"), (self.frame_hw, self.video_factor, "frame")):
            if f < 1 or f & (f - 1) or any(s % f for s in hw):
                raise ValueError(f"{what} factor {f} must be a power of 2 dividing the KL latent size {list(hw)}")
        down = 2 ** (len(self.decoder_channels) - 1)
        if any(s % down for s in (*self.audio_hw, *self.frame_hw)):
            raise ValueError(f"{len(self.decoder_channels)} decoder levels need KL latent sizes divisible by {down}")

    @property
    def audio_latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.audio_hw[0] // self.audio_factor, self.audio_hw[1] // self.audio_factor)

    @property
    def video_latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.frame_hw[0] // self.video_factor, self.frame_hw[1] // self.video_factor)

    def params(self) -> dict:
        params = asdict(self)
        for name in ("audio_hw", "frame_hw", "decoder_channels"):
            params[name] = list(params[name])
        return params


class ResBlock2d(nn.Module):
    """GroupNorm-SiLU-conv residual block with an optional embedding added between the convs."""

    def __init__(self, cin: int, cout: int, groups: int, emb_dim: int = 0):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(min(groups, cin), cin), nn.GroupNorm(groups, cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.emb = nn.Linear(emb_dim, cout) if emb_dim else None
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None and emb is not None:
            h = h + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _downsamplers(channels: int, factor: int, groups: int) -> nn.Sequential:
    layers = []
    for _ in range(int(math.log2(factor))):
        layers += [ResBlock2d(channels, channels, groups), nn.Conv2d(channels, channels, 3, stride=2, padding=1)]
    return nn.Sequential(*layers)


class AudioEncoder(nn.Module):
    """x_a [B, 4, h, w] -> posterior (mean, logvar) of z_a [B, C, h / f_a, w / f_a]."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        ch = c.encoder_channels
        self.net = nn.Sequential(nn.Conv2d(c.kl_channels, ch, 3, padding=1), ResBlock2d(ch, ch, c.norm_groups),
                                 _downsamplers(ch, c.audio_factor, c.norm_groups), ResBlock2d(ch, ch, c.norm_groups),
                                 nn.GroupNorm(c.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class VideoEncoder(nn.Module):
    """x_v [B, T, 4, h, w] -> posterior of z_v [B, C, h / f_v, w / f_v]: per-frame strided convs down
    to the latent's resolution first (the cost is per frame), then residual blocks each followed by
    a temporal layer (3-tap conv over frames, zero-initialised), then attention pooling over time:
    the whole clip in one latent, as the paper's video encoder (the decoder picks a frame by index)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        ch = c.encoder_channels
        layers: list[nn.Module] = [nn.Conv2d(c.kl_channels, ch, 3, padding=1)]
        for _ in range(int(math.log2(c.video_factor))):
            layers += [nn.SiLU(), nn.Conv2d(ch, ch, 3, stride=2, padding=1)]
        self.stem = nn.Sequential(*layers)
        self.spatial = nn.ModuleList([ResBlock2d(ch, ch, c.norm_groups), ResBlock2d(ch, ch, c.norm_groups)])
        self.temporal = nn.ModuleList([_zero(nn.Conv1d(ch, ch, 3, padding=1)) for _ in self.spatial])
        self.frame_position = nn.Parameter(torch.zeros(c.frames, ch))
        self.pool_score = nn.Conv2d(ch, 1, 1)  # per-position weights over frames
        self.out = nn.Sequential(ResBlock2d(ch, ch, c.norm_groups), nn.GroupNorm(c.norm_groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = x.shape[:2]
        h = self.stem(x.flatten(0, 1))
        h = h + self.frame_position[:t].repeat(b, 1)[:, :, None, None]
        for spatial, temporal in zip(self.spatial, self.temporal):
            h = spatial(h)
            _, ch, hh, ww = h.shape
            seq = h.reshape(b, t, ch, hh, ww).permute(0, 3, 4, 2, 1).reshape(b * hh * ww, ch, t)
            h = h + temporal(seq).reshape(b, hh, ww, ch, t).permute(0, 4, 3, 1, 2).reshape(b * t, ch, hh, ww)
        _, ch, hh, ww = h.shape
        weights = self.pool_score(h).reshape(b, t, 1, hh, ww).softmax(dim=1)
        pooled = (h.reshape(b, t, ch, hh, ww) * weights).sum(1)
        mean, logvar = self.out(pooled).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Projector(nn.Module):
    """z [B, C, h, w] -> semantic tokens s [B, h w, D] (rasterised)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c.latent_channels, c.semantic_dim, 3, padding=1),
                                 ResBlock2d(c.semantic_dim, c.semantic_dim, c.norm_groups))
        self.norm = nn.LayerNorm(c.semantic_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(z).flatten(2).transpose(1, 2))


class ContrastiveHead(nn.Module):
    """f_co: pooled semantic tokens -> unit vectors; Eq. (1) with a learnable temperature tau
    (CLIP's: logit scale exp(tau), from 1 / 0.07, at most 100)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.audio = nn.Linear(c.semantic_dim, c.contrastive_dim)
        self.video = nn.Linear(c.semantic_dim, c.contrastive_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(self, s_a: torch.Tensor, s_v: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(F.normalize(self.audio(s_a.mean(1)), dim=-1), F.normalize(self.video(s_v.mean(1)), dim=-1),
                                self.log_scale.clamp(max=math.log(100.0)).exp())


def contrastive_loss(e_a: torch.Tensor, e_v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eq. (1): the symmetric InfoNCE over the batch, matched pairs positive, all others negative
    (the paper's "dot product" on unit vectors, as the CLIP loss it follows; its 1/2-weighted sum
    over the batch is taken as a mean here so the weight does not depend on the batch size)."""
    logits = scale * e_a @ e_v.t()
    target = torch.arange(len(e_a), device=e_a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class CrossAttention(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attention = nn.MultiheadAttention(channels, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.out = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)
        attended, _ = self.attention(q, context, context, need_weights=False)
        return x + self.out(attended).transpose(1, 2).reshape(b, ch, h, w)


class SignalDecoder(nn.Module):
    """The shared epsilon-prediction decoder: noisy KL latent x_t [B, 4, h, w] -> epsilon.

    Conditions (Fig. 3b): its own perceptual latent z (frame-specific multi-scale features from
    residual blocks, FiLM'd by the frame index, added to the U-Net encoder's outputs; a pooled content
    feature added to the time embedding), the frame index (video; added to the time embedding too),
    and through cross-attention the context [other modality's s, modality embedding, class embedding].
    """

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.config = c
        chs, td, g = c.decoder_channels, c.time_dim, c.norm_groups
        self.time = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.content = nn.Linear(c.latent_channels, td)
        self.frame_index = nn.Embedding(c.frames, td)
        self.stem = nn.Conv2d(c.kl_channels, chs[0], 3, padding=1)
        self.z_stem = nn.Conv2d(c.latent_channels, chs[0], 3, padding=1)
        self.z_blocks = nn.ModuleList([ResBlock2d(chs[max(0, i - 1)] if i else chs[0], ch, g, td) for i, ch in enumerate(chs)])
        self.z_out = nn.ModuleList([_zero(nn.Conv2d(ch, ch, 1)) for ch in chs])
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, ch in enumerate(chs):
            self.down_blocks.append(ResBlock2d(chs[max(0, i - 1)] if i else chs[0], ch, g, td))
            self.down_attn.append(CrossAttention(ch, c.context_dim, c.heads, g) if i >= c.attention_from_level else None)
            self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i + 1 < len(chs) else nn.Identity())
        self.mid = ResBlock2d(chs[-1], chs[-1], g, td)
        self.mid_attn = CrossAttention(chs[-1], c.context_dim, c.heads, g)
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for i in reversed(range(len(chs))):
            above = chs[i + 1] if i + 1 < len(chs) else chs[-1]
            self.up_blocks.append(ResBlock2d(above + chs[i], chs[i], g, td))
            self.up_attn.append(CrossAttention(chs[i], c.context_dim, c.heads, g) if i >= c.attention_from_level else None)
        self.out = nn.Sequential(nn.GroupNorm(g, chs[0]), nn.SiLU(), _zero(nn.Conv2d(chs[0], c.kl_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, context: torch.Tensor,
                frame_index: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.config.time_dim)) + self.content(z.mean((2, 3)))
        z_emb = None
        if frame_index is not None:
            z_emb = self.frame_index(frame_index)
            emb = emb + z_emb
        # multi-scale features of z at each encoder level's resolution
        sizes, h = [], x
        for i in range(len(self.config.decoder_channels)):
            sizes.append(h.shape[-2:])
            h = h[..., ::2, ::2]
        zf, scales = self.z_stem(z), []
        for block, out, size in zip(self.z_blocks, self.z_out, sizes):
            zf = block(F.interpolate(zf, size=size, mode="bilinear", align_corners=False), z_emb)
            scales.append(out(zf))
        h = self.stem(x)
        skips = []
        for block, attn, down, feature in zip(self.down_blocks, self.down_attn, self.downsample, scales):
            h = block(h, emb)
            h = (attn(h, context) if attn is not None else h) + feature
            skips.append(h)
            h = down(h)
        h = self.mid_attn(self.mid(h, emb), context)
        for block, attn in zip(self.up_blocks, self.up_attn):
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1), emb)
            h = attn(h, context) if attn is not None else h
        return self.out(h)


class Discriminator(nn.Module):
    """Eq. (2)'s D on a triple (audio, frame i, frame j) of KL latents: per-input conv stems, then a
    cross-modal full-attention layer over all their tokens (with type embeddings), pooled to a logit.
    It sees KL latents, not pixels: decoding to pixels every step would cost the KL-VAE decoders."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        ch = c.discriminator_channels
        self.audio = nn.Sequential(nn.Conv2d(c.kl_channels, ch, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(ch, ch, 3, padding=1))
        self.frame = nn.Sequential(nn.Conv2d(c.kl_channels, ch, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(ch, ch, 3, padding=1))
        self.kind = nn.Parameter(torch.zeros(3, ch))
        self.mix = nn.TransformerEncoderLayer(ch, 4, 2 * ch, dropout=0.0, batch_first=True)
        self.head = nn.Linear(ch, 1)

    def forward(self, a: torch.Tensor, v_i: torch.Tensor, v_j: torch.Tensor) -> torch.Tensor:
        tokens = [self.audio(a).flatten(2).transpose(1, 2) + self.kind[0],
                  self.frame(v_i).flatten(2).transpose(1, 2) + self.kind[1],
                  self.frame(v_j).flatten(2).transpose(1, 2) + self.kind[2]]
        return self.head(self.mix(torch.cat(tokens, 1)).mean(1)).squeeze(-1)


class MmldmAutoencoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.config = c
        self.audio_encoder, self.video_encoder = AudioEncoder(c), VideoEncoder(c)
        self.audio_projector, self.video_projector = Projector(c), Projector(c)
        self.class_head = nn.Sequential(nn.Linear(2 * c.semantic_dim, c.semantic_dim), nn.SiLU(),
                                        nn.Linear(c.semantic_dim, c.classes)) if c.classes else None
        self.contrastive_head = ContrastiveHead(c)
        self.decoder = SignalDecoder(c)  # video's, and audio's too when shared
        self.audio_decoder = None if c.shared_decoder else SignalDecoder(c)
        self.context = nn.Linear(c.semantic_dim, c.context_dim)
        self.modality = nn.Parameter(torch.randn(2, c.context_dim) * 0.02)
        self.class_table = nn.Parameter(torch.randn(c.classes, c.context_dim) * 0.02) if c.classes and c.class_embedding == "predicted" else None

    def decoder_of(self, modality: int) -> SignalDecoder:
        return self.audio_decoder if modality == AUDIO and self.audio_decoder is not None else self.decoder

    # -- encoding
    def encode(self, x_a: torch.Tensor, x_v: torch.Tensor):
        """Posteriors (mean, logvar) of z_a and z_v."""
        return self.audio_encoder(x_a), self.video_encoder(x_v)

    def semantics(self, z_a: torch.Tensor, z_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        s_a, s_v = self.audio_projector(z_a), self.video_projector(z_v)
        logits = self.class_head(torch.cat([s_a.mean(1), s_v.mean(1)], -1)) if self.class_head is not None else None
        return s_a, s_v, logits

    def contexts(self, s_a: torch.Tensor, s_v: torch.Tensor, logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention contexts: for the audio decoder [s_v, audio embedding, class], for video [s_a, video embedding, class]."""
        b = s_a.shape[0]
        if not self.config.semantic:
            return self.modality[AUDIO].expand(b, 1, -1), self.modality[VIDEO].expand(b, 1, -1)
        extra = []
        if self.class_table is not None and logits is not None:
            extra.append((logits.softmax(-1) @ self.class_table)[:, None])
        audio_ctx = torch.cat([self.context(s_v), self.modality[AUDIO].expand(b, 1, -1), *extra], 1)
        video_ctx = torch.cat([self.context(s_a), self.modality[VIDEO].expand(b, 1, -1), *extra], 1)
        return audio_ctx, video_ctx


def build_autoencoder(config: AutoencoderConfig) -> MmldmAutoencoder:
    return MmldmAutoencoder(config)


def make_scheduler(num_train_timesteps: int, beta_schedule: str):
    """diffusers' DDPM schedule (alphas_cumprod, add_noise), epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, clip_sample=False,
                         prediction_type="epsilon")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over a sample's elements, mean over the batch (LDM's)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


@dataclass
class AutoencoderTerms:
    loss: torch.Tensor
    mse: torch.Tensor
    classification: torch.Tensor | None
    contrastive: torch.Tensor
    kl: torch.Tensor
    adversarial: torch.Tensor | None = None
    accuracy: float | None = None
    x0_audio: torch.Tensor | None = None  # one-step reconstructions (for the discriminator)
    x0_frames: torch.Tensor | None = None
    frame_rows: torch.Tensor | None = None


DECODER_WEIGHTINGS = ("eps", "min_snr", "x0")


def decoder_loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor:
    """Per-sample weights of the decoder's epsilon MSE at timesteps ``t``, normalised to mean 1 over
    uniform t (so the loss keeps its scale and the gradient clip its meaning). The network predicts
    epsilon in every case (Eq. 3 / Eq. 8); only where the steps are spent changes:

    - "eps": 1 (the paper's plain noise MSE). The eps error at high noise is tiny while the x0 it
      implies is off by that error x 1 / sqrt(SNR) (x 37 at t = T - 1 of LDM's schedule), and
      sampling starts there: the decoder fits the low-noise detail and never learns to use z.
    - "min_snr": min(SNR, gamma) / SNR (Hang et al. 2023, min-SNR-gamma for eps): low noise counts less.
    - "x0": 1 + min(1 / SNR, gamma): the eps MSE plus the x0 MSE it implies, truncated at gamma: the
      steps go to the high-noise end, where the content must come from z, and low noise keeps a share."""
    abar = alphas_cumprod.float()
    snr = abar / (1 - abar)
    if weighting == "eps":
        table = torch.ones_like(snr)
    elif weighting == "min_snr":
        table = snr.clamp(max=gamma) / snr
    elif weighting == "x0":
        table = 1 + (1 / snr).clamp(max=gamma)
    else:
        raise ValueError(f"decoder weighting must be one of {DECODER_WEIGHTINGS}, got {weighting!r}")
    return (table / table.mean())[t]


def _weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return ((prediction - target).pow(2).flatten(1).mean(1) * weights).mean()


def autoencoder_loss(model: MmldmAutoencoder, scheduler, x_a: torch.Tensor, x_v: torch.Tensor, labels: torch.Tensor | None,
                     frame_rows: torch.Tensor, generator: torch.Generator | None, *, cl_weight: float, co_weight: float,
                     kl_weight: float, keep_x0: bool = False, weighting: str = "eps", snr_gamma: float = 5.0) -> AutoencoderTerms:
    """Eq. (3) without the adversarial term (``adversarial_terms`` adds it): the decoder's noise MSE
    on the audio latent and on ``frame_rows`` [B, k] frames per clip (weighted over timesteps by
    ``decoder_loss_weights``), + lambda_cl CE + lambda_co Eq. (1) + lambda_kl (KL_a + KL_v). Posterior
    samples z = mean + std eps feed the projectors and decoder. ``labels`` < 0 (or None) have no
    class: left out of the CE. ``mse`` in the result is the unweighted noise MSE (comparable across
    weightings)."""
    b, k = frame_rows.shape
    device = x_a.device
    (mu_a, lv_a), (mu_v, lv_v) = model.encode(x_a, x_v)
    z_a = mu_a + (0.5 * lv_a).exp() * torch.randn(mu_a.shape, generator=generator).to(device)
    z_v = mu_v + (0.5 * lv_v).exp() * torch.randn(mu_v.shape, generator=generator).to(device)
    s_a, s_v, logits = model.semantics(z_a, z_v)
    audio_ctx, video_ctx = model.contexts(s_a, s_v, logits)
    frames = x_v[torch.arange(b, device=device)[:, None], frame_rows].flatten(0, 1)  # [B k, 4, h, w]
    abar = scheduler.alphas_cumprod.to(device).float()
    t_a = torch.randint(0, len(abar), (b,), generator=generator).to(device)
    t_v = torch.randint(0, len(abar), (b * k,), generator=generator).to(device)
    n_a = torch.randn(x_a.shape, generator=generator).to(device)
    n_v = torch.randn(frames.shape, generator=generator).to(device)
    ab_a, ab_v = abar[t_a][:, None, None, None], abar[t_v][:, None, None, None]
    xt_a = ab_a.sqrt() * x_a + (1 - ab_a).sqrt() * n_a
    xt_v = ab_v.sqrt() * frames + (1 - ab_v).sqrt() * n_v
    eps_a = model.decoder_of(AUDIO)(xt_a, t_a, z_a, audio_ctx)
    eps_v = model.decoder_of(VIDEO)(xt_v, t_v, z_v.repeat_interleave(k, 0), video_ctx.repeat_interleave(k, 0), frame_rows.flatten())
    mse = 0.5 * (F.mse_loss(eps_a, n_a) + F.mse_loss(eps_v, n_v))
    if weighting == "eps":  # the same loss as the weights of 1 would give, in the same float order: old fits reproduce
        decoder = mse
    else:
        decoder = 0.5 * (_weighted_mse(eps_a, n_a, decoder_loss_weights(abar, t_a, weighting, snr_gamma))
                         + _weighted_mse(eps_v, n_v, decoder_loss_weights(abar, t_v, weighting, snr_gamma)))
    semantic = model.config.semantic
    contrastive = model.contrastive_head.loss(s_a, s_v) if semantic else torch.zeros((), device=device)
    kl = kl_divergence(mu_a, lv_a) + kl_divergence(mu_v, lv_v)
    loss = decoder + co_weight * contrastive + kl_weight * kl
    classification, accuracy = None, None
    if semantic and logits is not None and labels is not None and bool((labels >= 0).any()):
        known = labels >= 0
        classification = F.cross_entropy(logits[known], labels[known])
        accuracy = float((logits[known].argmax(-1) == labels[known]).float().mean())
        loss = loss + cl_weight * classification
    terms = AutoencoderTerms(loss, mse.detach(), None if classification is None else classification.detach(),
                             contrastive.detach(), kl.detach(), accuracy=accuracy)
    if keep_x0:
        terms.x0_audio = (xt_a - (1 - ab_a).sqrt() * eps_a) / ab_a.sqrt()
        terms.x0_frames = ((xt_v - (1 - ab_v).sqrt() * eps_v) / ab_v.sqrt()).reshape(b, k, *frames.shape[1:])
        terms.frame_rows = frame_rows
    return terms


def adversarial_terms(discriminator: Discriminator, x_a: torch.Tensor, x_v: torch.Tensor,
                      terms: AutoencoderTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (2) as binary cross-entropy: (L_D, L_GAN^AE). Real <a, v_i, v_j> (i < j); fakes
    <a~, v~_i, v~_j>, <a~, v~_i, v_j>, <a~, v_i, v~_j> and the reversed order <a~, v~_j, v~_i>; the
    autoencoder wants D to call <a~, v~_i, v~_j> real. The reconstructions are the decoder's one-step
    x0 estimates at the training timestep (needs two frames per clip: ``frames_per_step`` >= 2)."""
    rows = terms.frame_rows
    b = x_a.shape[0]
    idx = torch.arange(b, device=x_a.device)
    order = rows[:, 0] < rows[:, 1]
    first = torch.where(order, rows[:, 0], rows[:, 1])
    second = torch.where(order, rows[:, 1], rows[:, 0])
    fake_first = torch.where(order[:, None, None, None], terms.x0_frames[:, 0], terms.x0_frames[:, 1])
    fake_second = torch.where(order[:, None, None, None], terms.x0_frames[:, 1], terms.x0_frames[:, 0])
    v_i, v_j, a_bar = x_v[idx, first], x_v[idx, second], terms.x0_audio
    real = discriminator(x_a, v_i, v_j)
    fakes = [discriminator(a_bar.detach(), fake_first.detach(), fake_second.detach()),
             discriminator(a_bar.detach(), fake_first.detach(), v_j),
             discriminator(a_bar.detach(), v_i, fake_second.detach()),
             discriminator(a_bar.detach(), fake_second.detach(), fake_first.detach())]
    ones, zeros = torch.ones_like(real), torch.zeros_like(real)
    loss_d = F.binary_cross_entropy_with_logits(real, ones) + sum(F.binary_cross_entropy_with_logits(f, zeros) for f in fakes) / len(fakes)
    loss_ae = F.binary_cross_entropy_with_logits(discriminator(a_bar, fake_first, fake_second), ones)
    return loss_d, loss_ae


@torch.no_grad()
def decode_signal(decoder: SignalDecoder, scheduler, z: torch.Tensor, context: torch.Tensor, shape: Sequence[int],
                  steps: int, generator: torch.Generator | None, frame_index: torch.Tensor | None = None,
                  on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM (eta 0) with the signal decoder: KL latents [B, *shape] from z (and the frame index);
    ``on_step`` is called after each step (a progress or thread-tuning hook)."""
    device = z.device
    x = torch.randn((z.shape[0], *shape), generator=generator).to(device)
    abar = scheduler.alphas_cumprod.float().to(device)
    times = ddim_timesteps(scheduler, steps)
    for i, t in enumerate(times):
        a_now = abar[t]
        a_next = abar[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0, device=device)
        eps = decoder(x, torch.full((len(x),), t, device=device, dtype=torch.long), z, context, frame_index)
        x0 = (x - (1 - a_now).sqrt() * eps) / a_now.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if on_step is not None:
            on_step(i + 1)
    return x


@torch.no_grad()
def decode_clips(model: MmldmAutoencoder, scheduler, z_a: torch.Tensor, z_v: torch.Tensor, steps: int,
                 generator: torch.Generator | None, frame_batch: int = 64,
                 on_step: Callable[[int], None] | None = None,
                 modalities: Sequence[str] = ("audio", "video")) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(audio KL latents [B, 4, h_a, w_a], frame KL latents [B, T, 4, h_v, w_v]) of MM-LDM latents; a
    modality left out of ``modalities`` is not decoded (None), and its noise is still drawn, so the
    other's decode is the same as when both are (an a2v evaluation needs the frames alone)."""
    c = model.config
    s_a, s_v, logits = model.semantics(z_a, z_v)
    audio_ctx, video_ctx = model.contexts(s_a, s_v, logits)
    audio_shape = (c.kl_channels, *c.audio_hw)
    if "audio" in modalities:
        audio = decode_signal(model.decoder_of(AUDIO), scheduler, z_a, audio_ctx, audio_shape, steps, generator, on_step=on_step)
    else:
        audio = None
        torch.randn((z_a.shape[0], *audio_shape), generator=generator)  # decode_signal's one draw
    if "video" not in modalities:
        return audio, None
    b, t = z_v.shape[0], c.frames
    index = torch.arange(t, device=z_v.device).repeat(b)
    zs, ctx = z_v.repeat_interleave(t, 0), video_ctx.repeat_interleave(t, 0)
    out = []
    for start in range(0, b * t, frame_batch):
        sl = slice(start, start + frame_batch)
        out.append(decode_signal(model.decoder_of(VIDEO), scheduler, zs[sl], ctx[sl], (c.kl_channels, *c.frame_hw), steps, generator,
                                 index[sl], on_step))
    return audio, torch.cat(out).reshape(b, t, c.kl_channels, *c.frame_hw)


# ---- the DiT ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DitConfig:
    audio_shape: tuple[int, ...] = (8, 5, 22)  # [C, *grid] of one modality's latent (grid 2-D or 3-D)
    video_shape: tuple[int, ...] = (8, 8, 8)
    audio_patch: tuple[int, ...] = (1, 1)  # patch per grid axis
    video_patch: tuple[int, ...] = (1, 1)
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    conditional_share: float = 0.05  # share of training samples for each conditional task (a2v, v2a)

    def __post_init__(self) -> None:
        for name in ("audio_shape", "video_shape", "audio_patch", "video_patch"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for shape, patch, what in ((self.audio_shape, self.audio_patch, "audio"), (self.video_shape, self.video_patch, "video")):
            if len(patch) != len(shape) - 1 or any(s % p for s, p in zip(shape[1:], patch)):
                raise ValueError(f"{what}_patch {list(patch)} must divide the grid {list(shape[1:])} axis by axis")
        if self.hidden % self.heads:
            raise ValueError("hidden must be a multiple of heads")
        if not 0 <= self.conditional_share <= 0.5:
            raise ValueError("conditional_share must be within 0..0.5")

    def tokens(self, what: str) -> int:
        shape, patch = (self.audio_shape, self.audio_patch) if what == "audio" else (self.video_shape, self.video_patch)
        return math.prod(s // p for s, p in zip(shape[1:], patch))

    def params(self) -> dict:
        params = asdict(self)
        for name in ("audio_shape", "video_shape", "audio_patch", "video_patch"):
            params[name] = list(params[name])
        return params


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """[B, C, *grid] -> tokens [B, N, C prod(patch)] in raster order of the patch grid."""
    b, c, *grid = x.shape
    n = len(grid)
    shape = [b, c]
    for s, p in zip(grid, patch):
        shape += [s // p, p]
    x = x.reshape(shape)
    outer = [2 + 2 * i for i in range(n)]
    inner = [3 + 2 * i for i in range(n)]
    x = x.permute(0, *outer, 1, *inner)
    return x.reshape(b, math.prod(s // p for s, p in zip(grid, patch)), c * math.prod(patch))


def unpatchify(tokens: torch.Tensor, shape: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """The inverse of ``patchify``: tokens [B, N, C prod(patch)] -> [B, *shape]."""
    b = tokens.shape[0]
    c, *grid = shape
    n = len(grid)
    outer = [s // p for s, p in zip(grid, patch)]
    x = tokens.reshape(b, *outer, c, *patch)
    order = [0, n + 1]
    for i in range(n):
        order += [1 + i, n + 2 + i]
    return x.permute(*order).reshape(b, c, *grid)


def sinusoidal_positions(count: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s fixed positional embedding over the raster index [count, dim]."""
    return timestep_embedding(torch.arange(count), dim)


class DitBlock(nn.Module):
    """DiT's adaLN-Zero block: the time embedding sets shift / scale / gate of attention and MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.modulation = _zero(nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attention(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class JointDiT(nn.Module):
    """epsilon_theta(z_a^t, z_v^t, t; c_a, c_v) -> (eps_a, eps_v) over [EOS_a, audio tokens, EOS_v, video tokens].

    ``c_a`` / ``c_v``: the clean latent of a conditioning modality, or zeros (the null latent); each
    enters through a zero-initialised linear layer added to its modality's input tokens."""

    def __init__(self, config: DitConfig):
        super().__init__()
        self.config = c = config
        d = c.hidden
        in_a, in_v = c.audio_shape[0] * math.prod(c.audio_patch), c.video_shape[0] * math.prod(c.video_patch)
        self.embed_a, self.embed_v = nn.Linear(in_a, d), nn.Linear(in_v, d)
        self.condition_a, self.condition_v = _zero(nn.Linear(in_a, d)), _zero(nn.Linear(in_v, d))
        self.register_buffer("position_a", sinusoidal_positions(c.tokens("audio"), d), persistent=False)
        self.register_buffer("position_v", sinusoidal_positions(c.tokens("video"), d), persistent=False)
        self.eos = nn.Parameter(torch.randn(2, d) * 0.02)  # [EOS_a], [EOS_v]
        self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList([DitBlock(d, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = _zero(nn.Linear(d, 2 * d))
        self.out_a, self.out_v = _zero(nn.Linear(d, in_a)), _zero(nn.Linear(d, in_v))

    def forward(self, z_a: torch.Tensor, z_v: torch.Tensor, t: torch.Tensor,
                c_a: torch.Tensor | None = None, c_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        b = z_a.shape[0]
        a = self.embed_a(patchify(z_a, c.audio_patch)) + self.position_a
        v = self.embed_v(patchify(z_v, c.video_patch)) + self.position_v
        if c_a is not None:
            a = a + self.condition_a(patchify(c_a, c.audio_patch))
        if c_v is not None:
            v = v + self.condition_v(patchify(c_v, c.video_patch))
        n_a = a.shape[1]
        x = torch.cat([self.eos[0].expand(b, 1, -1), a, self.eos[1].expand(b, 1, -1), v], 1)
        temb = self.time(timestep_embedding(t, c.hidden))
        for block in self.blocks:
            x = block(x, temb)
        shift, scale = self.final_modulation(F.silu(temb))[:, None].chunk(2, dim=-1)
        x = self.final_norm(x) * (1 + scale) + shift
        eps_a = unpatchify(self.out_a(x[:, 1 : 1 + n_a]), c.audio_shape, c.audio_patch)
        eps_v = unpatchify(self.out_v(x[:, 2 + n_a :]), c.video_shape, c.video_patch)
        return eps_a, eps_v


TASKS = ("joint", "a2v", "v2a")


def task_draw(batch: int, share: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per sample 0 = joint (null conditions), 1 = a2v (audio given), 2 = v2a (video given): each
    conditional task for ``share`` of the samples on average (the paper's 5%)."""
    u = torch.rand((batch,), generator=generator)
    return torch.where(u < share, 1, torch.where(u < 2 * share, 2, 0))


def dit_loss(model: JointDiT, scheduler, z_a: torch.Tensor, z_v: torch.Tensor, generator: torch.Generator | None,
             tasks: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (8): 1/2 |eps_a - n_a|^2 + 1/2 |eps_v - n_v|^2 (means over elements), with the conditions
    of each sample's task (``task_draw``): the given modality's clean latent, the other's null latent."""
    device = z_a.device
    b = z_a.shape[0]
    tasks = task_draw(b, model.config.conditional_share, generator) if tasks is None else tasks
    tasks = tasks.to(device)
    abar = scheduler.alphas_cumprod.to(device).float()
    t = torch.randint(0, len(abar), (b,), generator=generator).to(device)
    n_a = torch.randn(z_a.shape, generator=generator).to(device)
    n_v = torch.randn(z_v.shape, generator=generator).to(device)
    ab = abar[t]
    xa = ab.sqrt().reshape(-1, 1, 1, 1) * z_a + (1 - ab).sqrt().reshape(-1, 1, 1, 1) * n_a
    xv = ab.sqrt().reshape(-1, *([1] * (z_v.ndim - 1))) * z_v + (1 - ab).sqrt().reshape(-1, *([1] * (z_v.ndim - 1))) * n_v
    given_a = (tasks == 1).float().reshape(-1, *([1] * (z_a.ndim - 1)))
    given_v = (tasks == 2).float().reshape(-1, *([1] * (z_v.ndim - 1)))
    eps_a, eps_v = model(xa, xv, t, given_a * z_a, given_v * z_v)
    return 0.5 * F.mse_loss(eps_a, n_a) + 0.5 * F.mse_loss(eps_v, n_v)


def guided_noise(conditional: torch.Tensor, unconditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Eq. (9), read as classifier-free guidance: phi * eps(cond) + (1 - phi) * eps(null). The paper
    prints "- (1 - phi)"; with that sign phi = 1 gives the same, but any other phi scales the noise
    estimate by 2 phi - 1 instead of extrapolating from the unconditional one, so the sign is taken
    as a typo. phi = 1: the conditional model alone."""
    return phi * conditional + (1.0 - phi) * unconditional


@torch.no_grad()
def sample_dit(model: JointDiT, scheduler, batch: int, task: str = "joint", *, known: torch.Tensor | None = None,
               phi: float = 1.0, steps: int = 50, generator: torch.Generator | None = None,
               device: str | torch.device = "cpu", on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM (eta 0) sampling of (z_a, z_v). ``task`` "joint": both from noise, null conditions.
    "a2v" / "v2a": ``known`` is the given modality's clean latent; its noisy version at each step is
    q(z^t | z^0) with one noise drawn at the start (Eq. 6), the condition is ``known`` and the other's
    null latent, and the unknown modality's noise is ``guided_noise`` of the conditional and the
    unconditional (null, null) predictions with ``phi``. Noise is drawn on the host from ``generator``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task != "joint" and known is None:
        raise ValueError(f"{task} needs the known modality's latent")
    c = model.config
    x_a = torch.randn((batch, *c.audio_shape), generator=generator).to(device)
    x_v = torch.randn((batch, *c.video_shape), generator=generator).to(device)
    noise_known = torch.randn(known.shape, generator=generator).to(device) if known is not None else None
    zeros_a, zeros_v = torch.zeros_like(x_a), torch.zeros_like(x_v)
    abar = scheduler.alphas_cumprod.float().to(device)
    times = ddim_timesteps(scheduler, steps)
    for i, t in enumerate(times):
        a_now = abar[t]
        a_next = abar[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0, device=device)
        tt = torch.full((batch,), t, device=device, dtype=torch.long)
        if task == "a2v":
            x_a = a_now.sqrt() * known + (1 - a_now).sqrt() * noise_known
        elif task == "v2a":
            x_v = a_now.sqrt() * known + (1 - a_now).sqrt() * noise_known
        if task == "joint":
            eps_a, eps_v = model(x_a, x_v, tt, zeros_a, zeros_v)
        else:
            cond = (known, zeros_v) if task == "a2v" else (zeros_a, known)
            eps_a, eps_v = model(x_a, x_v, tt, *cond)
            if phi != 1.0:  # phi = 1: the conditional prediction alone, no second pass
                null_a, null_v = model(x_a, x_v, tt, zeros_a, zeros_v)
                eps_a, eps_v = (eps_a, guided_noise(eps_v, null_v, phi)) if task == "a2v" else (guided_noise(eps_a, null_a, phi), eps_v)
        x_a = a_next.sqrt() * (x_a - (1 - a_now).sqrt() * eps_a) / a_now.sqrt() + (1 - a_next).sqrt() * eps_a
        x_v = a_next.sqrt() * (x_v - (1 - a_now).sqrt() * eps_v) / a_now.sqrt() + (1 - a_next).sqrt() * eps_v
        if on_step is not None:
            on_step(i + 1)
    if task == "a2v":
        x_a = known
    elif task == "v2a":
        x_v = known
    return x_a, x_v


def build_dit(config: DitConfig) -> JointDiT:
    return JointDiT(config)
