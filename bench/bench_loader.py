"""ClipDataset through a DataLoader, 0 vs 2 workers: samples/s (ratio in one run, interleaved
repeats, medians), each clip exactly once per epoch; and random access by clip id (ms per clip).

    .venv/bin/python bench/bench_loader.py [--clips 1024] [--shard-size 64] [--repeats 5] [--batch-size 32]

The store is built first in a temporary folder: mel_spectrograms (float16 [80, 345], the demo's
shape) and clap_embeddings (audio + text, float32 [256]) per clip, one clip quarantined in CLAP,
written through FeatureStore.write_shard. Every read verifies sha256 as the defaults do. The floor
row reads the same arrays in bulk (FeatureStore.read_arrays of both features, no per-sample work).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.store import FeatureStore  # noqa: E402
from stages.store import ClipDataset  # noqa: E402
from tests.fixtures.clip_store import build_clip_store  # noqa: E402

FEATURES = ["mel_spectrograms", "clap_embeddings"]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader joins its workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def epoch(clips: ClipDataset, workers: int, batch_size: int, number: int) -> tuple[float, float, bool]:
    """(seconds, CPU seconds, each clip exactly once) of one whole epoch through clips.loader()."""
    clips.set_epoch(number)
    clips._cache.clear()  # no shard decoded by an earlier epoch in this process: every epoch reads the store
    loader = clips.loader(batch_size=batch_size, num_workers=workers,
                          multiprocessing_context="fork" if workers else None)
    start, cpu = time.perf_counter(), cpu_seconds()
    ids = [c for batch in loader for c in batch["clip_id"]]
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return seconds, cpu, len(ids) == len(set(ids)) == len(clips.clip_ids) and set(ids) == set(clips.clip_ids)


def bulk(store: FeatureStore) -> tuple[float, float]:
    start, cpu = time.perf_counter(), cpu_seconds()
    for feature in FEATURES:
        store.read_arrays("demo", feature)
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lookups", type=int, default=200, help="clip ids for the random-access rows")
    args = parser.parse_args()
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    root = tempfile.mkdtemp(prefix="loader-bench-")
    store = FeatureStore(root)
    build_clip_store(store, clips=args.clips, shard_size=args.shard_size, mel_shape=(80, 345), dim=256)
    clips = ClipDataset(store, "demo", FEATURES, seed=0)
    n = len(clips.clip_ids)
    print(f"{n} clips ({len(clips.left_out)} left out), {len(clips._units)} shards of {args.shard_size}, "
          f"batch {args.batch_size}, {args.repeats} interleaved repeats")

    times: dict[str, list[float]] = {"bulk": [], "workers 0": [], "workers 2": []}
    cpus: dict[str, list[float]] = {name: [] for name in times}
    once = {"workers 0": True, "workers 2": True}
    for repeat in range(args.repeats):
        seconds, cpu = bulk(store)
        times["bulk"].append(seconds)
        cpus["bulk"].append(cpu)
        for workers in ((0, 2) if repeat % 2 == 0 else (2, 0)):  # alternate which goes first
            seconds, cpu, ok = epoch(clips, workers, args.batch_size, repeat * 2 + workers)
            times[f"workers {workers}"].append(seconds)
            cpus[f"workers {workers}"].append(cpu)
            once[f"workers {workers}"] &= ok

    rng = np.random.default_rng(0)
    lookup_ids = [clips.clip_ids[i] for i in rng.choice(n, size=min(args.lookups, n), replace=False)]
    access = {}
    for name, order in (("random order", lookup_ids), ("shard order", sorted(lookup_ids, key=clips._index.get))):
        fresh = ClipDataset(store, "demo", FEATURES, seed=0)
        start = time.perf_counter()
        for clip_id in order:
            fresh[clip_id]
        access[name] = (time.perf_counter() - start) / len(order) * 1e3

    base = statistics.median(times["workers 0"])
    print()
    print("| reader | median s / epoch | samples/s | vs workers 0 | CPU s / epoch (all processes) | each clip once per epoch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        check = "yes" if once.get(name, True) else "NO"
        print(f"| {name if name != 'bulk' else 'bulk read_arrays (floor)'} | {median:.3f} | {n / median:.0f} | "
              f"{base / median:.2f}x | {statistics.median(cpus[name]):.2f} | {check if name != 'bulk' else 'n/a'} |")
    print()
    print("| random access by clip id (default cache) | ms per clip |")
    print("| --- | --- |")
    for name, ms in access.items():
        print(f"| {len(lookup_ids)} clips, {name} | {ms:.2f} |")
    load = os.getloadavg()
    print(f"\nload average at end: {' '.join(f'{x:.1f}' for x in load)}")
    if load[0] > (os.cpu_count() or 1):
        print("WARNING: more runnable processes than CPUs: the wall-clock ratios are unreliable "
              "(go by the CPU column, or run again on a quiet machine)")
    return 0 if all(once.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
