"""Benchmark of CMMD (issue 16): training steps/s and conditional sampling time at 50 / 20 / 10 DDIM steps.

  (a) training: steps/s of the default config (12 windows of 16 frames = 1.858 s, frame latents
      4 x 16 x 16, mel latents 80 x 160), nCMMD (joint loss alone) against CMMD (Eq. 6 with a
      negative audio and a negative video for a quarter of each batch), and without fusion
  (b) sampling V2A and A2V for 16 clips at 50 / 20 / 10 DDIM steps, lambda 0 (replacement) and
      lambda > 0 (reconstruction guidance: one backward pass per step); ratios to 50 steps

Shapes are the demo's; the weights do not change the speed, so the model is freshly initialised.
Interleaved repeats, medians. No asserts: a benchmark reports, it does not fail.

    .venv/bin/python bench/bench_cmmd.py [--repeats 3] [--threads 2] [--steps-per-repeat 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps-per-repeat", type=int, default=5)
    parser.add_argument("--clips", type=int, default=16, help="clips per sampling batch")
    args = parser.parse_args()

    import numpy as np
    import torch

    from models.cmmd import build_model, contrastive_loss, make_scheduler, sample_conditional
    from stages.cmmd.data import ClipWindows, draw_batch, valid_frame_counts
    from stages.cmmd.evaluate import DEFAULT_GUIDANCE
    from stages.cmmd.train import CmmdTrainConfig

    torch.set_num_threads(args.threads)
    print(f"# bench_cmmd: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(f"# command: {' '.join(sys.argv)}")
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(64, 34, 4, 16, 16)).astype(np.float32)
    data = ClipWindows([f"c{i}" for i in range(64)], frames, rng.normal(size=(64, 80, 345)).astype(np.float32),
                       valid_frame_counts(frames), ["train"] * 64)

    variants = {"nCMMD (eta 0)": CmmdTrainConfig(eta=0.0), "CMMD (eta 0.05, negatives)": CmmdTrainConfig(),
                "CMMD without fusion": CmmdTrainConfig(fusion=False)}
    setups = {}
    for name, config in variants.items():
        torch.manual_seed(0)
        model = build_model(config.model_config(), (16, 16)).train()
        setups[name] = (config, model, make_scheduler(model.config), torch.optim.AdamW(model.parameters(), 1e-3))

    def train_steps(name: str) -> float:
        config, model, scheduler, optimizer = setups[name]
        start = time.perf_counter()
        for step in range(args.steps_per_repeat):
            step_rng = np.random.default_rng(step)
            batch = draw_batch(data, step_rng.choice(len(data), config.batch_size), config.window_frames, step_rng,
                               config.negatives if config.eta > 0 else None)
            v0, a0 = torch.from_numpy(batch.video), torch.from_numpy(batch.audio)
            t = torch.randint(0, 1000, (len(v0),))
            neg = lambda p: None if p is None else (torch.from_numpy(p[0]), torch.from_numpy(p[1]))
            terms = contrastive_loss(model, scheduler, v0, a0, t, torch.randn_like(v0), torch.randn_like(a0), eta=config.eta,
                                     negative_audio=neg(batch.negative_audio), negative_video=neg(batch.negative_video))
            optimizer.zero_grad()
            terms.loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / args.steps_per_repeat

    times = {name: [] for name in variants}
    train_steps("nCMMD (eta 0)")  # warm-up (oneDNN primitive caches)
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(train_steps(name))
    base = statistics.median(times["nCMMD (eta 0)"])
    print("\n## (a) training, 12 windows per step\n")
    print("| variant | s / step (median) | steps / s | time vs nCMMD | 1500 steps |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {1 / med:.2f} | {med / base:.2f}x | {1500 * med / 60:.1f} min |")

    model = setups["CMMD (eta 0.05, negatives)"][1].eval()
    scheduler = setups["CMMD (eta 0.05, negatives)"][2]
    video = torch.from_numpy(data.video(np.arange(args.clips), np.zeros(args.clips, np.int64), 16))
    audio = torch.from_numpy(data.audio(np.arange(args.clips), np.zeros(args.clips, np.int64), 16))
    samples = {}
    for task, known, known_is in (("V2A", video, "video"), ("A2V", audio, "audio")):
        for guidance in (0.0, DEFAULT_GUIDANCE):
            for steps in (50, 20, 10):
                samples[(task, guidance, steps)] = []
    for _ in range(max(1, args.repeats - 1)):
        for (task, guidance, steps) in samples:
            known, known_is = (video, "video") if task == "V2A" else (audio, "audio")
            start = time.perf_counter()
            with torch.no_grad() if guidance == 0 else torch.enable_grad():
                sample_conditional(model, scheduler, known, known_is, steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(0))
            samples[(task, guidance, steps)].append(time.perf_counter() - start)
    print(f"\n## (b) sampling {args.clips} clips of 1.858 s\n")
    print("| task | lambda | DDIM steps | s (median) | s per clip | time vs 50 steps |")
    print("|---|---:|---:|---:|---:|---:|")
    for (task, guidance, steps), values in samples.items():
        med = statistics.median(values)
        ref = statistics.median(samples[(task, guidance, 50)])
        print(f"| {task} | {guidance:g} | {steps} | {med:.2f} | {med / args.clips:.3f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
