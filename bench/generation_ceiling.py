"""Where does the way back to sound lose what aiSFX hears? The ceiling of every generation metric.

    .venv/bin/python bench/generation_ceiling.py --store .data/features [--dataset demo] \
        [--splits val test] [--shapes 64 128 256 80x352 160x352] [--no-oracle]

Needs only the clip manifest (``refresh_features`` makes it, and ``make demo`` / ``make generate``
too); the mel-latent row reads the stored ``mel_latents`` when the store has them (else computes
them the same way, in-process), and the oracle row needs an audio VAE and its ``vae_latents``
(``dagster job execute -j train_vae``; the newest vae_latents key is used, or ``--latent-key K [K ...]``:
one oracle row per key, e.g. audio VAE variants from ``bench/fit_audio_vae.py``, each with its verdict).

On each split's real audio (22.05 kHz, the vocoder's rate), every stage of every decode path:

    real audio
    mel -> HiFi-GAN                                        (the vocoder alone)
    mel -> audio image (each shape) -> mel -> HiFi-GAN     (the MM-LDM image, no VAE)
    mel -> mel latent -> exact inverse -> HiFi-GAN         (CMMD's latent-spectrogram space)
    sensitivity: mel blurred / mel + noise -> HiFi-GAN     (what the metrics punish: blur, not noise)
    stored VAE latent -> audio VAE -> mel -> HiFi-GAN      (the oracle of Tables I / II)

Columns (each with a 95% bootstrap interval over clips, 1000 paired resamples):

    class acc   a logistic-regression label probe on aiSFX pooled embeddings of the train split's real audio
    FD          Frechet distance of aiSFX pooled clip embeddings [n, 512], stage vs real audio of the split
    KID         unbiased MMD^2, polynomial kernel (x.y / 512 + 1)^3, same embeddings (full 512 dims)
    FAD         Frechet distance of aiSFX per-second embeddings: one 512-d embedding of the 1 s block
                (100 aiSFX frames) centred on each second + 0.5 of the clip, 4 rows per 4 s clip

With n clips <= 512 the covariances are rank-deficient: FD and FAD are then computed after a PCA
fitted on the train split's real audio embeddings (never on the evaluated split) to
min(512, (rows - 1) // 2) components, so that a bootstrap resample (~63% distinct clips) still has
a full-rank covariance; the header says which dimension was used. Choose on val, report test:
the verdict, printed last, is for --default on the last split.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

RESAMPLES = 1000


def parse_shape(text: str) -> tuple[int, int]:
    """'128' -> (128, 128) (square), '80x352' -> (80, 352) (height x width)."""
    if "x" in text:
        height, width = text.lower().split("x")
        return int(height), int(width)
    return int(text), int(text)


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]} px" if shape[0] == shape[1] else f"{shape[0]} x {shape[1]}"


def cached_aisfx(cache: Path | None, tag: str, compute):
    """aiSFX outputs of a fixed set of real clips, kept in ``cache`` (they do not change between runs)."""
    if cache is None:
        return compute()
    path = cache / f"{hashlib.sha256(tag.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    out = compute()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def newest_oracle(store, dataset: str, latent_key: str | None):
    """(latent key, audio VAE ref {name, key, scaling_factor}) of the newest vae_latents with audio, or None."""
    keys = [latent_key] if latent_key else store.feature_keys(dataset, "vae_latents")
    for key in keys:
        shards = store.committed_shards(dataset, "vae_latents", key)
        if not shards:
            continue
        params = store.shard_manifest(dataset, "vae_latents", key, shards[0])["params"]
        if "audio" in params.get("vaes", {}):
            return key, params["vaes"]["audio"]
    return None


def read_oracle_latents(store, dataset: str, key: str, ids: list[str]) -> np.ndarray:
    """The stored audio latents of ``ids`` in that order (the posterior mean where mean and std are stored)."""
    shards = store.committed_shards(dataset, "vae_latents", key)
    names = store.read_arrays(dataset, "vae_latents", key, shards=shards[:1]).arrays.keys()
    name = "audio_mean" if "audio_mean" in names else "audio"
    table = store.read_arrays(dataset, "vae_latents", key, names=[name])
    row = {c: i for i, c in enumerate(table.clip_ids)}
    return np.asarray(table.arrays[name], np.float32)[[row[c] for c in ids]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], help="choose on val, report test (the verdict uses the last)")
    parser.add_argument("--shapes", nargs="+", default=["64", "128", "256", "80x352", "160x352"],
                        help="audio image shapes: N (square) or HxW")
    parser.add_argument("--default", default=None, help="the default audio image shape (the verdict's path); default: the feature's default")
    parser.add_argument("--latent-key", nargs="+", default=None,
                        help="vae_latents key(s) of the oracle row(s) (default: the newest); the verdict is for the last")
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--no-mel-latent", action="store_true")
    parser.add_argument("--no-sensitivity", action="store_true", help="leave out the blurred-mel and noisy-mel rows")
    parser.add_argument("--max-clips", type=int, default=None, help="at most this many clips per split (first by id)")
    parser.add_argument("--cache", default=".data/bench_cache", help="folder for the real clips' aiSFX outputs ('' = none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from models.towers import AudioTower, get_tower
    from models.vocoder import get_vocoder
    from stages.core.parallel import torch_threads
    from stages.core.settings import open_store  # s3:// stores with the jobs' endpoint and retries
    from stages.evaluation import distribution
    from stages.evaluation.audio import aisfx_outputs
    from stages.features import mel_latent
    from stages.features.mel import AudioImageParams, MelParams
    from stages.features.spectral import MelSpectrogram, audio_image_to_mel, get_preset, mel_to_audio_image
    from stages.generation import evaluate as generation_eval
    from stages.ingest.manifest import load_manifest

    started = time.perf_counter()
    store = open_store(args.store)
    manifest = load_manifest(store, args.dataset)
    if manifest is None:
        raise SystemExit(f"no clip manifest for dataset {args.dataset!r} in {args.store}: run "
                         f"`dagster job execute -j refresh_features` (or `make demo`) on that store first")
    mel_params = MelParams()
    preset = get_preset(mel_params.preset)
    rate, seconds = preset.sample_rate, mel_params.seconds
    shapes = [parse_shape(s) for s in args.shapes]
    default_image = AudioImageParams()
    default_shape = parse_shape(args.default) if args.default else (default_image.height, default_image.width)
    if default_shape not in shapes:
        shapes.append(default_shape)
    cache = Path(args.cache) if args.cache else None
    tower, vocoder = get_tower(AudioTower), get_vocoder()
    labelled = [c for c in manifest.clips if c.label]
    by_split = {s: sorted(c.id for c in labelled if c.split == s) for s in {"train", *args.splits}}
    labels = {c.id: c.label for c in labelled}

    def real_outputs(split: str):
        ids, audio = generation_eval.reference_audio(manifest, by_split[split][: args.max_clips], seconds, rate)
        tag = f"{manifest.dataset}|{split}|{','.join(ids)}|{rate}|{seconds}|{tower.__class__.__name__}"
        return ids, audio, cached_aisfx(cache, tag, lambda: aisfx_outputs(tower, audio, rate, seconds))

    with torch_threads(args.threads):
        train_ids, train_audio, train_out = real_outputs("train")
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
        probe.fit(train_out["pooled"], [labels[c] for c in train_ids])
        # mel-latent statistics of the train split, as the mel_latents feature computes them
        train_mels = np.asarray(MelSpectrogram(preset)(train_audio), np.float32)
        statistics = mel_latent.bin_statistics(train_mels.astype(mel_params.dtype))
        oracles = [] if args.no_oracle else [o for o in (newest_oracle(store, args.dataset, key) for key in (args.latent_key or [None]))
                                             if o is not None]
        decoders = []
        if oracles:
            from stages.generation.sample import SampleConfig, make_decoder

            decoders = [make_decoder(store, args.dataset, oracle[1], SampleConfig(threads=args.threads)) for oracle in oracles]
        verdicts = {}
        for split in args.splits:
            ids, real, reference = real_outputs(split)
            truth = np.array([labels[c] for c in ids])
            mels = np.asarray(MelSpectrogram(preset)(real), np.float32)
            stored = mels.astype(mel_params.dtype).astype(np.float32)  # what mel_spectrograms holds
            stages = [("real audio", lambda: real), ("mel -> HiFi-GAN", lambda: vocoder(stored))]
            for shape in shapes:
                stages.append((f"mel -> image {shape_name(shape)} -> mel -> HiFi-GAN",
                               lambda shape=shape: vocoder(audio_image_to_mel(mel_to_audio_image(stored, preset, shape), preset, stored.shape[-1]))))
            if not args.no_sensitivity:
                # What aiSFX's class probe is sensitive to: a slight blur of the mel (what an L1-trained
                # VAE does) against noise of about the same mel L1 (a VAE that keeps the texture).
                from scipy.ndimage import gaussian_filter

                noise = np.random.default_rng(0).normal(0.0, 0.4, stored.shape).astype(np.float32)
                stages.append(("sensitivity: mel blurred (Gaussian, 0.7 bins x frames) -> HiFi-GAN",
                               lambda: vocoder(gaussian_filter(stored, (0, 0.7, 0.7)))))
                stages.append(("sensitivity: mel + Gaussian noise (sd 0.4 nats) -> HiFi-GAN", lambda: vocoder(stored + noise)))
            if not args.no_mel_latent:
                stages.append(("mel -> mel latent -> inverse -> HiFi-GAN",
                               lambda: vocoder(mel_latent.denormalise(mel_latent.normalise(stored, statistics), statistics))))
            for oracle, decoder in zip(oracles, decoders):
                latents = read_oracle_latents(store, args.dataset, oracle[0], ids)
                stages.append((f"stored VAE latent -> audio VAE -> mel -> HiFi-GAN (oracle; VAE {oracle[1]['key']})",
                               lambda decoder=decoder, latents=latents: decoder(latents)["audio"]))
            fd_dims = distribution.full_rank_dims(len(ids), reference["pooled"].shape[-1])
            fad_dims = distribution.full_rank_dims(len(ids) * reference["per_second"].shape[1], reference["per_second"].shape[-1])
            pooled_pca = distribution.pca_fit(train_out["pooled"], fd_dims)
            second_pca = distribution.pca_fit(train_out["per_second"], fad_dims)
            real_pooled, real_seconds = pooled_pca(reference["pooled"]), second_pca(reference["per_second"])
            print(f"\n### decode-path ceiling, {split} split, n = {len(ids)} clips ({len(train_ids)} train clips for the probe "
                  f"and the PCA); FD on PCA-{fd_dims} of pooled aiSFX, FAD on PCA-{fad_dims} of per-second aiSFX "
                  f"({reference['per_second'].shape[1]} rows per clip), KID on the full 512 dims; [95% CI]\n")
            print("| stage (cumulative) | class acc (%) | FD (aiSFX) | KID (aiSFX) | FAD (aiSFX) | s |")
            print("| --- | --- | --- | --- | --- | --- |")
            rows = {}
            # Control: as many other real clips (train split, first by id) against this split: the
            # distances two sets of real audio of this size are apart (their floor at this n).
            other = {k: v[: len(ids)] for k, v in train_out.items()}
            print(f"| control: {len(ids)} other real clips (train split) | - | "
                  f"{_ci(distribution.bootstrap_interval(distribution.frechet_distance_of, pooled_pca(other['pooled']), real_pooled, resamples=RESAMPLES), 1)} | "
                  f"{_ci(distribution.bootstrap_interval(distribution.mmd2_unbiased, other['pooled'], reference['pooled'], resamples=RESAMPLES), 3)} | "
                  f"{_ci(distribution.bootstrap_interval(distribution.frechet_distance_of, second_pca(other['per_second']), real_seconds, resamples=RESAMPLES), 1)} | 0 |")
            for name, make in stages:
                t0 = time.perf_counter()
                scored = reference if name == "real audio" else aisfx_outputs(tower, make(), rate, seconds)
                correct = (probe.predict(scored["pooled"]) == truth).astype(float)
                acc = distribution.bootstrap_interval(lambda c: 100 * c.mean(), correct, resamples=RESAMPLES)
                fd = distribution.bootstrap_interval(distribution.frechet_distance_of, pooled_pca(scored["pooled"]), real_pooled,
                                                     resamples=RESAMPLES)
                kid = distribution.bootstrap_interval(distribution.mmd2_unbiased, scored["pooled"], reference["pooled"],
                                                      resamples=RESAMPLES)
                fad = distribution.bootstrap_interval(distribution.frechet_distance_of, second_pca(scored["per_second"]),
                                                      real_seconds, resamples=RESAMPLES)
                rows[name] = (acc, fd, kid, fad)
                if name == "real audio":  # the reference itself: its distances to itself say nothing
                    print(f"| {name} | {_ci(acc, 1)} | (reference) | (reference) | (reference) | {time.perf_counter() - t0:.0f} |", flush=True)
                    continue
                print(f"| {name} | {_ci(acc, 1)} | {_ci(fd, 1)} | {_ci(kid, 3)} | {_ci(fad, 1)} | {time.perf_counter() - t0:.0f} |", flush=True)
            for oracle in oracles:  # the last split's rows win: choose on val, report test
                oracle_row = next(r for n, r in rows.items() if n.startswith("stored VAE latent") and oracle[1]["key"] in n)
                verdicts[oracle[0]] = (100 * oracle_row[0].value / max(rows["real audio"][0].value, 1e-9),
                                       oracle_row[1].value / max(rows["mel -> HiFi-GAN"][1].value, 1e-9), split)
    print(f"\n({time.perf_counter() - started:.0f} s; default audio image {shape_name(default_shape)}"
          + (f"; oracle latents {', '.join(o[0] for o in oracles)}" if oracles else "; no audio VAE latents in the store: no oracle row") + ")")
    if not verdicts:
        print("oracle keeps n/a% of real audio's class accuracy (FD n/a x mel -> HiFi-GAN)")
    for key, (acc, fd, split) in verdicts.items():
        print(("" if len(verdicts) == 1 else f"{split}, vae_latents {key}: ")
              + f"oracle keeps {acc:.0f}% of real audio's class accuracy (FD {fd:.2f} x mel -> HiFi-GAN)")
    return 0


def _ci(interval, digits: int) -> str:
    return f"{interval.value:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


if __name__ == "__main__":
    raise SystemExit(main())
