"""Generate audio from the command line with the trained generators (and DiffGAP) in a feature store.

    python -m stages.generate_cli --store .data/features --clip-id demo_000123 --clip-id demo_000200
    python -m stages.generate_cli --store .data/features --text "a dog barks" --steps 20 --out /tmp/gen

Clip ids: text-to-audio from the clip's caption embedding (CLAP) and video-to-audio from its video
embedding (CAVP), each without and with DiffGAP. Text: the text tower + the CLAP head embed it.
Writes <out>/<name>__<T2A|V2A>__<baseline|diffgap>.wav (22.05 kHz) and a spectrogram preview PNG
per request; prints what it wrote. The newest checkpoints are used unless keys are given.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


from stages.embeddings.spaces import SPACES, get_space
def _newest(store, dataset: str, name: str, key: str | None) -> str:
    from stages.core.checkpoints import list_checkpoints

    if key:
        return key
    found = list_checkpoints(store, dataset, name)
    if not found:
        raise SystemExit(f"no {name} checkpoint for dataset {dataset!r} in {store.url_root}: materialize it first")
    return found[0]["checkpoint_key"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Text/video-to-audio generation with and without DiffGAP.")
    parser.add_argument("--store", default=None, help="feature store root (default: XMODAL_STORE_ROOT or .data/features)")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--clip-id", action="append", default=[], help="clip whose caption / video conditions the audio (repeatable)")
    parser.add_argument("--text", action="append", default=[], help="free-text prompt (repeatable)")
    parser.add_argument("--space", choices=[*SPACES, "both"], default="both", help="for clip ids: T2A (clap), V2A (cavp) or both")
    parser.add_argument("--diffgap", choices=["with", "without", "both"], default="both")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (50, 20, 5)")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocoder", choices=["hifigan", "griffinlim"], default="hifigan")
    parser.add_argument("--generator-key", action="append", default=[], metavar="SPACE=KEY", help="checkpoint key per space")
    parser.add_argument("--diffgap-key", action="append", default=[], metavar="SPACE=KEY", help="DiffGAP checkpoint key per space")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="generated", help="local output folder")
    args = parser.parse_args(argv)
    if not args.clip_id and not args.text:
        parser.error("give at least one --clip-id or --text")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import soundfile as sf

    from stages.generation import sample as generation_sample
    from stages.generation import train as generation_train
    from stages.diffgap.train import load_model
    from stages.ingest.manifest import load_manifest
    from stages.core.preview import preview_png
    from stages.core.store import FeatureStore

    if args.store is None:
        from pathlib import Path

        args.store = os.environ.get("XMODAL_STORE_ROOT", str(Path(__file__).resolve().parents[1] / ".data" / "features"))
    store = FeatureStore(args.store)
    gen_keys = dict(k.split("=", 1) for k in args.generator_key)
    gap_keys = dict(k.split("=", 1) for k in args.diffgap_key)
    sample = generation_sample.SampleConfig(steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, vocoder=args.vocoder,
                            threads=args.threads)
    spaces = list(SPACES) if args.space == "both" else [args.space]
    if args.text and "clap" not in spaces:
        spaces.insert(0, "clap")
    manifest = load_manifest(store, args.dataset) if args.clip_id else None
    if args.clip_id and manifest is None:
        raise SystemExit(f"no clip manifest for dataset {args.dataset!r} in {store.url_root}")
    os.makedirs(args.out, exist_ok=True)
    written = []
    for space in spaces:
        model, sidecar = generation_train.load_generator(store, args.dataset, space, _newest(store, args.dataset, generation_train.model_name(space), gen_keys.get(space)))
        diffgap = None
        if args.diffgap != "without":
            diffgap, _ = load_model(store, args.dataset, space, _newest(store, args.dataset, f"diffgap_{space}", gap_keys.get(space)))
        decoder = generation_sample.make_decoder(store, args.dataset, sidecar["audio_vae"], sample)
        requests = []
        if args.clip_id and (args.space in ("both", space)):
            pairs = generation_train.load_latent_pairs(store, manifest, space, sidecar["latent_key"], sidecar["embedding_key"])
            chosen = pairs.subset(clip_ids=args.clip_id)
            missing = sorted(set(args.clip_id) - set(chosen.clip_ids))
            if missing:
                print(f"{space}: no latents/embeddings for {missing}; skipped", file=sys.stderr)
            if len(chosen):
                requests.append((chosen.clip_ids, chosen.other))
        if args.text and space == "clap":
            cond = generation_sample.text_condition(store, args.dataset, sidecar["embedding_key"], args.text)
            requests.append(([f"text{i:02d}" for i in range(len(args.text))], cond))
        task = get_space(space).task
        for names, cond in requests:
            mels = []
            for label, gap in (("baseline", None), ("diffgap", diffgap)):
                if (label == "baseline" and args.diffgap == "with") or (label == "diffgap" and args.diffgap == "without"):
                    continue
                out = generation_sample.generate(model, decoder, cond, sample, gap)
                mels.append(out["mels"])
                for name, wave in zip(names, out["audio"]):
                    path = os.path.join(args.out, f"{name}__{task}__{label}.wav")
                    sf.write(path, wave, 22050, subtype="PCM_16")
                    written.append(path)
            png = os.path.join(args.out, f"{names[0]}__{task}__preview.png")
            with open(png, "wb") as handle:
                handle.write(preview_png(mels=np.concatenate(mels)))
            written.append(png)
    for i, text in enumerate(args.text):
        print(f"text{i:02d}: {text}")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
