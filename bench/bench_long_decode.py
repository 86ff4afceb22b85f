"""Peak memory of decoding one 4 s clip from a one-hour FLAC: the old decoder (whole file read into
memory, whole file decoded, then cropped) against stages.ingest.decode (streamed, seek + read only
the frames the clip needs).

    git show 0b6915b:stages/ingest/decode.py > /tmp/old_decode.py   # the decoder before issue 13
    .venv/bin/python bench/bench_long_decode.py --old /tmp/old_decode.py

Each decoder runs in its own fresh process; peak RSS is that process's ru_maxrss, with the RSS
after imports (before the decode) beside it. The FLAC (22.05 kHz mono, one hour, ~100 MB of noise
and tone) is generated chunkwise into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE, HOURS, CLIP_SECONDS = 22050, 1.0, 4.0

CHILD = r"""
import importlib.util, resource, sys, time
sys.path.insert(0, {root!r})
spec = importlib.util.spec_from_file_location("decoder_under_test", {module!r})
decode = sys.modules[spec.name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(decode)
import numpy, soundfile, soxr, fsspec  # imported before the baseline is taken
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
audio = decode.load_audio({path!r}, decode.AudioSpec(sample_rate=22050, seconds={seconds}, min_seconds=1.0))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, peak, seconds, audio.shape[0])
"""


def write_long_flac(path: str) -> None:
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    chunk = RATE * 60
    with soundfile.SoundFile(path, "w", RATE, 1, format="FLAC", subtype="PCM_16") as out:
        for minute in range(int(HOURS * 60)):
            t = (np.arange(chunk) + minute * chunk) / RATE
            out.write((0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(chunk)).astype(np.float32))


def measure(module: str, path: str) -> tuple[float, float, float]:
    code = CHILD.format(root=ROOT, module=module, path=path, seconds=CLIP_SECONDS)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{module}: {run.stderr.strip().splitlines()[-1]}")
    out = run.stdout.split()
    before_kb, peak_kb, seconds, samples = int(out[0]), int(out[1]), float(out[2]), int(out[3])
    assert samples == int(CLIP_SECONDS * RATE)
    return before_kb / 1024, peak_kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the old decode.py (git show 0b6915b:stages/ingest/decode.py)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "one_hour.flac")
        start = time.perf_counter()
        write_long_flac(path)
        print(f"one-hour FLAC: {os.path.getsize(path) / 2**20:.0f} MiB, written in {time.perf_counter() - start:.0f} s")
        new = os.path.join(ROOT, "stages", "ingest", "decode.py")
        results = {name: measure(module, path) for name, module in (("old", args.old), ("new", new))}
    for name, (before, peak, seconds) in results.items():
        print(f"{name}: peak RSS {peak:7.0f} MiB (after imports {before:.0f} MiB, decode {peak - before:6.0f} MiB), "
              f"{seconds:6.2f} s for one {CLIP_SECONDS:g} s clip")
    (old_before, old_peak, old_s), (new_before, new_peak, new_s) = results["old"], results["new"]
    print(f"peak RSS ratio old/new: {old_peak / new_peak:.1f}x; memory the decode adds: {old_peak - old_before:.0f} MiB "
          f"-> {new_peak - new_before:.0f} MiB; time ratio: {old_s / new_s:.0f}x")


if __name__ == "__main__":
    main()
