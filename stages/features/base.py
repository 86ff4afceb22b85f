"""The per-shard feature contract and the driver that computes only the shards whose key is missing.

A feature is defined by a name, parameters and a code version; with its input feature keys they
give its feature key (stages.core.store.feature_key). Shard jobs are small picklable records, so the
same functions run in-process or on Dask workers, write their shard and return a summary.

Adding a cached feature is one file with one class and one registration::

    @register_feature
    class Loudness(ShardFeature):
        name = "loudness"                  # the store folder and the Dagster asset name
        code_version = "1"                 # bump when the numbers it stores change
        params_type = LoudnessParams       # frozen dataclass: validated, .params() -> the key's payload
        inputs = ("mel_spectrograms",)     # features it reads per shard (their keys: job.input_keys)
        group, kinds = "features", ("numpy",)
        description = "Loudness per clip from the cached mels."

        def extract(self, job, store) -> ShardOutput:   # pure given the job: read, compute, return rows
            ...

The driver (``ShardFeature.compute_shard`` and ``run_feature``) owns everything else: timing,
threads, the store, the shard manifest (provenance, quarantine), the commit and the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator


from stages.ingest.manifest import ClipManifest, load_manifest
from stages.core.parallel import Executor, InProcessExecutor
from stages.core.progress import Progress
from stages.core.store import FeatureStore, StoreError


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
    # Per clip: (start, end) seconds in its media file, end 0 = to the end; () = every clip whole.
    spans: tuple[tuple[float, float], ...] = ()

    def span(self, row: int) -> tuple[float, float]:
        return self.spans[row] if self.spans else (0.0, 0.0)


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
    # Shards of this key found damaged (missing or mismatched files) and recomputed: "shard: why".
    retired: list[str] = field(default_factory=list)

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


@dataclass
class ShardOutput:
    """What a feature's ``extract`` returns for one shard: rows (in ``clip_ids`` order) and why the
    other clips of the shard are missing."""

    clip_ids: list[str]
    arrays: dict[str, Any]
    quarantined: list[dict]
    sample_meta: list[dict] | None = None
    tar_encodings: dict[str, str] | None = None
    params: dict | None = None  # what the manifest records as params, when more than the job's
    manifest_extra: dict = field(default_factory=dict)  # extra provenance (e.g. text digests)


class ShardFeature:
    """The contract of one per-shard cached feature (see the module docstring)."""

    name: ClassVar[str]
    code_version: ClassVar[str]
    params_type: ClassVar[type | None] = None
    inputs: ClassVar[tuple[str, ...]] = ()
    group: ClassVar[str] = "features"
    kinds: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # Set torch threads from the job (False: the feature manages threads itself).
    sets_threads: ClassVar[bool] = True

    def extract(self, job: ShardJob, store: FeatureStore) -> ShardOutput:
        raise NotImplementedError

    def compute_shard(self, job: ShardJob) -> ShardResult:
        """The driver for one shard: extract, then commit rows + provenance, then summarise."""
        start = time.perf_counter()
        if self.sets_threads:
            limit_threads(job)
        store = job_store(job)
        out = drop_non_finite_rows(self.extract(job, store))
        manifest = shard_manifest(job, out.quarantined, start, out.params)
        manifest.update(out.manifest_extra)
        store.write_shard(
            job.dataset, job.feature, job.key, job.shard,
            clip_ids=out.clip_ids, arrays=out.arrays, sample_meta=out.sample_meta,
            tar_encodings=out.tar_encodings, manifest=manifest,
        )
        return ShardResult(job.shard, len(out.clip_ids), out.quarantined, time.perf_counter() - start, True)

    def __reduce__(self):  # picklable by name, so Dask workers find the registered instance
        return (registered_feature, (self.registry_name(),))

    @classmethod
    def registry_name(cls) -> str:
        return getattr(cls, "variant", "") and f"{cls.name}:{cls.variant}" or cls.name


def drop_non_finite_rows(out: ShardOutput) -> ShardOutput:
    """Every stored array is finite: a row holding NaN or Inf in any float array is quarantined
    (with the array it was found in) instead of written, whatever feature made it."""
    import numpy as np

    n = len(out.clip_ids)
    bad = np.zeros(n, bool)
    where: dict[int, str] = {}
    for name, array in out.arrays.items():
        array = np.asarray(array) if not hasattr(array, "dtype") else array
        if array.dtype.kind != "f" or len(array) != n or not n:
            continue
        finite = np.isfinite(array.reshape(n, -1)).all(axis=1)
        for row in np.flatnonzero(~finite & ~bad):
            where[int(row)] = name
        bad |= ~finite
    if not bad.any():
        return out
    keep = np.flatnonzero(~bad)
    quarantined = list(out.quarantined) + [
        {"id": out.clip_ids[row], "reason": f"non-finite values in {where[row]}"} for row in sorted(where)
    ]
    return ShardOutput(
        clip_ids=[out.clip_ids[i] for i in keep],
        arrays={k: (np.asarray(v)[keep] if len(v) == n else v) for k, v in out.arrays.items()},
        quarantined=quarantined,
        sample_meta=None if out.sample_meta is None else [out.sample_meta[i] for i in keep],
        tar_encodings=out.tar_encodings, params=out.params, manifest_extra=out.manifest_extra,
    )


FEATURES: dict[str, ShardFeature] = {}


def register_feature(cls: type[ShardFeature]) -> type[ShardFeature]:
    """Add a feature to the registry (the asset factory, the CLI and the docs read it)."""
    name = cls.registry_name()
    if name in FEATURES and type(FEATURES[name]) is not cls:
        raise ValueError(f"feature {name!r} is registered twice ({type(FEATURES[name]).__name__} and {cls.__name__})")
    FEATURES[name] = cls()
    return cls


def all_features() -> dict[str, ShardFeature]:
    """Every registered feature (importing the packages that register them)."""
    import stages.embeddings  # noqa: F401
    import stages.features  # noqa: F401
    import stages.mmldm.latents  # noqa: F401

    return FEATURES


def registered_feature(name: str) -> ShardFeature:
    return FEATURES[name] if name in FEATURES else all_features()[name]


def iter_decoded(job: ShardJob, decode: Callable[[str, tuple[float, float]], Any], quarantined: list[dict],
                 prefetch: bool = False) -> Iterator[tuple[str, str, Any]]:
    """(clip id, content hash, decoded value) of every usable clip of a shard, in order.

    ``decode(uri, span)`` gets each clip's media and its (start, end) span. A clip whose decoder
    raises ClipError is appended to ``quarantined`` with its one-line reason and skipped; anything
    else is a bug and propagates. ``prefetch`` decodes ahead on one thread (PyAV and soxr release
    the GIL) while the caller computes on the clip before.
    """
    from stages.ingest.decode import ClipError

    def attempt(row):
        try:
            return decode(job.clips[row][1], job.span(row))
        except ClipError as exc:
            return exc

    rows = range(len(job.clips))
    if prefetch:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1)
        results = pool.map(attempt, rows)
    else:
        pool, results = None, map(attempt, rows)
    try:
        for clip, decoded in zip(job.clips, results):
            if isinstance(decoded, ClipError):
                quarantined.append({"id": clip[0], "reason": str(decoded)})
            else:
                yield clip[0], clip[2], decoded
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def decode_clips(job: ShardJob, decode: Callable[[str, tuple[float, float]], Any]) -> tuple[list[str], list[str], list[Any], list[dict]]:
    """Decode every clip of a shard: (ok ids, their content hashes, decoded values, quarantine)."""
    quarantined: list[dict] = []
    decoded = list(iter_decoded(job, decode, quarantined))
    return [d[0] for d in decoded], [d[1] for d in decoded], [d[2] for d in decoded], quarantined


def content_hash_meta(hashes: list[str]) -> list[dict]:
    """Per-sample WebDataset metadata of features computed from media: the clip's content hash."""
    return [{"content_hash": h} for h in hashes]


def shard_manifest(job: ShardJob, quarantined: list[dict], start: float, params: dict | None = None) -> dict[str, Any]:
    """The provenance every shard function commits: params, code version, input keys, source
    clips with their content hashes, quarantine, compute time, device."""
    return {
        "params": job.params if params is None else params,
        "code_version": job.code_version,
        "input_keys": list(job.input_keys),
        "clips": [_clip_entry(job, row) for row in range(len(job.clips))],
        "quarantined": quarantined,
        "compute_seconds": round(time.perf_counter() - start, 4),
        "device": job.device,
    }


def _clip_entry(job: ShardJob, row: int) -> dict:
    clip_id, _, digest = job.clips[row]
    start, end = job.span(row)
    entry = {"id": clip_id, "content_hash": digest}
    return entry if (start, end) == (0.0, 0.0) else {**entry, "start": start, "end": end}  # old entries unchanged


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
                spans=tuple(c.span for c in clips) if any(c.span != (0.0, 0.0) for c in clips) else (),
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
    log: Callable[[str], None] | None = None,
) -> FeatureRun:
    """Compute the missing shards of one feature key in parallel, then update the catalog.

    Shards already committed are verified first (a full read only for those whose files changed
    since they last verified); a damaged one is retired and computed again with the missing ones.
    ``log`` gets progress lines as shards complete (`feature: shards done/total (pct), rate, ETA`,
    stages.core.progress), as they come back from the executor (``results_as_completed``).
    """
    start = time.perf_counter()
    shard_names = sorted(manifest.by_shard())
    checks = store.verify_shards(manifest.dataset, feature, key, shard_names, repair=True)
    retired = [f"{c.shard}: {'; '.join(c.problems)}" for c in checks if c.retired]
    store.collect_garbage(manifest.dataset, feature, key)
    jobs, reused = shard_jobs(store, manifest, feature, key, params, code_version, input_keys, device, worker_threads)
    results: list[ShardResult] = []
    if jobs:
        clips = sum(len(job.clips) for job in jobs)
        progress = Progress(feature, len(jobs), "shards", log).start(clips=clips, reused=len(reused), key=key)
        for result in results_as_completed(executor, compute, jobs):
            results.append(result)
            progress.advance(1, clips=sum(r.rows + len(r.quarantined) for r in results))
        order = {job.shard: row for row, job in enumerate(jobs)}
        results.sort(key=lambda r: order[r.shard])  # the order of the jobs, whatever the order of completion
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
        retired=retired,
    )


def results_as_completed(executor: Executor, fn: Callable[[ShardJob], ShardResult], jobs: list[ShardJob]) -> Iterator[ShardResult]:
    """The results of ``fn`` over ``jobs`` as each one completes (any order), for progress: through
    the executor's ``map_unordered`` where it has one, one by one in this process, else all at once
    when ``map`` returns."""
    unordered = getattr(executor, "map_unordered", None)
    if unordered is not None:
        return iter(unordered(fn, jobs))
    if isinstance(executor, InProcessExecutor):
        return (fn(job) for job in jobs)
    return iter(executor.map(fn, jobs))


def recompute_key(store: FeatureStore, dataset: str, feature: str, key: str, executor: Executor | None = None) -> FeatureRun:
    """Compute the shards one stored key lacks for the dataset's current clip manifest, with the
    params its catalog entry records (``xmodal store verify --repair`` after retiring damage)."""
    entries = [e for e in store.catalog(dataset, feature) if e["feature_key"] == key]
    manifest = load_manifest(store, dataset)
    if not entries or manifest is None:
        raise StoreError(f"cannot recompute {dataset}/{feature}/{key}: "
                         f"{'no catalog entry' if not entries else 'no clip manifest'}; run its Dagster job instead")
    entry = entries[0]
    implementation = registered_feature(feature)
    return run_feature(store, manifest, feature, key, entry["params"], entry["code_version"],
                       implementation.compute_shard, executor or InProcessExecutor(),
                       input_keys=tuple(entry.get("input_keys", ())))
