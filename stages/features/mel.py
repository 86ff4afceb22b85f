"""Log-mel spectrograms of decoded audio and MM-LDM audio images of the cached mels, per shard.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from stages.ingest.decode import AudioSpec, ClipError, load_audio
from stages.features.spectral import STFT_SUB_BATCH, MelSpectrogram, get_preset, mel_to_audio_image
from stages.core.store import feature_key
from stages.features.base import ShardJob, ShardResult, job_store, limit_threads, shard_manifest


MEL_FEATURE = "mel_spectrograms"
AUDIO_IMAGE_FEATURE = "audio_images"
# Bump when the code changes the numbers it stores: the key changes and old caches stay valid.
MEL_CODE_VERSION = "1"
AUDIO_IMAGE_CODE_VERSION = "1"


@dataclass(frozen=True)
class MelParams:
    preset: str = "hifigan22k"
    seconds: float = 4.0
    min_seconds: float = 1.0
    fit: str = "pad"
    silence_dbfs: float = -60.0
    dtype: str = "float16"  # log-mel error <= 0.004 against float32, half the bytes

    def __post_init__(self) -> None:
        get_preset(self.preset)
        if self.fit not in ("pad", "tile"):
            raise ValueError(f"fit must be 'pad' or 'tile', got {self.fit!r}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {self.dtype!r}")
        if not 0 < self.min_seconds <= self.seconds:
            raise ValueError(f"need 0 < min_seconds <= seconds, got {self.min_seconds} and {self.seconds}")

    def params(self) -> dict:
        # The preset's values, not only its name, go into the key: editing a preset re-keys.
        return {**asdict(self), "preset_values": get_preset(self.preset).params()}

    def key(self) -> str:
        return feature_key(MEL_FEATURE, self.params(), MEL_CODE_VERSION)

    def audio_spec(self) -> AudioSpec:
        return AudioSpec(
            sample_rate=get_preset(self.preset).sample_rate,
            seconds=self.seconds,
            min_seconds=self.min_seconds,
            fit=self.fit,
            silence_dbfs=self.silence_dbfs,
        )


@dataclass(frozen=True)
class AudioImageParams:
    size: int = 64

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 1024:
            raise ValueError(f"audio image size must be within 8..1024, got {self.size}")

    def params(self) -> dict:
        return asdict(self)

    def key(self, mel_key: str) -> str:
        return feature_key(AUDIO_IMAGE_FEATURE, self.params(), AUDIO_IMAGE_CODE_VERSION, [mel_key])


def compute_mel_shard(job: ShardJob) -> ShardResult:
    """Decode every clip of the shard, quarantine bad ones, batched log-mel, write the shard."""
    start = time.perf_counter()
    limit_threads(job)
    store = job_store(job)
    params = MelParams(**{k: v for k, v in job.params.items() if k != "preset_values"})
    spec = params.audio_spec()
    preset = get_preset(params.preset)
    extractor = MelSpectrogram(preset, job.device)

    def decode(clip):
        try:
            return load_audio(clip[1], spec, job.storage_options)
        except ClipError as exc:
            return exc

    ok_ids, hashes, quarantined, mel_parts, pending = [], [], [], [], []
    # One thread decodes ahead (PyAV and soxr release the GIL) while this one runs the STFT.
    with ThreadPoolExecutor(max_workers=1) as pool:
        for (clip_id, _, digest), decoded in zip(job.clips, pool.map(decode, job.clips)):
            if isinstance(decoded, ClipError):
                quarantined.append({"id": clip_id, "reason": str(decoded)})
                continue
            ok_ids.append(clip_id)
            hashes.append(digest)
            pending.append(decoded)
            if len(pending) == STFT_SUB_BATCH:
                mel_parts.append(extractor(np.stack(pending)).astype(params.dtype))
                pending = []
    if pending:
        mel_parts.append(extractor(np.stack(pending)).astype(params.dtype))
    if mel_parts:
        mels = np.concatenate(mel_parts)
    else:
        mels = np.zeros((0, preset.n_mels, preset.n_frames(params.seconds)), params.dtype)
    store.write_shard(
        job.dataset, job.feature, job.key, job.shard,
        clip_ids=ok_ids,
        arrays={"mel": mels},
        sample_meta=[{"content_hash": h} for h in hashes],
        manifest=shard_manifest(job, quarantined, start),
    )
    return ShardResult(job.shard, len(ok_ids), quarantined, time.perf_counter() - start, True)


def compute_audio_image_shard(job: ShardJob) -> ShardResult:
    """Audio images of one shard from its cached mels (no decoding)."""
    start = time.perf_counter()
    store = job_store(job)
    (mel_key,) = job.input_keys
    mel_manifest = store.shard_manifest(job.dataset, MEL_FEATURE, mel_key, job.shard)
    table = store.read_arrays(job.dataset, MEL_FEATURE, mel_key, shards=[job.shard], names=["mel"])
    preset = get_preset(mel_manifest["params"]["preset"])
    size = int(job.params["size"])
    if len(table):
        images = mel_to_audio_image(table.arrays["mel"].astype(np.float32), preset, size)
    else:
        images = np.zeros((0, size, size, 3), np.uint8)
    quarantined = list(mel_manifest.get("quarantined", []))  # same rows as the mels, same reasons
    store.write_shard(
        job.dataset, job.feature, job.key, job.shard,
        clip_ids=table.clip_ids,
        arrays={"image": images},
        tar_encodings={"image": "png"},
        manifest=shard_manifest(job, quarantined, start),
    )
    return ShardResult(job.shard, len(table), quarantined, time.perf_counter() - start, True)
