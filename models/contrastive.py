"""Contrastive projection heads over frozen tower features: CLAP-style (audio-text) and CAVP-style
(audio-video, per second, Eq. (1) of DiffGAP with Diff-Foley's temporal negatives)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    embed_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def params(self) -> dict:
        return asdict(self)


class ProjectionHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear, plus a linear skip; L2-normalised output."""

    def __init__(self, in_dim: int, config: HeadConfig):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.embed_dim),
        )
        self.skip = nn.Linear(in_dim, config.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return F.normalize(self.mlp(x) + self.skip(x), dim=-1)


class _TwoTowerHead(nn.Module):
    def __init__(self, audio_dim: int, other_dim: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.audio = ProjectionHead(audio_dim, config)
        self.other = ProjectionHead(other_dim, config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()


class ClapHead(_TwoTowerHead):
    """Audio <-> text: symmetric InfoNCE over the batch with a learnable temperature."""

    def __init__(self, audio_dim: int = 512, text_dim: int = 384, config: HeadConfig = HeadConfig()):
        super().__init__(audio_dim, text_dim, config)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        return self.audio(audio)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.other(text)

    def loss(self, audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return info_nce(self.embed_audio(audio), self.embed_text(text), self.scale())


class CavpHead(_TwoTowerHead):
    """Audio <-> video per second (Eq. 1): for second i of clip b, the positive is the other
    modality's second i of clip b; negatives are second i of the other clips in the batch plus,
    as in Diff-Foley, the other seconds of the same clip (temporally shifted windows)."""

    def __init__(self, audio_dim: int = 512, video_dim: int = 1280, config: HeadConfig = HeadConfig()):
        super().__init__(audio_dim, video_dim, config)

    def embed_audio(self, audio_seconds: torch.Tensor) -> torch.Tensor:
        return self.audio(audio_seconds)

    def embed_video(self, video_seconds: torch.Tensor) -> torch.Tensor:
        return self.other(video_seconds)

    @staticmethod
    def pool(per_second: torch.Tensor) -> torch.Tensor:
        """Clip embedding: the normalised mean of the per-second embeddings."""
        return F.normalize(per_second.mean(dim=1), dim=-1)

    def loss(self, audio_seconds: torch.Tensor, video_seconds: torch.Tensor, temporal_negatives: bool = True) -> torch.Tensor:
        a = self.embed_audio(audio_seconds)  # [B, S, d]
        v = self.embed_video(video_seconds)
        scale = self.scale()
        return 0.5 * (
            per_second_nce(a, v, scale, temporal_negatives) + per_second_nce(v, a, scale, temporal_negatives)
        )


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` matches row i of `b`."""
    logits = scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def per_second_nce(anchor: torch.Tensor, other: torch.Tensor, scale: torch.Tensor, temporal_negatives: bool) -> torch.Tensor:
    """Eq. (1) for anchors [B, S, d] against `other` [B, S, d], averaged over clips and seconds."""
    batch, seconds, _ = anchor.shape
    logits = scale * torch.einsum("bsd,msd->bsm", anchor, other)  # second s of clip b vs second s of clip m
    if temporal_negatives and seconds > 1:
        within_clip = scale * torch.einsum("bsd,btd->bst", anchor, other)  # second s vs second t, same clip
        same_second = torch.eye(seconds, dtype=torch.bool, device=anchor.device)
        # Masked after scaling: scale * -inf would give the temperature a NaN gradient.
        within_clip = within_clip.masked_fill(same_second, float("-inf"))  # the positive is already above
        logits = torch.cat([logits, within_clip], dim=-1)
    target = torch.arange(batch, device=anchor.device)[:, None].expand(batch, seconds)
    return F.cross_entropy(logits.reshape(batch * seconds, -1), target.reshape(-1))
