"""MM-LDM's signal decoder on val: does its DDIM reconstruction of the KL latents come from z?

For each autoencoder variant (JSON of AutoencoderTrainConfig fields; fitted on the train split and
stored, a second run reuses them), on the val split: the decoder's reconstruction MSE in the KL
latent space from the posterior mean of z (DDIM, the evaluation's decoder steps), the same decode
from *another* clip's z (the control: what the decoder makes without this clip's information),
and predicting the mean latent. Ratios are against the mean latent. A sample of p(x | z) has twice
the error of its mean, so "below the control" is the first bar and "below the mean latent" the
second.

    .venv/bin/python bench/mmldm_decoder.py --store .data/features \
        '[{"decoder_weighting": "eps"}, {"decoder_weighting": "x0", "snr_gamma": 200}]'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="feature store root with vae_latents (train_vae or train_mmldm ran on it)")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("variants", nargs="?", default='[{"decoder_weighting": "eps"}, {}]',
                        help="JSON list of AutoencoderTrainConfig overrides ({} = the default)")
    parser.add_argument("--max-clips", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=25)
    args = parser.parse_args()

    import numpy as np
    import torch

    from models.mmldm import decode_clips, make_scheduler
    from stages.core.checkpoints import list_checkpoints
    from stages.core.store import FeatureStore
    from stages.ingest.manifest import load_manifest
    from stages.mmldm import train as mmldm_train

    store = FeatureStore(args.store)
    manifest = load_manifest(store, args.dataset)
    made = list_checkpoints(store, args.dataset, mmldm_train.AUTOENCODER_NAME)
    if not made:
        raise SystemExit(f"no MM-LDM autoencoder in {args.store}/{args.dataset} to take the vae_latents key from: run train_mmldm first")
    vae_latent_key = made[-1]["vae_latent_key"]
    val = mmldm_train.load_clip_latents(store, manifest, vae_latent_key).of_split("val")
    rows = val.subset(range(min(args.max_clips, len(val))))
    print(f"val: {len(rows)} clips, vae_latents {vae_latent_key}, DDIM {args.decoder_steps} steps\n")
    print("| autoencoder | key | train s | audio MSE (x mean) | control: another clip's z | frames MSE (x mean) | control | class acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for change in json.loads(args.variants):
        config = mmldm_train.AutoencoderTrainConfig(**change)
        start = time.perf_counter()
        fit = mmldm_train.fit_autoencoder(store, manifest, vae_latent_key, config, log=lambda m: print(m, file=sys.stderr))
        seconds = fit.sidecar.get("train_seconds", time.perf_counter() - start)
        model = fit.model
        # own z and the mean latent: the fit's own val metrics (the same decode, seed 0)
        own = mmldm_train.autoencoder_metrics(model, rows, 0, max_clips=len(rows), steps=args.decoder_steps)
        mean_audio, mean_frames = own["audio_mse_mean_latent"], own["frames_mse_mean_latent"]
        a, f = own["audio_mse"], own["frames_mse"]
        post = mmldm_train.encode_posteriors(model, rows.audio, rows.frames)
        other = torch.roll(torch.arange(len(rows)), 1)  # the control: each clip decoded from the previous clip's z
        scheduler = make_scheduler(model.config.num_train_timesteps, model.config.beta_schedule)
        audio, frames = decode_clips(model, scheduler, torch.from_numpy(post["audio_mean"])[other], torch.from_numpy(post["video_mean"])[other],
                                     args.decoder_steps, torch.Generator().manual_seed(0))
        ca, cf = float(np.mean((audio.numpy() - rows.audio) ** 2)), float(np.mean((frames.numpy() - rows.frames) ** 2))
        label = json.dumps(change) if change else "default"
        accuracy = own.get("class_accuracy")
        print(f"| {label} | {fit.key} | {seconds:.0f} | {a:.3f} ({a / mean_audio:.2f}x) | {ca:.3f} ({ca / mean_audio:.2f}x) | "
              f"{f:.3f} ({f / mean_frames:.2f}x) | {cf:.3f} ({cf / mean_frames:.2f}x) | "
              + (f"{100 * accuracy:.0f}%" if accuracy is not None else "-") + " |", flush=True)


if __name__ == "__main__":
    main()
