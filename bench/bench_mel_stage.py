"""Benchmark of the mel + audio-image stage against the decode-only rate (issue 14).

On the same generated demo clips, in one process, interleaved repeats (median of each):

  (a)  decode only: stages.ingest.decode.load_audio of every clip, one thread: the floor
  (s)  the stage as refresh_features runs it in-process: run_feature(mel_spectrograms), then
       run_feature(audio_images) from the cached mels, into a fresh store; clips decoded ahead
       on one thread (MelSpectrograms.decode_ahead, the default outside Dask workers)
  (s0) the same with DecodeAhead(threads=0): decoding inline, as on a single-threaded Dask worker
  parts, on the audio decoded by (a): STFT + mel + log (MelSpectrogram), the mel shard write,
       audio images of the mels (mel_to_audio_image), the audio image shard write (PNG in the tar)

Prints clips/s and the stage's rate as a fraction of the decode-only rate (goal >= 0.9x with the
decode on the second core), on wall time and on CPU time, and what bounds the stage: the decode
thread overlaps the STFT of the clips before, but each shard's write and the audio-image step
(which reads the committed mels) run after the decode, one thread at a time; the bounds line
turns the measured CPU times into the best rate each arrangement allows. No asserts.

    .venv/bin/python bench/bench_mel_stage.py [--clips 128] [--repeats 5] [--shard-size 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_towers import Timing, command_line, load_average, machine_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=128, help="demo clips (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians reported (default 5)")
    parser.add_argument("--shard-size", type=int, default=64, help="clips per shard (default 64, XMODAL_SHARD_SIZE's)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # one torch thread per task, as the compute resource sets it

    from stages.core.parallel import InProcessExecutor
    from stages.core.store import FeatureStore
    from stages.features.base import registered_feature, run_feature
    from stages.features.mel import (AUDIO_IMAGE_CODE_VERSION, AUDIO_IMAGE_FEATURE, MEL_CODE_VERSION, MEL_FEATURE,
                                     AudioImageParams, MelParams, compute_audio_image_shard, compute_mel_shard)
    from stages.features.spectral import STFT_SUB_BATCH, MelSpectrogram, get_preset, mel_to_audio_image
    from stages.ingest.decode import DecodeAhead, load_audio
    from stages.ingest.manifest import build_manifest
    from stages.ingest.sources import SourceConfig, read_source

    work = Path(tempfile.mkdtemp(prefix="bench_mel_stage-"))
    print(f"command: {command_line()}")
    print(f"machine: {machine_line()}")
    print(f"load average (1/5/15 min) at start: {load_average()} on {os.cpu_count()} cores")
    try:
        listing = read_source(SourceConfig(kind="demo", path=str(work / "demo"), demo_clips=args.clips))
        manifest, _ = build_manifest("bench", listing, None, args.shard_size)
        mel, image = MelParams(), AudioImageParams()
        preset, spec = get_preset(mel.preset), mel.audio_spec()
        uris = [c.uri for c in manifest.clips]
        ids_by_shard = [[c.id for c in members] for members in manifest.by_shard().values()]
        n = len(uris)
        mel_feature = registered_feature(MEL_FEATURE)
        default_ahead = mel_feature.decode_ahead
        counter = [0]

        def stage(ahead: DecodeAhead):
            def run():
                counter[0] += 1
                store = FeatureStore(str(work / f"store{counter[0]}"))
                mel_feature.decode_ahead = ahead
                try:
                    mels = run_feature(store, manifest, MEL_FEATURE, mel.key(), mel.params(), MEL_CODE_VERSION,
                                       compute_mel_shard, InProcessExecutor(), worker_threads=1)
                    images = run_feature(store, manifest, AUDIO_IMAGE_FEATURE, image.key(mel.key()), image.params(),
                                         AUDIO_IMAGE_CODE_VERSION, compute_audio_image_shard, InProcessExecutor(),
                                         input_keys=(mel.key(),), worker_threads=1)
                finally:
                    mel_feature.decode_ahead = default_ahead
                    shutil.rmtree(store.root, ignore_errors=True)
                assert mels.clips_ok == images.clips_ok == n, (mels, images)
            return run

        def write(name, arrays_of, encodings=None):
            def run():
                counter[0] += 1
                store, row = FeatureStore(str(work / f"store{counter[0]}")), 0
                for shard, ids in enumerate(ids_by_shard):
                    store.write_shard("bench", name, "k", f"s{shard:06d}", clip_ids=ids,
                                      arrays={"x": arrays_of()[row : row + len(ids)]}, tar_encodings=encodings,
                                      manifest={"params": {}})
                    row += len(ids)
                shutil.rmtree(store.root, ignore_errors=True)
            return run

        extractor = MelSpectrogram(preset)
        held: dict[str, np.ndarray] = {}

        def decode():
            held["audio"] = np.stack([load_audio(u, spec) for u in uris])

        def stft():
            audio = held["audio"]
            held["mel"] = np.concatenate([extractor(audio[i : i + STFT_SUB_BATCH]).astype(mel.dtype)
                                          for i in range(0, n, STFT_SUB_BATCH)])

        def images():
            held["image"] = mel_to_audio_image(held["mel"].astype(np.float32), preset, (image.height, image.width))

        passes = {
            "(a) decode only": decode,
            "(s) stage, decoded ahead (1 thread)": stage(DecodeAhead(threads=1, depth=default_ahead.depth)),
            "(s0) stage, decoding inline": stage(DecodeAhead(threads=0)),
            "part: STFT + mel + log": stft,
            "part: mel shard write": write("mel", lambda: held["mel"]),
            "part: audio images of the mels": images,
            "part: audio image shard write (PNG tar + zarr)": write("image", lambda: held["image"], {"x": "png"}),
        }
        for fn in passes.values():  # warm-up: imports, mel basis, first allocations
            fn()
        timings = {name: Timing() for name in passes}
        for _ in range(args.repeats):
            for name, fn in passes.items():
                timings[name].run(fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    decode_t = timings["(a) decode only"]
    print(f"\n### Mel + audio-image stage against decode only: {n} clips, shards of {args.shard_size}, "
          f"median of {args.repeats} interleaved repeats\n")
    print("| step | clips/s (wall) | ms per clip (wall) | ms per clip (CPU, all threads) | rate / decode-only (wall) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, t in timings.items():
        print(f"| {name} | {n / t.wall:.0f} | {1000 * t.wall / n:.2f} | {1000 * t.cpu / n:.2f} | "
              f"{decode_t.wall / t.wall:.2f}x |")
    part = {name.split(": ", 1)[1]: t.cpu for name, t in timings.items() if name.startswith("part:")}
    stft, serial = part["STFT + mel + log"], sum(v for k, v in part.items() if k != "STFT + mel + log")
    d = decode_t.cpu
    print(f"\nCPU per clip: decode {1000 * d / n:.2f} ms; STFT + mel {1000 * stft / n:.2f} ms (overlaps the decode); "
          f"after the decode, one thread at a time: mel write, audio images and their write {1000 * serial / n:.2f} ms.")
    print(f"Bounds from these CPU times, rate / decode-only: two free cores with the decode ahead (this code) "
          f"<= {d / (max(d, stft) + serial):.2f}x; one core {d / (d + stft + serial):.2f}x; two cores with the "
          f"shard writes and the audio images overlapping the decode too (not this driver) <= "
          f"{d / max(d, stft + serial):.2f}x.")
    busy = decode_t.cpu / decode_t.wall
    if busy < 0.85:
        print(f"WARNING: decode only got {busy:.2f} of a core: other processes were using the CPU, so wall "
              "rates are inflated and the overlap has no free core to run on; trust the CPU columns.")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
