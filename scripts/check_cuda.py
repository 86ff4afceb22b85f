"""Check the CUDA paths on a GPU machine in a few minutes, on tiny synthetic data (issue 14).

    .venv/bin/python scripts/check_cuda.py                  # cuda (the first GPU)
    .venv/bin/python scripts/check_cuda.py --device cuda:1
    .venv/bin/python scripts/check_cuda.py --device cpu --tiny --steps 3 --skip-towers   # the smoke test CI runs

For each model family (CLAP / CAVP heads, KL-VAE, DiffGAP, latent generator) it fits on the CPU and
on the device and compares:

- the first training step's loss: same initial weights, the same batch rows and the same noise
  (every random draw is made on the host, models.devices), so it must match to float error;
- a short fit's final loss (a sanity bound: longer fits drift apart by float error, like any
  two floating-point runs), and steps per second on each (the throughput, after a warm-up);
- sampling and encoding with the same CPU-trained weights moved to the device: DiffGAP DDIM and
  DDPM samples, generator latents (DDIM with guidance), VAE latents and reconstructions.

It also runs the towers' shard functions (stages.features.towers: aisfx audio, EfficientNet frames,
BERT text) on a 2-clip generated demo with ``device`` set, against the same on the CPU; and the
two ways training rows reach the device (resident, and pinned + streamed for data too large).
TF32 is switched off so the comparisons are float32 against float32.

Prints one row per check and exits 1 when any fails. ``--device cpu`` compares the CPU with itself
(everything identical): a smoke test of this script where there is no GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


@dataclass
class Row:
    check: str
    passed: bool
    detail: str
    cpu_rate: float | None = None  # steps (or items) per second
    device_rate: float | None = None


ROWS: list[Row] = []


@dataclass(frozen=True)
class Sizes:
    """How big the synthetic data and models are: the defaults' shapes on a GPU, tiny for the smoke test."""

    clips: int = 256
    audio_dim: int = 512
    text_dim: int = 768
    video_dim: int = 1280
    seconds: int = 4
    embed_dim: int = 256
    diffgap_width: int = 280
    latent_size: int = 16
    generator_channels: tuple[int, ...] = (32, 64)
    groups: int = 8
    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_groups: int = 4
    vae_attention: bool = True
    samples: int = 16
    sample_steps: int = 50


TINY = Sizes(clips=32, audio_dim=12, text_dim=10, video_dim=14, seconds=2, embed_dim=16, diffgap_width=32, latent_size=8,
             generator_channels=(8, 16), groups=4, image_size=16, vae_channels=(8, 8), vae_groups=4, vae_attention=False,
             samples=2, sample_steps=5)


def record(check: str, passed: bool, detail: str, cpu_rate: float | None = None, device_rate: float | None = None) -> None:
    ROWS.append(Row(check, bool(passed), detail, cpu_rate, device_rate))
    rates = ""
    if cpu_rate and device_rate:
        rates = f"  [cpu {cpu_rate:.3g}/s, device {device_rate:.3g}/s, x{device_rate / cpu_rate:.2f}]"
    print(f"{'PASS' if passed else 'FAIL'}  {check}: {detail}{rates}", flush=True)


def guarded(check: str):
    """Run one check; an exception is a FAIL row with its one-line reason (the other checks go on)."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the report names it, the run goes on
                record(check, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                traceback.print_exc(limit=4)
        return run
    return wrap


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


# ---- model families --------------------------------------------------------------------------------

@guarded("heads")
def check_heads(device: str, steps: int, rng: np.random.Generator, size: Sizes) -> None:
    from stages.embeddings.heads import CAVP_HEAD, CLAP_HEAD, HeadTrainConfig, PairedFeatures, train_head

    n, s = size.clips, size.seconds
    ids, splits = [f"c{i}" for i in range(n)], ["train"] * (n - n // 8) + ["val"] * (n // 8)
    data = {
        CLAP_HEAD: {"audio": rng.normal(size=(n, size.audio_dim)), "text": rng.normal(size=(n, size.text_dim))},
        CAVP_HEAD: {"audio": rng.normal(size=(n, s, size.audio_dim)), "video": rng.normal(size=(n, s, size.video_dim))},
    }
    for kind, arrays in data.items():
        features = PairedFeatures(ids, {k: v.astype(np.float32) for k, v in arrays.items()}, splits)
        train, val = features.subset("train"), features.subset("val")
        # dropout 0: dropout masks come from the device's RNG, the one draw not made on the host
        config = HeadTrainConfig(steps=1, batch_size=min(64, n // 2), eval_every=1, dropout=0.0, embed_dim=size.embed_dim,
                                 hidden_dim=2 * size.embed_dim)
        first = {d: train_head(kind, train, val, config, device=d).history[-1]["train_loss"] for d in ("cpu", device)}
        full = replace(config, steps=steps, eval_every=max(1, steps))
        runs = {d: train_head(kind, train, val, full, device=d) for d in ("cpu", device)}
        final = {d: r.history[-1]["train_loss"] for d, r in runs.items()}
        ok = relative(first["cpu"], first[device]) < 1e-3 and relative(final["cpu"], final[device]) < 0.25
        record(f"{kind} fit", ok, f"step-1 loss {first['cpu']:.5f} vs {first[device]:.5f}; after {steps} steps "
               f"{final['cpu']:.4f} vs {final[device]:.4f}", steps / runs["cpu"].seconds, steps / runs[device].seconds)


@guarded("vae")
def check_vae(device: str, steps: int, rng: np.random.Generator, size: Sizes) -> None:
    from stages.vae.train import VaeTrainConfig, decode_latents, encode_scaled, train_vae

    n = min(96, size.clips)
    images = rng.integers(0, 256, size=(n, size.image_size, size.image_size, 3), dtype=np.uint8)
    config = VaeTrainConfig(steps=steps, batch_size=16, eval_every=max(1, steps), max_val_images=16, block_out_channels=size.vae_channels,
                            norm_num_groups=size.vae_groups, mid_block_attention=size.vae_attention)
    train, val = images[: n - n // 6], images[n - n // 6 :]
    if device != "cpu":
        train_vae(train[:16], val, replace(config, steps=1), device=device)  # warm-up (CUDA context, cuDNN)
    runs = {d: train_vae(train, val, config, device=d) for d in ("cpu", device)}
    l1 = {d: r.best_val_l1 for d, r in runs.items()}
    # posterior samples come from each device's own RNG: the fits are compared loosely
    record("vae fit", relative(l1["cpu"], l1[device]) < 0.25, f"val L1 after {steps} steps {l1['cpu']:.4f} vs {l1[device]:.4f}",
           steps / runs["cpu"].seconds, steps / runs[device].seconds)
    vae = runs["cpu"].model
    timed = {}
    z = {}
    for d in ("cpu", device):
        vae.to(d)
        encode_scaled(vae, images[:4], 1.0)  # warm-up
        start = time.perf_counter()
        z[d] = encode_scaled(vae, images, 0.7)
        timed[d] = len(images) / (time.perf_counter() - start)
    back = {d: decode_latents(vae.to(d), z["cpu"], 0.7) for d in ("cpu", device)}
    vae.to("cpu")
    dz = float(np.abs(z["cpu"] - z[device]).max())
    levels = float(np.abs(back["cpu"].astype(int) - back[device].astype(int)).max())
    record("vae encode/decode", dz < 1e-3 and levels <= 2, f"latents max |diff| {dz:.2e}, images max |diff| {levels:.0f} levels",
           timed["cpu"], timed[device])


@guarded("diffgap")
def check_diffgap(device: str, steps: int, rng: np.random.Generator, size: Sizes) -> None:
    from models.diffgap import FROM_AUDIO, TO_AUDIO, sample
    from stages.diffgap.train import DiffgapTrainConfig, EmbeddingPairs, train_diffgap

    n, d = 2 * size.clips, size.embed_dim
    pairs = EmbeddingPairs([f"c{i}" for i in range(n)], unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d))), ["train"] * n)
    config = DiffgapTrainConfig(steps=1, checkpoint_every=0, condition_dropout=0.1, width=size.diffgap_width)
    first = {d: train_diffgap(pairs, config, device=d).history[-1]["loss"] for d in ("cpu", device)}
    full = replace(config, steps=steps, bst_interval=max(1, steps // 4))
    runs = {d: train_diffgap(pairs, full, device=d) for d in ("cpu", device)}
    final = {d: r.history[-1]["loss"] for d, r in runs.items()}
    ok = relative(first["cpu"], first[device]) < 1e-3 and relative(final["cpu"], final[device]) < 0.25
    record("diffgap fit", ok, f"step-1 loss {first['cpu']:.5f} vs {first[device]:.5f}; after {steps} steps "
           f"{final['cpu']:.4f} vs {final[device]:.4f}", steps / runs["cpu"].seconds, steps / runs[device].seconds)
    model = runs["cpu"].model
    condition = torch.from_numpy(pairs.other[:64])
    k, sample_steps = size.samples, size.sample_steps
    for sampler, direction, guidance in (("ddim", TO_AUDIO, 1.0), ("ddpm", FROM_AUDIO, 2.0)):
        drawn, rate = {}, {}
        for where in ("cpu", device):
            model.to(where)
            start = time.perf_counter()
            drawn[where] = sample(model, condition, direction, steps=sample_steps, sampler=sampler, samples_per_condition=k,
                                  guidance_scale=guidance, generator=torch.Generator().manual_seed(7))
            rate[where] = len(condition) * k / (time.perf_counter() - start)
        model.to("cpu")
        diff = float((drawn["cpu"] - drawn[device]).abs().max())
        record(f"diffgap sample {sampler}", diff < 1e-3, f"{len(condition)} x {k} samples, {sample_steps} steps: max |diff| {diff:.2e} "
               "(unit vectors)", rate["cpu"], rate[device])


@guarded("generator")
def check_generator(device: str, steps: int, rng: np.random.Generator, size: Sizes) -> None:
    from stages.generation.sample import SampleConfig, generate_latents
    from stages.generation.train import GeneratorTrainConfig, LatentPairs, train_generator

    n, d, h = size.clips, size.embed_dim, size.latent_size
    pairs = LatentPairs([f"c{i}" for i in range(n)], rng.normal(size=(n, 4, h, h)).astype(np.float32),
                        unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d))), ["train"] * n)
    config = GeneratorTrainConfig(steps=1, threads=1, batch_size=min(32, n // 2), block_out_channels=size.generator_channels,
                                  norm_num_groups=size.groups)
    first = {d: train_generator(pairs, config, device=d).history[-1]["loss"] for d in ("cpu", device)}
    full = replace(config, steps=steps)
    runs = {d: train_generator(pairs, full, device=d) for d in ("cpu", device)}
    final = {d: r.history[-1]["loss"] for d, r in runs.items()}
    ok = relative(first["cpu"], first[device]) < 1e-3 and relative(final["cpu"], final[device]) < 0.25
    record("generator fit", ok, f"step-1 loss {first['cpu']:.5f} vs {first[device]:.5f}; after {steps} steps "
           f"{final['cpu']:.4f} vs {final[device]:.4f}", steps / runs["cpu"].seconds, steps / runs[device].seconds)
    model = runs["cpu"].model
    latents, rate = {}, {}
    count, sample_steps = min(32, n), min(20, size.sample_steps)
    for where in ("cpu", device):
        model.to(where)
        start = time.perf_counter()
        latents[where] = generate_latents(model, pairs.audio[:count], SampleConfig(steps=sample_steps, guidance_scale=3.0, threads=1))
        rate[where] = count / (time.perf_counter() - start)
    model.to("cpu")
    diff = float(np.abs(latents["cpu"] - latents[device]).max())
    record("generator sample ddim", diff < 1e-2, f"{count} latents, {sample_steps} steps, guidance 3: max |diff| {diff:.2e} "
           "(unit-std latents)", rate["cpu"], rate[device])


@guarded("cmmd")
def check_cmmd(device: str, steps: int, rng: np.random.Generator, size: Sizes) -> None:
    from stages.cmmd.data import ClipWindows, valid_frame_counts
    from stages.cmmd.evaluate import generate
    from stages.cmmd.train import CmmdTrainConfig, train_cmmd

    n, h = size.clips, size.latent_size
    frames = rng.normal(size=(n, 20, 4, h, h)).astype(np.float32)
    data = ClipWindows([f"c{i}" for i in range(n)], frames, rng.normal(size=(n, 80, 200)).astype(np.float32),
                       valid_frame_counts(frames), ["train"] * n)
    levels = dict(video_levels=(8, 16), audio_levels=(16, 16)) if size is TINY else {}
    config = CmmdTrainConfig(steps=1, batch_size=min(12, n // 2), checkpoint_every=0, **levels)
    first = {d: train_cmmd(data, config, device=d).history[-1]["loss"] for d in ("cpu", device)}
    runs = {d: train_cmmd(data, replace(config, steps=steps), device=d) for d in ("cpu", device)}
    final = {d: r.history[-1]["loss"] for d, r in runs.items()}
    ok = relative(first["cpu"], first[device]) < 1e-3 and relative(final["cpu"], final[device]) < 0.25
    record("cmmd fit", ok, f"step-1 loss {first['cpu']:.5f} vs {first[device]:.5f}; after {steps} steps "
           f"{final['cpu']:.4f} vs {final[device]:.4f}", steps / runs["cpu"].seconds, steps / runs[device].seconds)
    model = runs["cpu"].model
    video = np.ascontiguousarray(frames[: size.samples, :16].transpose(0, 2, 1, 3, 4))
    out, rate = {}, {}
    for where in ("cpu", device):
        model.to(where)
        start = time.perf_counter()
        out[where] = generate(model, video, "video", size.sample_steps, 0.05, seed=0, device=where)
        rate[where] = len(video) / (time.perf_counter() - start)
    model.to("cpu")
    diff = float(np.abs(out["cpu"] - out[device]).max())
    record("cmmd sample v2a guided", diff < 5e-2, f"{len(video)} clips, {size.sample_steps} DDIM steps, lambda 0.05: "
           f"max |diff| {diff:.2e} (unit-std mel latents)", rate["cpu"], rate[device])


@guarded("mmldm")
def check_mmldm(device: str, steps: int, rng: np.random.Generator, size: Sizes) -> None:
    from stages.mmldm.train import (AutoencoderTrainConfig, ClipLatents, DitTrainConfig, SemanticLatents, train_autoencoder,
                                    train_dit)

    n, h = size.clips, size.latent_size
    latents = ClipLatents([f"c{i}" for i in range(n)], rng.normal(size=(n, 4, h, h)).astype(np.float32),
                          rng.normal(size=(n, 4, 4, h, h)).astype(np.float32), rng.integers(0, 3, n), ["train"] * n, ["a", "b", "c"])
    tiny = dict(latent_channels=4, encoder_channels=16, decoder_channels=(16, 16), semantic_dim=16) if size is TINY else {}
    config = AutoencoderTrainConfig(steps=1, batch_size=min(12, n // 2), checkpoint_every=0, **tiny)
    first = {d: train_autoencoder(latents, config, device=d).history[-1]["mse"] for d in ("cpu", device)}
    runs = {d: train_autoencoder(latents, replace(config, steps=steps), device=d) for d in ("cpu", device)}
    final = {d: r.history[-1]["mse"] for d, r in runs.items()}
    ok = relative(first["cpu"], first[device]) < 1e-3 and relative(final["cpu"], final[device]) < 0.25
    record("mmldm autoencoder fit", ok, f"step-1 decoder MSE {first['cpu']:.5f} vs {first[device]:.5f}; after {steps} steps "
           f"{final['cpu']:.4f} vs {final[device]:.4f}", steps / runs["cpu"].seconds, steps / runs[device].seconds)
    c = runs["cpu"].model.config
    z = SemanticLatents([f"c{i}" for i in range(n)], rng.normal(size=(n, *c.audio_latent_shape)).astype(np.float32),
                        np.full((n, *c.audio_latent_shape), 0.1, np.float32), rng.normal(size=(n, *c.video_latent_shape)).astype(np.float32),
                        np.full((n, *c.video_latent_shape), 0.1, np.float32), ["train"] * n)
    dit_config = DitTrainConfig(steps=steps, batch_size=min(16, n // 2), checkpoint_every=0, **(dict(hidden=32, depth=1, heads=2) if size is TINY else {}))
    dits = {d: train_dit(z, dit_config, {"audio": 1.0, "video": 1.0}, device=d) for d in ("cpu", device)}
    loss = {d: r.history[-1]["loss"] for d, r in dits.items()}
    record("mmldm dit fit", relative(loss["cpu"], loss[device]) < 0.25, f"after {steps} steps loss {loss['cpu']:.4f} vs {loss[device]:.4f}",
           steps / dits["cpu"].seconds, steps / dits[device].seconds)


@guarded("rows")
def check_rows(device: str, rng: np.random.Generator) -> None:
    import models.devices as devices

    arrays = {"x": rng.normal(size=(1000, 33)).astype(np.float32), "y": rng.integers(0, 255, size=(1000, 4, 4), dtype=np.uint8)}
    batches = [np.sort(rng.choice(1000, 64, replace=False)) for _ in range(20)]
    resident = devices.DeviceRows(arrays, device)
    share, devices.RESIDENT_SHARE = devices.RESIDENT_SHARE, 0.0  # as if the data did not fit: pinned + streamed
    try:
        streamed = devices.DeviceRows(arrays, device)
    finally:
        devices.RESIDENT_SHARE = share
    same = all(
        all(np.array_equal(a[k].cpu().numpy(), arrays[k][rows]) and np.array_equal(b[k].cpu().numpy(), arrays[k][rows]) for k in arrays)
        for rows, a, b in zip(batches, resident.prefetch(batches), streamed.prefetch(batches))
    )
    record("training rows", same, f"resident={resident.resident}, streamed={not streamed.resident}: 20 prefetched batches equal the host rows")


# ---- towers (another engineer's part, through its public stage functions) -------------------------

@guarded("towers")
def check_towers(device: str, folder: Path) -> None:
    import json

    from stages.core.store import FeatureStore
    from stages.features import towers as T
    from stages.features.base import ShardJob
    from stages.ingest.demo import DemoSpec, generate_demo

    listing = generate_demo(folder / "demo", DemoSpec(n_clips=2, seed=0))
    records = [json.loads(line) for line in listing.read_text().splitlines()]
    clips = tuple((r["id"], str(listing.parent / r["path"]), f"h{i}") for i, r in enumerate(records))
    texts = tuple(r["caption"] for r in records)
    for feature, params, compute, arrays in (
        (T.AUDIO_TOWER_FEATURE, T.AudioTowerParams(), T.compute_audio_tower_shard, ("pooled", "per_second")),
        (T.FRAME_TOWER_FEATURE, T.FrameTowerParams(), T.compute_frame_tower_shard, ("pooled", "per_second")),
        (T.TEXT_TOWER_FEATURE, T.TextTowerParams(), T.compute_text_tower_shard, ("text",)),
    ):
        out, rate = {}, {}
        for d in ("cpu", device):
            root = folder / f"store-{d.replace(':', '')}-{feature}"
            job = ShardJob(store_root=str(root), storage_options={}, dataset="check", feature=feature, key=params.key(),
                           shard="s000000", clips=clips, params=params.params(), code_version="1", texts=texts, device=d)
            compute(job)  # loads the tower once per process (and warms the device up)
            job = replace(job, store_root=str(root) + "-timed")
            start = time.perf_counter()
            compute(job)
            rate[d] = len(clips) / (time.perf_counter() - start)
            table = FeatureStore(job.store_root).read_arrays("check", feature, params.key())
            out[d] = {name: np.asarray(table.arrays[name], np.float32) for name in arrays}
        worst = max(float(np.abs(out["cpu"][k] - out[device][k]).max() / max(1e-6, np.abs(out["cpu"][k]).max())) for k in arrays)
        record(f"{feature} shard", worst < 1e-2, f"{len(clips)} clips, max |diff| / max |x| = {worst:.2e}", rate["cpu"], rate[device])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke test of this script)")
    parser.add_argument("--steps", type=int, default=200, help="steps of each timed fit")
    parser.add_argument("--skip-towers", action="store_true", help="leave out the tower shards (they load pretrained weights)")
    parser.add_argument("--tiny", action="store_true", help="tiny data and models (the smoke test) instead of the defaults' shapes")
    args = parser.parse_args(argv)

    from models.devices import check_device, describe

    try:
        check_device(args.device)
    except ValueError as exc:
        print(f"check_cuda: {exc}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 against float32
    torch.backends.cudnn.allow_tf32 = False
    print(f"check_cuda: torch {torch.__version__}, {describe(args.device)} against {describe('cpu')}; {args.steps} steps per fit", flush=True)
    started = time.perf_counter()
    rng, size = np.random.default_rng(0), TINY if args.tiny else Sizes()
    check_rows(args.device, rng)
    check_heads(args.device, args.steps, rng, size)
    check_diffgap(args.device, args.steps, rng, size)
    check_generator(args.device, args.steps, rng, size)
    check_vae(args.device, args.steps, rng, size)
    check_cmmd(args.device, args.steps, rng, size)
    check_mmldm(args.device, args.steps, rng, size)
    if not args.skip_towers:
        with tempfile.TemporaryDirectory() as folder:
            check_towers(args.device, Path(folder))
    failed = [row.check for row in ROWS if not row.passed]
    print(f"check_cuda: {len(ROWS) - len(failed)}/{len(ROWS)} checks passed in {time.perf_counter() - started:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
