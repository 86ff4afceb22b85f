"""MM-LDM's tables over several trainings (issue 17): the DiT trained with several seeds on the
latents `train_mmldm` cached (Table 1's rows: svg, a2v, v2a at each phi, with ground truth, the
autoencoder's reconstruction and a control), and the autoencoder ablations of Table 5 (without the
semantic space; two decoders instead of one), each with its own latents and DiT.

    # once: the features, the default autoencoder and DiT of the demo
    .venv/bin/dagster job execute -j train_mmldm
    # the DiT over 3 trainings, test split
    nice -n 5 .venv/bin/python bench/mmldm_tables.py --store .data/features --seeds 0 1 2
    # Table 5: autoencoder variants (each: autoencoder -> latents -> DiT seed 0 -> evaluation)
    nice -n 5 .venv/bin/python bench/mmldm_tables.py --store .data/features --ablations --seeds 0

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
    variants = ABLATIONS if args.ablations else {"MM-LDM": {}}
    for name, change in variants.items():
        ae_config = mmldm_train.AutoencoderTrainConfig(**change, **({"steps": args.ae_steps} if args.ae_steps else {}))
        start = time.perf_counter()
        ae = mmldm_train.fit_autoencoder(store, manifest, vae_latent_key, ae_config, log=print)
        print(f"{name}: autoencoder {ae.key} {ae.status} ({time.perf_counter() - start:.0f} s); {ae.sidecar['metrics']}")
        params = MmldmLatentParams(ae.key)
        latent_key = params.key(vae_latent_key)
        feature = registered_feature(MMLDM_LATENT_FEATURE)
        done = set(store.committed_shards(args.dataset, MMLDM_LATENT_FEATURE, latent_key))
        for shard, clips in sorted(manifest.by_shard().items()):
            if shard not in done:
                feature.compute_shard(ShardJob(store.url_root, {}, args.dataset, MMLDM_LATENT_FEATURE, latent_key, shard,
                                               tuple((c.id, c.uri, c.content_hash) for c in clips), params.params(),
                                               feature.code_version, (ae.key, vae_latent_key)))
        for seed in args.seeds:
            dit_config = mmldm_train.DitTrainConfig(seed=seed, **({"steps": args.dit_steps} if args.dit_steps else {}))
            start = time.perf_counter()
            dit = mmldm_train.fit_dit(store, manifest, latent_key, ae.key, dit_config, log=print)
            print(f"{name} seed {seed}: DiT {dit.key} {dit.status} ({time.perf_counter() - start:.0f} s)")
            key = feature_key("mmldm_evaluation", eval_config.params(), "1", [dit.key, manifest.digest()])
            result = cached_result(store, args.dataset, "mmldm_evaluation", key,
                                   lambda: mmldm_eval.evaluate_checkpoint(store, manifest, dit.key, eval_config, towers=towers, label=name,
                                                                          log=print),
                                   provenance={"mmldm": dit.key, "config": eval_config.params()}, log=print)
            for row in result.value["rows"]:
                if row["model"] in (mmldm_eval.RECONSTRUCTION,) and name != "MM-LDM":
                    row = {**row, "model": f"{mmldm_eval.RECONSTRUCTION} ({name})"}
                if name != "MM-LDM" and row["model"] in (mmldm_eval.GROUND_TRUTH, mmldm_eval.CONTROL):
                    continue  # the same rows as the default's
                rows.append({**row, "seed": seed})
    title = "Table 5 (autoencoder variants)" if args.ablations else "Table 1"
    print(f"\n## MM-LDM on the {args.split} split, {title}: {len(args.seeds)} training(s) (seeds {args.seeds}), "
          f"{eval_config.steps} DDIM steps, decoder {eval_config.decoder_steps} steps"
          + (f", autoencoder {args.ae_steps} steps" if args.ae_steps else "") + (f", DiT {args.dit_steps} steps" if args.dit_steps else ""))
    print(mmldm_eval.table_markdown(rows))


if __name__ == "__main__":
    main()
