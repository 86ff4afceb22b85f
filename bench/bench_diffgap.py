"""DiffGAP speed: training steps/s and sampling throughput (embeddings/s) at 50 / 20 / 5 steps.

Ratios are against figures measured in the same process (sampling: against 50 DDIM steps;
training: against plain single-direction training), so a noisy machine shifts both sides.

    .venv/bin/python bench/bench_diffgap.py [--repeats 3] [--queries 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from models.diffgap import TO_AUDIO, Denoiser, DenoiserConfig
from stages.diffgap.train import DiffgapTrainConfig, EmbeddingPairs, train_diffgap
from stages.diffgap.evaluate import generate
from stages.evaluation.retrieval import normalize


def _pairs(n: int, dim: int, seed: int = 0) -> EmbeddingPairs:
    rng = np.random.default_rng(seed)
    return EmbeddingPairs([f"c{i}" for i in range(n)], normalize(rng.normal(size=(n, dim))),
                          normalize(rng.normal(size=(n, dim))), ["train"] * n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=4, help="generated embeddings averaged per query")
    args = parser.parse_args()
    dim = 256
    pairs = _pairs(2048, dim)
    model = Denoiser(DenoiserConfig(embed_dim=dim))
    condition = pairs.other[: args.queries]

    train_diffgap(pairs, DiffgapTrainConfig(steps=20, checkpoint_every=0))  # warm-up: allocator, kernels
    generate(model, condition[:8], TO_AUDIO, steps=5)
    train_runs = {"single direction": [], "BST (interval 50)": []}
    sample_runs = {(s, steps): [] for s in ("ddim", "ddpm") for steps in (50, 20, 5)}
    for _ in range(args.repeats):  # interleaved, medians reported
        for label, bst in (("single direction", False), ("BST (interval 50)", True)):
            config = DiffgapTrainConfig(steps=args.train_steps, bst=bst, bst_interval=50, checkpoint_every=0)
            start = time.perf_counter()
            train_diffgap(pairs, config)
            train_runs[label].append(args.train_steps / (time.perf_counter() - start))
        for sampler, steps in sample_runs:
            start = time.perf_counter()
            generate(model, condition, TO_AUDIO, steps=steps, sampler=sampler, samples=args.samples)
            sample_runs[(sampler, steps)].append(len(condition) / (time.perf_counter() - start))

    print(f"# DiffGAP benchmark  ({platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread)")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# denoiser: {model.parameter_bytes() / 1e6:.2f} MB, d={dim}, batch 64, medians of {args.repeats}")
    base_train = statistics.median(train_runs["single direction"])
    print("\n| training | steps/s | ratio to single direction |\n| --- | --- | --- |")
    for label, runs in train_runs.items():
        print(f"| {label} | {statistics.median(runs):.1f} | {statistics.median(runs) / base_train:.2f} |")
    base = statistics.median(sample_runs[("ddim", 50)])
    print(f"\n| sampler | steps | queries/s ({args.samples} samples each) | ratio to DDIM 50 |\n| --- | --- | --- | --- |")
    for (sampler, steps), runs in sample_runs.items():
        print(f"| {sampler} | {steps} | {statistics.median(runs):.0f} | {statistics.median(runs) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
