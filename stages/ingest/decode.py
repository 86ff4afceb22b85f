"""Decode clips: audio through soundfile or PyAV (resampled with soxr), frames through decord.

A clip that cannot be used raises ``ClipError`` with a one-line reason; the caller quarantines
the clip and the shard goes on.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import asdict, dataclass

import numpy as np

# Containers soundfile reads directly (3600 clips/s for WAV); everything else goes through PyAV.
SOUNDFILE_EXTENSIONS = {".wav", ".flac", ".ogg", ".aiff", ".aif"}
MEDIA_EXTENSIONS = SOUNDFILE_EXTENSIONS | {".mp4", ".m4a", ".mkv", ".webm", ".mov", ".avi", ".mp3", ".aac", ".opus"}


class ClipError(Exception):
    """A single clip is unusable; ``str(err)`` is the one-line reason kept in the quarantine."""


@dataclass(frozen=True)
class AudioSpec:
    """How a clip's audio becomes a fixed-length mono array."""

    sample_rate: int = 22050
    seconds: float = 4.0
    min_seconds: float = 1.0  # shorter clips are quarantined rather than padded into mostly silence
    fit: str = "pad"  # "pad" with zeros or "tile" (repeat) a clip shorter than `seconds`
    silence_dbfs: float = -60.0  # a clip whose peak is below this is quarantined as silent

    def params(self) -> dict:
        return asdict(self)

    @property
    def n_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))


@dataclass(frozen=True)
class FrameSpec:
    """How a clip's video becomes uint8 frames [T, size, size, 3]."""

    fps: float = 8.0
    size: int = 64
    seconds: float = 4.0

    def params(self) -> dict:
        return asdict(self)

    @property
    def n_frames(self) -> int:
        return int(round(self.seconds * self.fps))


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Whole file through fsspec (clips are small); a missing or empty file is a ClipError."""
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ClipError("media file not found") from None
    except OSError as exc:
        raise ClipError(f"cannot read media file: {_one_line(exc)}") from None
    if not data:
        raise ClipError("empty file (0 bytes)")
    return data


def decode_audio(data: bytes, name: str = "") -> tuple[np.ndarray, int]:
    """Decode to mono float32 at the file's own rate; returns (samples, sample_rate)."""
    ext = os.path.splitext(name)[1].lower()
    if ext in SOUNDFILE_EXTENSIONS:
        import soundfile

        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
            return samples.mean(axis=1), int(rate)
        except Exception:  # noqa: BLE001 - fall through to FFmpeg, which reads more variants
            pass
    return _decode_audio_pyav(data)


def _decode_audio_pyav(data: bytes) -> tuple[np.ndarray, int]:
    import av

    try:
        # Tags (title, artist...) in another encoding than UTF-8 must not make a good clip unreadable.
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="replace")
    except (av.error.FFmpegError, ValueError) as exc:
        raise ClipError(f"not a readable media file: {_one_line(exc)}") from None
    with container:
        if not container.streams.audio:
            raise ClipError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        chunks = []
        try:
            for frame in container.decode(stream):
                plane = frame.to_ndarray()
                if plane.dtype.kind == "i":  # s16/s32: full scale is 2**(bits-1), as soundfile reads them
                    plane = plane.astype(np.float32) / float(-np.iinfo(plane.dtype).min)
                elif plane.dtype.kind == "u":  # unsigned PCM (pcm_u8 in AVI/MOV): silence is the midpoint
                    half = float(np.iinfo(plane.dtype).max // 2 + 1)
                    plane = (plane.astype(np.float32) - half) / half
                if not frame.format.is_planar:  # interleaved: [1, samples*channels]
                    plane = plane.reshape(-1, len(frame.layout.channels)).T
                plane = plane.astype(np.float32, copy=False)
                chunks.append(plane[0] if len(plane) == 1 else plane.mean(axis=0))  # mono needs no mean
        except av.error.FFmpegError as exc:
            if not chunks:
                raise ClipError(f"cannot decode audio: {_one_line(exc)}") from None
            # A truncated file decodes up to the damage; the duration check decides.
    if not chunks:
        raise ClipError("audio stream has no samples")
    return np.concatenate(chunks), int(rate)


def prepare_audio(samples: np.ndarray, rate: int, spec: AudioSpec) -> np.ndarray:
    """Resample (soxr), check length and level, then pad/tile/crop to exactly ``spec.seconds``."""
    import soxr

    if not rate or rate <= 0:
        raise ClipError(f"audio stream has no sample rate ({rate!r})")
    if not np.all(np.isfinite(samples)):
        raise ClipError("audio holds NaN or Inf samples")
    seconds = len(samples) / rate
    if seconds < spec.min_seconds:
        raise ClipError(f"audio too short: {seconds:.2f} s < {spec.min_seconds:g} s")
    if rate != spec.sample_rate:
        samples = soxr.resample(samples, rate, spec.sample_rate, quality="HQ").astype(np.float32)
    peak = float(np.max(np.abs(samples)))
    if peak <= 10 ** (spec.silence_dbfs / 20):
        level = "-inf" if peak == 0 else f"{20 * np.log10(peak):.0f}"
        raise ClipError(f"silent audio (peak {level} dBFS < {spec.silence_dbfs:g} dBFS)")
    target = spec.n_samples
    if len(samples) < target:
        if spec.fit == "tile":
            samples = np.tile(samples, -(-target // len(samples)))
        else:
            samples = np.pad(samples, (0, target - len(samples)))
    return np.ascontiguousarray(samples[:target], dtype=np.float32)


def load_audio(uri: str, spec: AudioSpec, storage_options: dict | None = None) -> np.ndarray:
    """Read, decode and fit one clip's audio: float32 [spec.n_samples]."""
    samples, rate = decode_audio(read_bytes(uri, storage_options), uri)
    return prepare_audio(samples, rate, spec)


def decode_frames(data: bytes, spec: FrameSpec) -> np.ndarray:
    """Frames at ``spec.fps`` (nearest source frame), shorter side resized then centre-cropped."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    except Exception as exc:  # noqa: BLE001 - decord raises its own DECORDError and RuntimeError
        message = _one_line(exc)
        if "video stream" in message.lower():
            raise ClipError("no video stream") from None
        raise ClipError(f"cannot decode video: {message[:200]}") from None
    total = len(reader)
    if total == 0:
        raise ClipError("video stream has no frames")
    source_fps = reader.get_avg_fps() or spec.fps
    times = (np.arange(spec.n_frames) + 0.5) / spec.fps
    indices = np.minimum((times * source_fps).astype(np.int64), total - 1)
    try:
        frames = reader.get_batch(list(indices)).asnumpy()
    except Exception as exc:  # noqa: BLE001
        raise ClipError(f"cannot decode video frames: {_one_line(exc)[:200]}") from None
    return resize_center_crop(frames, spec.size)


def resize_center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t, h, w, _ = frames.shape
    if (h, w) == (size, size):
        return frames
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def load_frames(uri: str, spec: FrameSpec, storage_options: dict | None = None) -> np.ndarray:
    return decode_frames(read_bytes(uri, storage_options), spec)


# decord prefixes its errors with "[hh:mm:ss] /path/of/its/source.cc:123: ": a time stamp would make
# the same clip's reason differ between runs.
_DECORD_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: (Error: )?")


def _one_line(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and type(exc).__module__.startswith("av."):
        text = strerror  # FFmpeg's own words, without "[Errno 1094995529] ... '<none>'"
    else:
        text = str(exc)
    text = _DECORD_PREFIX.sub("", " ".join(text.split())) or type(exc).__name__
    return text[:240]  # with its prefix ("not a readable media file: ...") a reason stays < 300 chars
