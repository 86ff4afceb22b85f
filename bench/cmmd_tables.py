"""CMMD's tables over several trainings (issue 16): CMMD, nCMMD (eta 0) and CMMD without fusion, each
trained with several seeds on the features `train_cmmd` cached, evaluated V2A and A2V at lambda 0
and the chosen lambda; mean +- std over trainings, with ground truth and a control in every table.

    # once: the features (and one default CMMD) of the demo
    .venv/bin/dagster job execute -j train_cmmd
    # lambda on the val split (never on test), seed 0 of CMMD
    nice -n 10 .venv/bin/python bench/cmmd_tables.py --store .data/features --choose-lambda 0 0.01 0.05 0.2
    # the tables on test over 3 trainings
    nice -n 10 .venv/bin/python bench/cmmd_tables.py --store .data/features --seeds 0 1 2
    # sampling twice the training window (the paper's test setting), CMMD seed 0
    nice -n 10 .venv/bin/python bench/cmmd_tables.py --store .data/features --seeds 0 --variants CMMD --length-factor 2

Checkpoints and evaluations are stored (reused by a second run); ``--steps`` trains each model for
fewer steps than the asset's default (say so when you report it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {"CMMD": {}, "nCMMD": {"eta": 0.0}, "CMMD without fusion": {"fusion": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="feature store root (train_cmmd ran on it)")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=0, help="training steps per model (0 = the asset's default)")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=None, help="lambdas (default: 0 and the chosen one)")
    parser.add_argument("--choose-lambda", type=float, nargs="+", default=None,
                        help="evaluate seed-0 CMMD on the val split at these lambdas and print the best (V2A onset F1 at 100 ms)")
    parser.add_argument("--max-clips", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length-factor", type=int, default=1,
                        help="sample this many times the training window (2: the paper's test setting; only clips that long)")
    args = parser.parse_args()

    from stages.cmmd import evaluate as cmmd_eval
    from stages.cmmd import train as cmmd_train
    from stages.core.checkpoints import list_checkpoints
    from stages.core.store import FeatureStore
    from stages.features.latents import LATENT_FEATURE
    from stages.ingest.manifest import load_manifest

    store = FeatureStore(args.store)
    manifest = load_manifest(store, args.dataset)
    made = [s for s in list_checkpoints(store, args.dataset, cmmd_train.CMMD_NAME) if s.get("shards_seen") == sorted(manifest.by_shard())]
    if not made:
        raise SystemExit(f"no CMMD checkpoint for the current manifest of {args.dataset}: run `dagster job execute -j train_cmmd` first")
    ref = made[-1]  # the oldest: the job's default model
    mel_latent_key, frame_latent_key, mel_key = ref["mel_latent_key"], ref["frame_latent_key"], ref["mel_key"]
    shard = sorted(manifest.by_shard())[0]
    latent_manifest = store.shard_manifest(args.dataset, LATENT_FEATURE, frame_latent_key, shard)
    vae = latent_manifest["params"]["vaes"]["frames"]
    frames_key = latent_manifest["params"]["inputs"]["frames"]["key"]
    towers = cmmd_eval.load_towers()
    print(f"# cmmd_tables: {args.store} {args.dataset}, {len(manifest.clips)} clips; frames {frames_key}, frame VAE {vae['key']}, "
          f"mel latents {mel_latent_key}; load {os.getloadavg()[0]:.1f}")
    print(f"# command: {' '.join(sys.argv)}")

    def fit(variant: str, seed: int):
        fields = {**VARIANTS[variant], "seed": seed, "threads": args.threads}
        if args.steps:
            fields["steps"] = args.steps
        config = cmmd_train.CmmdTrainConfig(**fields)
        start = time.perf_counter()
        fitted = cmmd_train.fit_cmmd(store, manifest, mel_latent_key, frame_latent_key, config, mel_key=mel_key)
        print(f"# {variant} seed {seed}: {fitted.status} in {time.perf_counter() - start:.0f} s "
              f"(train {fitted.sidecar['train_seconds']:.0f} s, {fitted.sidecar['steps_run']} steps), key {fitted.key}", flush=True)
        return fitted

    def evaluate(fitted, split: str, guidance) -> list[dict]:
        config = cmmd_eval.CmmdEvalConfig(split=split, max_clips=args.max_clips, steps=args.ddim_steps, guidance=guidance,
                                          length_factor=args.length_factor, threads=args.threads)
        from stages.core.results import cached_result
        from stages.core.store import feature_key

        key = feature_key("cmmd_tables", config.params(), "2", [fitted.key, frames_key])
        start = time.perf_counter()
        result = cached_result(store, args.dataset, "cmmd_tables", key, lambda: cmmd_eval.evaluate_checkpoint(
            store, manifest, fitted.key, frames_key, vae["key"], vae["scaling_factor"], config, towers=towers, keep_samples=0))
        print(f"#   evaluated on {split} ({'reused' if result.reused else f'{time.perf_counter() - start:.0f} s'})", flush=True)
        return result.value["rows"]

    if args.choose_lambda:
        rows = evaluate(fit("CMMD", 0), "val", args.choose_lambda)
        print("\n## lambda on the val split (CMMD, seed 0)\n")
        for task in ("V2A", "A2V"):
            print(cmmd_eval.table_markdown(rows, task) + "\n")
        def f1(row):  # the hit rate alone rewards onsets everywhere; precision alone, few onsets
            recall, precision = row.get("onset hit 100 ms", 0.0), row.get("onset precision 100 ms", 0.0)
            return 2 * recall * precision / max(recall + precision, 1e-12)

        scored = [(f1(r), r["lambda"]) for r in rows if r["task"] == "V2A" and r["model"] == "CMMD"]
        best = max(scored)
        print(f"chosen lambda (V2A onset F1 at 100 ms on val): {best[1]:g} ({best[0] * 100:.1f}%); all: "
              + ", ".join(f"{g:g}: {v * 100:.1f}%" for v, g in scored))
        return

    guidance = args.guidance if args.guidance is not None else [0.0, cmmd_eval.DEFAULT_GUIDANCE]
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            found = evaluate(fit(variant, seed), "test", guidance)
            # ground truth / control / real rows do not depend on the model: keep one training's
            rows += [r for r in found if r["model"] in VARIANTS or seed == args.seeds[0] and variant == args.variants[0]]
    print(f"\n## CMMD on the test split, {len(args.seeds)} trainings per variant (seeds {args.seeds}), "
          f"{args.ddim_steps} DDIM steps{f', {args.steps} training steps' if args.steps else ''}"
          f"{f', sampled at {args.length_factor}x the training window' if args.length_factor != 1 else ''}\n")
    for task in ("V2A", "A2V"):
        print(f"### {task}\n\n" + cmmd_eval.table_markdown(rows, task) + "\n")


if __name__ == "__main__":
    main()
