"""Benchmark of the mel_spectrograms stage against its floor, the naive loop and the cache.

On the same demo clips, in one process run, with interleaved repeats (median of each):

  (a)  decode only: stages.ingest.decode.load_audio (PyAV / soundfile + soxr) for every clip, the floor
  (b)  the naive loop: librosa.load(mp4) (audioread -> an ffmpeg process per file) + melspectrogram
  (c)  run_feature(mel_spectrograms) into a fresh store, InProcessExecutor, cold
  (c2) the same with DaskExecutor(n_workers=2), cold (cluster started once, outside the timing)
  (d)  reading the cached mels back: FeatureStore.read_arrays (zarr), FeatureStore.webdataset (tar)
  (e)  run_feature again with nothing new (every shard cached)

plus the parts of (c) measured on their own (mel of decoded audio; shard write) to show where
the time goes. Prints the machine, the exact command, a table of clips/s and the target ratios
with PASS/MISS, on wall time and on CPU time (the CPU-time ratios of the single-process steps
stay usable when other processes share the cores; the script warns when they did). No asserts:
a benchmark reports, it does not fail.

    .venv/bin/python bench/bench_features.py [--clips 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


# ---- results -------------------------------------------------------------------------------------
@dataclass
class Timing:
    label: str
    what: str
    clips: int
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # CPU seconds of this process + reaped children
    skipped: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.walls) if self.walls else float("nan")

    @property
    def rate(self) -> float:
        return self.clips / self.median if self.walls and self.median > 0 else float("nan")

    @property
    def cores(self) -> float | None:
        if not self.cpus or not self.walls:
            return None
        return statistics.median(c / w for c, w in zip(self.cpus, self.walls) if w > 0)


def _cpu_seconds(children: bool) -> float:
    """CPU seconds of every thread of this process (+ reaped child processes such as ffmpeg)."""
    used = time.process_time()
    if children:
        import resource

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        used += usage.ru_utime + usage.ru_stime
    return used


def timed(timing: Timing, fn: Callable[[], object], cpu: str = "self") -> object:
    """Run fn once, append its wall time and its CPU time ("self", "children" too, or "none")."""
    children = cpu == "children"
    cpu0, wall0 = _cpu_seconds(children), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - wall0
    timing.walls.append(wall)
    if cpu != "none":
        timing.cpus.append(_cpu_seconds(children) - cpu0)
    return out


# ---- the workloads -------------------------------------------------------------------------------
def decode_all(uris, spec):
    from stages.ingest.decode import load_audio

    return [load_audio(uri, spec) for uri in uris]


def naive_loop(uris, preset):
    """What a researcher writes first: one librosa.load + melspectrogram + log per file."""
    import librosa

    mels = []
    with warnings.catch_warnings():
        # librosa warns that it falls back to audioread for mp4 (PySoundFile cannot read it).
        warnings.simplefilter("ignore")
        for uri in uris:
            y, sr = librosa.load(uri, sr=preset.sample_rate, mono=True, duration=4.0)
            mel = librosa.feature.melspectrogram(
                y=y, sr=sr, n_fft=preset.n_fft, hop_length=preset.hop_length, n_mels=preset.n_mels,
                fmin=preset.fmin, fmax=preset.fmax, power=preset.power,
            )
            mels.append(np.log(np.maximum(mel, preset.floor)))
    return mels


def run_mel(store, manifest, params, executor, worker_threads):
    from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, compute_mel_shard
    from stages.features.base import run_feature

    return run_feature(
        store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
        compute_mel_shard, executor, worker_threads=worker_threads,
    )


def mel_only(audio_by_shard, preset):
    """The STFT + mel + log part of (c) on already decoded audio, shard by shard (as the stage does)."""
    from stages.features.spectral import MelSpectrogram

    mel = MelSpectrogram(preset)
    return [mel(np.stack(audio)).astype(np.float16) for audio in audio_by_shard]


def warm_worker(torch_threads: int) -> str:
    """Run on every Dask worker before timing: the imports and the mel basis, like the parent's warm-up."""
    import torch

    import stages.features.mel  # noqa: F401 - av, librosa, zarr, webdataset come with it or below
    from stages.features.spectral import MelSpectrogram

    torch.set_num_threads(torch_threads)
    MelSpectrogram("hifigan22k")(np.zeros((1, 22050), np.float32))
    import av, librosa, webdataset, zarr  # noqa: E401, F401

    return "ok"


def write_only(store, dataset, key, shards, mels_by_shard, ids_by_shard):
    """The write part of (c): tar + zarr + manifest per shard, mels already computed."""
    from stages.features.mel import MEL_FEATURE

    for shard, mels, ids in zip(shards, mels_by_shard, ids_by_shard):
        store.write_shard(
            dataset, MEL_FEATURE, key, shard, clip_ids=ids, arrays={"mel": mels},
            sample_meta=[{"content_hash": ""} for _ in ids], manifest={"params": {}},
        )


def read_zarr(store, dataset, key):
    from stages.features.mel import MEL_FEATURE

    table = store.read_arrays(dataset, MEL_FEATURE, key, names=["mel"])
    return table.arrays["mel"].shape[0]


def read_webdataset(store, dataset, key):
    from stages.features.mel import MEL_FEATURE

    rows = 0
    for sample in store.webdataset(dataset, MEL_FEATURE, key):
        rows += sample["mel.npy"].shape[0] > 0
    return rows


# ---- helpers -------------------------------------------------------------------------------------
def machine_line(torch_threads: int) -> str:
    import torch

    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{model or 'unknown CPU'}; {os.cpu_count()} logical cores ({usable} usable); "
        f"torch {torch.__version__} with {torch_threads} thread(s) per process "
        f"(torch.get_num_threads() = {torch.get_num_threads()}); process nice {os.nice(0)}; "
        f"Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}"
    )


def command_line() -> str:
    exe = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("../..") else sys.executable
    return shlex.join([exe, *sys.argv])


def compare_with_librosa(store, dataset, key, uri_by_id, spec, preset) -> str:
    """One clip: our log-mel vs librosa's on the same samples, vs the naive loop, and float16 rounding."""
    import librosa

    from stages.ingest.decode import load_audio
    from stages.features.mel import MEL_FEATURE
    from stages.features.spectral import MelSpectrogram

    table = store.read_arrays(dataset, MEL_FEATURE, key, names=["mel"])
    clip_id = table.clip_ids[0]
    audio = load_audio(uri_by_id[clip_id], spec)
    ours = MelSpectrogram(preset)(audio)[0]
    same = librosa.feature.melspectrogram(
        y=audio, sr=preset.sample_rate, n_fft=preset.n_fft, hop_length=preset.hop_length, n_mels=preset.n_mels,
        fmin=preset.fmin, fmax=preset.fmax, power=preset.power, pad_mode=preset.pad_mode,
    )
    math_err = float(np.max(np.abs(ours - np.log(np.maximum(same, preset.floor)))))
    (naive,) = naive_loop([uri_by_id[clip_id]], preset)
    frames = min(ours.shape[1], naive.shape[1])
    # The naive loop pads edges with zeros (librosa 0.11's default, the preset reflects) and gets
    # 16-bit samples from ffmpeg: compare inner frames, expect differences in the quietest bins.
    edge = preset.n_fft // preset.hop_length // 2 + 1
    diff = np.abs(ours[:, edge : frames - edge] - naive[:, edge : frames - edge])
    rounding = float(np.max(np.abs(table.arrays["mel"][0].astype(np.float32) - ours)))
    return (f"clip {clip_id}: log-mel vs librosa on the same samples (pad {preset.pad_mode}): max |diff| "
            f"{math_err:.1e}; vs the naive loop (16-bit audio from ffmpeg): max {float(diff.max()):.1e}, "
            f"median {float(np.median(diff)):.1e}; float16 storage rounding <= {rounding:.4f}")


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    if value != value:  # NaN
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=128, help="demo clips (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported (default 3)")
    parser.add_argument("--shard-size", type=int, default=32, help="clips per shard (default 32)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes for (c2) (default 2; 0 skips)")
    parser.add_argument("--naive-clips", type=int, default=0,
                        help="clips for the naive loop (b) (default 0 = all; its rate is per clip)")
    parser.add_argument("--profile", action="store_true",
                        help="after the repeats, cProfile one cold (c) run and print the top functions")
    parser.add_argument("--keep", metavar="DIR", default="",
                        help="work in DIR and keep it (demo clips are reused); default: a temp dir, removed")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.repeats < 1 or args.shard_size < 1 or args.torch_threads < 1:
        parser.error("--clips, --repeats, --shard-size and --torch-threads must be at least 1")

    import torch

    torch.set_num_threads(args.torch_threads)
    logging.getLogger("distributed").setLevel(logging.ERROR)

    from stages.features.mel import MelParams
    from stages.ingest.manifest import build_manifest
    from stages.core.parallel import DaskExecutor, InProcessExecutor
    from stages.ingest.sources import SourceConfig, SourceListing, read_source
    from stages.features.spectral import get_preset
    from stages.core.store import FeatureStore

    work = args.keep or tempfile.mkdtemp(prefix="bench_features-")
    os.makedirs(work, exist_ok=True)
    dataset = "bench"
    params = MelParams()  # hifigan22k, 4 s, float16
    preset = get_preset(params.preset)
    spec = params.audio_spec()
    key = params.key()
    print(f"machine: {machine_line(args.torch_threads)}")
    print(f"command: {command_line()}")
    print(f"load average (1/5/15 min) at start: {load_average()} on {os.cpu_count()} cores"
          " (other processes on the machine share the cores and slow every row)")
    print(f"work dir: {work}{' (kept)' if args.keep else ' (removed at the end)'}")

    dask = None
    try:
        t0 = time.perf_counter()
        demo_dir = os.path.join(work, "demo")
        listing = read_source(SourceConfig(kind="demo", path=demo_dir, demo_clips=args.clips))
        manifest, _ = build_manifest(dataset, listing, None, args.shard_size)
        clips = manifest.clips
        uris = [c.uri for c in clips]
        uri_by_id = {c.id: c.uri for c in clips}
        by_shard = manifest.by_shard()
        n = len(clips)
        naive_uris = uris[: args.naive_clips] if args.naive_clips else uris
        print(f"demo: {n} mp4 clips (2-4 s, AAC 22.05 kHz mono) in {len(by_shard)} shards of <= {args.shard_size}; "
              f"generated/listed in {time.perf_counter() - t0:.1f} s; preset {params.preset}, {params.seconds:g} s, "
              f"{params.dtype}; feature key {key}")

        have_ffmpeg = shutil.which("ffmpeg") is not None
        if not have_ffmpeg:
            print("\n!! ffmpeg is not on PATH: librosa.load cannot read mp4 (audioread needs the ffmpeg binary).\n"
                  "!! Skipping the naive loop (b) and its ratio. Run ./scripts/setup.sh --bench to install ffmpeg.\n")

        counter = [0]

        def fresh_store() -> FeatureStore:
            counter[0] += 1
            path = os.path.join(work, "stores", f"s{counter[0]:03d}")
            shutil.rmtree(path, ignore_errors=True)  # a kept work dir may hold one from an earlier run
            return FeatureStore(path)

        def drop(store: FeatureStore) -> None:
            shutil.rmtree(store.root, ignore_errors=True)

        # Everything not timed happens here, once: imports, mel basis, the Dask cluster and its workers.
        t0 = time.perf_counter()
        warm_listing = SourceListing(clips=listing.clips[: args.shard_size * max(1, args.workers)])
        warm_manifest, _ = build_manifest(dataset, warm_listing, None, args.shard_size)
        first_shard = next(iter(by_shard.values()))
        decode_all([c.uri for c in first_shard[:4]], spec)
        if have_ffmpeg:
            naive_loop(uris[:2], preset)
        s = fresh_store()
        run_mel(s, warm_manifest, params, InProcessExecutor(), args.torch_threads)
        read_zarr(s, dataset, key)
        read_webdataset(s, dataset, key)
        drop(s)
        dask_start = float("nan")
        if args.workers:
            d0 = time.perf_counter()
            dask = DaskExecutor(n_workers=args.workers, threads_per_worker=1)
            dask_start = time.perf_counter() - d0
            dask.client.run(warm_worker, 1)  # every worker: imports and mel basis
            s = fresh_store()
            run_mel(s, warm_manifest, params, dask, 1)
            drop(s)
        print(f"warm-up (imports, mel basis, Dask workers; untimed): {time.perf_counter() - t0:.1f} s"
              + (f", of which LocalCluster start {dask_start:.1f} s" if args.workers else ""))

        T = {
            "a": Timing("(a)", "decode only: load_audio (PyAV + soxr), the floor", n),
            "b": Timing("(b)", "naive: librosa.load (audioread+ffmpeg) + melspectrogram + log", len(naive_uris)),
            "c": Timing("(c)", "run_feature cold, InProcessExecutor", n),
            "c2": Timing("(c2)", f"run_feature cold, DaskExecutor(n_workers={args.workers})", n),
            "c.mel": Timing("  (c) part", "STFT + mel + log of decoded audio (MelSpectrogram)", n),
            "c.write": Timing("  (c) part", "write shards (tar + zarr + manifest)", n),
            "d.zarr": Timing("(d)", "read cached mels: read_arrays (zarr)", n),
            "d.wds": Timing("(d)", "read cached mels: iterate webdataset (tar)", n),
            "e": Timing("(e)", "run_feature re-run, all shards cached", n),
        }
        if not have_ffmpeg:
            T["b"].skipped = "ffmpeg missing"
        if not args.workers:
            T["c2"].skipped = "--workers 0"

        shard_names = list(by_shard)
        ids_by_shard = [[c.id for c in members] for members in by_shard.values()]
        for r in range(args.repeats):
            r0 = time.perf_counter()
            # The slow naive loop first, then the fast steps back to back (the ratios pair (a) with (c)).
            if have_ffmpeg:
                timed(T["b"], lambda: naive_loop(naive_uris, preset), cpu="children")  # + its ffmpeg processes
            audio = timed(T["a"], lambda: decode_all(uris, spec))
            store = fresh_store()
            run = timed(T["c"], lambda: run_mel(store, manifest, params, InProcessExecutor(), args.torch_threads))
            assert run.shards_new == len(by_shard) and run.clips_ok == n, run  # sanity, not timing
            rerun = timed(T["e"], lambda: run_mel(store, manifest, params, InProcessExecutor(), args.torch_threads))
            assert rerun.shards_new == 0 and rerun.shards_reused == len(by_shard), rerun
            rows = timed(T["d.zarr"], lambda: read_zarr(store, dataset, key))
            assert rows == n, rows
            rows = timed(T["d.wds"], lambda: read_webdataset(store, dataset, key))
            assert rows == n, rows
            if r == args.repeats - 1 and have_ffmpeg:
                check = compare_with_librosa(store, dataset, key, uri_by_id, spec, preset)
            drop(store)

            # The parts of (c), measured alone on the audio decoded by (a).
            audio_by_shard, i = [], 0
            for ids in ids_by_shard:
                audio_by_shard.append(audio[i : i + len(ids)])
                i += len(ids)
            mels = timed(T["c.mel"], lambda: mel_only(audio_by_shard, preset))
            s = fresh_store()
            timed(T["c.write"], lambda: write_only(s, dataset, key, shard_names, mels, ids_by_shard))
            drop(s)
            del audio, audio_by_shard, mels

            if dask is not None:
                s2 = fresh_store()
                run2 = timed(T["c2"], lambda: run_mel(s2, manifest, params, dask, 1), cpu="none")
                assert run2.shards_new == len(by_shard) and run2.clips_ok == n, run2
                drop(s2)
            print(f"repeat {r + 1}/{args.repeats}: {time.perf_counter() - r0:.1f} s")
        if args.profile:
            import cProfile
            import pstats

            store = fresh_store()
            profiler = cProfile.Profile(time.process_time)  # CPU time: waiting for a core is not charged
            profiler.runcall(run_mel, store, manifest, params, InProcessExecutor(), args.torch_threads)
            drop(store)
            print("\ncProfile (CPU time) of one cold (c) run; profiling overhead inflates Python-heavy parts:")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(20)
    finally:
        if dask is not None:
            dask.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # ---- report ----------------------------------------------------------------------------------
    print(f"\n### Feature extraction: {n} clips, shard size {args.shard_size}, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| step | what | clips | median s | clips/s | CPU s | CPU cores busy | min..max s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for t in T.values():
        if t.skipped:
            print(f"| {t.label} | {t.what} | {t.clips} | skipped ({t.skipped}) | | | | |")
            continue
        cpu = "" if not t.cpus else f"{statistics.median(t.cpus):.4f}"
        cores = "" if t.cores is None else f"{t.cores:.2f}"
        rate = f"{t.rate:,.0f}" if t.rate >= 100 else f"{t.rate:.1f}"
        print(f"| {t.label} | {t.what} | {t.clips} | {t.median:.4f} | {rate} | {cpu} | {cores} | "
              f"{min(t.walls):.4f}..{max(t.walls):.4f} |")

    a, b, c, c2 = T["a"], T["b"], T["c"], T["c2"]
    nan = float("nan")

    def per_clip(stat: Callable[[Timing], float], key: str) -> float:
        t = T[key]
        return nan if t.skipped or not t.walls else stat(t) / t.clips

    med = lambda t: t.median  # noqa: E731
    best = lambda t: min(t.walls)  # noqa: E731 - the fastest repeat: least disturbed by other load
    cpu = lambda t: statistics.median(t.cpus) if t.cpus else nan  # noqa: E731 - CPU s: robust to other load

    def ratio(top: str, bottom: str, stat) -> float:
        return per_clip(stat, top) / per_clip(stat, bottom)

    # (name, numerator, denominator, scale, target, higher is better, shown target, unit)
    targets = [
        ("(c)/(b) speed-up, clips/s", "b", "c", 1, 5.0, True, ">= 5x", "x"),
        ("(c) time / (a) decode-only time", "c", "a", 1, 1.5, False, "<= 1.5x", "x"),
        ("(e) cached re-run / cold (c)", "e", "c", 100, 3.0, False, "< 3%", "%"),
        ("recompute (c) / read zarr (d)", "c", "d.zarr", 1, 20.0, True, ">= 20x", "x"),
        ("recompute (c) / read webdataset (d)", "c", "d.wds", 1, 20.0, True, ">= 20x", "x"),
    ]
    busy = {k: T[k].cores for k in ("a", "c", "c.mel", "c.write") if T[k].cores is not None}
    contended = bool(busy) and min(busy.values()) < 0.85
    print("\n| ratio | median wall | target | verdict (wall) | best-of-repeats wall | median CPU time | verdict (CPU) |")
    print("|---|---:|---:|---|---:|---:|---|")
    for name, top, bottom, scale, target, higher, shown, unit in targets:
        values = [ratio(top, bottom, stat) * scale for stat in (med, best, cpu)]
        texts = ["n/a" if v != v else f"{v:.2f}{unit}" for v in values]
        if T[top].skipped or T[bottom].skipped:
            texts[0] = f"n/a ({(T[top].skipped or T[bottom].skipped)})"
        mark = verdict(values[0], target, higher)
        if contended and mark != "n/a":
            mark += " (busy machine: unreliable)"
        print(f"| {name} | {texts[0]} | {shown} | {mark} | {texts[1]} | {texts[2]} | "
              f"{verdict(values[2], target, higher)} |")
    if not c2.skipped:
        print(f"| (c2) Dask {args.workers} workers vs (c) 1 process, clips/s | {ratio('c', 'c2', med):.2f}x | (info) | "
              f"| {ratio('c', 'c2', best):.2f}x | | |")
        if not b.skipped:
            print(f"| (c2)/(b) speed-up, clips/s | {ratio('b', 'c2', med):.2f}x | (info) | | "
                  f"{ratio('b', 'c2', best):.2f}x | | |")
    print("(CPU time counts this process's threads, plus the ffmpeg processes for (b), so the (c)/(b) CPU "
          "ratio is the CPU cost per clip, not the wall speed-up. CPU time hardly grows when other processes "
          "take turns on the cores, so it is the better guide on a busy machine.)")
    if contended:
        print(f"\nWARNING: single-process steps got only {min(busy.values()):.2f} of a core (CPU cores busy column): "
              "other processes were using the CPU, so wall times are inflated and wall ratios unreliable. "
              "Re-run on a quiet machine; meanwhile trust the CPU-time columns.")
    parts = T["c.mel"].median + T["c.write"].median
    print(f"\nwhere (c) goes (median wall): decode {a.median:.3f} s ({a.median / c.median:.0%}), "
          f"STFT+mel {T['c.mel'].median:.3f} s ({T['c.mel'].median / c.median:.0%}), "
          f"write {T['c.write'].median:.3f} s ({T['c.write'].median / c.median:.0%}), "
          f"rest {c.median - a.median - parts:.3f} s (of {c.median:.3f} s)")
    ca, cm, cw, cc = (cpu(T[k]) for k in ("a", "c.mel", "c.write", "c"))
    print(f"where (c) goes (median CPU): decode {ca:.3f} s ({ca / cc:.0%}), STFT+mel {cm:.3f} s ({cm / cc:.0%}), "
          f"write {cw:.3f} s ({cw / cc:.0%}), rest {cc - ca - cm - cw:.3f} s (of {cc:.3f} s)")
    if not b.skipped:
        print(f"check: {check}")
    print(f"load average (1/5/15 min) at the end: {load_average()}")
    print(f"date: {_dt.datetime.now().astimezone().isoformat(timespec='minutes')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
