"""Decode clips: audio through soundfile, then PyAV (resampled with soxr); frames through decord, then PyAV.

A clip that cannot be used raises ``ClipError`` with a one-line reason; the caller quarantines
the clip and the shard goes on. Files are streamed (an fsspec file object, a local path for
decord) and decoded only as far as the clip needs: a 4 s clip of a one-hour FLAC reads 4 s.

What a clip is made of is ``ClipLength`` (one setting shared by every feature that decodes audio:
mels, the audio tower, pretrained CLAP): ``seconds`` per clip, ``min_seconds`` below which a clip
is quarantined, ``fit`` for a shorter clip (pad / tile) and ``crop`` for a longer one ("start":
the first ``seconds``, "centre": the middle ``seconds``). A clip's span (start, end) in its file
comes from the source (CSV / JSONL offsets into an uncut file); end 0 means the end of the file.

Containers are recognised by content (``sniff_media``), not only by extension.
"""

from __future__ import annotations

import io
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from stages.core.errors import ConfigError

# Containers soundfile reads directly (3600 clips/s for WAV); everything else goes through PyAV.
SOUNDFILE_EXTENSIONS = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".caf", ".au", ".snd", ".w64"}
MEDIA_EXTENSIONS = SOUNDFILE_EXTENSIONS | {
    ".mp4", ".m4a", ".m4v", ".mkv", ".mka", ".webm", ".mov", ".avi", ".mp3", ".mp2", ".aac", ".opus", ".mpeg",
    ".mpg", ".ts", ".mts", ".m2ts", ".3gp", ".3g2", ".wma", ".wmv", ".asf", ".ogv", ".flv", ".ac3", ".amr", ".wv",
}
CROPS = ("start", "centre")
FITS = ("pad", "tile")
# Float samples beyond this are not audio (a float WAV holding 1e30 gave a mel of inf values).
MAX_ABS_SAMPLE = 1e3
# A container claiming more than this is read as far as the clip needs, never "whole".
MAX_TRUSTED_SECONDS = 24 * 3600.0

# (offset, magic, kind): the first bytes of the containers the decoders open.
_MAGIC = (
    (0, b"fLaC", "flac"), (0, b"OggS", "ogg"), (0, b"\x1a\x45\xdf\xa3", "matroska"), (0, b"ID3", "mp3"),
    (0, b"\x00\x00\x01\xba", "mpeg"), (0, b"\x00\x00\x01\xb3", "mpeg"), (0, b"\x30\x26\xb2\x75", "asf"),
    (0, b"caff", "caf"), (0, b".snd", "au"), (0, b"FLV", "flv"), (0, b"#!AMR", "amr"), (0, b"wvpk", "wavpack"),
    (0, b"\x0b\x77", "ac3"), (4, b"ftyp", "mp4"), (4, b"moov", "mov"), (4, b"mdat", "mov"), (4, b"wide", "mov"),
)


def sniff_media(head: bytes) -> str:
    """The container the first bytes say ("" when they do not look like media)."""
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI "):
        return "wav" if head[8:12] == b"WAVE" else "avi"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "mpegts"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "mpeg-audio"  # MP3 / MP2 / ADTS AAC frame sync
    return ""


class ClipError(Exception):
    """A single clip is unusable; ``str(err)`` is the one-line reason kept in the quarantine."""


@dataclass(frozen=True)
class ClipLength:
    """How long a clip is, for every feature that decodes audio (and the frames beside it)."""

    seconds: float = 4.0
    # Speech prompts, UI sounds and one-shots are short: pad them; only near-empty clips go.
    min_seconds: float = 0.1
    fit: str = "pad"  # "pad" with zeros or "tile" (repeat) a clip shorter than `seconds`
    crop: str = "start"  # a longer clip: its first `seconds` ("start") or its middle ones ("centre")

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ConfigError(f"fit must be 'pad' or 'tile', got {self.fit!r}")
        if self.crop not in CROPS:
            raise ConfigError(f"crop must be 'start' or 'centre', got {self.crop!r}")
        if not 0 < self.min_seconds <= self.seconds:
            raise ConfigError(f"need 0 < min_seconds <= seconds, got {self.min_seconds} and {self.seconds}")

    def key_params(self) -> dict:
        """What a feature key holds: crop only when not the old implicit "start", so keys made
        before crop existed stay valid."""
        params = {"seconds": self.seconds, "min_seconds": self.min_seconds, "fit": self.fit}
        return params if self.crop == "start" else {**params, "crop": self.crop}

    @classmethod
    def from_params(cls, params: dict) -> "ClipLength":
        return cls(**{k: params[k] for k in ("seconds", "min_seconds", "fit", "crop") if k in params})


@dataclass(frozen=True)
class AudioSpec:
    """How a clip's audio becomes a fixed-length mono array."""

    sample_rate: int = 22050
    seconds: float = 4.0
    min_seconds: float = 0.1  # ClipLength's default: shorter clips are quarantined, longer ones padded
    fit: str = "pad"  # "pad" with zeros or "tile" (repeat) a clip shorter than `seconds`
    silence_dbfs: float = -60.0  # a clip whose peak is below this is quarantined as silent
    crop: str = "start"

    @classmethod
    def of(cls, length: ClipLength, sample_rate: int, silence_dbfs: float = -60.0) -> "AudioSpec":
        return cls(sample_rate=int(sample_rate), seconds=length.seconds, min_seconds=length.min_seconds,
                   fit=length.fit, silence_dbfs=silence_dbfs, crop=length.crop)

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
    crop: str = "start"

    def params(self) -> dict:
        return asdict(self)

    @property
    def n_frames(self) -> int:
        return int(round(self.seconds * self.fps))


_RESAMPLE_MARGIN_S = 0.1
Span = tuple[float, float]  # (start, end) seconds in the file; end 0 = to the end of the file


def check_span(span: Span | None) -> Span:
    start, end = (float(span[0]), float(span[1])) if span else (0.0, 0.0)
    if not (np.isfinite(start) and np.isfinite(end)) or start < 0 or end < 0 or (end and end <= start):
        raise ClipError(f"bad clip span: start {start:g} s, end {end:g} s")
    return start, end


def window(span: Span, duration: float | None, length_seconds: float, crop: str) -> tuple[float, float]:
    """(offset, seconds) to decode: the span cut to the file's duration (when known), then cropped."""
    start, end = span
    if duration is not None and 0 < duration <= MAX_TRUSTED_SECONDS:
        end = min(end, duration) if end else duration
    available = (end - start) if end else None
    if available is not None and available <= 0:
        raise ClipError(f"clip starts at {start:g} s, after the end of the media ({end:g} s)")
    if available is None or available <= length_seconds:
        return start, (available if available is not None else length_seconds)
    offset = start + (available - length_seconds) / 2 if crop == "centre" else start
    return offset, length_seconds


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


@contextmanager
def open_media(uri: str, storage_options: dict | None = None):
    """A seekable binary file object through fsspec; a missing or empty file is a ClipError."""
    import fsspec

    try:
        handle = fsspec.open(uri, "rb", **(storage_options or {})).open()
    except FileNotFoundError:
        raise ClipError("media file not found") from None
    except OSError as exc:
        raise ClipError(f"cannot read media file: {_one_line(exc)}") from None
    try:
        try:
            first = handle.read(1)
        except OSError as exc:
            raise ClipError(f"cannot read media file: {_one_line(exc)}") from None
        if not first:
            raise ClipError("empty file (0 bytes)")
        handle.seek(0)
        yield handle
    finally:
        handle.close()


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Whole file through fsspec (for small files); a missing or empty file is a ClipError."""
    with open_media(uri, storage_options) as handle:
        return handle.read()


def iter_chunks(uri: str, storage_options: dict | None = None, chunk: int = 1 << 20):
    """The file in chunks (content hashing without holding the file)."""
    with open_media(uri, storage_options) as handle:
        while block := handle.read(chunk):
            yield block


def _as_file(data) -> io.IOBase:
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


def decode_audio(data, name: str = "", span: Span = (0.0, 0.0), seconds: float | None = None,
                 crop: str = "start") -> tuple[np.ndarray, int]:
    """Decode mono float32 at the file's own rate: (samples, sample_rate).

    ``data``: bytes or a seekable file object. With ``seconds``, only the window of the span the
    clip needs is decoded (see ``window``); without, the whole span. soundfile is tried first when
    the content (or the name) says it can read it, then PyAV; when both fail the reason names both.
    """
    handle = _as_file(data)
    head = handle.read(256)
    handle.seek(0)
    kind = sniff_media(head)
    failures = []
    if kind in ("wav", "flac", "ogg", "aiff", "caf", "au") or (
        not kind and os.path.splitext(name)[1].lower() in SOUNDFILE_EXTENSIONS
    ):
        try:
            return _decode_audio_soundfile(handle, span, seconds, crop)
        except ClipError:
            raise
        except Exception as exc:  # noqa: BLE001 - fall through to FFmpeg, which reads more variants
            failures.append(f"soundfile: {_one_line(exc)[:100]}")
            handle.seek(0)
    try:
        return _decode_audio_pyav(handle, span, seconds, crop)
    except ClipError as exc:
        if failures:
            raise ClipError(f"{exc} ({'; '.join(failures)})") from None
        raise


def _decode_audio_soundfile(handle, span: Span, seconds: float | None, crop: str) -> tuple[np.ndarray, int]:
    import soundfile

    with soundfile.SoundFile(handle) as sound:
        rate = int(sound.samplerate)
        duration = sound.frames / rate if rate and sound.frames > 0 else None
        offset, length = window(span, duration, seconds if seconds is not None else float("inf"), crop)
        if offset:
            sound.seek(int(round(offset * rate)))
        frames = -1 if not np.isfinite(length) else int(round(length * rate))
        samples = sound.read(frames, dtype="float32", always_2d=True)
    if not len(samples):
        raise ClipError("audio stream has no samples")
    return (samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)), rate


def _container_seconds(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base
    return None


def _open_av(handle):
    import av

    try:
        # Tags (title, artist...) in another encoding than UTF-8 must not make a good clip unreadable.
        return av.open(handle, mode="r", metadata_errors="replace")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as exc:
        raise ClipError(f"not a readable media file: {_one_line(exc)}") from None


def _seek(container, stream, offset: float) -> None:
    """Seek to the keyframe before ``offset`` (the decoder then drops what lies before it)."""
    import av

    if offset > 0 and stream.time_base:
        try:
            container.seek(int(offset / stream.time_base), stream=stream, backward=True)
        except av.error.FFmpegError:  # not seekable: decode from the start instead
            container.seek(0)


def _decode_audio_pyav(handle, span: Span, seconds: float | None, crop: str) -> tuple[np.ndarray, int]:
    import av

    container = _open_av(handle)
    with container:
        if not container.streams.audio:
            raise ClipError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        if not rate:
            raise ClipError(f"audio stream has no sample rate ({rate!r})")
        offset, length = window(span, _container_seconds(container, stream),
                                seconds if seconds is not None else float("inf"), crop)
        _seek(container, stream, offset)
        wanted = int(round(length * rate)) if np.isfinite(length) else None
        chunks, have = [], 0
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
                mono = plane[0] if len(plane) == 1 else plane.mean(axis=0)  # mono needs no mean
                if offset > 0 and frame.time is not None:  # drop what lies before the window
                    skip = int(round((offset - frame.time) * rate))
                    if skip >= len(mono):
                        continue
                    mono = mono[max(0, skip):]
                chunks.append(mono)
                have += len(mono)
                if wanted is not None and have >= wanted:
                    break  # decoded as far as the clip needs
        except av.error.FFmpegError as exc:
            if not chunks:
                raise ClipError(f"cannot decode audio: {_one_line(exc)}") from None
            if wanted is None or have < wanted:  # the damage lies inside the clip: not a shorter clip
                raise ClipError(f"truncated media: audio breaks off after {have / rate:.2f} s ({_one_line(exc)[:120]})") from None
    if not chunks:
        raise ClipError("audio stream has no samples")
    samples = np.concatenate(chunks)
    return (samples[:wanted] if wanted is not None else samples), int(rate)


def prepare_audio(samples: np.ndarray, rate: int, spec: AudioSpec) -> np.ndarray:
    """Check values, resample (soxr), check length and level, then pad/tile/crop to ``spec.seconds``.

    Values are checked before anything is computed from them: NaN/Inf or samples far outside
    [-1, 1] are not audio (a float WAV of 1e30 gave mels of inf); anything else is left as it is.
    """
    import soxr

    if not rate or rate <= 0:
        raise ClipError(f"audio stream has no sample rate ({rate!r})")
    if not np.all(np.isfinite(samples)):
        raise ClipError("audio holds NaN or Inf samples")
    if len(samples) and float(np.max(np.abs(samples))) > MAX_ABS_SAMPLE:
        raise ClipError(f"audio samples far outside [-1, 1] (peak {float(np.max(np.abs(samples))):.3g})")
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


def load_audio(uri: str, spec: AudioSpec, storage_options: dict | None = None, span: Span | None = None) -> np.ndarray:
    """Stream, decode (only the window the clip needs) and fit one clip's audio: float32 [spec.n_samples]."""
    span = check_span(span)
    with open_media(uri, storage_options) as handle:
        # A little beyond the clip, so resampling sees the same neighbours as on the whole file.
        samples, rate = decode_audio(handle, uri, span, spec.seconds + _RESAMPLE_MARGIN_S, spec.crop)
    return prepare_audio(samples, rate, spec)


def frame_times(spec: FrameSpec, span: Span, duration: float | None) -> np.ndarray:
    """The media times (seconds) of the frames a clip takes: ``spec.fps`` over its window."""
    offset, _ = window(span, duration, spec.seconds, spec.crop)
    return offset + (np.arange(spec.n_frames) + 0.5) / spec.fps


def decode_frames(data, spec: FrameSpec, span: Span = (0.0, 0.0)) -> np.ndarray:
    """Frames at ``spec.fps`` (nearest source frame), shorter side resized then centre-cropped.

    ``data``: bytes, a file object or a local path. decord first; when it cannot open the file
    (Theora in Ogg, MPEG-2...) PyAV, and the reason names both when neither can. A clip shorter
    than its window repeats its last frame.
    """
    try:
        frames = _decode_frames_decord(data, spec, span)
    except ClipError as decord_error:
        if str(decord_error) == "no video stream":
            raise
        if hasattr(data, "seek"):
            data.seek(0)
        try:
            frames = _decode_frames_pyav(data, spec, span)
        except ClipError as pyav_error:
            if str(pyav_error) == "no video stream":
                raise
            raise ClipError(f"cannot decode video (decord: {str(decord_error)[:110]}; PyAV: {str(pyav_error)[:110]})") from None
    return resize_center_crop(frames, spec.size)


def _decode_frames_decord(data, spec: FrameSpec, span: Span) -> np.ndarray:
    import decord

    source = data if isinstance(data, str) else _as_file(data)
    try:
        reader = decord.VideoReader(source, ctx=decord.cpu(0))
    except Exception as exc:  # noqa: BLE001 - decord raises its own DECORDError and RuntimeError
        message = _one_line(exc).replace(source, "<file>") if isinstance(source, str) else _one_line(exc)
        if "video stream" in message.lower():
            raise ClipError("no video stream") from None
        raise ClipError(f"cannot decode video: {message[:200]}") from None
    total = len(reader)
    if total == 0:
        raise ClipError("video stream has no frames")
    source_fps = reader.get_avg_fps() or spec.fps
    times = frame_times(spec, span, total / source_fps)
    indices = np.minimum((times * source_fps).astype(np.int64), total - 1)
    try:
        return reader.get_batch(list(indices)).asnumpy()
    except Exception as exc:  # noqa: BLE001
        raise ClipError(f"cannot decode video frames: {_one_line(exc)[:200]}") from None


def _decode_frames_pyav(data, spec: FrameSpec, span: Span) -> np.ndarray:
    import av

    container = _open_av(open(data, "rb") if isinstance(data, str) else _as_file(data))
    with container:
        if not container.streams.video:
            raise ClipError("no video stream")
        stream = container.streams.video[0]
        times = frame_times(spec, span, _container_seconds(container, stream))
        _seek(container, stream, float(times[0]))
        picked: list[np.ndarray] = []
        last, last_time = None, 0.0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                # A decoded frame covers [its time, the next one's): it serves every target before the next.
                while last is not None and len(picked) < len(times) and times[len(picked)] < frame.time:
                    picked.append(last)
                last, last_time = frame.to_ndarray(format="rgb24"), float(frame.time)
                if len(picked) == len(times):
                    break
        except av.error.FFmpegError as exc:
            if last is None or len(picked) < len(times) and times[len(picked)] < (_container_seconds(container, stream) or 0):
                raise ClipError(f"cannot decode video: {_one_line(exc)}") from None
        declared = _container_seconds(container, stream)
    if last is None:
        raise ClipError("video stream has no frames")
    if len(picked) < len(times) and declared and declared <= MAX_TRUSTED_SECONDS and last_time < min(times[-1], declared) - 1.0:
        raise ClipError(f"truncated media: video ends at {last_time:.2f} s of the {declared:.2f} s its container declares")
    picked += [last] * (len(times) - len(picked))  # past the end: the last frame repeats
    return np.stack(picked)


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


def load_frames(uri: str, spec: FrameSpec, storage_options: dict | None = None, span: Span | None = None) -> np.ndarray:
    """A clip's frames. A local file is handed to the decoders by path (decord would read a file
    object whole); a remote one is read once."""
    span = check_span(span)
    if _is_local(uri) and not storage_options:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.exists(path):
            raise ClipError("media file not found")
        if os.path.isdir(path):
            raise ClipError("cannot read media file: Is a directory")
        if os.path.getsize(path) == 0:
            raise ClipError("empty file (0 bytes)")
        return decode_frames(path, spec, span)
    return decode_frames(read_bytes(uri, storage_options), spec, span)


# decord prefixes its errors with "[hh:mm:ss] /path/of/its/source.cc:123: ": a time stamp would make
# the same clip's reason differ between runs.
_DECORD_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: (Error: )?")
# soundfile names the file object it was given ("<... object at 0x7f...>"): an address differs per run.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")


def _one_line(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and type(exc).__module__.startswith("av."):
        text = strerror  # FFmpeg's own words, without "[Errno 1094995529] ... '<none>'"
    else:
        text = str(exc)
    text = _DECORD_PREFIX.sub("", " ".join(text.split()))
    text = _OBJECT_REPR.sub("<file>", text) or type(exc).__name__
    return text[:240]  # with its prefix ("not a readable media file: ...") a reason stays < 300 chars


# ---- decoding ahead of the computation ---------------------------------------------------------

@dataclass(frozen=True)
class DecodeAhead:
    """How a shard's clips are decoded ahead of the work on them (a setting of each decoding stage).

    ``threads`` decode clips on their own threads while the caller computes on earlier ones (PyAV,
    soundfile, soxr and decord release the GIL while they decode); ``depth`` bounds how many
    decoded clips may wait, so memory stays at ``depth`` clips whatever the shard size. Results
    come back in clip order, each clip's ClipError with it, so ordering and quarantine are those
    of decoding inline. ``threads=-1`` (the default) is one thread in an ordinary process and none
    on a Dask worker: a cluster already runs one single-threaded worker per core, and a decode
    thread per worker would put two busy threads on every core.
    """

    threads: int = -1
    depth: int = 16

    def __post_init__(self) -> None:
        if self.threads < -1 or self.depth < 1:
            raise ConfigError(f"decode ahead needs threads >= -1 and depth >= 1, got {self.threads} and {self.depth}")

    def resolved_threads(self) -> int:
        if self.threads >= 0:
            return self.threads
        return 0 if _on_dask_worker() else 1


def _on_dask_worker() -> bool:
    import sys

    if "distributed" not in sys.modules:  # never imported: this cannot be a worker
        return False
    try:
        sys.modules["distributed"].get_worker()
    except (ValueError, AttributeError):
        return False
    return True


class DecodedAhead:
    """A decode function for clips in a known order, whose results are computed ``ahead`` of time.

    ``requests`` are the (uri, span) of every clip, in the order the caller will ask for them;
    calling the object with the next (uri, span) returns that clip's decoded value or raises its
    ClipError, exactly like ``decode(uri, span)``. Use it as a context manager: leaving stops the
    threads (decodes not yet started are cancelled)::

        with DecodedAhead(decode, requests, DecodeAhead()) as decode_next:
            for clip_id, digest, value in iter_decoded(job, decode_next, quarantined): ...
    """

    def __init__(self, decode, requests, ahead: DecodeAhead | None = None):
        self.decode = decode
        self.requests = list(requests)
        self.ahead = ahead or DecodeAhead()
        self.threads = self.ahead.resolved_threads()
        self._next = 0  # next request to hand out
        self._submitted = 0
        self._pending: list = []  # futures of requests _next, _next + 1, ...
        self._pool = None

    @classmethod
    def of_shard(cls, decode, job, ahead: DecodeAhead | None = None) -> "DecodedAhead":
        """For a shard job (``job.clips`` of (id, uri, hash), ``job.span(row)``), in clip order."""
        return cls(decode, [(clip[1], job.span(row)) for row, clip in enumerate(job.clips)], ahead)

    def __enter__(self) -> "DecodedAhead":
        if self.threads > 0 and self.requests:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode-ahead")
            self._fill()
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool, self._pending = None, []

    def _attempt(self, row: int):
        try:
            return self.decode(*self.requests[row])
        except ClipError as exc:  # a value like any other: raised again in order, by __call__
            return exc

    def _fill(self) -> None:
        while self._submitted < len(self.requests) and len(self._pending) < self.ahead.depth:
            self._pending.append(self._pool.submit(self._attempt, self._submitted))
            self._submitted += 1

    def __call__(self, uri: str, span=None):
        row = self._next
        if row >= len(self.requests) or self.requests[row][0] != uri:
            raise ValueError(f"decode ahead: clip {row} asked for {uri!r}, expected "
                             f"{self.requests[row][0] if row < len(self.requests) else 'no more clips'!r}")
        self._next += 1
        if self._pool is None:
            result = self._attempt(row)
        else:
            result = self._pending.pop(0).result()  # anything but a ClipError (a bug) is raised here
            self._fill()
        if isinstance(result, ClipError):
            raise result
        return result
