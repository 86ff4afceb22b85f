"""The ``video_frames`` feature: uint8 frames [N, T, size, size, 3] per shard, decoded once with decord.

Frames are sampled at ``fps`` over ``seconds`` of each clip (its first, or with crop="centre" its middle, ones) (nearest source frame; a
shorter clip repeats its last frame, the way stages.ingest.decode.decode_frames fits it), the shorter
side resized to ``size`` and centre-cropped. A clip without a video stream, or whose video cannot
be decoded, is quarantined with its one-line reason; the rest of the shard goes on.

    from stages.core.store import FeatureStore
    frames = FeatureStore(root).read_arrays("demo", "video_frames").arrays["frames"]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from stages.core.errors import ConfigError
from stages.features.base import (ShardFeature, ShardJob, ShardOutput, content_hash_meta, decode_clips, register_feature,
                                  registered_feature)
from stages.ingest.decode import CROPS, FrameSpec, load_frames
from stages.core.store import feature_key

VIDEO_FRAMES_FEATURE = "video_frames"
# Bump when the code changes the frames it stores: the key changes and old caches stay valid.
FRAMES_CODE_VERSION = "1"


@dataclass(frozen=True)
class FrameParams:
    fps: float = 4.0
    size: int = 64
    seconds: float = 4.0
    crop: str = "start"  # a longer clip: its first or its middle `seconds` (as ClipLength.crop)

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"crop must be 'start' or 'centre', got {self.crop!r}")
        if not 0 < self.fps <= 60:
            raise ConfigError(f"fps must be within (0, 60], got {self.fps}")
        if not 8 <= self.size <= 1024:
            raise ConfigError(f"frame size must be within 8..1024, got {self.size}")
        if self.seconds <= 0 or self.frame_spec().n_frames < 1:
            raise ConfigError(f"seconds x fps must give at least one frame, got {self.seconds} s at {self.fps} fps")

    def params(self) -> dict:
        params = asdict(self)
        return params if self.crop != "start" else {k: v for k, v in params.items() if k != "crop"}  # keys before crop

    def key(self) -> str:
        return feature_key(VIDEO_FRAMES_FEATURE, self.params(), FRAMES_CODE_VERSION)

    def frame_spec(self) -> FrameSpec:
        return FrameSpec(fps=self.fps, size=self.size, seconds=self.seconds, crop=self.crop)

    @property
    def n_frames(self) -> int:
        return self.frame_spec().n_frames


@register_feature
class VideoFrames(ShardFeature):
    name, code_version, params_type = VIDEO_FRAMES_FEATURE, FRAMES_CODE_VERSION, FrameParams
    group, kinds = "vae", ("numpy", "zarr")
    description = "uint8 video frames [T, size, size, 3] per clip (decord), the frame VAE's input."
    sets_threads = False  # decord, no torch

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Decode every clip's frames; clips without usable video are quarantined."""
        spec = FrameParams(**job.params).frame_spec()
        ok_ids, hashes, frames, quarantined = decode_clips(job, lambda uri, span: load_frames(uri, spec, job.storage_options, span))
        if frames:
            stacked = np.stack(frames).astype(np.uint8, copy=False)
        else:
            stacked = np.zeros((0, spec.n_frames, spec.size, spec.size, 3), np.uint8)
        return ShardOutput(ok_ids, {"frames": stacked}, quarantined, sample_meta=content_hash_meta(hashes))


compute_frames_shard = registered_feature(VIDEO_FRAMES_FEATURE).compute_shard


def frames_preview_png(frames: np.ndarray, shown: int = 8, height: int = 64) -> bytes:
    """One row per clip: ``shown`` evenly spaced frames of uint8 [n, T, H, W, 3] (stages.core.preview style)."""
    import io

    from PIL import Image

    rows = []
    for clip in np.asarray(frames):
        picks = np.linspace(0, len(clip) - 1, num=min(shown, len(clip))).round().astype(int)
        tiles = [
            np.pad(np.asarray(Image.fromarray(clip[i]).resize((height, height), Image.Resampling.NEAREST)),
                   ((2, 2), (2, 2), (0, 0)), constant_values=255)
            for i in picks
        ]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()
