"""MM-LDM's tables over several trainings (issue 17): the DiT trained with several seeds on the
latents `train_mmldm` cached (Table 1's rows: svg, a2v, v2a at each phi, with ground truth, the
autoencoder's reconstruction and a control), and the autoencoder ablations of Table 5 (without the
semantic space; two decoders instead of one), each with its own latents, evaluated on its
reconstruction as the paper's Table 5 is.

    # once: the features, the default autoencoder and DiT of the demo
    .venv/bin/dagster job execute -j train_mmldm
    # the DiT over 3 trainings, test split
    nice -n 5 .venv/bin/python bench/mmldm_tables.py --store .data/features --seeds 0 1 2
    # Table 5: autoencoder variants, reconstruction rows (rFAD / rFVD / rKVD, as the paper's); with
    # --ablations the seeds are the autoencoders' (each: autoencoder -> its latents -> reconstruction)
    nice -n 5 .venv/bin/python bench/mmldm_tables.py --store .data/features --ablations --seeds 0 1

    # Table 1 with the signal-space baseline (the same DiT on the signals, no autoencoder; one per seed):
    nice -n 5 .venv/bin/python bench/mmldm_tables.py --store .data/features --seeds 0 --signal-baseline --baseline-steps 600

Checkpoints, latents and evaluations are stored (a second run reuses them); ``--ae-steps`` /
``--dit-steps`` train for fewer steps than the assets' defaults (say so when you report it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ABLATIONS = {"MM-LDM": {}, "without semantic space": {"semantic": False}, "two decoders": {"shared_decoder": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="feature store root (train_mmldm ran on it)")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablations", action="store_true", help="Table 5: the autoencoder variants")
    parser.add_argument("--ae-steps", type=int, default=0)
    parser.add_argument("--dit-steps", type=int, default=0)
    parser.add_argument("--phi", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--max-clips", type=int, default=64)
    parser.add_argument("--split", default="test")
    parser.add_argument("--signal-baseline", action="store_true", help="Table 1: add the signal-space baseline's rows")
    parser.add_argument("--baseline-steps", type=int, default=600, help="its training steps (equal wall time, not equal steps)")
    parser.add_argument("--baseline-batch", type=int, default=8)
    args = parser.parse_args()

    from stages.core.checkpoints import list_checkpoints
    from stages.core.results import cached_result
    from stages.core.store import FeatureStore, feature_key
    from stages.features.base import ShardJob, registered_feature
    from stages.ingest.manifest import load_manifest
    from stages.cmmd.evaluate import load_towers
    from stages.mmldm import evaluate as mmldm_eval
    from stages.mmldm import train as mmldm_train
    from stages.mmldm.latents import MMLDM_LATENT_FEATURE, MmldmLatentParams

    store = FeatureStore(args.store)
    manifest = load_manifest(store, args.dataset)
    made = list_checkpoints(store, args.dataset, mmldm_train.AUTOENCODER_NAME)
    if not made:
        raise SystemExit(f"no MM-LDM autoencoder in {args.store}/{args.dataset}: run `dagster job execute -j train_mmldm` first")
    vae_latent_key = made[-1]["vae_latent_key"]
    towers = load_towers()
    eval_config = mmldm_eval.MmldmEvalConfig(split=args.split, max_clips=args.max_clips, phi=tuple(args.phi))
    rows = []

    def autoencoder_and_latents(name: str, change: dict, seed: int):
        """The stored (or newly fitted) autoencoder of this variant and seed, and its cached latents' key."""
        ae_config = mmldm_train.AutoencoderTrainConfig(**change, seed=seed, **({"steps": args.ae_steps} if args.ae_steps else {}))
        start = time.perf_counter()
        ae = mmldm_train.fit_autoencoder(store, manifest, vae_latent_key, ae_config, log=print)
        print(f"{name} seed {seed}: autoencoder {ae.key} {ae.status} ({time.perf_counter() - start:.0f} s); {ae.sidecar['metrics']}")
        params = MmldmLatentParams(ae.key)
        latent_key = params.key(vae_latent_key)
        feature = registered_feature(MMLDM_LATENT_FEATURE)
        done = set(store.committed_shards(args.dataset, MMLDM_LATENT_FEATURE, latent_key))
        for shard, clips in sorted(manifest.by_shard().items()):
            if shard not in done:
                feature.compute_shard(ShardJob(store.url_root, {}, args.dataset, MMLDM_LATENT_FEATURE, latent_key, shard,
                                               tuple((c.id, c.uri, c.content_hash) for c in clips), params.params(),
                                               feature.code_version, (ae.key, vae_latent_key)))
        return ae, latent_key

    def signal_baseline_rows(seed: int, latent_key: str) -> list[dict]:
        """The signal-space baseline's svg / a2v / v2a rows (trained here, its evaluation cached)."""
        from stages.mmldm import signal_baseline

        config = mmldm_train.DitTrainConfig(seed=seed, steps=args.baseline_steps, batch_size=args.baseline_batch)
        base_config = mmldm_eval.MmldmEvalConfig(split=args.split, max_clips=args.max_clips, phi=tuple(args.phi), tasks=())
        params = {"dit": config.params(), "audio_patch": list(signal_baseline.AUDIO_PATCH),
                  "video_patch": list(signal_baseline.VIDEO_PATCH), "evaluation": base_config.params()}
        key = feature_key("mmldm_signal_baseline", params, "1", [vae_latent_key, latent_key, manifest.digest()])

        def run() -> dict:
            baseline = signal_baseline.train_signal_baseline(store, manifest, vae_latent_key, config, log=print)
            print(f"{signal_baseline.LABEL} seed {seed}: {baseline.steps} steps in {baseline.seconds_trained:.0f} s")
            result = mmldm_eval.evaluate_mmldm(store, manifest, None, None, {"mmldm_latent_key": latent_key}, vae_latent_key,
                                               base_config, log=print, keep_samples=0, towers=towers, baseline=baseline)
            return {"rows": result.rows, "train_seconds": baseline.seconds_trained, "steps": baseline.steps}

        result = cached_result(store, args.dataset, "mmldm_signal_baseline", key, run, provenance={"params": params}, log=print)
        print(f"{signal_baseline.LABEL} seed {seed}: trained {result.value['steps']} steps in {result.value['train_seconds']:.0f} s")
        return [{**row, "seed": seed} for row in result.value["rows"] if row["model"] == signal_baseline.LABEL]

    if args.ablations:  # Table 5: each variant's reconstruction rows, one autoencoder per seed
        recon_config = mmldm_eval.MmldmEvalConfig(split=args.split, max_clips=args.max_clips, tasks=())
        for name, change in ABLATIONS.items():
            for seed in args.seeds:
                ae, latent_key = autoencoder_and_latents(name, change, seed)
                key = feature_key("mmldm_evaluation", recon_config.params(), "1", [ae.key, latent_key, manifest.digest()])
                result = cached_result(store, args.dataset, "mmldm_evaluation", key,
                                       lambda: mmldm_eval.evaluate_reconstruction(store, manifest, ae.key, latent_key, recon_config,
                                                                                  towers=towers, label=name, log=print),
                                       provenance={"mmldm_autoencoder": ae.key, "config": recon_config.params()}, log=print)
                for row in result.value["rows"]:
                    if row["model"] == mmldm_eval.RECONSTRUCTION:
                        rows.append({**row, "model": f"{mmldm_eval.RECONSTRUCTION} ({name})", "seed": seed})
                    elif name == "MM-LDM":  # ground truth and the control: once
                        rows.append({**row, "seed": seed})
    else:  # Table 1: the default autoencoder, one DiT per seed
        ae, latent_key = autoencoder_and_latents("MM-LDM", {}, 0)
        for seed in args.seeds:
            dit_config = mmldm_train.DitTrainConfig(seed=seed, **({"steps": args.dit_steps} if args.dit_steps else {}))
            start = time.perf_counter()
            dit = mmldm_train.fit_dit(store, manifest, latent_key, ae.key, dit_config, log=print)
            print(f"MM-LDM seed {seed}: DiT {dit.key} {dit.status} ({time.perf_counter() - start:.0f} s)")
            key = feature_key("mmldm_evaluation", eval_config.params(), "1", [dit.key, manifest.digest()])
            result = cached_result(store, args.dataset, "mmldm_evaluation", key,
                                   lambda: mmldm_eval.evaluate_checkpoint(store, manifest, dit.key, eval_config, towers=towers,
                                                                          label="MM-LDM", log=print),
                                   provenance={"mmldm": dit.key, "config": eval_config.params()}, log=print)
            rows += [{**row, "seed": seed} for row in result.value["rows"]]
            if args.signal_baseline:
                rows += signal_baseline_rows(seed, latent_key)
    title = "Table 5 (autoencoder variants, reconstruction)" if args.ablations else "Table 1"
    print(f"\n## MM-LDM on the {args.split} split, {title}: {len(args.seeds)} training(s) (seeds {args.seeds}), "
          f"{eval_config.steps} DDIM steps, decoder {eval_config.decoder_steps} steps"
          + (f", autoencoder {args.ae_steps} steps" if args.ae_steps else "") + (f", DiT {args.dit_steps} steps" if args.dit_steps else ""))
    print(mmldm_eval.table_markdown(rows))


if __name__ == "__main__":
    main()
