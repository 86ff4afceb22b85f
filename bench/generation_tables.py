"""Tables I (V2A) and II (T2A) on a store that holds the trained generators and DiffGAP models,
as mean +- std over sampling seeds, at 50 / 20 / 5 DDIM steps, with a class-accuracy diagnostic.

    .venv/bin/python bench/generation_tables.py --store .data/features [--dataset demo] \
        [--seeds 0 1 2] [--steps 50 20 5] [--split test] [--spaces cavp clap]

Uses the newest audio_generator_{clap,cavp} checkpoint and the newest BST DiffGAP model of each
space, of the training seeds --generator-seed / --diffgap-seed (default: any generator, DiffGAP
seed 0). Training variance is larger than sampling variance: compare trainings of several seeds.

Besides the issue's metrics it prints "class acc": a logistic-regression probe on the aiSFX
embeddings of the real train clips' audio (at the generator's sample rate, so real and generated
audio share a bandwidth) predicts each generated clip's label; the real-audio row is its ceiling. It says whether the generated sound is the right *kind* of sound, which IS / FD on
69 sound-effect classes cannot on synthetic demo audio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from stages.evaluation import audio as audio_metrics  # noqa: E402
from stages.embeddings.spaces import get_space  # noqa: E402
from stages.generation import evaluate as generation_eval  # noqa: E402
from stages.generation import sample as generation_sample  # noqa: E402
from stages.generation import train as generation_train  # noqa: E402
from stages.diffgap import train as diffgap_train  # noqa: E402

COLUMNS = {"V2A": ["IS (aiSFX)", "KL (aiSFX)", "FD (aiSFX)", "Acc", "class acc"],
           "T2A": ["IS (aiSFX)", "KL (aiSFX)", "FAD (aiSFX)", "FD (aiSFX)", "class acc"]}


def label_probe(store, manifest, space: str, sidecar: dict, rate: int, seconds: float, threads: int):
    """(probe, labels by clip id) or (None, {}) when the manifest has no labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from models.towers import AudioTower, get_tower
    from stages.core.parallel import torch_threads

    index = manifest.index()
    pairs = generation_train.load_latent_pairs(store, manifest, space, sidecar["latent_key"], sidecar["embedding_key"])
    train_ids = [c for c in pairs.subset("train").clip_ids if index[c].label]
    if len({index[c].label for c in train_ids}) < 2:
        return None, {}
    ids, audio = generation_eval.reference_audio(manifest, train_ids, seconds, rate)
    with torch_threads(threads):
        pooled = audio_metrics.aisfx_outputs(get_tower(AudioTower), audio, rate, seconds)["pooled"]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000)).fit(pooled, [index[c].label for c in ids])
    return probe, {c.id: c.label for c in manifest.clips}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 20, 5])
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-clips", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generator-seed", type=int, default=None, help="training seed of the generator (default: the newest)")
    parser.add_argument("--diffgap-seed", type=int, default=0, help="training seed of the DiffGAP model")
    parser.add_argument("--spaces", nargs="+", default=["cavp", "clap"], choices=["cavp", "clap"],
                        help="cavp = Table I (V2A), clap = Table II (T2A)")
    args = parser.parse_args()


    from stages.core.checkpoints import list_checkpoints
    from stages.ingest.manifest import load_manifest
    from stages.core.settings import open_store  # s3:// stores with the jobs' endpoint and retries

    store = open_store(args.store)
    manifest = load_manifest(store, args.dataset)
    if manifest is None:
        raise SystemExit(f"no clip manifest for dataset {args.dataset!r} in {args.store}")
    for space in args.spaces:
        generators = [s for s in list_checkpoints(store, args.dataset, generation_train.model_name(space))
                      if args.generator_seed is None or s["train_config"]["seed"] == args.generator_seed]
        diffgaps = [s for s in list_checkpoints(store, args.dataset, diffgap_train.model_name(space))
                    if s["train_config"]["bst"] and s["train_config"]["seed"] == args.diffgap_seed]
        if not generators or not diffgaps:
            print(f"<!-- {space}: no generator or DiffGAP checkpoint; skipped -->")
            continue
        model, sidecar = generation_train.load_generator(store, args.dataset, space, generators[0]["checkpoint_key"])
        diffgap, _ = diffgap_train.load_model(store, args.dataset, space, diffgaps[0]["checkpoint_key"])
        task = get_space(space).task
        results: dict[tuple[str, int], list[dict]] = {}
        probe = labels = None
        trust = []
        start = time.perf_counter()
        for steps in args.steps:
            for i, seed in enumerate(args.seeds):
                sample = generation_sample.SampleConfig(steps=steps, seed=seed, guidance_scale=args.guidance_scale, threads=args.threads)
                # the oracle and the real audio do not depend on seed or steps: score them once
                once = steps == args.steps[0] and i == 0
                evaluation = generation_eval.EvalConfig(args.split, args.max_clips, oracle=once)
                rows, outputs = generation_eval.evaluate_space(store, manifest, space, model, sidecar, diffgap, sample, evaluation)
                if probe is None:
                    decoder = generation_sample.make_decoder(store, args.dataset, sidecar["audio_vae"], generation_sample.SampleConfig(vocoder="griffinlim"))
                    probe, labels = label_probe(store, manifest, space, sidecar, decoder.sample_rate, decoder.seconds, args.threads)
                for row in rows:
                    if row["method"] == generation_eval.REAL and not once:
                        continue
                    out = outputs[row["method"]]
                    if probe is not None:
                        truth = [labels[c] for c in out["clip_ids"]]
                        row["class acc"] = float(100 * np.mean(probe.predict(out["aisfx"]["pooled"]) == np.array(truth)))
                    shown_steps = steps if row["method"] in generation_eval.SAMPLED else "-"
                    results.setdefault((row["method"], shown_steps), []).append(row)
                    if "Acc (real pairs vs misaligned)" in row:
                        trust.append(row["Acc (real pairs vs misaligned)"])
        columns = COLUMNS[task]
        n = next(iter(results.values()))[0]["n"]
        print(f"\n### Table {'I' if task == 'V2A' else 'II'} ({task}), {args.split} split, n = {n} clips, "
              f"mean +- std over sampling seeds {args.seeds}, guidance {args.guidance_scale}, "
              f"generator {generators[0]['checkpoint_key']}, DiffGAP {diffgaps[0]['checkpoint_key']} "
              f"({time.perf_counter() - start:.0f} s)\n")
        print("| method | steps | " + " | ".join(columns) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
        for (method, steps), rows in results.items():
            cells = []
            for column in columns:
                values = np.array([r.get(column, np.nan) for r in rows], float)
                cells.append(f"{values.mean():.2f}" + (f" +- {values.std():.2f}" if len(values) > 1 else ""))
            print(f"| {method} | {steps} | " + " | ".join(cells) + " |")
        if trust:
            print(f"\nAlignment classifier on real aligned + misaligned {args.split} pairs: {np.mean(trust):.1f}% correct.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
