"""Benchmark of the frozen towers' embedding throughput (clips/s) by batch size.

On the same generated demo clips, already decoded (decoding is benchmarked in bench_features.py),
with interleaved repeats (median and best of each):

  audio   AudioTower.embed: 4 s at 44.1 kHz -> aisfx spectrogram + 4 blocks of 100 frames
  frames  FrameTower.embed: 4 s at 4 fps = 16 frames of 128x128 per clip (the asset's defaults)
  text    TextTower.encode: one demo caption per clip

A batch of B clips is one call; inside it the towers run their forward passes in chunks of their
default size (audio: 8 blocks, frames: 16 frames; measured best on 1 thread here), text in one
forward of B captions. The table shows clips/s and the ratio to batch size 1 for each tower; ``--frame-sizes 64,112,128,224`` adds the frame tower at
other input sizes (batch 8), the measurement behind the default size. No asserts: it reports.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32, help="clips per timed pass (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported (default 3)")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes in clips (default 1,8,32)")
    parser.add_argument("--frame-sizes", default="", help="also time the frame tower at these input sizes (batch 8)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads; 1 (default) as in the Dask workers, 0 keeps torch's default")
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from models.towers import DEFAULT_FRAME_SIZE, AudioTower, FrameTower, TextTower, get_tower
    from stages.ingest.decode import AudioSpec, FrameSpec, load_audio, load_frames
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
        audio = np.stack([load_audio(u, AudioSpec(sample_rate=AudioTower.sample_rate, seconds=AUDIO_SECONDS)) for u in uris])
        frames = np.stack([load_frames(u, FrameSpec(fps=FPS, size=DEFAULT_FRAME_SIZE, seconds=AUDIO_SECONDS)) for u in uris])
        small = {s: np.stack([load_frames(u, FrameSpec(fps=FPS, size=s, seconds=AUDIO_SECONDS)) for u in uris[:8]])
                 for s in sizes}
        captions = [r["caption"] for r in records]
        print(f"setup: {len(uris)} demo clips generated and decoded in {time.perf_counter() - started:.1f} s")

        loads = {}
        for name, make in (("audio", lambda: get_tower(AudioTower)), ("frames", lambda: get_tower(FrameTower)),
                           ("text", lambda: get_tower(TextTower))):
            t0 = time.perf_counter()
            make()
            loads[name] = time.perf_counter() - t0
        extra = {s: get_tower(FrameTower, size=s) for s in sizes}
        audio_tower, frame_tower, text_tower = get_tower(AudioTower), get_tower(FrameTower), get_tower(TextTower)
        per_clip = frames.shape[1]

        runs = {
            "audio": lambda b: [audio_tower.embed(x, seconds=AUDIO_SECONDS) for x in batches_of(audio, b)],
            "frames": lambda b: [frame_tower.embed(x.reshape(-1, *x.shape[2:])) for x in batches_of(frames, b)],
            "text": lambda b: [text_tower.encode(x, batch_size=b) for x in batches_of(captions, b)],
        }
        for fn in runs.values():  # warm-up: first calls allocate and pick kernels
            fn(min(batches))
        walls: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                for b in batches:
                    t0 = time.perf_counter()
                    fn(b)
                    walls.setdefault((name, b), []).append(time.perf_counter() - t0)
            for s, tower in extra.items():
                x = small[s]
                t0 = time.perf_counter()
                tower.embed(x.reshape(-1, *x.shape[2:]))
                walls.setdefault((f"frames@{s}", 8), []).append(time.perf_counter() - t0)

        print()
        print(f"Tower load (first in process): audio {loads['audio']:.2f} s, frames {loads['frames']:.2f} s, "
              f"text {loads['text']:.2f} s")
        print()
        print("| tower | work per clip | batch (clips) | median s | clips/s (median) | clips/s (best) | x batch 1 |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        what = {"audio": "4 s at 44.1 kHz, 4 blocks", "frames": f"{per_clip} frames {DEFAULT_FRAME_SIZE}px",
                "text": "1 caption"}
        for name in runs:
            base = len(uris) / statistics.median(walls[(name, batches[0])])
            for b in batches:
                med = statistics.median(walls[(name, b)])
                rate, best = len(uris) / med, len(uris) / min(walls[(name, b)])
                print(f"| {name} | {what[name]} | {b} | {med:.3f} | {rate:.1f} | {best:.1f} | {rate / base:.2f} |")
        if sizes:
            print()
            print("| frame tower input | batch (clips) | clips/s (median) | frames/s | x size "
                  f"{DEFAULT_FRAME_SIZE} |")
            print("| ---: | ---: | ---: | ---: | ---: |")
            ref = statistics.median(walls[(f"frames@{DEFAULT_FRAME_SIZE}", 8)]) if DEFAULT_FRAME_SIZE in sizes else None
            for s in sizes:
                med = statistics.median(walls[(f"frames@{s}", 8)])
                ratio = f"{ref / med:.2f}" if ref else "n/a"
                print(f"| {s}x{s} | 8 | {8 / med:.1f} | {8 * per_clip / med:.0f} | {ratio} |")
    print()
    print(f"load average at end: {load_average()}  (other processes slow every row; compare median with best)")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
