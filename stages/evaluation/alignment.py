"""Diff-Foley's alignment accuracy (Acc): a classifier of aligned vs shifted (video, audio) pairs
over motion and onset envelopes, trained on held-out real clips.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from models.alignment import AlignmentClassifier


# ---- alignment classifier (Diff-Foley's Acc) ----------------------------------------------------

@dataclass(frozen=True)
class AlignmentConfig:
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 1e-3
    hidden: int = 32
    weight_decay: float = 0.01
    seed: int = 0
    fps: float = 8.0  # rate of the motion / onset envelopes
    max_lag: int = 4  # envelope cross-correlation at lags -max_lag..max_lag frames
    min_shift: int = 2  # a shifted negative moves the audio by at least this many frames

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.hidden < 1 or self.max_lag < 0 or self.min_shift < 1 or not self.fps > 0:
            raise ValueError("alignment config needs steps, batch_size, hidden, min_shift >= 1, max_lag >= 0 and fps > 0")

    def params(self) -> dict:
        return asdict(self)


@dataclass
class AlignmentPairs:
    """What the alignment classifier sees of N (video, audio) pairs.

    motion [N, T]: the video's motion envelope (mean absolute frame difference at ``fps``);
    onsets [N, T]: the audio's onset-strength envelope on the same frame grid;
    video_per_second / audio_per_second [N, S, d]: CAVP per-second embeddings (what is heard vs seen).
    """

    motion: np.ndarray
    onsets: np.ndarray
    video_per_second: np.ndarray
    audio_per_second: np.ndarray

    def __post_init__(self) -> None:
        # contiguous float32: torch.from_numpy refuses reversed / strided views
        self.motion = np.ascontiguousarray(self.motion, np.float32)
        self.onsets = np.ascontiguousarray(self.onsets, np.float32)
        self.video_per_second = np.ascontiguousarray(self.video_per_second, np.float32)
        self.audio_per_second = np.ascontiguousarray(self.audio_per_second, np.float32)
        n = {len(self.motion), len(self.onsets), len(self.video_per_second), len(self.audio_per_second)}
        if len(n) != 1 or self.motion.shape != self.onsets.shape or self.video_per_second.shape != self.audio_per_second.shape:
            raise ValueError(f"alignment pairs disagree in shape: motion {self.motion.shape}, onsets {self.onsets.shape}, "
                             f"video {self.video_per_second.shape}, audio {self.audio_per_second.shape}")

    def __len__(self) -> int:
        return len(self.motion)

    def take(self, rows) -> "AlignmentPairs":
        return AlignmentPairs(self.motion[rows], self.onsets[rows], self.video_per_second[rows], self.audio_per_second[rows])

    def with_audio(self, onsets: np.ndarray, audio_per_second: np.ndarray) -> "AlignmentPairs":
        """The same videos with other audio (generated, swapped or shifted)."""
        return AlignmentPairs(self.motion, onsets, self.video_per_second, audio_per_second)


def motion_envelope(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames [T, H, W, C] -> [T] (first frame 0)."""
    f = np.asarray(frames, np.float32)
    if f.ndim != 4 or len(f) < 1:
        raise ValueError(f"need frames [T, H, W, C], got shape {f.shape}")
    return np.concatenate([[0.0], np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))]).astype(np.float32)


def onset_envelope(wave: np.ndarray, rate: int, fps: float, frames: int, hop: int = 256) -> np.ndarray:
    """Onset strength (librosa, spectral flux of a log-mel) max-pooled into ``frames`` bins at ``fps``."""
    import librosa

    wave = np.asarray(wave, np.float32)
    if wave.size < 2 * hop:
        return np.zeros(frames, np.float32)
    strength = librosa.onset.onset_strength(y=wave, sr=rate, hop_length=hop)
    bins = np.minimum((np.arange(len(strength)) * hop / rate * fps).astype(int), frames - 1)
    out = np.zeros(frames, np.float32)
    np.maximum.at(out, bins, strength.astype(np.float32))
    return out


def onset_envelopes(audio: np.ndarray, rate: int, fps: float, frames: int) -> np.ndarray:
    return np.stack([onset_envelope(w, rate, fps, frames) for w in audio]) if len(audio) else np.zeros((0, frames), np.float32)


def _tensors(pairs: AlignmentPairs) -> tuple[torch.Tensor, ...]:
    import torch

    return tuple(torch.from_numpy(x) for x in (pairs.motion, pairs.onsets, pairs.video_per_second, pairs.audio_per_second))


def negatives(pairs: AlignmentPairs, rng: np.random.Generator, fps: float = 8.0, min_shift: int = 2) -> AlignmentPairs:
    """Misaligned pairs: half swapped (another clip's audio), half shifted (the clip's own audio
    rolled by min_shift..T-min_shift frames; its per-second embeddings by the nearest whole second)."""
    n, frames = pairs.onsets.shape
    seconds = pairs.audio_per_second.shape[1]
    other = (np.arange(n) + rng.integers(1, max(2, n), size=n)) % n
    shifts = rng.integers(min_shift, max(min_shift + 1, frames - min_shift + 1), size=n)
    shifted_onsets = np.stack([np.roll(o, int(k)) for o, k in zip(pairs.onsets, shifts)])
    shifted_ps = np.stack([np.roll(a, int(round(k / fps)) % seconds, axis=0) for a, k in zip(pairs.audio_per_second, shifts)])
    use_shift = rng.random(n) < 0.5 if frames > 2 * min_shift else np.zeros(n, bool)
    onsets = np.where(use_shift[:, None], shifted_onsets, pairs.onsets[other])
    per_second = np.where(use_shift[:, None, None], shifted_ps, pairs.audio_per_second[other])
    return pairs.with_audio(onsets, per_second)


def train_alignment(pairs: AlignmentPairs, config: AlignmentConfig = AlignmentConfig()) -> AlignmentClassifier:
    """Train on aligned pairs (label 1) vs fresh swapped / shifted negatives (label 0) each step."""
    import torch
    from models.alignment import AlignmentClassifier
    from torch import nn

    if len(pairs) < 2:
        raise ValueError(f"the alignment classifier needs at least 2 training clips, got {len(pairs)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = AlignmentClassifier(pairs.video_per_second.shape[1], config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model.train()
    for _ in range(config.steps):
        rows = rng.choice(len(pairs), config.batch_size, replace=len(pairs) < config.batch_size)
        positive = pairs.take(rows)
        negative = negatives(positive, rng, config.fps, config.min_shift)
        x = [torch.cat([p, q]) for p, q in zip(_tensors(positive), _tensors(negative))]
        y = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))])
        loss = nn.functional.binary_cross_entropy_with_logits(model(*x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def aligned_probability(model: AlignmentClassifier, pairs: AlignmentPairs) -> np.ndarray:
    import torch

    with torch.no_grad():
        model.eval()
        return torch.sigmoid(model(*_tensors(pairs))).numpy()


def alignment_accuracy(model: AlignmentClassifier, pairs: AlignmentPairs) -> float:
    """Acc (%): share of (video, audio) pairs classified as aligned."""
    return float(100.0 * np.mean(aligned_probability(model, pairs) > 0.5))


def classifier_accuracy(model: AlignmentClassifier, pairs: AlignmentPairs, seed: int = 1) -> float:
    """Accuracy (%) on real aligned pairs + as many misaligned ones: how much the Acc can be trusted."""
    rng = np.random.default_rng(seed)
    pos = aligned_probability(model, pairs) > 0.5
    neg = aligned_probability(model, negatives(pairs, rng, model.config.fps, model.config.min_shift)) <= 0.5
    return float(100.0 * np.mean(np.concatenate([pos, neg])))
