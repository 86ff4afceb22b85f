"""Contrastive head training speed: steps/s of the CLAP head (pooled, 512+384 -> 256) and the
CAVP head (per second, 4 s x (512+1280) -> 256, with and without temporal negatives), as
ratios to the CLAP head measured in the same process.

    .venv/bin/python bench/bench_heads.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from stages.embeddings.heads import CAVP_HEAD, CLAP_HEAD, HeadTrainConfig, PairedFeatures, train_head


def _pairs(kind: str, n: int = 512) -> PairedFeatures:
    rng = np.random.default_rng(0)
    if kind == CLAP_HEAD:
        arrays = {"audio": rng.normal(size=(n, 512)), "text": rng.normal(size=(n, 384))}
    else:
        arrays = {"audio": rng.normal(size=(n, 4, 512)), "video": rng.normal(size=(n, 4, 1280))}
    return PairedFeatures([f"c{i}" for i in range(n)], {k: v.astype(np.float32) for k, v in arrays.items()}, ["train"] * n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = {"CLAP head": (CLAP_HEAD, True), "CAVP head, temporal negatives": (CAVP_HEAD, True),
             "CAVP head, clip negatives only": (CAVP_HEAD, False)}
    data = {name: _pairs(kind) for name, (kind, _) in cases.items()}
    empty = PairedFeatures([], {}, [])
    runs = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (kind, temporal) in cases.items():
            config = HeadTrainConfig(steps=args.steps, eval_every=args.steps, temporal_negatives=temporal)
            start = time.perf_counter()
            train_head(kind, data[name], empty, config)
            runs[name].append(args.steps / (time.perf_counter() - start))
    print(f"# head training, batch 64, 1 torch thread, {os.cpu_count()} cores; medians of {args.repeats}")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    base = statistics.median(runs["CLAP head"])
    print("| head | steps/s | ratio to CLAP head |\n| --- | --- | --- |")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
