"""Where does the way back to sound lose what aiSFX hears? The ceiling of every generation metric.

    .venv/bin/python bench/generation_ceiling.py --store .data/features [--dataset demo] [--sizes 64 128 256]

On the held-out split's real audio (22.05 kHz), scores each stage of the decode path that
generated audio goes through, cumulatively:

    real audio
    mel -> HiFi-GAN                                  (the vocoder alone)
    mel -> audio image (size px) -> mel -> HiFi-GAN  (the MM-LDM image, no VAE)
    stored latent -> audio VAE -> mel -> HiFi-GAN    (the oracle row of Tables I / II)

with "class acc" (a label probe on aiSFX embeddings of the real train audio; chance = 1 / classes),
FD / KL / IS (aiSFX) against the real audio. A generator cannot beat the last row.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from models.towers import AudioTower, get_tower
    from models.vocoder import get_vocoder
    from stages.evaluation import audio as audio_metrics
    from stages.generation import evaluate as generation_eval
    from stages.generation import sample as generation_sample
    from stages.generation import train as generation_train
    from stages.core.checkpoints import list_checkpoints
    from stages.ingest.manifest import load_manifest
    from stages.core.parallel import torch_threads
    from stages.features.spectral import MelSpectrogram, audio_image_to_mel, get_preset, mel_to_audio_image
    from stages.core.settings import open_store  # s3:// stores with the jobs' endpoint and retries
    from bench.generation_tables import label_probe

    store = open_store(args.store)
    manifest = load_manifest(store, args.dataset)
    found = list_checkpoints(store, args.dataset, generation_train.model_name("clap"))
    if manifest is None or not found:
        raise SystemExit(f"need a clip manifest and an audio_generator_clap checkpoint in {args.store}")
    _, sidecar = generation_train.load_generator(store, args.dataset, "clap", found[0]["checkpoint_key"])
    decoder = generation_sample.make_decoder(store, args.dataset, sidecar["audio_vae"], generation_sample.SampleConfig(threads=args.threads))
    rate, seconds, preset = decoder.sample_rate, decoder.seconds, get_preset(decoder.preset)
    pairs = generation_train.load_latent_pairs(store, manifest, "clap", sidecar["latent_key"], sidecar["embedding_key"])
    held_out = pairs.subset(args.split)
    ids, real = generation_eval.reference_audio(manifest, held_out.clip_ids, seconds, rate)
    held_out = held_out.subset(clip_ids=ids)
    probe, labels = label_probe(store, manifest, "clap", sidecar, rate, seconds, args.threads)
    truth = np.array([labels.get(c) for c in ids])
    tower, vocoder = get_tower(AudioTower), get_vocoder()

    with torch_threads(args.threads):
        reference = audio_metrics.aisfx_outputs(tower, real, rate, seconds)
        mels = np.asarray(MelSpectrogram(decoder.preset)(real), np.float32)
        stages = [("real audio", lambda: real), ("mel -> HiFi-GAN", lambda: vocoder(mels))]
        stages += [(f"mel -> image {size} px -> mel -> HiFi-GAN",
                    lambda size=size: vocoder(audio_image_to_mel(mel_to_audio_image(mels, preset, size), preset, mels.shape[-1])))
                   for size in args.sizes]
        stages.append(("stored latent -> VAE -> mel -> HiFi-GAN (oracle)", lambda: decoder(held_out.latents)["audio"]))
        print(f"# decode-path ceiling, {args.split} split, n = {len(ids)} clips, audio VAE {sidecar['audio_vae']['key']}")
        print("| stage | class acc | FD (aiSFX) | KL (aiSFX) | IS (aiSFX) |")
        print("| --- | --- | --- | --- | --- |")
        for name, make in stages:
            scored = audio_metrics.aisfx_outputs(tower, make(), rate, seconds)
            accuracy = 100 * np.mean(probe.predict(scored["pooled"]) == truth) if probe is not None else float("nan")
            print(f"| {name} | {accuracy:.1f} | {audio_metrics.frechet_distance_of(scored['pooled'], reference['pooled']):.1f} | "
                  f"{audio_metrics.paired_kl(reference['logits'], scored['logits']):.2f} | {audio_metrics.inception_score(scored['logits']):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
