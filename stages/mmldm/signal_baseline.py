"""The signal-space baseline of MM-LDM's Table 1 (issue 17): the same JointDiT (width, depth, training
rule, conditional tasks, DDIM sampler) diffusing directly on the signals the KL latents were encoded
from, with no autoencoder: the grayscale audio image (one plane of the RGB image; 80 x 352 on the demo)
in 8 x 8 patches and the clip's RGB frames (16 x 64 x 64) in 1 x 8 x 8 patches. What the hierarchical
latent space buys is the gap between its rows and MM-LDM's at equal training time; it is a bench/
comparison, not a model to use (no asset, not stored as a checkpoint; its evaluation is a cached result).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from stages.core.store import FeatureStore
from stages.ingest.manifest import ClipManifest

LABEL = "signal-space baseline"
AUDIO_PATCH = (8, 8)
VIDEO_PATCH = (1, 8, 8)


def load_signals(store: FeatureStore, manifest: ClipManifest, vae_latent_key: str):
    """Every clip's audio image [1, H, W] and frames [3, T, H, W] in [-1, 1], as the KL-VAEs of
    ``vae_latent_key`` saw them (the inputs named in its shards' manifests), in manifest order; a
    ``SemanticLatents`` with zero std, so the DiT's training loop takes it as it is."""
    from stages.features.latents import LATENT_FEATURE
    from stages.mmldm.train import SemanticLatents

    shards = sorted(manifest.by_shard())
    inputs = store.shard_manifest(manifest.dataset, LATENT_FEATURE, vae_latent_key, shards[0])["params"]["inputs"]
    tables = {m: store.read_arrays(manifest.dataset, inputs[m]["feature"], inputs[m]["key"], shards=shards, names=[inputs[m]["array"]])
              for m in ("audio", "frames")}
    rows = {m: {c: i for i, c in enumerate(t.clip_ids)} for m, t in tables.items()}
    ids = [c.id for c in manifest.clips if all(c.id in r for r in rows.values())]
    if not ids:
        raise ValueError(f"no clip of {manifest.dataset!r} has both an audio image and frames under vae_latents {vae_latent_key}")
    images = tables["audio"].arrays[inputs["audio"]["array"]][[rows["audio"][c] for c in ids]]  # uint8 [N, H, W, 3]
    frames = tables["frames"].arrays[inputs["frames"]["array"]][[rows["frames"][c] for c in ids]]  # uint8 [N, T, H, W, 3]
    audio = (images[:, None, :, :, 0].astype(np.float32) / 127.5 - 1.0)  # the three planes are equal (grayscale)
    video = (np.moveaxis(frames, -1, 1).astype(np.float32) / 127.5 - 1.0)
    index = manifest.index()
    return SemanticLatents(ids, audio, np.zeros_like(audio), video, np.zeros_like(video), [index[c].split for c in ids])


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclass
class SignalBaseline:
    """A trained signal-space DiT with the signals of its clips; ``generate`` gives what a row scores."""

    dit: object
    scales: dict
    signals: object  # SemanticLatents of every clip (the known modality of a2v / v2a)
    seconds_trained: float
    steps: int
    label: str = LABEL

    def generate(self, task: str, ids: Sequence[str], phi: float, steps: int, seed: int, batch_size: int, decoders,
                 device: str = "cpu", on_step: Callable[[int], None] | None = None):
        """(waves | None, frames uint8 [N, T, H, W, 3] | None, mels | None) of ``task`` for the clips ``ids``:
        the audio image's plane -> RGB -> mel (``decoders``' preset) -> the vocoder; a2v scores frames only,
        v2a audio only, as MM-LDM's rows."""
        from models.mmldm import make_scheduler
        from stages.generation.vocode import images_to_mels, mels_to_audio
        from stages.mmldm.evaluate import generate_latents

        rows = {c: i for i, c in enumerate(self.signals.clip_ids)}
        pick = [rows[c] for c in ids]
        known = self.signals.audio_mean[pick] if task == "a2v" else self.signals.video_mean[pick] if task == "v2a" else None
        scheduler = make_scheduler(self.dit.config.num_train_timesteps, self.dit.config.beta_schedule)
        x_a, x_v = generate_latents(self.dit, scheduler, self.scales, task, len(ids), known, phi, steps, seed, batch_size, device, on_step)
        waves = mels = frames = None
        if task != "a2v":
            images = np.repeat(to_uint8(x_a[:, 0])[..., None], 3, axis=-1)
            mels = images_to_mels(images, decoders.preset, decoders.seconds)
            waves = mels_to_audio(mels, decoders.vocoder, decoders.preset)
        if task != "v2a":
            frames = np.ascontiguousarray(np.moveaxis(to_uint8(x_v), 1, -1))
        return waves, frames, mels


def train_signal_baseline(store: FeatureStore, manifest: ClipManifest, vae_latent_key: str, config,
                          audio_patch: Sequence[int] = AUDIO_PATCH, video_patch: Sequence[int] = VIDEO_PATCH,
                          log: Callable[[str], None] | None = None, device: str = "cpu") -> SignalBaseline:
    """The JointDiT of ``config`` (a DitTrainConfig: the same as MM-LDM's but for its steps and batch) on
    the train split's signals, with the same training loop, scaled to unit std as MM-LDM's latents are."""
    from dataclasses import replace

    from stages.mmldm.train import latent_scales, train_dit

    signals = load_signals(store, manifest, vae_latent_key)
    train = signals.of_split("train")
    model_config = replace(config.model_config(train.audio_mean.shape[1:], train.video_mean.shape[1:]),
                           audio_patch=tuple(audio_patch), video_patch=tuple(video_patch))
    scales = latent_scales(train)
    start = time.perf_counter()
    result = train_dit(train, config, scales, log=log, device=device, label=f"{LABEL} seed {config.seed}", model_config=model_config)
    return SignalBaseline(result.model, scales, signals, time.perf_counter() - start, result.steps_run)
