"""Fit one audio VAE variant on a store and write its audio-only ``vae_latents``, for the oracle row
of ``bench/generation_ceiling.py --latent-key <key>`` (the key is printed last).

    .venv/bin/python bench/fit_audio_vae.py --store /tmp/m15/store [--dataset demo] ['{"latent_channels": 8}']

The JSON sets fields of ``stages.vae.train.AudioVaeTrainConfig`` (the audio VAE's defaults); the
store needs the default mel_spectrograms and audio_images (``dagster job execute -j train_vae`` or
``refresh_features`` makes them). A fitted key is reused, as the assets reuse it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON of AudioVaeTrainConfig fields")
    args = parser.parse_args()

    from stages.core.parallel import InProcessExecutor
    from stages.core.settings import open_store
    from stages.features.base import run_feature
    from stages.features.latents import LATENT_CODE_VERSION, LATENT_FEATURE, LatentParams, compute_latent_shard
    from stages.features.mel import AudioImageParams, MelParams
    from stages.ingest.manifest import load_manifest
    from stages.vae.train import AUDIO_VAE, VaeTrainConfig, fit_vae

    store = open_store(args.store)
    manifest = load_manifest(store, args.dataset)
    if manifest is None:
        raise SystemExit(f"no clip manifest for {args.dataset!r} in {args.store}: run refresh_features first")
    image_key = AudioImageParams().key(MelParams().key())
    config = VaeTrainConfig.for_modality("audio", **json.loads(args.overrides))
    start = time.perf_counter()
    fit = fit_vae(store, manifest, AUDIO_VAE, "audio", image_key, config, log=lambda line: print(line, flush=True))
    stopping = fit.sidecar.get("stopping") or {}
    print(f"fit {fit.key} in {time.perf_counter() - start:.0f} s ({'reused' if fit.reused else 'trained'}): "
          f"steps {fit.sidecar['steps']}, best step {fit.sidecar['best_step']}, learning-rate drops at "
          f"{stopping.get('lr_drop_steps')}, stopped by {stopping.get('stopped_by')}")
    print("val L1 per evaluation:", [(h["step"], h["val_l1"]) for h in fit.sidecar["history"]])
    vaes = {"audio": {"name": AUDIO_VAE, "key": fit.key, "scaling_factor": fit.scaling_factor}}
    params = LatentParams(modalities=("audio",)).job_params(vaes, {"audio": image_key})
    key = LatentParams.key(params)
    run_feature(store, manifest, LATENT_FEATURE, key, params, LATENT_CODE_VERSION, compute_latent_shard, InProcessExecutor(),
                input_keys=LatentParams.input_keys(params))
    print(f"vae_latents key {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
