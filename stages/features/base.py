"""The per-shard feature contract and the driver that computes only the shards whose key is missing.

A feature is defined by a name, parameters and a code version; with its input feature keys they
give its feature key (stages.core.store.feature_key). Shard jobs are small picklable records, so the
same functions run in-process or on Dask workers, write their shard and return a summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable


from stages.ingest.manifest import ClipManifest
from stages.core.parallel import Executor
from stages.core.store import FeatureStore


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
