"""CMMD's data: aligned (video, audio) windows cut from cached features, and negatives made from them.

    frames  [N, T_clip, C, h, w]   frame VAE latents at ``fps`` (cmmd_frame_latents, the means)
    mels    [N, n_mels, F_clip]    mel latents (mel_latents): r = mel frames per video frame, exactly

A window of ``frames`` video frames starting at frame o is frames[o : o + frames] with mels
[r o : r (o + frames)]: the video frame rate is chosen so that r is an integer (CMMD_FPS = 22050 /
2560 with the vocoder's hop of 256 gives r = 10), so the two agree exactly, never by rounding.
Nothing is decoded again: every window and every negative is a slice of the cached arrays.

Negatives (CMMD 2.2, on the cached features): for a positive window (a, v),
    shift    the same clip's audio (or video) moved by a random +-[min_shift, max_shift] seconds
    segment  a split point; one side from another clip's window (a_d), the other from a
    swap     another clip's window in place of a
A clip too short for any shift of its window falls back to a swap (counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# 22050 Hz / hop 256 = 86.13 mel frames per second; 10 of them per video frame -> 8.613 fps.
MEL_RATE = 22050 / 256
FRAME_RATIO = 10
CMMD_FPS = MEL_RATE / FRAME_RATIO
NEGATIVE_KINDS = ("shift", "segment", "swap")
# Frames that differ from the clip's last frame by at most this (float16 latents of one repeated
# frame are equal to rounding) count as the repeated tail of a clip shorter than the cache.
_REPEAT_TOLERANCE = 1e-3


@dataclass
class ClipWindows:
    """Aligned cached arrays of clips (one modality pair per row) and their usable lengths."""

    clip_ids: list[str]
    frames: np.ndarray  # [N, T, C, h, w] float32
    mels: np.ndarray  # [N, n_mels, F] float32
    valid_frames: np.ndarray  # [N] int: frames before a clip's repeated tail (its real length)
    splits: list[str] = field(default_factory=list)
    ratio: int = FRAME_RATIO

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.mels) or len(self.frames) != len(self.clip_ids):
            raise ValueError("frames, mels and clip ids need one row per clip")
        if self.mels.shape[2] < self.frames.shape[1] * self.ratio:
            usable = self.mels.shape[2] // self.ratio
            self.frames = self.frames[:, :usable]
            self.valid_frames = np.minimum(self.valid_frames, usable)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def subset(self, rows: Sequence[int]) -> "ClipWindows":
        rows = list(rows)
        return ClipWindows([self.clip_ids[i] for i in rows], self.frames[rows], self.mels[rows], self.valid_frames[rows],
                           [self.splits[i] for i in rows] if self.splits else [], self.ratio)

    def of_split(self, split: str) -> "ClipWindows":
        return self.subset([i for i, s in enumerate(self.splits) if s == split])

    def max_offset(self, rows: np.ndarray, frames: int) -> np.ndarray:
        """The last window start inside each clip's own frames (0 when the clip is shorter than a window)."""
        return np.maximum(0, np.minimum(self.valid_frames[rows], self.frames.shape[1]) - frames)

    def video(self, rows: np.ndarray, offsets: np.ndarray, frames: int) -> np.ndarray:
        """[B, C, frames, h, w]: the model's layout (channels first, then time)."""
        out = np.stack([self.frames[r, o : o + frames] for r, o in zip(rows, offsets)])
        return np.ascontiguousarray(out.transpose(0, 2, 1, 3, 4))

    def audio(self, rows: np.ndarray, mel_offsets: np.ndarray, frames: int) -> np.ndarray:
        length = frames * self.ratio
        return np.stack([self.mels[r, :, m : m + length] for r, m in zip(rows, mel_offsets)])


def valid_frame_counts(frames: np.ndarray) -> np.ndarray:
    """Per clip, the frames before the repeated tail: video_frames repeats a shorter clip's last
    frame up to the cached length. A clip that is still at its end (a still picture) only loses
    window starts, never gets a window past its end."""
    frames = np.asarray(frames, np.float32)
    last = frames[:, -1:]
    differs = np.abs(frames - last).reshape(len(frames), frames.shape[1], -1).max(axis=2) > _REPEAT_TOLERANCE
    counts = np.ones(len(frames), np.int64)
    for i, row in enumerate(differs):
        changed = np.flatnonzero(row)
        counts[i] = changed[-1] + 2 if len(changed) else 1
    return np.minimum(counts, frames.shape[1])


@dataclass(frozen=True)
class NegativeConfig:
    kinds: tuple[str, ...] = NEGATIVE_KINDS
    fraction: float = 0.25  # share of each batch that gets a negative audio, and as many a negative video
    min_shift: float = 0.2  # seconds: "hundreds of ms" (the paper); below one event gap of the demo (0.4 s)
    max_shift: float = 0.6
    min_split: float = 0.25  # segment split point, as a share of the window
    max_split: float = 0.75

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [k for k in self.kinds if k not in NEGATIVE_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"negative kinds must be a non-empty subset of {list(NEGATIVE_KINDS)}, got {list(self.kinds)}")
        if not 0 < self.fraction <= 1 or not 0 < self.min_shift <= self.max_shift or not 0 < self.min_split <= self.max_split < 1:
            raise ValueError("need 0 < fraction <= 1, 0 < min_shift <= max_shift and 0 < min_split <= max_split < 1")


@dataclass
class Batch:
    video: np.ndarray  # [B, C, T, h, w]
    audio: np.ndarray  # [B, n_mels, r T]
    rows: np.ndarray
    offsets: np.ndarray
    negative_audio: tuple[np.ndarray, np.ndarray] | None = None  # (batch rows, audio [b, n_mels, r T])
    negative_video: tuple[np.ndarray, np.ndarray] | None = None
    kinds: dict[str, int] = field(default_factory=dict)  # "<modality> <kind>" -> count (fallbacks included)


def _other_rows(rng: np.random.Generator, rows: np.ndarray, n: int) -> np.ndarray:
    """For each row, a different clip's row (n clips, n >= 2)."""
    other = rng.integers(0, n - 1, len(rows))
    return other + (other >= rows)


def draw_batch(data: ClipWindows, rows: np.ndarray, frames: int, rng: np.random.Generator,
               negatives: NegativeConfig | None = None) -> Batch:
    """Positive windows of ``rows`` at random offsets inside each clip, and (``negatives``) a
    negative audio for a random ``fraction`` of them and a negative video for another draw."""
    rows = np.asarray(rows)
    offsets = rng.integers(0, data.max_offset(rows, frames) + 1)
    batch = Batch(data.video(rows, offsets, frames), data.audio(rows, offsets * data.ratio, frames), rows, offsets)
    if negatives is None:
        return batch
    count = max(1, int(round(negatives.fraction * len(rows))))
    batch.negative_audio = _negatives(data, batch, "audio", rng.choice(len(rows), count, replace=False), frames, rng, negatives)
    batch.negative_video = _negatives(data, batch, "video", rng.choice(len(rows), count, replace=False), frames, rng, negatives)
    return batch


def _negatives(data: ClipWindows, batch: Batch, modality: str, picks: np.ndarray, frames: int,
               rng: np.random.Generator, config: NegativeConfig) -> tuple[np.ndarray, np.ndarray]:
    rows, offsets = batch.rows[picks], batch.offsets[picks]
    # units of the modality: mel frames for audio, video frames for video
    unit_rate = MEL_RATE if modality == "audio" else MEL_RATE / data.ratio
    scale = data.ratio if modality == "audio" else 1
    length = frames * scale
    cut = (lambda r, o: data.audio(np.array([r]), np.array([o]), frames)[0]) if modality == "audio" else (
        lambda r, o: data.video(np.array([r]), np.array([o]), frames)[0])
    out = []
    for r, o in zip(rows, offsets):
        kind = config.kinds[rng.integers(len(config.kinds))]
        start = o * scale
        if kind == "shift":
            last = int(data.max_offset(np.array([r]), frames)[0]) * scale
            low, high = int(np.ceil(config.min_shift * unit_rate)), int(np.floor(config.max_shift * unit_rate))
            moves = [s for s in range(-high, high + 1) if abs(s) >= max(1, low) and 0 <= start + s <= last]
            if moves:
                out.append(cut(r, start + moves[rng.integers(len(moves))]))
                batch.kinds[f"{modality} shift"] = batch.kinds.get(f"{modality} shift", 0) + 1
                continue
            kind = "swap"  # too short to shift: another clip instead
            batch.kinds[f"{modality} shift -> swap"] = batch.kinds.get(f"{modality} shift -> swap", 0) + 1
        other = int(_other_rows(rng, np.array([r]), len(data))[0])
        other_start = int(rng.integers(0, data.max_offset(np.array([other]), frames)[0] + 1)) * scale
        donor = cut(other, other_start)
        if kind == "segment":
            own = cut(r, start)
            split = int(rng.integers(int(config.min_split * length), int(config.max_split * length) + 1))
            axis = 1  # time: [n_mels, F] for audio, [C, T, h, w] for video
            left, right = (donor, own) if rng.random() < 0.5 else (own, donor)
            out.append(np.concatenate([np.take(left, range(split), axis=axis), np.take(right, range(split, length), axis=axis)], axis=axis))
        else:
            out.append(donor)
        batch.kinds[f"{modality} {kind}"] = batch.kinds.get(f"{modality} {kind}", 0) + 1
    return picks, np.stack(out)


def evaluation_windows(data: ClipWindows, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every clip's first window (offset 0), the deterministic evaluation input: (video, audio, rows)."""
    rows = np.arange(len(data))
    offsets = np.zeros(len(data), np.int64)
    return data.video(rows, offsets, frames), data.audio(rows, offsets, frames), rows
