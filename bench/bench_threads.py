"""Benchmark of StepThreads (stages.core.parallel): torch threads chosen by timing a loop's own steps,
against fixed counts, on an idle machine and beside a busy neighbour.

The loop is the default audio VAE's training step (80 x 96 windows, batch 16, freshly initialised;
weights do not change its speed) and, with ``--model frame``, the frame VAE's (64 x 64). For each
condition (``idle``; ``busy``: another process running 1-thread matrix products on one core, as a
second job would) it runs ``--steps`` steps at 1 thread, at all usable cores and with threads 0
(auto), interleaved over ``--repeats``, and prints seconds per step (median over repeats) and each
row's time against the best fixed count of that condition. No asserts: a benchmark reports.

    .venv/bin/python bench/bench_threads.py [--steps 60] [--repeats 2] [--model audio|frame] [--conditions idle busy]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_features import command_line, load_average, machine_line  # noqa: E402


def _neighbour(stop) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = (a @ a).clamp_(-1, 1)


def time_loop(model: str, threads: int, steps: int, hold_steps: int) -> tuple[float, dict]:
    """Seconds per step over ``steps`` VAE training steps at ``threads`` (0 = StepThreads auto)."""
    import torch

    import stages.features  # noqa: F401  (registers features; stages.vae.train imports them)
    from models.vae import build_vae
    from stages.core.parallel import StepThreads
    from stages.vae.train import AudioVaeTrainConfig, VaeTrainConfig

    config = AudioVaeTrainConfig() if model == "audio" else VaeTrainConfig()
    vae = build_vae(config.vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), 1e-3)
    x = torch.randn((16, 3, 80, 96) if model == "audio" else (16, 3, 64, 64))
    start = time.perf_counter()
    with StepThreads(threads, hold_steps=hold_steps) as tuner:
        for _ in range(steps):
            tuner.tick()
            posterior = vae.encode(x).latent_dist
            y = vae.decode(posterior.sample()).sample
            loss = (y - x).abs().mean() + 1e-5 * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - start) / steps, tuner.summary()


def main() -> None:
    from stages.core.parallel import usable_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", choices=("audio", "frame"), default="audio")
    parser.add_argument("--conditions", nargs="+", choices=("idle", "busy"), default=["idle", "busy"])
    parser.add_argument("--hold-steps", type=int, default=200, help="StepThreads hold_steps (the default of every loop)")
    args = parser.parse_args()
    cores = usable_cores()
    counts = sorted({1, cores})
    print(f"# bench_threads: {machine_line(cores)}")
    print(f"# {command_line()}")
    print(f"# {args.model} VAE step, {args.steps} steps x {args.repeats} repeats, {cores} usable cores, load {load_average()}")
    table = []
    for condition in args.conditions:
        stop = mp.Event()
        neighbour = mp.Process(target=_neighbour, args=(stop,), daemon=True) if condition == "busy" else None
        if neighbour:
            neighbour.start()
            time.sleep(1.0)
        try:
            walls: dict[str, list[float]] = {}
            summaries: dict[str, dict] = {}
            for _ in range(args.repeats):
                for threads in [*counts, 0]:
                    label = "auto" if threads == 0 else f"{threads} thread(s)"
                    seconds, summary = time_loop(args.model, threads, args.steps, args.hold_steps)
                    walls.setdefault(label, []).append(seconds)
                    summaries[label] = summary
        finally:
            stop.set()
            if neighbour:
                neighbour.join(5)
        best_fixed = min(statistics.median(v) for k, v in walls.items() if k != "auto")
        for label, values in walls.items():
            s = statistics.median(values)
            at = summaries[label]["steps_at_threads"]
            table.append((condition, label, s, s / best_fixed, at))
    print()
    print("| condition | threads | s / step (median) | vs best fixed | steps at each count (last repeat) |")
    print("|---|---|---:|---:|---|")
    for condition, label, s, ratio, at in table:
        print(f"| {condition} | {label} | {s:.3f} | {ratio:.2f}x | {at} |")
    print(f"# load at the end {load_average()}")


if __name__ == "__main__":
    main()
