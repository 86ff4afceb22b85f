"""What verified reads cost: FeatureStore.read_arrays and .webdataset with and without checking
every array / tar against the manifest's sha256, interleaved in one run (median of repeats).

    .venv/bin/python bench/bench_store_verify.py [--shards 40] [--clips 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.store import FeatureStore  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--clips", type=int, default=64, help="clips per shard")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    root = tempfile.mkdtemp(prefix="verify-bench-")
    store = FeatureStore(root)
    rng = np.random.default_rng(0)
    for s in range(args.shards):  # mel-sized rows: 80 x 173 float16 (4 s at 22.05 kHz, hop 512)
        ids = [f"c{s:04d}_{i:03d}" for i in range(args.clips)]
        store.write_shard("bench", "mel_spectrograms", "k", f"s{s:06d}-bench", clip_ids=ids,
                          arrays={"mel": rng.normal(-4, 2, (args.clips, 80, 173)).astype(np.float16)},
                          manifest={"params": {}, "quarantined": []})
    mb = args.shards * args.clips * 80 * 173 * 2 / 1e6
    cases = {
        "read_arrays, verified": lambda: store.read_arrays("bench", "mel_spectrograms", "k"),
        "read_arrays, verify=False": lambda: store.read_arrays("bench", "mel_spectrograms", "k", verify=False),
        "webdataset, verified": lambda: sum(1 for _ in store.webdataset("bench", "mel_spectrograms", "k")),
        "webdataset, verify=False": lambda: sum(1 for _ in store.webdataset("bench", "mel_spectrograms", "k",
                                                                            verify=False)),
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():  # interleaved: the machine's noise hits every case alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.shards} shards x {args.clips} clips, {mb:.0f} MB of float16 mels; median of {args.repeats}")
    for name, seconds in median.items():
        print(f"  {name:<28} {seconds * 1000:8.1f} ms  {mb / seconds:8.0f} MB/s")
    print(f"verified / unverified: read_arrays {median['read_arrays, verified'] / median['read_arrays, verify=False']:.2f}x, "
          f"webdataset {median['webdataset, verified'] / median['webdataset, verify=False']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
