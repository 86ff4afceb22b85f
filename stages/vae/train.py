"""KL-VAEs on cached audio images and video frames: training, scaling factor, metrics, latents per shard.

MM-LDM section 3.1: audio images and video frames are compressed by a KL-VAE into perceptual
latents. Here one small AutoencoderKL per modality (``audio_vae`` on audio images, ``frame_vae``
on video frames; see the measurements in the module's tests and the report for why they are not
shared) is trained on the cached images of the training split until validation reconstruction
stops improving (``PlateauRule``, within a step budget), or loaded from a local pretrained folder.
The latent scaling factor is 1 / std of the posterior means of the training images, so scaled
latents have unit variance on the training split; it is stored in the checkpoint sidecar.

``vae_latents`` (stages.features.latents) stores, per shard, the scaled posterior (mean and std)
of every clip that has all of the requested modalities; ``latent_statistics`` their per-channel
statistics over the train split.

No dagster here: usable from a notebook.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from models.constants import DEFAULT_BATCH
from stages.core.checkpoints import load_checkpoint, save_checkpoint
from stages.core.progress import LossWindow, Progress
from stages.features.mel import AUDIO_IMAGE_FEATURE, MEL_FEATURE
from stages.features.frames import VIDEO_FRAMES_FEATURE
from stages.ingest.manifest import ClipManifest
from stages.core.parallel import StepThreads, torch_threads
from stages.features.spectral import MelPreset, audio_image_to_mel, get_preset
from stages.core.lineage import NewShards, Start, Trained, fit_with_lineage
from stages.core.store import FeatureStore, canonical_json, feature_key

if TYPE_CHECKING:
    import torch
    from models.vae import VaeConfig

AUDIO_VAE, FRAME_VAE = "audio_vae", "frame_vae"
# Bump when the code changes the weights it trains / the latents it stores.
VAE_CODE_VERSION = "1"

# What each modality reads: (feature, array in that feature).
MODALITY_INPUTS = {"audio": (AUDIO_IMAGE_FEATURE, "image"), "frames": (VIDEO_FRAMES_FEATURE, "frames")}
MODALITIES = tuple(MODALITY_INPUTS)


@dataclass(frozen=True)
class VaeTrainConfig:
    # The budget: at most this many steps (the one-cycle learning-rate schedule spans them); the
    # stopping rule below ends a fit earlier once validation reconstruction stops improving. 1000:
    # 0.4 s a step at 64 px on one CPU thread, so `make generate` (17 min with two 300-step VAEs)
    # grows to about 26 min if neither VAE stops early; 2000 steps halved the val L1 of 300
    # (BENCHMARKS.md, decode-path ceiling). 80 x 344 audio images cost 5.6 s a step (2.4 without
    # the mid-block attention over 20 x 86 latents; 2 busy cores): retune for that shape.
    # bench/bench_vae.py `curve` measures where the rule stops.
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_weight: float = 1e-5  # per latent element, next to a per-pixel L1 in [-1, 1] units
    spectral_weight: float = 0.0
    # A multi-scale gradient loss (models.vae.gradient_l1): L1 on the height and width differences
    # of the image at `gradient_scales` resolutions, so a VAE cannot smooth away onsets and
    # harmonics at little cost in pixel L1 (0 = off; off, the two fields stay out of the key).
    gradient_weight: float = 0.0
    gradient_scales: int = 3
    # An adversarial PatchGAN loss (LDM's AutoencoderKL training): from step `adversarial_start` on,
    # a discriminator (`discriminator_channels`, `discriminator_layers`) learns real from
    # reconstructed training windows by a hinge loss, and the VAE adds `adversarial_weight` x its
    # generator loss, scaled by LDM's adaptive weight when `adaptive_weight`. The stopping rule
    # and the kept best weights start afresh when it starts. 0 = off (out of the key, as before).
    adversarial_weight: float = 0.0
    adversarial_start: int = 0  # -1: halfway through the budget (`adversarial_step`: steps // 2)
    adaptive_weight: bool = True
    discriminator_channels: int = 32
    discriminator_layers: int = 2
    eval_every: int = 50
    # Stop after `patience` evaluations in a row that did not lower the best validation L1 by a
    # relative `min_delta` (3 x 50 steps without a 1% gain); patience 0 = no rule, run all `steps`
    # (and the checkpoint key of a config from before the rule existed: key_params).
    patience: int = 3
    min_delta: float = 0.01
    # With the rule on, the learning rate does not follow a schedule over the budget (a fit stopped
    # halfway by a one-cycle schedule never anneals: the first audio VAE stopped at step 550 of
    # 1000 at half its peak rate, val L1 jumping 0.052-0.064 between evaluations, while the frame
    # VAE, annealed to the end, went 0.124 -> 0.072 over its last 600 steps). It warms up, stays
    # constant, and each plateau first multiplies it by `lr_drop` (up to `lr_drops` times, the
    # patience count starting afresh); the plateau after the last drop stops the fit.
    lr_drops: int = 2
    lr_drop: float = 0.2
    seed: int = 0
    max_val_images: int = 256  # validation images scored at each evaluation (a fixed seeded subset)
    frame_stride: int = 1  # frames only: train on every k-th frame of each clip
    # Train on random windows of at most this many columns of each image (0 = whole images); the
    # convolutional VAE then encodes and decodes whole images. An 80 x 344 audio image costs 5.0
    # CPU-s a step whole and 1.05 as 80 x 96 windows (64 x 64 frames: 0.53), so the audio VAE can
    # train at the mel's own resolution within `make generate`'s budget; 64 px frames are narrower
    # than the window and train whole. Validation always scores whole images.
    crop_width: int = 96
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 4
    mid_block_attention: bool = True
    # Torch threads while fitting (speed only, not in the checkpoint key). 0: tuned while it runs by
    # timing its own steps (stages.core.parallel.StepThreads): 2 threads make a step 1.77x faster on
    # an idle 2-core machine, and 13x slower (0.3 -> 4 s) with the other core busy.
    threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.steps < 0 or self.batch_size < 1 or self.eval_every < 1 or self.frame_stride < 1 or self.max_val_images < 1:
            raise ValueError("steps must be >= 0 and batch_size, eval_every, frame_stride, max_val_images >= 1")
        if not self.learning_rate > 0 or self.kl_weight < 0 or self.spectral_weight < 0:
            raise ValueError("learning_rate must be > 0 and kl_weight, spectral_weight >= 0")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.crop_width < 0 or self.crop_width % factor:
            raise ValueError(f"crop_width must be 0 or a positive multiple of the VAE's downsampling factor {factor}, got {self.crop_width}")
        if self.gradient_weight < 0 or self.gradient_scales < 1 or self.adversarial_weight < 0:
            raise ValueError("gradient_weight and adversarial_weight must be >= 0 and gradient_scales >= 1")
        if self.adversarial_start < -1 or self.adversarial_weight and not 0 <= self.adversarial_step < max(self.steps, 1):
            raise ValueError(f"adversarial_start must be -1 (steps // 2) or lie in [0, steps) = [0, {self.steps}), got {self.adversarial_start}")
        if self.discriminator_channels < 4 or self.discriminator_channels % 4 or self.discriminator_layers < 1:
            raise ValueError("discriminator_channels must be a multiple of 4 and discriminator_layers >= 1")
        if self.patience < 0 or not 0 <= self.min_delta < 1:
            raise ValueError(f"patience must be >= 0 and min_delta in [0, 1), got {self.patience} and {self.min_delta}")
        if self.lr_drops < 0 or not 0 < self.lr_drop < 1:
            raise ValueError(f"lr_drops must be >= 0 and lr_drop in (0, 1), got {self.lr_drops} and {self.lr_drop}")
        self.vae_config()  # validates the architecture

    @property
    def adversarial_step(self) -> int:
        """The step the adversarial phase starts at (``adversarial_start``, -1 resolved against ``steps``)."""
        return self.steps // 2 if self.adversarial_start == -1 else self.adversarial_start

    @classmethod
    def for_modality(cls, modality: str, **fields) -> "VaeTrainConfig":
        """The default config of ``modality``'s VAE (AudioVaeTrainConfig for audio) with ``fields`` set."""
        return (AudioVaeTrainConfig if modality == "audio" else cls)(**fields)

    def vae_config(self) -> VaeConfig:
        from models.vae import VaeConfig

        return VaeConfig(
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            mid_block_attention=self.mid_block_attention,
        )

    def params(self) -> dict:
        """Every field but ``threads`` (``VaeTrainConfig(**params())`` is the same config)."""
        fields = {**asdict(self), "block_out_channels": list(self.block_out_channels)}
        fields.pop("threads")
        return fields

    def key_params(self) -> dict:
        """What shapes the trained weights (the checkpoint key): ``params()``, without the stopping
        rule when it is off, so a config from before the rule keeps its key and its checkpoint."""
        fields = self.params()
        if not self.patience:
            for name in ("patience", "min_delta", "lr_drops", "lr_drop"):  # they mean nothing without the rule
                fields.pop(name)
        if not self.crop_width:
            fields.pop("crop_width")
        # the new losses, off, leave the key of a config from before them
        if not self.gradient_weight:
            for name in ("gradient_weight", "gradient_scales"):
                fields.pop(name)
        if self.adversarial_weight:  # the step it runs from: -1 and the step it names train the same weights
            fields["adversarial_start"] = self.adversarial_step
        else:
            for name in ("adversarial_weight", "adversarial_start", "adaptive_weight", "discriminator_channels",
                         "discriminator_layers"):
                fields.pop(name)
        return fields


@dataclass(frozen=True)
class AudioVaeTrainConfig(VaeTrainConfig):
    """The audio VAE's defaults: three levels (4x down), so an 80 x 352 audio image gives 20 x 88 x 4
    latents (a quarter of the image's values, AudioLDM's VAE keeps half). The 8x VAE (10 x 44, 16x
    fewer values) smoothed the mel's fine texture, and aiSFX classifies these sounds by it: a
    Gaussian blur of 0.7 mel bins / frames alone drops the label probe from 97% to 69% (noise of the
    same L1 keeps 89%); its oracle kept 17% of real audio's class accuracy on test, this one (with
    the gradient loss and the adversarial phase below) 60% on test, 84% on val (BENCHMARKS.md, "The
    adversarial audio VAE"). The
    generator patches 20 x 88 into 10 x 44 x 16 (GeneratorTrainConfig.patch), so it costs no more;
    MM-LDM takes f_a = 4 on it (the paper's).
    64 validation images per evaluation (not 256): at 20 x 88 an evaluation of 256 cost about a
    minute on one thread, as much as 50 training steps."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    max_val_images: int = 64
    # The multi-scale gradient L1 (models.vae.gradient_l1) beside the pixel L1: measured on the demo's val
    # split, 1000 steps, the oracle kept 72% of real audio's class accuracy with it (FD 2.2x the
    # vocoder's) and 48% without it at 800 steps (FD 3.8x); val L1 0.026 against 0.030 at 1000 steps.
    gradient_weight: float = 0.5
    # The adversarial PatchGAN phase over the second half of a 2000-step budget (LDM's VAE recipe:
    # reconstruction first, then the discriminator). Measured on the demo's val split (one training
    # each, same store): 1000 steps without it kept 72% of real audio's class accuracy (FD 2.9x the
    # vocoder's), 2000 steps without it 72% (FD 1.9x), 2000 with it from step 1000 84% (FD 1.9x);
    # the pixel L1 alone smooths the texture aiSFX classifies by (BENCHMARKS.md, "The adversarial
    # audio VAE"). 17 min of `make generate` on 2 idle cores (the 1000-step VAE: 9 min).
    steps: int = 2000
    adversarial_weight: float = 0.5
    adversarial_start: int = -1


# ---- images from the store ------------------------------------------------------------------------

@dataclass
class ImageSet:
    """uint8 images [N, H, W, 3], the clip and split of each (frames: one row per frame)."""

    images: np.ndarray
    clip_ids: list[str]
    splits: list[str]

    def subset(self, split: str) -> "ImageSet":
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return ImageSet(self.images[keep], [self.clip_ids[i] for i in keep], [split] * len(keep))

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def clips(self) -> int:
        return len(set(self.clip_ids))


def read_image_set(
    store: FeatureStore, manifest: ClipManifest, modality: str, key: str, shards: Sequence[str] | None = None,
    frame_stride: int = 1,
) -> ImageSet:
    """Every cached image of one modality (frames flattened, every ``frame_stride``-th), with splits."""
    feature, array = MODALITY_INPUTS[modality]
    table = store.read_arrays(manifest.dataset, feature, key, shards=shards, names=[array])
    index = manifest.index()
    keep = [i for i, clip_id in enumerate(table.clip_ids) if clip_id in index]
    ids = [table.clip_ids[i] for i in keep]
    if not keep:
        return ImageSet(np.zeros((0, 1, 1, 3), np.uint8), [], [])
    values = table.arrays[array][keep]
    if modality == "frames":
        values = values[:, ::frame_stride]
        per_clip = values.shape[1]
        values = values.reshape(-1, *values.shape[2:])
        ids = [clip_id for clip_id in ids for _ in range(per_clip)]
    return ImageSet(np.ascontiguousarray(values), ids, [index[clip_id].split for clip_id in ids])


# ---- training -------------------------------------------------------------------------------------

@dataclass
class VaeTrainResult:
    model: Any
    history: list[dict]
    best_step: int
    best_val_l1: float
    seconds: float
    val_source: str  # "val", or "train" when the validation split is empty
    steps_run: int = 0
    stopped_by: str = "max_steps"  # "max_steps" (the budget ran out) or "plateau" (the stopping rule)
    lr_drop_steps: tuple[int, ...] = ()  # steps at which a plateau lowered the learning rate
    threads: dict | None = None  # StepThreads.summary(): the torch threads the steps ran at (speed only)

    def stopping(self, config: "VaeTrainConfig") -> dict:
        """The stopping rule and its outcome, as the sidecar and the asset metadata give it."""
        return {"rule": {"metric": f"{self.val_source} L1", "eval_every": config.eval_every, "patience": config.patience,
                         "min_delta": config.min_delta, "lr_drops": config.lr_drops, "lr_drop": config.lr_drop,
                         "max_steps": config.steps},
                "lr_drop_steps": list(self.lr_drop_steps),
                "steps_run": self.steps_run, "best_step": self.best_step, "best_val_l1": round(self.best_val_l1, 5),
                "stopped_by": self.stopped_by, "reason": stop_reason(self.stopped_by, config)}


def stop_reason(stopped_by: str, config: "VaeTrainConfig") -> str:
    if stopped_by == "plateau":
        return (f"validation L1 did not improve by {config.min_delta:.1%} (relative) in {config.patience} evaluations "
                f"({config.patience * config.eval_every} steps)"
                + (f" after {config.lr_drops} learning-rate drops (x{config.lr_drop} each)" if config.lr_drops else ""))
    return f"the budget of {config.steps} steps ran out" + ("" if config.patience else " (no stopping rule)")


@dataclass
class PlateauRule:
    """Stop once ``patience`` evaluations in a row have not lowered the best value by a relative
    ``min_delta`` (patience 0: never). Smaller values are better."""

    patience: int
    min_delta: float
    best: float = math.inf
    stale: int = 0

    def update(self, value: float) -> bool:
        """Record one evaluation; True when training should stop."""
        if value < self.best * (1.0 - self.min_delta):
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return bool(self.patience) and self.stale >= self.patience


def _fixed_subset(count: int, limit: int, seed: int) -> np.ndarray:
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def reconstruction_l1(vae, images: np.ndarray, batch_size: int = DEFAULT_BATCH) -> float:
    """Mean |x - x_hat| in [-1, 1] units, decoding the posterior means."""
    import torch
    from models.vae import images_to_tensor

    with torch.no_grad():
        vae.eval()
        device = next(vae.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(images), batch_size):
            x = images_to_tensor(images[start : start + batch_size], device)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            total += float((y - x).abs().sum())
            count += x.numel()
        return total / max(count, 1)


@contextmanager
def seeded_rng(seed: int, device: str = "cpu") -> Iterator[None]:
    """torch's global RNG seeded with ``seed`` inside the block and the caller's state restored after
    (CPU, and the CUDA device trained on): a fit depends on its config's seed, not on the caller."""
    import torch
    from models.devices import seeded_devices

    with torch.random.fork_rng(devices=seeded_devices(device)):
        torch.manual_seed(seed)
        yield


def train_vae(
    train: np.ndarray,
    val: np.ndarray,
    config: VaeTrainConfig,
    device: str = "cpu",
    init_state: Mapping[str, torch.Tensor] | None = None,
    log: Callable[[str], None] | None = None,
    label: str = "vae",
    on_eval: Callable[[int, Any], Mapping[str, float]] | None = None,
) -> VaeTrainResult:
    """AdamW (one-cycle schedule over ``config.steps``) on random batches, evaluated every
    ``eval_every`` steps; stops early by the config's ``PlateauRule`` and keeps the weights with the
    lowest validation L1 (the best evaluation, not the last).

    ``train`` / ``val`` are uint8 [N, H, W, 3]. An empty validation set scores a fixed subset of
    the training images instead (``val_source`` says so). Initialisation and the posterior samples
    come from the config's seed in a scope of their own (the caller's global RNG is left as it was).
    On ``device`` (models.devices); ``log`` gets progress lines named by ``label`` (steps, loss,
    validation L1, ETA). ``on_eval(step, vae)`` (benchmarks) may add measurements to each
    evaluation's history row; it runs outside the seeded scope's training RNG use.
    """
    from models.devices import check_device

    check_device(device)
    with seeded_rng(config.seed, device):
        return _train_vae(train, val, config, device, init_state, log, label, on_eval)


def _train_vae(train, val, config, device, init_state, log, label="vae", on_eval=None) -> VaeTrainResult:
    import torch
    from models.devices import DeviceRows
    from models import vae as vae_module
    from models.vae import build_vae, images_to_tensor

    if len(train) < 1:
        raise ValueError("need at least 1 training image")
    start = time.perf_counter()
    vae = build_vae(config.vae_config(), seed=config.seed).to(device)
    if init_state is not None:
        vae.load_state_dict(init_state)
    val_source = "val" if len(val) else "train"
    scored = val if len(val) else train
    scored = scored[_fixed_subset(len(scored), config.max_val_images, config.seed)]
    rng = np.random.default_rng(config.seed)
    best = (reconstruction_l1(vae, scored), 0, {k: v.detach().clone() for k, v in vae.state_dict().items()})
    history = [{"step": 0, "train_l1": None, "train_kl": None, "val_l1": round(best[0], 5), **_extra(on_eval, 0, vae)}]
    if config.steps:
        optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
        # 5% warm-up, but at least 2 steps: OneCycleLR divides by (warm-up steps - 1), so a warm-up
        # of exactly one step (steps=20) raised ZeroDivisionError.
        pct_start = 0.05 if config.steps < 4 else min(0.5, max(0.05, 2.0 / config.steps))
        if config.patience:
            # warm-up as the one-cycle's, then constant; `drop` scales it at each plateau
            warmup = max(1, round(pct_start * config.steps))
            drop = [1.0]
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) * drop[0])
        else:  # the rule off: the one-cycle schedule over every step, as before the rule (same key, same numbers)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=pct_start, anneal_strategy="cos"
            )
    adversary = _Adversary(vae, config, device) if config.adversarial_weight and config.steps else None
    vae.train()
    batch = min(config.batch_size, len(train))
    # uint8 images on the device when they fit, else pinned on the host (models.devices)
    images = DeviceRows({"images": train}, device)
    rows = (np.sort(rng.choice(len(train), size=batch, replace=False)) for _ in range(config.steps))
    # Window offsets from a generator of their own: whole-image training keeps its batches exactly.
    width = train.shape[2]
    window = config.crop_width if 0 < config.crop_width < width else 0
    offsets = np.random.default_rng([config.seed, 1])
    losses = LossWindow("VAE training loss")
    progress = Progress(label, config.steps, "steps", log).start()
    current = best[0]
    rule = PlateauRule(config.patience, config.min_delta)
    rule.update(best[0])
    steps_run, stopped_by, drop_steps = 0, "max_steps", []
    with StepThreads(config.threads) as threads:
        for step, chunk in enumerate(images.prefetch(rows), start=1):
            threads.tick()
            batch_images = chunk["images"]
            if window:
                starts = offsets.integers(0, width - window + 1, size=len(batch_images))
                batch_images = torch.stack([batch_images[i, :, int(s) : int(s) + window] for i, s in enumerate(starts)])
            x = images_to_tensor(batch_images, device)
            adversarial = adversary is not None and step > config.adversarial_step
            if adversary is None and not config.gradient_weight:  # as before the new losses (tests record this call)
                loss, parts = vae_module.vae_loss(vae, x, config.kl_weight, config.spectral_weight)
            else:
                loss, parts, y = vae_module.vae_forward_loss(vae, x, config.kl_weight, config.spectral_weight,
                                                             config.gradient_weight, config.gradient_scales)
                if adversarial:
                    loss = adversary.generator_term(loss, y, parts)
            losses.add(step, loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if adversarial:
                adversary.discriminator_step(x, y, parts)
            steps_run = step
            plateau = False
            if step % config.eval_every == 0 or step == config.steps:
                losses.check()
                current = reconstruction_l1(vae, scored)
                row = {"step": step, "train_l1": round(float(parts["l1"]), 5), "train_kl": round(float(parts["kl"]), 4),
                       "val_l1": round(current, 5)}
                row.update({f"train_{k}": round(float(v), 5) for k, v in parts.items() if k not in ("l1", "kl")})
                history.append({**row, **_extra(on_eval, step, vae)})
                vae.train()  # reconstruction_l1 (and on_eval) leave it in eval mode
                counting = adversary is None or step > config.adversarial_step
                if counting and adversary is not None and not adversary.counted:
                    # The adversarial phase starts: its weights are the ones to keep, so the best and the
                    # rule start afresh (the pre-adversarial weights have lower L1 but blur).
                    adversary.counted = True
                    best, rule = (math.inf, step, None), PlateauRule(config.patience, config.min_delta)
                if counting and current < best[0]:
                    best = (current, step, {k: v.detach().clone() for k, v in vae.state_dict().items()})
                plateau = counting and rule.update(current) and step < config.steps
                if plateau and len(drop_steps) < config.lr_drops:
                    drop[0] *= config.lr_drop
                    drop_steps.append(step)
                    rule.stale, plateau = 0, False
                    if log:
                        log(f"{label}: step {step}: {val_source} L1 flat for {config.patience} evaluations; learning rate "
                            f"x{config.lr_drop} (drop {len(drop_steps)} of {config.lr_drops}), best {best[0]:.5f} at step {best[1]}")
            if progress.due() or step == config.steps or plateau:
                progress.advance(step - progress.done, loss=losses.check, **{f"{val_source} L1": current})
            if plateau:
                stopped_by = "plateau"
                if log:
                    log(f"{label}: stopped at step {step} of {config.steps}: {stop_reason(stopped_by, config)}; "
                        f"best {val_source} L1 {best[0]:.5f} at step {best[1]}")
                break
    vae.load_state_dict(best[2])
    vae.eval()
    return VaeTrainResult(vae, history, best[1], best[0], time.perf_counter() - start, val_source, steps_run, stopped_by,
                          tuple(drop_steps), threads.summary())


class _Adversary:
    """The discriminator of an adversarial VAE fit and its optimizer (LDM: hinge loss, Adam with
    betas (0.5, 0.9) at the VAE's learning rate), built in the fit's seeded scope after the VAE."""

    def __init__(self, vae, config: VaeTrainConfig, device: str):
        import torch
        from models.vae import PatchDiscriminator

        self.vae, self.config = vae, config
        self.model = PatchDiscriminator(config.discriminator_channels, config.discriminator_layers).to(device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
        self.counted = False

    def generator_term(self, loss, reconstruction, parts: dict):
        """``loss`` + weight x the generator's hinge loss -mean D(x_hat) (D's weights are not stepped here)."""
        from models.vae import adaptive_adversarial_weight

        for p in self.model.parameters():
            p.requires_grad_(False)
        generator = -self.model(reconstruction).mean()
        for p in self.model.parameters():
            p.requires_grad_(True)
        weight = self.config.adversarial_weight
        if self.config.adaptive_weight:
            adaptive = adaptive_adversarial_weight(loss, generator, self.vae.decoder.conv_out.weight)
            parts["adaptive_weight"] = adaptive
            weight = weight * adaptive
        parts["generator"] = generator.detach()
        return loss + weight * generator

    def discriminator_step(self, real, reconstruction, parts: dict) -> None:
        from models.vae import hinge_discriminator_loss

        loss = hinge_discriminator_loss(self.model(real), self.model(reconstruction.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        parts["discriminator"] = loss.detach()


def _extra(on_eval, step: int, vae) -> dict:
    """``on_eval``'s measurements, with the RNG state kept: they do not change the training."""
    if on_eval is None:
        return {}
    import torch

    with torch.random.fork_rng(devices=[]):
        return dict(on_eval(step, vae))


def compute_scaling_factor(vae, images: np.ndarray, max_images: int = 1024, seed: int = 0) -> float:
    """1 / std of the posterior means of (a seeded subset of) the images: scaled latents have unit std."""
    from models.vae import encode

    if not len(images):
        raise ValueError("the scaling factor needs at least one image")
    rows = _fixed_subset(len(images), max_images, seed)
    std = float(encode(vae, images[rows]).std())
    if not math.isfinite(std) or std <= 0:
        raise FloatingPointError(f"latent std is {std}: cannot compute a scaling factor")
    return 1.0 / std


# ---- metrics --------------------------------------------------------------------------------------

def psnr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """PSNR in dB of uint8 images over the whole set (one MSE, peak 255)."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def spectral_convergence(reference_log_mel: np.ndarray, estimate_log_mel: np.ndarray) -> float:
    """Mean over clips of ||S - S_hat||_F / ||S||_F on linear mel magnitudes (exp of the log-mels)."""
    ref, est = np.exp(np.asarray(reference_log_mel, np.float64)), np.exp(np.asarray(estimate_log_mel, np.float64))
    axes = tuple(range(1, ref.ndim))
    return float(np.mean(np.sqrt(((ref - est) ** 2).sum(axis=axes)) / np.maximum(np.sqrt((ref**2).sum(axis=axes)), 1e-12)))


def audio_image_metrics(
    original: np.ndarray, reconstructed: np.ndarray, preset: MelPreset, n_frames: int, source_mels: np.ndarray | None = None
) -> dict[str, float]:
    """Mel-domain errors of reconstructed audio images.

    ``mel_l1``: mean |delta log-mel| (natural log units) between the mels of the original and of
    the reconstructed image (the VAE's own error); ``spectral_convergence`` on the same pair. With
    the cached ``source_mels``: ``mel_l1_source_image`` (what the audio image itself loses:
    quantisation and resizing) and ``mel_l1_source_recon`` (image + VAE).
    """
    mel_original = audio_image_to_mel(original, preset, n_frames)
    mel_recon = audio_image_to_mel(reconstructed, preset, n_frames)
    out = {
        "mel_l1": float(np.abs(mel_original - mel_recon).mean()),
        "spectral_convergence": spectral_convergence(mel_original, mel_recon),
    }
    if source_mels is not None:
        source = np.maximum(np.asarray(source_mels, np.float32), preset.image_low)  # images start at image_low
        out["mel_l1_source_image"] = float(np.abs(source - mel_original).mean())
        out["mel_l1_source_recon"] = float(np.abs(source - mel_recon).mean())
    return out


def reconstruction_metrics(
    vae, images: np.ndarray, preset: MelPreset | None = None, n_frames: int | None = None,
    source_mels: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """PSNR and L1 of the posterior-mean reconstructions (+ mel metrics for audio images); and the
    reconstructions."""
    from models.vae import decode, encode

    recon = decode(vae, encode(vae, images))
    metrics = {"psnr": psnr(images, recon), "l1": float(np.abs(images.astype(np.float32) - recon).mean() / 127.5)}
    if preset is not None:
        metrics.update(audio_image_metrics(images, recon, preset, int(n_frames), source_mels))
    return metrics, recon


def baseline_metrics(
    train_mean: np.ndarray, images: np.ndarray, untrained, preset: MelPreset | None = None, n_frames: int | None = None,
) -> dict[str, dict[str, float]]:
    """Two references for the trained VAE: the mean training image for every input (a trivial
    reconstruction) and the same architecture untrained."""
    trivial = np.broadcast_to(np.asarray(np.rint(train_mean), np.uint8), images.shape)
    mean_metrics = {"psnr": psnr(images, trivial), "l1": float(np.abs(images.astype(np.float32) - trivial).mean() / 127.5)}
    if preset is not None:
        mean_metrics.update(audio_image_metrics(images, np.ascontiguousarray(trivial), preset, int(n_frames)))
    untrained_metrics, _ = reconstruction_metrics(untrained, images, preset, n_frames)
    return {"mean_image": mean_metrics, "untrained": untrained_metrics}


# ---- checkpoints ----------------------------------------------------------------------------------

def pretrained_fingerprint(path: str) -> dict:
    """The folder, its config and the sha256 of its weight files: what makes a pretrained VAE itself."""
    from models.vae import check_pretrained_dir

    folder, subfolder, weights = check_pretrained_dir(path)
    digests = {}
    for name in weights:
        digest = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[name] = digest.hexdigest()
    with open(os.path.join(folder, subfolder, "config.json"), encoding="utf-8") as handle:
        config = {k: v for k, v in json.load(handle).items() if k != "_diffusers_version"}
    return {"pretrained_dir": folder, "subfolder": subfolder, "weights_sha256": digests, "config": config}


def vae_checkpoint_key(name: str, params: Mapping[str, Any], input_keys: Sequence[str], shards: Sequence[str]) -> str:
    """hash(model name, training parameters or pretrained fingerprint, code version, input keys, shards)."""
    return feature_key(name, dict(params), VAE_CODE_VERSION, [*input_keys, *shards])


def vae_fit_key(name: str, modality: str, input_key: str, shards: Sequence[str], config: VaeTrainConfig,
                pretrained: Mapping[str, Any] | None = None) -> str:
    """The checkpoint key ``fit_vae`` trains (``config.key_params()``) or loads (``pretrained``) under."""
    if pretrained is not None:
        # The same weights in another folder are the same model: the key hashes contents, not the path.
        params: dict[str, Any] = {"pretrained": {k: pretrained[k] for k in ("weights_sha256", "config")},
                                  "frame_stride": config.frame_stride, "max_val_images": config.max_val_images,
                                  "seed": config.seed}
    else:
        params = config.key_params()
    return vae_checkpoint_key(name, {**params, "modality": modality}, [input_key], shards)


def diffusers_config(vae) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items()}


def save_vae_checkpoint(store: FeatureStore, dataset: str, name: str, key: str, vae, sidecar: Mapping[str, Any]) -> dict:
    """safetensors weights + a sidecar holding the diffusers config (to rebuild), the scaling factor
    and the lineage (input feature keys, shards, steps, metrics)."""
    info = dict(sidecar)
    info["diffusers_config"] = diffusers_config(vae)
    if "scaling_factor" not in info:
        raise ValueError("a VAE checkpoint needs its scaling_factor")
    return save_checkpoint(store, dataset, name, key, vae.state_dict(), info)


@lru_cache(maxsize=8)
def _cached_vae(store_root: str, storage_json: str, dataset: str, name: str, key: str, device: str):
    from models.vae import vae_from_config

    store = FeatureStore(store_root, json.loads(storage_json))
    state, sidecar = load_checkpoint(store, dataset, name, key)
    return vae_from_config(sidecar["diffusers_config"], state).to(device), sidecar


def load_vae(store: FeatureStore, dataset: str, name: str, key: str, device: str = "cpu"):
    """(AutoencoderKL in eval mode, sidecar) of a stored checkpoint; cached per process (workers
    encode many shards), so do not train the returned model in place."""
    return _cached_vae(store.url_root, canonical_json(store.storage_options), dataset, name, key, str(device))


# ---- encoding and decoding with a stored scaling factor -------------------------------------------

def encode_scaled(vae, images: np.ndarray, scaling_factor: float, dtype: str = "float32", batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Scaled posterior means of uint8 images [..., H, W, 3] -> [..., C, h, w] (leading axes kept)."""
    from models.vae import encode

    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    z = encode(vae, flat, batch_size=batch_size) * float(scaling_factor)
    return z.numpy().astype(dtype).reshape(*lead, *z.shape[1:])


def encode_scaled_posterior(vae, images: np.ndarray, scaling_factor: float, dtype: str = "float32",
                            batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the scaled posterior of uint8 images [..., H, W, 3], each [..., C, h, w]: the
    mean is ``encode_scaled``'s, the std is the posterior's std times the same factor."""
    from models.vae import encode_posterior

    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    mean, std = encode_posterior(vae, flat, batch_size=batch_size)
    factor = float(scaling_factor)
    return tuple((z * factor).numpy().astype(dtype).reshape(*lead, *z.shape[1:]) for z in (mean, std))  # type: ignore[return-value]


def decode_latents(vae, latents: np.ndarray, scaling_factor: float, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """uint8 images [..., H, W, 3] of scaled latents [..., C, h, w] (inverse of ``encode_scaled``)."""
    import torch
    from models.vae import decode

    latents = np.asarray(latents, np.float32)
    lead = latents.shape[:-3]
    flat = torch.from_numpy(latents.reshape(-1, *latents.shape[-3:]) / float(scaling_factor))
    images = decode(vae, flat, batch_size=batch_size)
    return images.reshape(*lead, *images.shape[1:])


# ---- fitting one modality's VAE from the store ----------------------------------------------------

@dataclass
class VaeFit:
    """A VAE checkpoint in the store: its key, its sidecar, and whether it was already there."""

    name: str
    key: str
    sidecar: dict
    reused: bool

    @property
    def scaling_factor(self) -> float:
        return float(self.sidecar["scaling_factor"])


def _audio_source(store: FeatureStore, dataset: str, image_key: str, shards: Sequence[str]) -> tuple[MelPreset, float, str]:
    """(mel preset, clip seconds, mel feature key) behind an audio image key, from its shard manifests."""
    image_manifest = store.shard_manifest(dataset, AUDIO_IMAGE_FEATURE, image_key, shards[0])
    (mel_key,) = image_manifest["input_keys"]
    mel_manifest = store.shard_manifest(dataset, MEL_FEATURE, mel_key, shards[0])
    return get_preset(mel_manifest["params"]["preset"]), float(mel_manifest["params"]["seconds"]), mel_key


def fit_vae(
    store: FeatureStore,
    manifest: ClipManifest,
    name: str,
    modality: str,
    input_key: str,
    config: VaeTrainConfig | None = None,
    pretrained_dir: str = "",
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> VaeFit:
    """Train (``config``) or load (``pretrained_dir``) the VAE of one modality, compute its scaling
    factor on the training split and its validation metrics next to two baselines, and save it as a
    checkpoint; reuse the checkpoint when its key exists.

    The key hashes the training parameters (or the pretrained folder's config and weight hashes),
    the input feature key and the manifest's shards.
    """
    import torch

    if modality not in MODALITY_INPUTS:
        raise ValueError(f"unknown modality {modality!r}: choose one of {list(MODALITIES)}")
    config = config or VaeTrainConfig.for_modality(modality)
    shards = sorted(manifest.by_shard())
    pretrained = pretrained_fingerprint(pretrained_dir) if pretrained_dir else None
    key = vae_fit_key(name, modality, input_key, shards, config, pretrained)

    def train(start: Start) -> Trained:
        # the fit's steps tune their own threads (StepThreads); the rest runs on one unless fixed
        with torch_threads(config.threads or 1):
            vae, sidecar = _fit_new(store, manifest, name, modality, input_key, config, key, shards, pretrained, device, log)
        return Trained(state={}, model=vae, steps_run=sidecar["steps"], seconds=sidecar["train_seconds"], sidecar=sidecar,
                       save=lambda st, dataset, nm, k, extra: save_vae_checkpoint(st, dataset, nm, k, vae, extra))

    # New shards train a new VAE (its key hashes them); stages.core.lineage does reuse and the sidecar.
    fitted = fit_with_lineage(store, manifest.dataset, name, key, shards, train, on_new_shards=NewShards.RETRAIN)
    if not fitted.reused:  # the sidecar as stored (with its url and weight hash), like a reused one
        _, written = load_checkpoint(store, manifest.dataset, name, key)
        return VaeFit(name, key, written, False)
    return VaeFit(name, key, fitted.sidecar, True)


def _fit_new(store, manifest, name, modality, input_key, config, key, shards, pretrained, device, log):
    """Train (or load) one VAE and measure it: (the model, its sidecar fields)."""
    import torch
    from models.vae import encode, load_pretrained_vae, vae_from_config

    pretrained_dir = pretrained["pretrained_dir"] if pretrained else ""
    feature = MODALITY_INPUTS[modality][0]
    images = read_image_set(store, manifest, modality, input_key, shards, config.frame_stride)
    train, val = images.subset("train"), images.subset("val")
    if not len(train):
        raise ValueError(f"{name}: no {feature} images in the training split ({len(images)} images in all)")
    scored = val if len(val) else train
    rows = _fixed_subset(len(scored), config.max_val_images, config.seed)
    eval_images = scored.images[rows]
    start = time.perf_counter()
    if pretrained_dir:
        vae = load_pretrained_vae(pretrained_dir).to(device)
        history, best_step, val_source, steps_run, stopping = [], 0, ("val" if len(val) else "train"), 0, None
        threads = None
    else:
        result = train_vae(train.images, val.images, config, device=device, log=log, label=f"{name} seed {config.seed}")
        vae, history, best_step, val_source = result.model, result.history, result.best_step, result.val_source
        steps_run, stopping, threads = result.steps_run, result.stopping(config), result.threads
    train_seconds = time.perf_counter() - start
    scaling = compute_scaling_factor(vae, train.images, seed=config.seed)

    sidecar: dict[str, Any] = {"modality": modality, "input_feature": feature, "input_keys": {feature: input_key}}
    preset = n_frames = source_mels = None
    if modality == "audio":
        preset, seconds, mel_key = _audio_source(store, manifest.dataset, input_key, shards)
        n_frames = preset.n_frames(seconds)
        sidecar.update(mel_preset=preset.name, mel_seconds=seconds)
        sidecar["input_keys"][MEL_FEATURE] = mel_key
        mel_table = store.read_arrays(manifest.dataset, MEL_FEATURE, mel_key, shards=shards, names=["mel"])
        by_id = dict(zip(mel_table.clip_ids, mel_table.arrays["mel"]))
        eval_ids = [scored.clip_ids[i] for i in rows]
        if all(c in by_id for c in eval_ids):
            source_mels = np.stack([by_id[c] for c in eval_ids]).astype(np.float32)
    metrics, _ = reconstruction_metrics(vae, eval_images, preset, n_frames, source_mels)
    with seeded_rng(config.seed):
        untrained = vae_from_config(diffusers_config(vae)).to(device)  # same architecture, fresh weights
    baselines = baseline_metrics(train.images.mean(axis=0), eval_images, untrained, preset, n_frames)
    sidecar.update(
        shards=shards,
        train_config=config.params() if not pretrained_dir else None,
        pretrained=pretrained,
        steps=steps_run,  # steps run (the stopping rule may end a fit before config.steps)
        stopping=stopping,
        history=history,
        best_step=best_step,
        scaling_factor=scaling,
        metrics_split=val_source,
        metrics={k: round(float(v), 5) for k, v in metrics.items()},
        baselines={b: {k: round(float(v), 5) for k, v in m.items()} for b, m in baselines.items()},
        clips_train=train.clips,
        clips_val=val.clips,
        images_train=len(train),
        images_val=len(val),
        images_scored=len(eval_images),
        image_size=int(train.images.shape[1]),
        latent_shape=list(encode(vae, train.images[:1]).shape[1:]),
        train_seconds=round(train_seconds, 2),
        train_threads=threads,
        device=str(device),  # where it trained (provenance; not in the key)
    )
    if log:
        log(f"{name} {key}: {metrics_line(sidecar)}")
    return vae, sidecar


def metrics_line(sidecar: Mapping[str, Any]) -> str:
    """One line: trained vs mean-image vs untrained on the scored split."""
    m, b = sidecar["metrics"], sidecar["baselines"]
    parts = [f"PSNR {m['psnr']:.2f} dB (mean image {b['mean_image']['psnr']:.2f}, untrained {b['untrained']['psnr']:.2f})"]
    if "mel_l1" in m:
        parts.append(f"mel L1 {m['mel_l1']:.3f} (mean image {b['mean_image']['mel_l1']:.3f}, untrained {b['untrained']['mel_l1']:.3f})")
        parts.append(f"spectral convergence {m['spectral_convergence']:.3f}")
    return f"{sidecar['metrics_split']} split: " + "; ".join(parts) + f"; scaling factor {sidecar['scaling_factor']:.4f}"


def preview_pairs(
    store: FeatureStore, manifest: ClipManifest, fit: VaeFit, count: int = 4, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(inputs, reconstructions, clip ids) of the first ``count`` scored clips (val, else train).
    Audio: one image per clip [n, H, W, 3]; frames: every frame [n, T, H, W, 3]."""
    sidecar = fit.sidecar
    modality = sidecar["modality"]
    feature, array = MODALITY_INPUTS[modality]
    key = sidecar["input_keys"][feature]
    split = sidecar["metrics_split"]
    index = manifest.index()
    picked, ids = [], []
    for shard in sidecar["shards"]:  # shard by shard: frames of a whole dataset are large
        table = store.read_arrays(manifest.dataset, feature, key, shards=[shard], names=[array])
        for row, clip_id in enumerate(table.clip_ids):
            if len(ids) < count and clip_id in index and index[clip_id].split == split:
                picked.append(table.arrays[array][row])
                ids.append(clip_id)
        if len(ids) >= count:
            break
    if not ids:
        raise ValueError(f"no {feature} rows in the {split} split to preview")
    originals = np.stack(picked)
    vae, _ = load_vae(store, manifest.dataset, fit.name, fit.key, device)
    recon = decode_latents(vae, encode_scaled(vae, originals, 1.0), 1.0)
    return originals, recon, ids


def fit_preview_png(store: FeatureStore, manifest: ClipManifest, fit: VaeFit, count: int = 4, device: str = "cpu") -> bytes:
    """``comparison_png`` of ``preview_pairs``: inputs next to reconstructions (and mels, for audio)."""
    originals, recon, _ = preview_pairs(store, manifest, fit, count, device)
    preset = n_frames = None
    if fit.sidecar["modality"] == "audio":
        preset = get_preset(fit.sidecar["mel_preset"])
        n_frames = preset.n_frames(fit.sidecar["mel_seconds"])
    return comparison_png(originals, recon, preset, n_frames)


def comparison_png(originals: np.ndarray, reconstructions: np.ndarray, preset: MelPreset | None = None,
                   n_frames: int | None = None, frames_shown: int = 4, height: int = 96) -> bytes:
    """One row per clip, input next to reconstruction (stages.core.preview style).

    Audio images: [input, reconstruction, input mel, reconstructed mel] (mels in colour, when a
    preset is given). Frames [n, T, ...]: ``frames_shown`` evenly spaced frames, each input next to
    its reconstruction.
    """
    import io

    from PIL import Image

    from stages.core.preview import colorize

    def tile(image: np.ndarray, width: int | None = None) -> np.ndarray:
        picture = Image.fromarray(np.ascontiguousarray(image))
        size = (width or height, height)
        resample = Image.Resampling.NEAREST if width is None else Image.Resampling.BILINEAR
        return np.pad(np.asarray(picture.resize(size, resample)), ((2, 2), (2, 2), (0, 0)), constant_values=255)

    rows = []
    for original, recon in zip(originals, reconstructions):
        if original.ndim == 4:  # frames
            picks = np.linspace(0, len(original) - 1, num=min(frames_shown, len(original))).round().astype(int)
            tiles = [t for i in picks for t in (tile(original[i]), tile(recon[i]), np.full((height + 4, 6, 3), 255, np.uint8))]
        else:
            tiles = [tile(original), tile(recon)]
            if preset is not None:
                mels = audio_image_to_mel(np.stack([original, recon]), preset, int(n_frames))
                # One colour scale for both: low frequencies at the bottom, as stages.core.preview draws them.
                both = colorize(np.concatenate([mels[0][::-1], mels[1][::-1]], axis=1))
                half, width = mels.shape[2], round(mels.shape[2] * height / mels.shape[1])
                tiles += [tile(both[:, :half], width), tile(both[:, half:], width)]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()
