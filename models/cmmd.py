"""CMMD (Yang, Gamper, Braun): joint video-audio diffusion with easy fusion, the joint contrastive
loss (Eq. 6) and conditional sampling by reconstruction guidance (Eq. 3) with DDIM.

    video  v0  [B, C, T, h, w]   frame VAE latents of T frames (scaled posterior means)
    audio  a0  [B, n_mels, r*T]  the normalised mel (mel_latents): r mel frames per video frame

One network predicts both velocities (Eq. 2, v-parameterisation): ``JointUNet(v_n, a_n, n) ->
(v_hat, a_hat)``. Both streams downsample time by 2 per level, so at every level the audio has
exactly r frames per video frame, and an easy-fusion block exchanges time-aligned summaries (see
``EasyFusion``). The network is fully convolutional in time: it samples twice the training length
as the paper does at test time.

The paper leaves the easy-fusion internals, the U-Net sizes and the shift ranges open; the
choices here are config fields (``CmmdConfig``) and said where they are made.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CmmdConfig:
    video_channels: int = 4  # latent channels of the frame VAE
    # Space-to-depth of the video latents before the first conv (2: 16 x 16 x 4 -> 8 x 8 x 16): a
    # quarter of the convolution cost at the top level, which dominates a step on CPU.
    video_patch: int = 2
    mel_bins: int = 80
    frame_ratio: int = 10  # mel frames per video frame (exact: 22050 / 256 / (22050 / 2560))
    # Channels per level of each stream; n levels downsample time (both streams) and space (video) by 2^(n-1).
    video_levels: tuple[int, ...] = (32, 64, 64)
    audio_levels: tuple[int, ...] = (64, 96, 128)
    time_dim: int = 128
    norm_groups: int = 8
    fusion: bool = True  # the easy-fusion blocks; False: two independent U-Nets sharing only the loss (ablation)
    fusion_kernel: int = 3  # temporal kernel of each fusion projection (at the video frame rate)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self) -> None:
        object.__setattr__(self, "video_levels", tuple(int(c) for c in self.video_levels))
        object.__setattr__(self, "audio_levels", tuple(int(c) for c in self.audio_levels))
        if len(self.video_levels) != len(self.audio_levels) or not self.video_levels:
            raise ValueError("video_levels and audio_levels need the same number (>= 1) of levels")
        if any(c % self.norm_groups for c in (*self.video_levels, *self.audio_levels)):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every level's channels")
        if self.video_patch < 1:
            raise ValueError("video_patch must be >= 1")
        if self.frame_ratio < 1 or self.fusion_kernel < 1 or self.fusion_kernel % 2 == 0:
            raise ValueError("frame_ratio >= 1 and an odd fusion_kernel >= 1 are needed")

    @property
    def time_divisor(self) -> int:
        """Video windows must hold a multiple of this many frames (each level halves time)."""
        return 2 ** (len(self.video_levels) - 1)

    def params(self) -> dict:
        params = asdict(self)
        params["video_levels"], params["audio_levels"] = list(self.video_levels), list(self.audio_levels)
        return params


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class VideoResBlock(nn.Module):
    """Factorised space-time residual block on [B, C, T, h, w]: a 3x3 spatial conv, then a 3-tap temporal conv."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, cin), nn.GroupNorm(groups, cout)
        self.spatial = nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))
        self.temporal = _zero(nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0)))
        self.time = nn.Linear(time_dim, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.spatial(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None, None]
        return self.skip(x) + self.temporal(F.silu(self.norm2(h)))


class AudioResBlock(nn.Module):
    """Residual block on the mel as a sequence [B, C, T_a] (mel bins are the input channels)."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, cin), nn.GroupNorm(groups, cout)
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=1)
        self.conv2 = _zero(nn.Conv1d(cout, cout, 3, padding=1))
        self.time = nn.Linear(time_dim, cout)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class EasyFusion(nn.Module):
    """Time-aligned exchange between the streams at one resolution (the choice made here for the
    paper's easy fusion, whose internals it leaves to an appendix).

    The video features are averaged over space ([B, Cv, T]) and the audio features over each video
    frame's r mel frames ([B, Ca, T]); each summary goes through a temporal conv (``kernel`` taps at
    the video frame rate, so +-1 frame of slack) into the other stream's channels and is added:
    broadcast over space for video, repeated over the r mel frames for audio. The projections start
    at zero, so an untrained fusion is the identity and the two streams learn to use each other.
    Cost: two small 1-D convs per level, against MM-Diffusion's cross-attention between streams.
    """

    def __init__(self, video_ch: int, audio_ch: int, ratio: int, kernel: int):
        super().__init__()
        self.ratio = ratio
        self.to_audio = _zero(nn.Conv1d(video_ch, audio_ch, kernel, padding=kernel // 2))
        self.to_video = _zero(nn.Conv1d(audio_ch, video_ch, kernel, padding=kernel // 2))

    def forward(self, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_seq = v.mean(dim=(3, 4))  # [B, Cv, T]
        a_seq = F.avg_pool1d(a, self.ratio)  # [B, Ca, T]
        a = a + self.to_audio(v_seq).repeat_interleave(self.ratio, dim=2)
        v = v + self.to_video(a_seq)[:, :, :, None, None]
        return v, a


class JointUNet(nn.Module):
    """v_theta(v_n, a_n, n) -> (velocity of video, velocity of audio): two U-Nets, one per stream,
    with an easy-fusion block after every level (encoder, middle, decoder) when ``config.fusion``."""

    def __init__(self, config: CmmdConfig):
        super().__init__()
        self.config = config
        c, g, td = config, config.norm_groups, config.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(td, td * 2), nn.SiLU(), nn.Linear(td * 2, td))
        self.v_in = nn.Conv3d(c.video_channels * c.video_patch ** 2, c.video_levels[0], (1, 3, 3), padding=(0, 1, 1))
        self.a_in = nn.Conv1d(c.mel_bins, c.audio_levels[0], 3, padding=1)
        levels = list(zip(c.video_levels, c.audio_levels))

        def fusion(vc, ac):
            return EasyFusion(vc, ac, c.frame_ratio, c.fusion_kernel) if c.fusion else None

        self.down_v, self.down_a, self.down_f, self.pool_v, self.pool_a = (nn.ModuleList() for _ in range(5))
        prev_v, prev_a = levels[0]
        skips = []
        for i, (vc, ac) in enumerate(levels):
            self.down_v.append(VideoResBlock(prev_v, vc, td, g))
            self.down_a.append(AudioResBlock(prev_a, ac, td, g))
            self.down_f.append(fusion(vc, ac) or nn.Identity())
            skips.append((vc, ac))
            last = i == len(levels) - 1
            self.pool_v.append(nn.Identity() if last else nn.Conv3d(vc, vc, 3, stride=2, padding=1))
            self.pool_a.append(nn.Identity() if last else nn.Conv1d(ac, ac, 3, stride=2, padding=1))
            prev_v, prev_a = vc, ac
        self.mid_v, self.mid_a = VideoResBlock(prev_v, prev_v, td, g), AudioResBlock(prev_a, prev_a, td, g)
        self.mid_f = fusion(prev_v, prev_a) or nn.Identity()
        self.up_v, self.up_a, self.up_f, self.upconv_v, self.upconv_a = (nn.ModuleList() for _ in range(5))
        for i, (vc, ac) in reversed(list(enumerate(levels))):
            sv, sa = skips[i]
            self.up_v.append(VideoResBlock(prev_v + sv, vc, td, g))
            self.up_a.append(AudioResBlock(prev_a + sa, ac, td, g))
            self.up_f.append(fusion(vc, ac) or nn.Identity())
            first = i == 0
            self.upconv_v.append(nn.Identity() if first else nn.Conv3d(vc, levels[i - 1][0], 1))
            self.upconv_a.append(nn.Identity() if first else nn.Conv1d(ac, levels[i - 1][1], 1))
            prev_v, prev_a = (vc, ac) if first else levels[i - 1]
        self.v_out = nn.Sequential(nn.GroupNorm(g, c.video_levels[0]), nn.SiLU(),
                                   _zero(nn.Conv3d(c.video_levels[0], c.video_channels * c.video_patch ** 2, (1, 3, 3), padding=(0, 1, 1))))
        self.a_out = nn.Sequential(nn.GroupNorm(g, c.audio_levels[0]), nn.SiLU(),
                                   _zero(nn.Conv1d(c.audio_levels[0], c.mel_bins, 3, padding=1)))

    @staticmethod
    def _fuse(block, v, a):
        return block(v, a) if isinstance(block, EasyFusion) else (v, a)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, C, T, h, w], audio [B, n_mels, r*T], t [B] -> velocities of the same shapes."""
        c = self.config
        if video.shape[2] % c.time_divisor or audio.shape[2] != video.shape[2] * c.frame_ratio:
            raise ValueError(f"need T a multiple of {c.time_divisor} video frames and {c.frame_ratio} mel frames per frame, "
                             f"got video T={video.shape[2]}, audio T={audio.shape[2]}")
        temb = self.time_mlp(timestep_embedding(t, c.time_dim))
        v, a = self.v_in(_to_patches(video, c.video_patch)), self.a_in(audio)
        skips = []
        for bv, ba, bf, pv, pa in zip(self.down_v, self.down_a, self.down_f, self.pool_v, self.pool_a):
            v, a = self._fuse(bf, bv(v, temb), ba(a, temb))
            skips.append((v, a))
            v, a = pv(v), pa(a)
        v, a = self._fuse(self.mid_f, self.mid_v(v, temb), self.mid_a(a, temb))
        for bv, ba, bf, uv, ua in zip(self.up_v, self.up_a, self.up_f, self.upconv_v, self.upconv_a):
            sv, sa = skips.pop()
            v, a = self._fuse(bf, bv(torch.cat([v, sv], 1), temb), ba(torch.cat([a, sa], 1), temb))
            if not isinstance(uv, nn.Identity):
                # channels first, at the low resolution (a 1x1 conv), then nearest up: the next
                # block's convs smooth it; a 3x3x3 conv after upsampling cost a third of the step.
                v = F.interpolate(uv(v), scale_factor=2, mode="nearest")
                a = F.interpolate(ua(a), scale_factor=2, mode="nearest")
        return _from_patches(self.v_out(v), c.video_patch), self.a_out(a)


def _to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, h, w] -> [B, C p^2, T, h / p, w / p] (space-to-depth)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"frame latents {h} x {w} are not divisible by video_patch {p}")
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def _from_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    b, cp, t, hp, wp = x.shape
    c = cp // (p * p)
    x = x.reshape(b, c, p, p, t, hp, wp).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, t, hp * p, wp * p)


# ---- the diffusion: schedule, v-targets, the joint and contrastive losses ---------------------------

def make_scheduler(config: CmmdConfig):
    """diffusers' DDPM schedule (for alphas_cumprod, add_noise and get_velocity), v-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         clip_sample=False, prediction_type="v_prediction")


def _abar(scheduler, t: torch.Tensor, ndim: int) -> torch.Tensor:
    abar = scheduler.alphas_cumprod.to(t.device)[t].float()
    return abar.reshape(-1, *([1] * (ndim - 1)))


def noised(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (the paper's Eq. 2 target, per modality)."""
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def per_sample_joint_loss(model: JointUNet, scheduler, v0, a0, t, eps_v, eps_a, audio_weight: float = 1.0) -> torch.Tensor:
    """L_jdiff of every pair [B]: the mean squared velocity error of video plus ``audio_weight`` times
    that of audio (each modality's mean, so neither counts by its element count)."""
    abar_v, abar_a = _abar(scheduler, t, v0.ndim), _abar(scheduler, t, a0.ndim)
    pred_v, pred_a = model(noised(v0, eps_v, abar_v), noised(a0, eps_a, abar_a), t)
    err_v = (pred_v - velocity(v0, eps_v, abar_v)).pow(2).flatten(1).mean(1)
    err_a = (pred_a - velocity(a0, eps_a, abar_a)).pow(2).flatten(1).mean(1)
    return (err_v + audio_weight * err_a) / (1 + audio_weight)


@dataclass
class ContrastiveTerms:
    loss: torch.Tensor  # what is minimised
    positive: torch.Tensor  # mean L_jdiff of the matched pairs
    negative_audio: torch.Tensor | None  # mean L_jdiff(a-, v) (before the cap), None without negatives
    negative_video: torch.Tensor | None


def contrastive_loss(model: JointUNet, scheduler, v0: torch.Tensor, a0: torch.Tensor, t: torch.Tensor,
                     eps_v: torch.Tensor, eps_a: torch.Tensor, *, eta: float = 0.0,
                     negative_audio: tuple[torch.Tensor, torch.Tensor] | None = None,
                     negative_video: tuple[torch.Tensor, torch.Tensor] | None = None,
                     cap: float = 2.0, audio_weight: float = 1.0) -> ContrastiveTerms:
    """Eq. (6): L_jdiff(a, v) - eta E_{a-} L_jdiff(a-, v) - eta E_{v-} L_jdiff(a, v-).

    ``negative_audio = (rows, a_neg)``: for the positives at ``rows`` (a random subset of the batch),
    their negative audio; the negative pair keeps its positive's video, timestep and noise, so the
    two losses differ only by the mismatch. Likewise ``negative_video``. ``eta = 0`` (or no
    negatives) is nCMMD: the plain joint loss.

    The negative terms are maximised, and a loss that is maximised is unbounded: a model that tells
    negatives apart could raise their error without end. Each negative's loss therefore enters as
    min(L_neg, cap x its positive's L_jdiff, detached): past ``cap`` times the matched error it
    gives no more gradient (``cap = 0``: uncapped, the paper's form as written).
    """
    positive = per_sample_joint_loss(model, scheduler, v0, a0, t, eps_v, eps_a, audio_weight)
    loss = positive.mean()
    terms: dict[str, torch.Tensor | None] = {"audio": None, "video": None}
    if eta > 0:
        for kind, negative in (("audio", negative_audio), ("video", negative_video)):
            if negative is None or not len(negative[0]):
                continue
            rows, x_neg = negative
            v_in, a_in = (v0[rows], x_neg) if kind == "audio" else (x_neg, a0[rows])
            neg = per_sample_joint_loss(model, scheduler, v_in, a_in, t[rows], eps_v[rows], eps_a[rows], audio_weight)
            terms[kind] = neg.mean().detach()
            capped = torch.minimum(neg, cap * positive[rows].detach()) if cap > 0 else neg
            loss = loss - eta * capped.mean()
    return ContrastiveTerms(loss, positive.mean().detach(), terms["audio"], terms["video"])


# ---- conditional sampling: DDIM with reconstruction guidance (Eq. 3) ---------------------------------

def ddim_timesteps(scheduler, steps: int) -> list[int]:
    """``steps`` timesteps from T - 1 down ("trailing" spacing: even few steps start from pure noise)."""
    total = scheduler.config.num_train_timesteps
    if not 1 <= steps <= total:
        raise ValueError(f"DDIM steps must be within 1..{total}, got {steps}")
    return [int(round(total - 1 - i * total / steps)) for i in range(steps)]


def sample_conditional(model: JointUNet, scheduler, known: torch.Tensor, known_is: str, *, steps: int = 50,
                       guidance: float = 0.0, generator: torch.Generator | None = None,
                       on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Generate the other modality given ``known`` (``known_is`` "video": V2A, given v0 [B, C, T, h, w];
    "audio": A2V, given a0 [B, n_mels, r*T]) with DDIM (eta 0) and reconstruction guidance.

    Eq. (5): the known modality's noisy version follows q(x_n | x_0) with one noise drawn at the start
    (fixed over the steps). At step n the model's x0-estimate of the unknown modality, x_bar, is
    corrected by Eq. (3): x_hat = x_bar - lambda sqrt(abar_n) grad_{x_n} ||known - known_hat||^2 (the
    known modality's own x0-estimate, summed over its elements); then
    x_{n-1} = sqrt(abar_{n-1}) x_hat + sqrt(1 - abar_{n-1}) eps_hat (the model's noise estimate).
    ``guidance = 0`` is the replacement method (no gradient is taken). The noise comes from
    ``generator`` on the host, so a seed gives the same samples on any device.
    """
    if known_is not in ("video", "audio"):
        raise ValueError(f"known_is must be 'video' or 'audio', got {known_is!r}")
    c = model.config
    device = known.device
    batch = known.shape[0]
    if known_is == "video":
        frames = known.shape[2]
        unknown_shape = (batch, c.mel_bins, frames * c.frame_ratio)
    else:
        frames = known.shape[2] // c.frame_ratio
        unknown_shape = (batch, c.video_channels, frames, *_latent_hw(model, known))
    eps_known = torch.randn(known.shape, generator=generator).to(device)
    x = torch.randn(unknown_shape, generator=generator).to(device)
    times = ddim_timesteps(scheduler, steps)
    alphas = scheduler.alphas_cumprod.float()
    for i, t_now in enumerate(times):
        abar = alphas[t_now].to(device)
        abar_next = alphas[times[i + 1]].to(device) if i + 1 < len(times) else torch.tensor(1.0, device=device)
        known_n = abar.sqrt() * known + (1 - abar).sqrt() * eps_known
        tt = torch.full((batch,), t_now, device=device, dtype=torch.long)
        with torch.enable_grad() if guidance > 0 else torch.no_grad():
            x_in = x.detach().requires_grad_(guidance > 0)
            pv, pa = (model(known_n, x_in, tt) if known_is == "video" else model(x_in, known_n, tt))
            pred_known, pred_unknown = (pv, pa) if known_is == "video" else (pa, pv)
            x0_unknown = abar.sqrt() * x_in - (1 - abar).sqrt() * pred_unknown
            eps_unknown = (1 - abar).sqrt() * x_in + abar.sqrt() * pred_unknown
            if guidance > 0:
                x0_known = abar.sqrt() * known_n - (1 - abar).sqrt() * pred_known
                error = (known - x0_known).pow(2).sum()
                # allow_unused: without fusion the known stream never sees x_n, the gradient is zero
                grad, = torch.autograd.grad(error, x_in, allow_unused=True)
                if grad is not None:
                    x0_unknown = x0_unknown - guidance * abar.sqrt() * grad
        x = (abar_next.sqrt() * x0_unknown + (1 - abar_next).sqrt() * eps_unknown).detach()
        if on_step is not None:
            on_step(i + 1)
    return x


def _latent_hw(model: JointUNet, audio: torch.Tensor) -> Sequence[int]:
    hw = getattr(model, "latent_hw", None)
    if hw is None:
        raise ValueError("audio-to-video sampling needs model.latent_hw (the frame latents' h, w), set when it was built")
    return tuple(hw)


def build_model(config: CmmdConfig, latent_hw: Sequence[int]) -> JointUNet:
    model = JointUNet(config)
    model.latent_hw = tuple(int(s) for s in latent_hw)
    return model
