"""Per-shard feature computation and the driver that computes only the shards whose key is missing.

A feature is defined by a name, parameters and a code version; with its input feature keys they
give its feature key (stages.store.feature_key). Shard jobs are small picklable records, so the
same functions run in-process or on Dask workers, write their shard and return a summary.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from stages.decode import AudioSpec, ClipError, load_audio
from stages.manifest import ClipManifest
from stages.parallel import Executor
from stages.spectral import STFT_SUB_BATCH, MelSpectrogram, get_preset, mel_to_audio_image
from stages.store import FeatureStore, feature_key

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


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to compute one shard of one feature."""

    store_root: str
    storage_options: dict
    dataset: str
    feature: str
    key: str
    shard: str
    clips: tuple[tuple[str, str, str], ...]  # (clip id, media uri, content hash)
    params: dict
    code_version: str
    input_keys: tuple[str, ...] = ()
    device: str = "cpu"
    worker_threads: int = 0  # torch threads in a worker; 0 leaves torch's default
    texts: tuple[str, ...] = ()  # per clip: its caption, else its label (for text features)


@dataclass
class ShardResult:
    shard: str
    rows: int
    quarantined: list[dict]
    seconds: float
    computed: bool


@dataclass
class FeatureRun:
    """What one materialization did, for metadata and logs."""

    dataset: str
    feature: str
    key: str
    shards_total: int
    shards_new: int
    shards_reused: int
    clips_ok: int
    clips_quarantined: int
    quarantined: list[dict] = field(default_factory=list)
    clips_computed: int = 0
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def clips_per_second(self) -> float:
        return self.clips_computed / self.seconds if self.seconds > 0 else 0.0


def job_store(job: ShardJob) -> FeatureStore:
    return FeatureStore(job.store_root, job.storage_options)


def limit_threads(job: ShardJob) -> None:
    """Set this worker's torch threads as the job asks (0 leaves torch's default)."""
    if job.worker_threads:
        import torch

        torch.set_num_threads(job.worker_threads)


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


def shard_manifest(job: ShardJob, quarantined: list[dict], start: float, params: dict | None = None) -> dict[str, Any]:
    """The provenance every shard function commits: params, code version, input keys, source
    clips with their content hashes, quarantine, compute time, device."""
    return {
        "params": job.params if params is None else params,
        "code_version": job.code_version,
        "input_keys": list(job.input_keys),
        "clips": [{"id": clip_id, "content_hash": digest} for clip_id, _, digest in job.clips],
        "quarantined": quarantined,
        "compute_seconds": round(time.perf_counter() - start, 4),
        "device": job.device,
    }


def shard_jobs(
    store: FeatureStore,
    manifest: ClipManifest,
    feature: str,
    key: str,
    params: dict,
    code_version: str,
    input_keys: tuple[str, ...] = (),
    device: str = "cpu",
    worker_threads: int = 0,
) -> tuple[list[ShardJob], list[str]]:
    """Jobs for the manifest's shards that this key lacks, and the names of those it has."""
    have = set(store.committed_shards(manifest.dataset, feature, key))
    jobs, reused = [], []
    for shard, clips in manifest.by_shard().items():
        if shard in have:
            reused.append(shard)
            continue
        jobs.append(
            ShardJob(
                store_root=store.url_root,
                storage_options=store.storage_options,
                dataset=manifest.dataset,
                feature=feature,
                key=key,
                shard=shard,
                clips=tuple((c.id, c.uri, c.content_hash) for c in clips),
                texts=tuple(c.caption or c.label for c in clips),
                params=params,
                code_version=code_version,
                input_keys=input_keys,
                device=device,
                worker_threads=worker_threads,
            )
        )
    return jobs, reused


def run_feature(
    store: FeatureStore,
    manifest: ClipManifest,
    feature: str,
    key: str,
    params: dict,
    code_version: str,
    compute: Callable[[ShardJob], ShardResult],
    executor: Executor,
    input_keys: tuple[str, ...] = (),
    device: str = "cpu",
    worker_threads: int = 0,
) -> FeatureRun:
    """Compute the missing shards of one feature key in parallel, then update the catalog."""
    start = time.perf_counter()
    jobs, reused = shard_jobs(store, manifest, feature, key, params, code_version, input_keys, device, worker_threads)
    results: list[ShardResult] = executor.map(compute, jobs)
    for shard in reused:
        committed = store.shard_manifest(manifest.dataset, feature, key, shard)
        results.append(ShardResult(shard, committed["rows"], committed.get("quarantined", []), 0.0, False))
    elapsed = time.perf_counter() - start
    shards = sorted(manifest.by_shard())
    store.update_catalog(
        manifest.dataset, feature, key, params=params, code_version=code_version, input_keys=input_keys, shards=shards
    )
    quarantined = [dict(q, shard=r.shard) for r in results for q in r.quarantined]
    return FeatureRun(
        dataset=manifest.dataset,
        feature=feature,
        key=key,
        shards_total=len(results),
        shards_new=len(jobs),
        shards_reused=len(reused),
        clips_ok=sum(r.rows for r in results),
        clips_quarantined=len(quarantined),
        quarantined=quarantined,
        clips_computed=sum(r.rows + len(r.quarantined) for r in results if r.computed),
        seconds=elapsed,
        shards=shards,
    )



@dataclass(frozen=True)
class FeatureRef:
    """A pointer to one feature key's shards for one clip manifest (what assets pass downstream)."""

    dataset: str
    feature: str
    key: str
    manifest_digest: str
    shards: tuple[str, ...]

    def read(self, store: FeatureStore, names=None):
        return store.read_arrays(self.dataset, self.feature, self.key, shards=self.shards, names=names)


@dataclass(frozen=True)
class ManifestRef:
    dataset: str
    digest: str
    clips: int
    shards: tuple[str, ...]
