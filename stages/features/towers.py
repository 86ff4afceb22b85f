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

from models.constants import DEFAULT_FRAME_SIZE
from stages.core.errors import ConfigError, EnvironmentMismatchError
from stages.features.base import (ShardFeature, ShardJob, ShardOutput, content_hash_meta, iter_decoded, register_feature,
                                  registered_feature)
from stages.ingest.decode import CROPS, AudioSpec, ClipLength, DecodeAhead, DecodedAhead, FrameSpec, load_audio, load_frames
from stages.core.store import feature_key

AUDIO_TOWER_FEATURE = "audio_tower"
FRAME_TOWER_FEATURE = "frame_tower"
TEXT_TOWER_FEATURE = "text_tower"
# Bump when the code here changes the numbers it stores (the towers carry their own version).
AUDIO_TOWER_CODE_VERSION = "1"
FRAME_TOWER_CODE_VERSION = "1"
TEXT_TOWER_CODE_VERSION = "1"


def __getattr__(name: str):
    # The tower classes (their dims, for the asset checks) load models.towers, and so torch, on first use.
    if name in ("AudioTower", "FrameTower", "TextTower"):
        from models import towers

        return getattr(towers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

NO_TEXT_REASON = "no caption or label"
_DTYPES = ("float16", "float32")
_EMBED_CLIPS = 32  # clips embedded at once on CPU: bounds memory for large shards
# Clips decoded ahead (threads per DecodeAhead's rule) while the tower embeds the group before:
# one group, so the decoder never waits for the tower within a group.
TOWER_DECODE_AHEAD = DecodeAhead(depth=_EMBED_CLIPS)


def embed_groups(job: ShardJob, decode, embed, clip_bytes: int, ahead: DecodeAhead) -> tuple[list[str], list[str], list[dict]]:
    """Decode a shard's clips ahead (bad ones quarantined) and ``embed(start, decoded)`` them in
    groups of clips, in clip order, while the next group decodes: (ok ids, hashes, quarantine).

    A group is _EMBED_CLIPS clips on CPU; on CUDA as many as fit (up to 8x; the tower splits them
    into device batches itself), so each device call has enough work to hide the copies.
    """
    from models.devices import fitting_batch

    group = fitting_batch(job.device, _EMBED_CLIPS, clip_bytes * 4, limit=8)
    ok_ids, hashes, quarantined, pending = [], [], [], []
    with DecodedAhead.of_shard(decode, job, ahead) as decode_next:
        for clip_id, digest, decoded in iter_decoded(job, decode_next, quarantined):
            ok_ids.append(clip_id)
            hashes.append(digest)
            pending.append(decoded)
            if len(pending) == group:
                embed(len(ok_ids) - len(pending), pending)
                pending = []
        if pending:
            embed(len(ok_ids) - len(pending), pending)
    return ok_ids, hashes, quarantined


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
        from models.towers import AudioTower

        own = {k: v for k, v in asdict(self).items() if k not in ("seconds", "min_seconds", "fit", "crop")}
        return {**own, **self.clip_length().key_params(), "tower": AudioTower.describe()}

    def key(self) -> str:
        return feature_key(AUDIO_TOWER_FEATURE, self.params(), AUDIO_TOWER_CODE_VERSION)

    @property
    def n_seconds(self) -> int:
        return int(math.floor(self.seconds + 1e-9))

    def audio_spec(self) -> AudioSpec:
        from models.towers import AudioTower

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
        from models.towers import FrameTower

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
        from models.towers import TextTower

        return {"tower": TextTower.describe()}

    def key(self) -> str:
        return feature_key(TEXT_TOWER_FEATURE, self.params(), TEXT_TOWER_CODE_VERSION)


def _tower_for(job: ShardJob, cls, **kwargs):
    """The process's shared tower; its settings must be the ones the feature key was made from."""
    from models.towers import get_tower

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

    decode_ahead: DecodeAhead = TOWER_DECODE_AHEAD  # a setting of the stage, not part of the key

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Decode at 44.1 kHz (same length / silence rules as the mels) ahead of aisfx, which embeds
        the clips in groups."""
        from models.towers import AudioTower

        params = AudioTowerParams.from_params(job.params)
        spec = params.audio_spec()
        n_sec, dim, n = params.n_seconds, AudioTower.dim, len(job.clips)
        pooled = np.zeros((n, dim), np.float32)  # rows of every clip; the quarantined ones are cut below
        per_second = np.zeros((n, n_sec, dim), params.per_second_dtype)
        logits = np.zeros((n, AudioTower.n_classes), np.float32)
        tower = []  # loaded at the first clip that decodes: a shard of bad clips never loads it

        def embed(start: int, audio: list) -> None:
            if not tower:
                tower.append(_tower_for(job, AudioTower))
            out = tower[0].embed(np.stack(audio), seconds=params.seconds)
            stop = start + len(audio)
            pooled[start:stop], per_second[start:stop], logits[start:stop] = out["pooled"], out["per_second"], out["logits"]

        ok_ids, hashes, quarantined = embed_groups(
            job, lambda uri, span: load_audio(uri, spec, job.storage_options, span), embed, spec.n_samples * 4,
            self.decode_ahead)
        rows = len(ok_ids)
        return ShardOutput(ok_ids, {"pooled": pooled[:rows], "per_second": per_second[:rows], "logits": logits[:rows]},
                           quarantined, sample_meta=content_hash_meta(hashes))


@register_feature
class FrameTowerFeatures(ShardFeature):
    name, code_version, params_type = FRAME_TOWER_FEATURE, FRAME_TOWER_CODE_VERSION, FrameTowerParams
    group, kinds = "towers", ("pytorch",)
    description = "EfficientNet-lite0 (ImageNet) frame embeddings per clip: pooled [1280] and per second [S, 1280]."

    decode_ahead: DecodeAhead = TOWER_DECODE_AHEAD  # a setting of the stage, not part of the key

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Frames at ``fps`` (decord) decoded ahead of EfficientNet-lite0, which embeds every frame
        in groups of clips; averaged per second and per clip."""
        from models.towers import FrameTower

        params = FrameTowerParams.from_params(job.params)
        spec = params.frame_spec()
        n_sec, dim, n_frames, n = params.n_seconds, FrameTower.dim, spec.n_frames, len(job.clips)
        second = params.second_of_frame()
        pooled = np.zeros((n, dim), np.float32)
        per_second = np.zeros((n, n_sec, dim), params.per_second_dtype)
        tower = []

        def embed(start: int, clips: list) -> None:
            if not tower:
                tower.append(_tower_for(job, FrameTower, size=params.size))
            frames = np.stack(clips)  # [n, T, size, size, 3]
            count = len(frames)
            emb = tower[0].embed(frames.reshape(count * n_frames, *frames.shape[2:])).reshape(count, n_frames, dim)
            pooled[start : start + count] = emb.mean(axis=1)
            for s in range(n_sec):
                per_second[start : start + count, s] = emb[:, second == s].mean(axis=1)

        ok_ids, hashes, quarantined = embed_groups(
            job, lambda uri, span: load_frames(uri, spec, job.storage_options, span), embed,
            n_frames * spec.size * spec.size * 3, self.decode_ahead)
        rows = len(ok_ids)
        return ShardOutput(ok_ids, {"pooled": pooled[:rows], "per_second": per_second[:rows]}, quarantined,
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
        from models.towers import TextTower

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
