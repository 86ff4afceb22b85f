"""Benchmark of the KL-VAE (encode / decode images/s at batch 1, 16, 64) and of the way back to sound.

  (a) VAE encode: uint8 images -> posterior means, images/s, at batch 1 / 16 / 64
  (b) VAE decode: latents -> uint8 images, images/s, at batch 1 / 16 / 64
  (c) HiFi-GAN vocoder on 4 s clips (hifigan22k log-mels of demo clips): real-time factor
      = seconds of audio per second of compute, at batch 1 and batch 4
  (d) the whole way back for 4 s clips: latent -> audio image -> mel -> waveform, real-time factor

The VAE is the default architecture of the audio_vae / frame_vae assets (64x64x3 -> 4x16x16,
models.vae.VaeConfig()); its weights do not change its speed, so it is freshly initialised.
Interleaved repeats, medians (and best-of). Prints the machine, the command, a table and the
ratios. No asserts: a benchmark reports, it does not fail.

    .venv/bin/python bench/bench_vae.py [--repeats 5] [--torch-threads 1]

``curve`` (issue 15): validation reconstruction of the audio VAE against training steps on the demo
(mels and audio images computed into a work folder, reused by a second run), for each seed: one
fit over the whole ``--max-steps`` budget with the rule off, evaluated every ``--eval-every``
steps (pixel L1, PSNR, mel L1 against the image's own mel and against the source mel), and where
the stopping rule (``--patience``, ``--min-delta``) would have stopped it (with the rule off the fit
follows the one-cycle schedule over the budget, so the marks say where a rule without learning-rate
drops would stop; the default rule, which lowers the rate on its first two plateaus, trains
differently after the first one: fit that config itself to see it). Controls: the audio image itself (no
VAE: what the image alone loses), the mean training image and the untrained VAE (step 0).

    nice -n 10 .venv/bin/python bench/bench_vae.py curve [--clips 300] [--size 64 | --height 80 --width 352]
        [--max-steps 600] [--eval-every 50] [--patience 4] [--min-delta 0.01] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_features import command_line, load_average, machine_line  # noqa: E402

BATCHES = (1, 16, 64)
CLIP_SECONDS = 4.0


@dataclass
class Row:
    label: str
    what: str
    units: float  # images, or seconds of audio, per call
    walls: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def rate(self) -> float:
        return self.units / self.median

    @property
    def best_rate(self) -> float:
        return self.units / min(self.walls)


def timed(row: Row, fn) -> object:
    start = time.perf_counter()
    out = fn()
    row.walls.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians reported (default 5)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--size", type=int, default=64, help="image size (default 64)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    from models.vae import VaeConfig, build_vae, decode, encode
    from models.vocoder import get_vocoder
    from stages.ingest.decode import AudioSpec, load_audio
    from stages.ingest.demo import DemoSpec, generate_demo
    from stages.features.spectral import MelSpectrogram, get_preset, mel_to_audio_image
    from stages.vae.train import decode_latents
    from stages.generation.vocode import images_to_mels, log_mel_error

    print(f"machine: {machine_line(args.torch_threads)}")
    print(f"command: {command_line()}")
    print(f"load average (1/5/15 min) at start: {load_average()} on {os.cpu_count()} cores"
          " (other processes on the machine share the cores and slow every row)")

    config = VaeConfig()
    vae = build_vae(config, seed=0).eval()
    params = sum(p.numel() for p in vae.parameters())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(max(BATCHES), args.size, args.size, 3), dtype=np.uint8)
    latents = encode(vae, images)
    print(f"VAE: AutoencoderKL {list(config.block_out_channels)}, {params / 1e6:.2f} M parameters, "
          f"{args.size}x{args.size}x3 -> {list(latents.shape[1:])}")

    with tempfile.TemporaryDirectory(prefix="bench_vae-") as work:
        jsonl = generate_demo(os.path.join(work, "demo"), DemoSpec(n_clips=4, min_seconds=4.0, max_seconds=4.0))
        uris = sorted(str(p) for p in (jsonl.parent / "media").glob("*.mp4"))
        audio = np.stack([load_audio(u, AudioSpec(sample_rate=22050, seconds=CLIP_SECONDS)) for u in uris])
    preset = get_preset("hifigan22k")
    mels = MelSpectrogram(preset)(audio)
    vocoder = get_vocoder()
    audio_images = mel_to_audio_image(mels, preset, args.size)
    audio_latents = latents[:4].numpy()  # any latent decodes at the same speed

    rows: dict[str, Row] = {}
    for b in BATCHES:
        rows[f"enc{b}"] = Row("(a)", f"VAE encode, batch {b}", b)
        rows[f"dec{b}"] = Row("(b)", f"VAE decode, batch {b}", b)
    rows["voc1"] = Row("(c)", "vocoder, 1 clip of 4 s", CLIP_SECONDS)
    rows["voc4"] = Row("(c)", "vocoder, batch of 4 clips of 4 s", 4 * CLIP_SECONDS)
    rows["way1"] = Row("(d)", "latent -> image -> mel -> waveform, 1 clip", CLIP_SECONDS)

    # warm-up (untimed): every code path once
    for b in BATCHES:
        encode(vae, images[:b], batch_size=b)
        decode(vae, latents[:b], batch_size=b)
    vocoder(mels[:1, :, :32])
    for r in range(args.repeats):
        r0 = time.perf_counter()
        for b in BATCHES:
            timed(rows[f"enc{b}"], lambda: encode(vae, images[:b], batch_size=b))
            timed(rows[f"dec{b}"], lambda: decode(vae, latents[:b], batch_size=b))
        timed(rows["voc1"], lambda: vocoder(mels[:1]))
        waves = timed(rows["voc4"], lambda: vocoder(mels))
        timed(rows["way1"], lambda: vocoder(images_to_mels(decode_latents(vae, audio_latents[:1], 1.0), preset, CLIP_SECONDS)))
        print(f"repeat {r + 1}/{args.repeats}: {time.perf_counter() - r0:.1f} s")

    again = MelSpectrogram(preset)(waves)
    error = np.mean([log_mel_error(mels[i], again[i]) for i in range(len(mels))])
    image_error = np.mean([log_mel_error(mels[i], images_to_mels(audio_images[i : i + 1], preset, CLIP_SECONDS)[0])
                           for i in range(len(mels))])

    print(f"\n### KL-VAE and vocoder, median of {args.repeats} interleaved repeats, {args.torch_threads} torch thread(s)\n")
    print("| step | what | median s | rate | best-of rate |")
    print("|---|---|---:|---:|---:|")
    for key, row in rows.items():
        unit = "images/s" if key[:3] in ("enc", "dec") else "x real time"
        print(f"| {row.label} | {row.what} | {row.median:.4f} | {row.rate:,.1f} {unit} | {row.best_rate:,.1f} |")

    ratios = [
        ("encode batch 64 / batch 1, images/s", rows["enc64"].rate / rows["enc1"].rate, "x"),
        ("decode batch 64 / batch 1, images/s", rows["dec64"].rate / rows["dec1"].rate, "x"),
        ("encode batch 16 / batch 64, images/s (16 is the default)", rows["enc16"].rate / rows["enc64"].rate, "x"),
        ("decode batch 16 / batch 64, images/s", rows["dec16"].rate / rows["dec64"].rate, "x"),
        ("encode / decode at batch 16, images/s", rows["enc16"].rate / rows["dec16"].rate, "x"),
        ("vocoder real-time factor, 1 clip (audio s / compute s)", rows["voc1"].rate, ""),
        ("vocoder real-time factor, 4 clips", rows["voc4"].rate, ""),
        ("whole way back real-time factor, 1 clip", rows["way1"].rate, ""),
        ("VAE decode share of the way back", rows["dec1"].median / rows["way1"].median * 100, "%"),
    ]
    print("\n| ratio | value | real time? |")
    print("|---|---:|---|")
    for name, value, unit in ratios:
        verdict = ("faster" if value >= 1 else "slower") if "real-time" in name else ""
        print(f"| {name} | {value:.2f}{unit} | {verdict} |")
    print(f"\ncheck: vocoded demo clips vs their mels: mean |delta log-mel| over bins > ln(1e-5) = {error:.3f}; "
          f"the 64x64 audio image alone (mel -> image -> mel) loses {image_error:.3f}")
    print(f"load average (1/5/15 min) at the end: {load_average()}")
    print(f"date: {_dt.datetime.now().astimezone().isoformat(timespec='minutes')}")
    return 0


def curve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="validation reconstruction of the audio VAE against training steps")
    parser.add_argument("--clips", type=int, default=300, help="demo clips (default 300)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_vae_curve"),
                        help="folder of the demo media and the store (reused by a second run)")
    parser.add_argument("--size", type=int, default=None, help="square audio images of this side")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--min-delta", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=None, help="VAE levels (default: the asset's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)

    import dataclasses

    import torch

    torch.set_num_threads(args.torch_threads)
    from stages.core.parallel import InProcessExecutor
    from stages.core.store import FeatureStore
    from stages.features.base import run_feature
    from stages.features.mel import (AUDIO_IMAGE_CODE_VERSION, AUDIO_IMAGE_FEATURE, MEL_CODE_VERSION, MEL_FEATURE, AudioImageParams,
                                     MelParams, compute_audio_image_shard, compute_mel_shard)
    from stages.features.spectral import get_preset
    from stages.ingest.demo import DemoSpec, generate_demo
    from stages.ingest.manifest import build_manifest
    from stages.ingest.sources import SourceConfig, read_source
    from stages.vae.train import (PlateauRule, VaeTrainConfig, audio_image_metrics, psnr, read_image_set, reconstruction_metrics,
                                  train_vae, _fixed_subset)
    from models.vae import decode, encode

    print(f"machine: {machine_line(args.torch_threads)}")
    print(f"command: {command_line()}")
    print(f"load average (1/5/15 min) at start: {load_average()} on {os.cpu_count()} cores")
    start = time.perf_counter()
    jsonl = generate_demo(os.path.join(args.work, "demo"), DemoSpec(n_clips=args.clips))
    manifest, _ = build_manifest("demo", read_source(SourceConfig(kind="jsonl", path=str(jsonl))), None, 64)
    store = FeatureStore(os.path.join(args.work, "store"))
    mel = MelParams()
    run_feature(store, manifest, MEL_FEATURE, mel.key(), mel.params(), MEL_CODE_VERSION, compute_mel_shard, InProcessExecutor())
    if args.size is not None:
        image_params = AudioImageParams(size=args.size)
    elif args.height is not None:
        image_params = AudioImageParams(height=args.height, width=args.width)
    else:
        image_params = AudioImageParams()
    image_key = image_params.key(mel.key())
    run_feature(store, manifest, AUDIO_IMAGE_FEATURE, image_key, image_params.params(), AUDIO_IMAGE_CODE_VERSION,
                compute_audio_image_shard, InProcessExecutor(), input_keys=(mel.key(),))
    images = read_image_set(store, manifest, "audio", image_key)
    train, val = images.subset("train"), images.subset("val")
    preset = get_preset(mel.preset)
    n_frames = preset.n_frames(mel.seconds)
    mels = store.read_arrays("demo", MEL_FEATURE, mel.key(), names=["mel"])
    by_id = dict(zip(mels.clip_ids, mels.arrays["mel"]))
    print(f"data: {len(train)} train / {len(val)} val audio images {list(train.images.shape[1:])} of the demo "
          f"({args.clips} clips; prepared in {time.perf_counter() - start:.0f} s)")

    base = VaeTrainConfig.for_modality("audio")
    overrides = {"steps": args.max_steps, "eval_every": args.eval_every, "patience": 0}
    if args.block_out_channels:
        overrides["block_out_channels"] = tuple(args.block_out_channels)
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    config = dataclasses.replace(base, **overrides)
    rows = _fixed_subset(len(val), config.max_val_images, config.seed)
    scored = val.images[rows]
    source = np.stack([by_id[val.clip_ids[i]] for i in rows]).astype(np.float32)

    def measure(step, vae) -> dict:
        recon = decode(vae, encode(vae, scored))
        m = audio_image_metrics(scored, recon, preset, n_frames, source)
        return {"psnr": round(psnr(scored, recon), 3), "mel_l1": round(m["mel_l1"], 4), "mel_l1_source": round(m["mel_l1_source_recon"], 4)}

    identity = audio_image_metrics(scored, scored, preset, n_frames, source)
    trivial = np.ascontiguousarray(np.broadcast_to(np.rint(train.images.mean(axis=0)).astype(np.uint8), scored.shape))
    mean_image = audio_image_metrics(scored, trivial, preset, n_frames, source)
    print(f"VAE: {list(config.block_out_channels)}, batch {config.batch_size}, lr {config.learning_rate}, budget {config.steps} steps, "
          f"rule: patience {args.patience} evaluations x {config.eval_every} steps, min_delta {args.min_delta:.1%}\n")
    print("| seed | step | val L1 | PSNR dB | mel L1 (vs image mel) | mel L1 vs source mel | rule |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    print(f"| - | no VAE (the audio image itself) | 0 | inf | 0 | {identity['mel_l1_source_image']:.4f} | control |")
    print(f"| - | mean training image | {np.abs(scored.astype(np.float32) - trivial).mean() / 127.5:.5f} | {psnr(scored, trivial):.2f} | "
          f"{mean_image['mel_l1']:.4f} | {mean_image['mel_l1_source_recon']:.4f} | control |")
    summary = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        result = train_vae(train.images, val.images, dataclasses.replace(config, seed=seed), on_eval=measure)
        seconds = time.perf_counter() - t0
        rule = PlateauRule(args.patience, args.min_delta)
        stop = None
        for h in result.history:
            if rule.update(h["val_l1"]) and stop is None and h["step"] < config.steps:
                stop = h["step"]
        kept = min((h for h in result.history if stop is None or h["step"] <= stop), key=lambda h: h["val_l1"])
        for h in result.history:
            mark = "stops here" if h["step"] == stop else ""
            mark += (", " if mark else "") + ("kept (best before the stop)" if h is kept else "")
            if h["step"] == 0:
                mark = "untrained (control)" + (", " + mark if mark else "")
            print(f"| {seed} | {h['step']} | {h['val_l1']:.5f} | {h['psnr']:.2f} | {h['mel_l1']:.4f} | {h['mel_l1_source']:.4f} | {mark} |")
        best = min(result.history, key=lambda h: h["val_l1"])
        summary.append((seed, stop, kept, best, seconds / max(config.steps, 1)))
    print("\n| seed | rule stops at | kept step | kept val L1 | best over the budget (step, val L1) | kept / best val L1 | s/step |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    for seed, stop, kept, best, per_step in summary:
        print(f"| {seed} | {stop if stop is not None else f'budget ({config.steps})'} | {kept['step']} | {kept['val_l1']:.5f} | "
              f"{best['step']}, {best['val_l1']:.5f} | {kept['val_l1'] / best['val_l1']:.3f} | {per_step:.2f} |")
    print(f"\nload average (1/5/15 min) at the end: {load_average()}; total {time.perf_counter() - start:.0f} s")
    print(f"date: {_dt.datetime.now().astimezone().isoformat(timespec='minutes')}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "curve":
        raise SystemExit(curve(sys.argv[2:]))
    raise SystemExit(main())
