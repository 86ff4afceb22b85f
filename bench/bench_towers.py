"""Benchmark of the frozen towers' embedding throughput (clips/s per core), before and after.

On the same generated demo clips, already decoded, 1 torch thread, interleaved repeats (median
and best of each; CPU seconds too, which other processes on the machine inflate far less):

  audio   AudioTower.embed: 4 s at 44.1 kHz -> aisfx spectrogram + 4 blocks of 100 frames
  frames  FrameTower.embed: 4 s at 4 fps = 16 frames of 128x128 per clip (the asset's defaults)
  text    TextTower.encode: one demo caption per clip

"before" is the packaged networks (``fused=False``: aisfx's EmbeddingNet and EfficientNet's own
``extract_features``, conv -> BatchNorm -> activation as separate passes, EfficientNet padding
before every convolution) under ``torch.no_grad``, the code path of the previous commit; "after"
is the towers' default (BatchNorm folded into the convolutions, symmetric padding inside them,
activations in place, ``inference_mode``). The same run prints

- the frame tower against decoding the same frames (``load_frames`` at the tower's 128 px: the
  demo's 64 px video decoded by decord, then upsampled; and at the source's 64 px, no resize),
- the tower shard stages (``compute_*_tower_shard``: decode, embed, write) with the clips decoded
  ahead on a thread (the default) and inline (``DecodeAhead(threads=0)``, as a Dask worker does),
- clips/s by batch size (``--batches``) and, with ``--frame-sizes 64,112,128,224``, the frame
  tower at other input sizes (batch 8), the measurement behind the default size.

No asserts: it reports.

    .venv/bin/python bench/bench_towers.py [--clips 32] [--repeats 3] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AUDIO_SECONDS, FPS = 4.0, 4.0


def machine_line() -> str:
    import torch

    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{model or 'unknown CPU'}; {os.cpu_count()} logical cores ({usable} usable); torch {torch.__version__} "
        f"with {torch.get_num_threads()} thread(s); Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}"
    )


def command_line() -> str:
    exe = os.path.relpath(sys.executable)
    return shlex.join([exe if not exe.startswith("../..") else sys.executable, *sys.argv])


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def batches_of(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Timing:
    """Wall and CPU seconds of one timed pass, repeated."""

    def __init__(self):
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def run(self, fn):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = fn()
        self.walls.append(time.perf_counter() - wall0)
        self.cpus.append(time.process_time() - cpu0)
        return out

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    @property
    def best(self) -> float:
        return min(self.walls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32, help="clips per timed pass (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported (default 3)")
    parser.add_argument("--batches", default="32", help="batch sizes in clips for the batch table (default 32 = the stage's group)")
    parser.add_argument("--frame-sizes", default="", help="also time the frame tower at these input sizes (batch 8)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads; 1 (default) as in the Dask workers, 0 keeps torch's default")
    parser.add_argument("--no-stage", action="store_true", help="leave out the shard stages (decode + embed + write)")
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from models.towers import DEFAULT_FRAME_SIZE, AudioTower, FrameTower, TextTower, get_tower
    from stages.features import towers as T
    from stages.features.base import ShardJob, registered_feature
    from stages.ingest.decode import AudioSpec, DecodeAhead, FrameSpec, load_audio, load_frames
    from stages.ingest.demo import DemoSpec, generate_demo

    batches = [int(b) for b in args.batches.split(",") if b]
    sizes = [int(s) for s in args.frame_sizes.split(",") if s]
    print(f"# bench_towers  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"command: {command_line()}")
    print(f"machine: {machine_line()}")
    print(f"load average (1/5/15 min) at start: {load_average()} on {os.cpu_count()} cores")

    with tempfile.TemporaryDirectory(prefix="bench_towers_") as tmp:
        started = time.perf_counter()
        jsonl = generate_demo(Path(tmp) / "demo", DemoSpec(n_clips=args.clips, seed=0))
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        uris = [str(jsonl.parent / r["path"]) for r in records]
        n = len(uris)
        audio_spec = AudioSpec(sample_rate=AudioTower.sample_rate, seconds=AUDIO_SECONDS)
        frame_spec = FrameSpec(fps=FPS, size=DEFAULT_FRAME_SIZE, seconds=AUDIO_SECONDS)
        source_spec = FrameSpec(fps=FPS, size=64, seconds=AUDIO_SECONDS)  # the demo video's own size
        audio = np.stack([load_audio(u, audio_spec) for u in uris])
        frames = np.stack([load_frames(u, frame_spec) for u in uris])
        flat = frames.reshape(-1, *frames.shape[2:])
        small = {s: np.stack([load_frames(u, FrameSpec(fps=FPS, size=s, seconds=AUDIO_SECONDS)) for u in uris[:8]])
                 for s in sizes}
        captions = [r["caption"] for r in records]
        print(f"setup: {n} demo clips generated and decoded in {time.perf_counter() - started:.1f} s")

        loads = {}
        for name, make in (("audio", lambda: get_tower(AudioTower)), ("frames", lambda: get_tower(FrameTower)),
                           ("text", lambda: get_tower(TextTower))):
            t0 = time.perf_counter()
            make()
            loads[name] = time.perf_counter() - t0
        audio_tower, frame_tower, text_tower = get_tower(AudioTower), get_tower(FrameTower), get_tower(TextTower)
        audio_before, frame_before = get_tower(AudioTower, fused=False), get_tower(FrameTower, fused=False)
        extra = {s: get_tower(FrameTower, size=s) for s in sizes}
        per_clip = frames.shape[1]

        def embed_before(tower, fn):  # the previous commit's path: packaged networks under no_grad
            def run():
                with torch.no_grad():
                    return fn(tower)
            return run

        audio_run = lambda tower, b: [tower.embed(x, seconds=AUDIO_SECONDS) for x in batches_of(audio, b)]  # noqa: E731
        frame_run = lambda tower, b: [tower.embed(x.reshape(-1, *x.shape[2:])) for x in batches_of(frames, b)]  # noqa: E731
        group = T._EMBED_CLIPS
        passes = {  # (name, what): the work of one timed pass over the n clips
            "audio before": embed_before(audio_before, lambda t: audio_run(t, group)),
            "audio after": lambda: audio_run(audio_tower, group),
            "frames before": embed_before(frame_before, lambda t: frame_run(t, group)),
            "frames after": lambda: frame_run(frame_tower, group),
            "decode frames 128px": lambda: [load_frames(u, frame_spec) for u in uris],
            "decode frames 64px": lambda: [load_frames(u, source_spec) for u in uris],
            "decode audio 44.1k": lambda: [load_audio(u, audio_spec) for u in uris],
        }
        for b in batches:
            if b != group:
                passes[f"audio batch {b}"] = lambda b=b: audio_run(audio_tower, b)
                passes[f"frames batch {b}"] = lambda b=b: frame_run(frame_tower, b)
        for b in sorted(set(batches) | {group}):
            passes[f"text batch {b}"] = lambda b=b: [text_tower.encode(x, batch_size=b) for x in batches_of(captions, b)]
        for size, tower in extra.items():
            passes[f"frames@{size}"] = lambda x=small[size], tower=tower: tower.embed(x.reshape(-1, *x.shape[2:]))

        stage_dir = Path(tmp) / "stores"
        clips = tuple((r["id"], u, f"h{i}") for i, (r, u) in enumerate(zip(records, uris)))
        counter = [0]

        def stage(feature, params, compute, ahead):
            impl = registered_feature(feature)

            def run():
                counter[0] += 1
                job = ShardJob(store_root=str(stage_dir / f"s{counter[0]}"), storage_options={}, dataset="bench",
                               feature=feature, key=params.key(), shard="s000000", clips=clips, params=params.params(),
                               code_version="1", worker_threads=args.torch_threads)
                saved, impl.decode_ahead = impl.decode_ahead, ahead
                try:
                    result = compute(job)
                finally:
                    impl.decode_ahead = saved
                    shutil.rmtree(job.store_root, ignore_errors=True)
                assert result.rows == n, result
            return run

        if not args.no_stage:
            for label, feature, params, compute in (
                ("audio", T.AUDIO_TOWER_FEATURE, T.AudioTowerParams(), T.compute_audio_tower_shard),
                ("frames", T.FRAME_TOWER_FEATURE, T.FrameTowerParams(), T.compute_frame_tower_shard),
            ):
                passes[f"{label} stage, decoded ahead"] = stage(feature, params, compute, DecodeAhead(threads=1, depth=group))
                passes[f"{label} stage, inline"] = stage(feature, params, compute, DecodeAhead(threads=0))

        for fn in passes.values():  # warm-up: first calls allocate, pick kernels, import decoders
            fn()
        timings = {name: Timing() for name in passes}
        for _ in range(args.repeats):
            for name, fn in passes.items():
                timings[name].run(fn)

        def rate(name: str, items: int = n) -> float:
            return items / timings[name].wall

        def cpu_rate(name: str, items: int = n) -> float:
            return items / timings[name].cpu

        print()
        print(f"Tower load (first in process): audio {loads['audio']:.2f} s, frames {loads['frames']:.2f} s, "
              f"text {loads['text']:.2f} s")
        print()
        print(f"### Towers before / after: clips/s per core, {n} clips, groups of {group} clips, "
              f"{torch.get_num_threads()} torch thread(s), median of {args.repeats} interleaved repeats")
        print()
        print("| tower | work per clip | before clips/s | after clips/s | after / before (wall) | best-of wall | "
              "before clips per CPU-s | after clips per CPU-s | CPU-time ratio |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        what = {"audio": "4 s at 44.1 kHz, 4 blocks", "frames": f"{per_clip} frames {DEFAULT_FRAME_SIZE}px"}
        for name in ("audio", "frames"):
            b, a = f"{name} before", f"{name} after"
            print(f"| {name} | {what[name]} | {rate(b):.2f} | {rate(a):.2f} | {rate(a) / rate(b):.2f}x | "
                  f"{timings[b].best / timings[a].best:.2f}x | {cpu_rate(b):.2f} | {cpu_rate(a):.2f} | "
                  f"{cpu_rate(a) / cpu_rate(b):.2f}x |")
        text = f"text batch {group}"
        print(f"| text | 1 caption | (unchanged) | {rate(text):.1f} | | | | {cpu_rate(text):.1f} | |")
        print()
        frames_n = n * per_clip
        print("### Frame tower against decoding the same frames (frames/s, one core)")
        print()
        print("| step | frames/s (wall) | frames/s (CPU) | tower slower by (wall) | (CPU) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name in ("decode frames 64px", "decode frames 128px", "frames before", "frames after"):
            slower = rate("decode frames 128px", frames_n) / rate(name, frames_n)
            slower_cpu = cpu_rate("decode frames 128px", frames_n) / cpu_rate(name, frames_n)
            print(f"| {name} | {rate(name, frames_n):.0f} | {cpu_rate(name, frames_n):.0f} | "
                  f"{slower:.1f}x | {slower_cpu:.1f}x |")
        print(f"(decode audio at 44.1 kHz for the audio tower: {rate('decode audio 44.1k'):.0f} clips/s; "
              f"the 64 -> 128 px upsample costs {timings['decode frames 128px'].cpu / timings['decode frames 64px'].cpu:.2f}x "
              "the 64 px decode in CPU time)")
        if not args.no_stage:
            print()
            print("### Tower shard stages (decode + embed + write), clips/s")
            print()
            print("| stage | decoded ahead (1 thread) | inline | ahead / inline | CPU s ahead | CPU s inline |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for label in ("audio", "frames"):
                ahead, inline = f"{label} stage, decoded ahead", f"{label} stage, inline"
                print(f"| {label}_tower | {rate(ahead):.2f} | {rate(inline):.2f} | {rate(ahead) / rate(inline):.2f}x | "
                      f"{timings[ahead].cpu:.2f} | {timings[inline].cpu:.2f} |")
        print()
        print("| tower (after) | batch (clips) | clips/s (median) | clips/s (best) |")
        print("| --- | ---: | ---: | ---: |")
        for b in sorted(set(batches) | {group}):
            for name in ("audio", "frames", "text"):
                key = f"{name} after" if name != "text" and b == group else f"{name} batch {b}"
                if key in timings:
                    print(f"| {name} | {b} | {rate(key):.1f} | {n / timings[key].best:.1f} |")
        if sizes:
            print()
            print("| frame tower input | batch (clips) | clips/s (median) | frames/s | x size "
                  f"{DEFAULT_FRAME_SIZE} |")
            print("| ---: | ---: | ---: | ---: | ---: |")
            ref = timings[f"frames@{DEFAULT_FRAME_SIZE}"].wall if DEFAULT_FRAME_SIZE in sizes else None
            for size in sizes:
                med = timings[f"frames@{size}"].wall
                ratio = f"{ref / med:.2f}" if ref else "n/a"
                print(f"| {size}x{size} | 8 | {8 / med:.1f} | {8 * per_clip / med:.0f} | {ratio} |")
    print()
    print(f"load average at end: {load_average()}  (other processes slow every row; compare median with best and CPU)")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
