"""Cached features of the frozen pretrained towers (models.towers), one feature per modality.

    audio_tower   pooled [N, 512] f32, per_second [N, S, 512] (f16 by default), logits [N, 69] f32
    frame_tower   pooled [N, 1280] f32, per_second [N, S, 1280] (f16 by default)
    text_tower    text [N, 384] f32, unit norm

S = floor(seconds). The feature key holds the parameters below and the tower's settings()
(package, version, weight file sha256, input settings), so another checkpoint or frame size is
another key beside the old one. Shard jobs follow stages.features.compute_mel_shard: decode,
quarantine bad clips with a one-line reason, embed the rest batched, write the shard.

Why float16 for per_second: it is the largest array (S x 512 or S x 1280 per clip), used to train
contrastive heads; float16 halves it with a relative error of at most 4e-4 of the largest value
(aisfx embeddings reach ~9; EfficientNet features ~6). pooled and logits stay float32: they are
small and logits feed KL / IS, where exact values matter more.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

from models.towers import DEFAULT_FRAME_SIZE, AudioTower, FrameTower, TextTower, get_tower
from stages.core.errors import ConfigError, EnvironmentMismatchError
from stages.features.base import (ShardFeature, ShardJob, ShardOutput, content_hash_meta, decode_clips, register_feature,
                                  registered_feature)
from stages.ingest.decode import CROPS, AudioSpec, ClipLength, FrameSpec, load_audio, load_frames
from stages.core.store import feature_key

AUDIO_TOWER_FEATURE = "audio_tower"
FRAME_TOWER_FEATURE = "frame_tower"
TEXT_TOWER_FEATURE = "text_tower"
# Bump when the code here changes the numbers it stores (the towers carry their own version).
AUDIO_TOWER_CODE_VERSION = "1"
FRAME_TOWER_CODE_VERSION = "1"
TEXT_TOWER_CODE_VERSION = "1"

NO_TEXT_REASON = "no caption or label"
_DTYPES = ("float16", "float32")
_EMBED_CLIPS = 32  # clips embedded at once: bounds memory for large shards


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ConfigError(f"per_second_dtype must be 'float16' or 'float32', got {dtype!r}")


@dataclass(frozen=True)
class AudioTowerParams:
    # Clip length: ClipLength's fields and defaults (the same setting as the mels).
    seconds: float = ClipLength.seconds
    min_seconds: float = ClipLength.min_seconds
    fit: str = ClipLength.fit
    silence_dbfs: float = -60.0
    per_second_dtype: str = "float16"
    crop: str = ClipLength.crop

    def __post_init__(self) -> None:
        self.clip_length()  # validates seconds, min_seconds, fit, crop
        _check_dtype(self.per_second_dtype)
        if self.seconds < 1:
            raise ConfigError(f"seconds must be at least 1 (one embedding per second), got {self.seconds}")

    def clip_length(self) -> ClipLength:
        return ClipLength(self.seconds, self.min_seconds, self.fit, self.crop)

    @classmethod
    def from_params(cls, params: dict) -> "AudioTowerParams":
        return cls(**{k: v for k, v in params.items() if k != "tower"})

    def params(self) -> dict:
        own = {k: v for k, v in asdict(self).items() if k not in ("seconds", "min_seconds", "fit", "crop")}
        return {**own, **self.clip_length().key_params(), "tower": AudioTower.describe()}

    def key(self) -> str:
        return feature_key(AUDIO_TOWER_FEATURE, self.params(), AUDIO_TOWER_CODE_VERSION)

    @property
    def n_seconds(self) -> int:
        return int(math.floor(self.seconds + 1e-9))

    def audio_spec(self) -> AudioSpec:
        return AudioSpec.of(self.clip_length(), AudioTower.sample_rate, self.silence_dbfs)


@dataclass(frozen=True)
class FrameTowerParams:
    seconds: float = 4.0
    fps: float = 4.0
    size: int = DEFAULT_FRAME_SIZE
    per_second_dtype: str = "float16"
    crop: str = ClipLength.crop  # as the audio tower's, so frames and audio cover the same seconds

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"crop must be 'start' or 'centre', got {self.crop!r}")
        _check_dtype(self.per_second_dtype)
        if self.seconds < 1:
            raise ConfigError(f"seconds must be at least 1 (one embedding per second), got {self.seconds}")
        if not 1 <= self.fps <= 60:
            raise ConfigError(f"fps must be within 1..60 (every second needs a frame), got {self.fps}")
        if not 32 <= self.size <= 512:
            raise ConfigError(f"size must be within 32..512, got {self.size}")

    @classmethod
    def from_params(cls, params: dict) -> "FrameTowerParams":
        return cls(**{k: v for k, v in params.items() if k != "tower"})

    def params(self) -> dict:
        own = {k: v for k, v in asdict(self).items() if k != "crop" or v != "start"}  # keys made before crop stay
        return {**own, "tower": FrameTower.describe(size=self.size)}

    def key(self) -> str:
        return feature_key(FRAME_TOWER_FEATURE, self.params(), FRAME_TOWER_CODE_VERSION)

    @property
    def n_seconds(self) -> int:
        return int(math.floor(self.seconds + 1e-9))

    def frame_spec(self) -> FrameSpec:
        # Decoded straight at the tower's input size: one resize, done by the decoder.
        return FrameSpec(fps=self.fps, size=self.size, seconds=self.seconds, crop=self.crop)

    def second_of_frame(self) -> np.ndarray:
        """The second each decoded frame falls in (frame j is taken at (j + 0.5) / fps)."""
        n_frames = self.frame_spec().n_frames
        return np.floor((np.arange(n_frames) + 0.5) / self.fps).astype(np.int64)


@dataclass(frozen=True)
class TextTowerParams:
    """Nothing to choose yet beyond the tower: texts are each clip's caption, else its label."""

    def params(self) -> dict:
        return {"tower": TextTower.describe()}

    def key(self) -> str:
        return feature_key(TEXT_TOWER_FEATURE, self.params(), TEXT_TOWER_CODE_VERSION)


def _tower_for(job: ShardJob, cls, **kwargs):
    """The process's shared tower; its settings must be the ones the feature key was made from."""
    tower = get_tower(cls, device=job.device, **kwargs)
    expected = job.params.get("tower")
    if expected is not None and tower.settings() != expected:
        changed = sorted(k for k in set(expected) | set(tower.settings()) if expected.get(k) != tower.settings().get(k))
        raise EnvironmentMismatchError(
            f"{cls.__name__} on this worker differs from the one the feature key {job.key} was made for "
            f"(in {', '.join(changed)}): install the same package versions everywhere"
        )
    return tower


@register_feature
class AudioTowerFeatures(ShardFeature):
    name, code_version, params_type = AUDIO_TOWER_FEATURE, AUDIO_TOWER_CODE_VERSION, AudioTowerParams
    group, kinds = "towers", ("pytorch",)
    description = "aisfx audio embeddings per clip: pooled [512], per second [S, 512] and 69 'ucsMixed' class logits."

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Decode at 44.1 kHz (same length / silence rules as the mels), aisfx embeddings."""
        params = AudioTowerParams.from_params(job.params)
        spec = params.audio_spec()
        ok_ids, hashes, audio, quarantined = decode_clips(job, lambda uri, span: load_audio(uri, spec, job.storage_options, span))
        n_sec, dim = params.n_seconds, AudioTower.dim
        pooled = np.zeros((len(audio), dim), np.float32)
        per_second = np.zeros((len(audio), n_sec, dim), params.per_second_dtype)
        logits = np.zeros((len(audio), AudioTower.n_classes), np.float32)
        if audio:
            tower = _tower_for(job, AudioTower)
            for lo in range(0, len(audio), _EMBED_CLIPS):
                out = tower.embed(np.stack(audio[lo : lo + _EMBED_CLIPS]), seconds=params.seconds)
                hi = lo + len(out["pooled"])
                pooled[lo:hi], per_second[lo:hi], logits[lo:hi] = out["pooled"], out["per_second"], out["logits"]
        return ShardOutput(ok_ids, {"pooled": pooled, "per_second": per_second, "logits": logits}, quarantined,
                           sample_meta=content_hash_meta(hashes))


@register_feature
class FrameTowerFeatures(ShardFeature):
    name, code_version, params_type = FRAME_TOWER_FEATURE, FRAME_TOWER_CODE_VERSION, FrameTowerParams
    group, kinds = "towers", ("pytorch",)
    description = "EfficientNet-lite0 (ImageNet) frame embeddings per clip: pooled [1280] and per second [S, 1280]."

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Frames at ``fps`` (decord), EfficientNet-lite0 per frame, averaged per second and per clip."""
        params = FrameTowerParams.from_params(job.params)
        spec = params.frame_spec()
        ok_ids, hashes, clips, quarantined = decode_clips(job, lambda uri, span: load_frames(uri, spec, job.storage_options, span))
        n_sec, dim, n_frames = params.n_seconds, FrameTower.dim, spec.n_frames
        second = params.second_of_frame()
        pooled = np.zeros((len(clips), dim), np.float32)
        per_second = np.zeros((len(clips), n_sec, dim), params.per_second_dtype)
        if clips:
            tower = _tower_for(job, FrameTower, size=params.size)
            for lo in range(0, len(clips), _EMBED_CLIPS):
                frames = np.stack(clips[lo : lo + _EMBED_CLIPS])  # [n, T, size, size, 3]
                n = len(frames)
                emb = tower.embed(frames.reshape(n * n_frames, *frames.shape[2:])).reshape(n, n_frames, dim)
                pooled[lo : lo + n] = emb.mean(axis=1)
                for s in range(n_sec):
                    per_second[lo : lo + n, s] = emb[:, second == s].mean(axis=1)
        return ShardOutput(ok_ids, {"pooled": pooled, "per_second": per_second}, quarantined,
                           sample_meta=content_hash_meta(hashes))


def text_digest(text: str) -> str:
    """Short hash of the text a row was embedded from (kept per clip in the shard manifest)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def clean_text(text: str | None) -> str:
    return " ".join(str(text or "").split())


@register_feature
class TextTowerFeatures(ShardFeature):
    name, code_version, params_type = TEXT_TOWER_FEATURE, TEXT_TOWER_CODE_VERSION, TextTowerParams
    group, kinds = "towers", ("pytorch",)
    description = "MiniLM (all-MiniLM-L6-v2) sentence embeddings [384], unit norm, of each clip's caption, else its label."

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """MiniLM embeddings of each clip's caption (else its label); an empty text is quarantined."""
        if len(job.texts) != len(job.clips):
            raise ValueError(f"shard {job.shard}: {len(job.texts)} texts for {len(job.clips)} clips (ShardJob.texts)")
        ok_ids, hashes, texts, quarantined = [], [], [], []
        for (clip_id, _, digest), raw in zip(job.clips, job.texts):
            text = clean_text(raw)
            if not text:
                quarantined.append({"id": clip_id, "reason": NO_TEXT_REASON})
                continue
            ok_ids.append(clip_id)
            hashes.append(digest)
            texts.append(text)
        if texts:
            embeddings = _tower_for(job, TextTower).encode(texts)
        else:
            embeddings = np.zeros((0, TextTower.dim), np.float32)
        # The shard name follows the clips' media hashes, not their captions: keep what was embedded
        # so a check can tell when a caption changed under an unchanged shard name.
        digests = {clip_id: text_digest(t) for clip_id, t in zip(ok_ids, texts)}
        return ShardOutput(ok_ids, {"text": embeddings}, quarantined,
                           sample_meta=[{"content_hash": h, "text": t} for h, t in zip(hashes, texts)],
                           manifest_extra={"text_digests": digests})


compute_audio_tower_shard = registered_feature(AUDIO_TOWER_FEATURE).compute_shard
compute_frame_tower_shard = registered_feature(FRAME_TOWER_FEATURE).compute_shard
compute_text_tower_shard = registered_feature(TEXT_TOWER_FEATURE).compute_shard
