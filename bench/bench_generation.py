"""Generation throughput: seconds of audio per second of compute for 50 / 20 / 5 DDIM steps.

    .venv/bin/python bench/bench_generation.py [--store ROOT --dataset demo] [--clips 4] [--repeats 3]

With a store holding a trained generator (audio_generator asset), it times that generator with
its VAE; otherwise an untrained generator of the default size on random conditions (the cost
does not depend on the weights) and the VAE only when a store has one. Three parts are timed
separately, since they scale differently: latent diffusion (steps x 2 UNet calls with guidance),
VAE decode + image -> mel, and the HiFi-GAN vocoder (fixed per second of audio). Medians of
``--repeats`` interleaved runs on ``--threads`` torch threads. Prints a ratio table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--clips", type=int, default=4, help="clips generated per call (one batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length when no store is given")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from models.generator import GeneratorConfig, LatentGenerator, sample_latents
    from models.vocoder import get_vocoder
    from stages.generation import sample as generation_sample
    from stages.generation import train as generation_train

    decoder = None
    if args.store:
        from stages.core.checkpoints import list_checkpoints
        from stages.core.settings import open_store  # s3:// stores with the jobs' endpoint and retries

        store = open_store(args.store)
        found = list_checkpoints(store, args.dataset, generation_train.model_name("clap"))
        if not found:
            raise SystemExit(f"no audio_generator_clap checkpoint in {args.store}: run without --store or materialize it")
        model, sidecar = generation_train.load_generator(store, args.dataset, "clap", found[0]["checkpoint_key"])
        decoder = generation_sample.make_decoder(store, args.dataset, sidecar["audio_vae"], generation_sample.SampleConfig(vocoder="hifigan"))
        seconds = decoder.seconds
        source = f"trained generator {found[0]['checkpoint_key']} + its VAE"
    else:
        torch.manual_seed(0)
        model = LatentGenerator(GeneratorConfig())
        seconds = args.seconds
        source = "untrained default-size generator (no VAE: decode not timed)"
    model.eval()
    cond = torch.nn.functional.normalize(torch.randn(args.clips, model.config.cond_dim), dim=-1)
    vocoder = get_vocoder()
    n_frames = int(round(seconds * 22050)) // 256 + 1
    mels = np.full((args.clips, 80, n_frames), -6.0, np.float32)
    vocoder(mels[:1, :, :16])  # warm-up
    sample_latents(model, cond[:1], steps=2, guidance_scale=args.guidance_scale)

    times: dict[str, list[float]] = {f"diffusion {s} steps": [] for s in (50, 20, 5)}
    times["VAE decode + mel"] = []
    times["HiFi-GAN vocoder"] = []
    latents = None
    for _ in range(args.repeats):
        for steps in (50, 20, 5):
            start = time.perf_counter()
            latents = sample_latents(model, cond, steps=steps, guidance_scale=args.guidance_scale,
                                     generator=torch.Generator().manual_seed(0))
            times[f"diffusion {steps} steps"].append(time.perf_counter() - start)
        if decoder is not None:
            from stages.vae.train import decode_latents
            from stages.generation.vocode import images_to_mels

            start = time.perf_counter()
            mels = images_to_mels(decode_latents(decoder.vae, latents.numpy(), decoder.scaling_factor), decoder.preset, seconds)
            times["VAE decode + mel"].append(time.perf_counter() - start)
        start = time.perf_counter()
        vocoder(mels)
        times["HiFi-GAN vocoder"].append(time.perf_counter() - start)

    audio = args.clips * seconds
    median = {k: statistics.median(v) for k, v in times.items() if v}
    tail = median.get("VAE decode + mel", 0.0) + median["HiFi-GAN vocoder"]
    print(f"# generation throughput: {args.clips} clips x {seconds:g} s per call, guidance {args.guidance_scale}, "
          f"{args.threads} threads, median of {args.repeats}; {source}")
    print(f"{'part':<28} {'seconds':>9} {'audio s / s':>12}")
    for name, value in median.items():
        print(f"{name:<28} {value:>9.3f} {audio / value:>12.2f}")
    print()
    print(f"{'end to end':<28} {'seconds':>9} {'audio s / s':>12} {'vs 50 steps':>12}")
    base = median["diffusion 50 steps"] + tail
    for steps in (50, 20, 5):
        total = median[f"diffusion {steps} steps"] + tail
        print(f"{f'{steps} steps':<28} {total:>9.3f} {audio / total:>12.2f} {base / total:>11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
