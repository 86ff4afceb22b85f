"""Why does (or doesn't) DiffGAP help? A sweep over the knobs the issue names, on a store that
already holds the train_diffgap outputs: samples averaged per query, sampling steps, training
length, and the modality gap. Decisions are read off the validation split; test is printed
beside it only to report, never to choose.

    .venv/bin/python bench/diffgap_sweep.py --store .data/features [--dataset demo]
"""

from __future__ import annotations

import argparse


from models.diffgap import FROM_AUDIO, TO_AUDIO
from stages.diffgap import evaluate as diffgap_eval
from stages.diffgap import train as diffgap_train
from stages.core.checkpoints import list_checkpoints
from stages.ingest.manifest import load_manifest
from stages.core.parallel import torch_threads
from stages.core.settings import open_store  # s3:// stores with the jobs' endpoint and retries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--long-steps", type=int, default=9000, help="a longer training run to compare with")
    args = parser.parse_args()
    store = open_store(args.store)
    manifest = load_manifest(store, args.dataset)
    print("| space | direction | variant | val R@1 (blend) | val R@1 (generated only) | test R@1 (blend) | w |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with torch_threads(1):
        for space in ("clap", "cavp"):
            main_ckpt = next(s for s in list_checkpoints(store, args.dataset, diffgap_train.model_name(space))
                             if s["train_config"]["bst"] and s["train_config"]["seed"] == 0
                             and s["train_config"]["bst_interval"] == diffgap_train.DiffgapTrainConfig().bst_interval)
            config = diffgap_train.DiffgapTrainConfig(**main_ckpt["train_config"])
            data = diffgap_eval.split_pairs(diffgap_train.load_pairs(store, manifest, space, main_ckpt["embedding_key"]))
            print(f"<!-- {space} gap on train: {diffgap_train.gap_statistics(data.train)} -->")
            model, _ = diffgap_train.load_model(store, args.dataset, space, main_ckpt["checkpoint_key"])
            long = diffgap_train.fit_space(store, manifest, space, main_ckpt["embedding_key"],
                               diffgap_train.DiffgapTrainConfig(**{**config.params(), "steps": args.long_steps})).model
            variants = [("k=1, 50 steps", model, 1, 50), ("k=4, 50 steps", model, 4, 50), ("k=16, 50 steps", model, 16, 50),
                        ("k=64, 50 steps", model, 64, 50), ("k=16, 5 steps", model, 16, 5),
                        (f"k=16, {args.long_steps} train steps", long, 16, 50)]
            for direction in (TO_AUDIO, FROM_AUDIO):
                vq, vg = data.val.condition_target(direction)
                tq, tg = data.test.condition_target(direction)
                base_val = diffgap_eval.blended_metrics(vq, vg, vq, 0.0)["R@1"]
                base_test = diffgap_eval.blended_metrics(tq, tg, tq, 0.0)["R@1"]
                name = diffgap_train.direction_names(space)[direction]
                print(f"| {space} | {name} | base encoder | {base_val:.1f} | | {base_test:.1f} | |")
                for label, m, k, steps in variants:
                    vp = diffgap_eval.generate(m, vq, direction, steps=steps, samples=k, seed=0)
                    w = diffgap_eval.choose_blend(vq, vg, vp)
                    tp = diffgap_eval.generate(m, tq, direction, steps=steps, samples=k, seed=1)
                    print(f"| {space} | {name} | {label} | {diffgap_eval.blended_metrics(vq, vg, vp, w)['R@1']:.1f} | "
                          f"{diffgap_eval.blended_metrics(vq, vg, vp, 1.0)['R@1']:.1f} | {diffgap_eval.blended_metrics(tq, tg, tp, w)['R@1']:.1f} | {w:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
