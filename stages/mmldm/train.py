"""MM-LDM training on cached features (models.mmldm): the multi-modal autoencoder on the KL-VAE
latents (``vae_latents``), then the DiT on its cached latents (``mmldm_latents``), both through the
shared lineage mechanism.

    from stages.mmldm.train import AutoencoderTrainConfig, DitTrainConfig, fit_autoencoder, fit_dit
    ae = fit_autoencoder(store, manifest, vae_latent_key, AutoencoderTrainConfig())
    dit = fit_dit(store, manifest, mmldm_latent_key, DitTrainConfig())

The autoencoder defines a latent space, as the heads do: its key leaves the shards out
(``NewShards.REUSE``), so new clips are encoded by the trained autoencoder and only their shards of
``mmldm_latents`` are computed; the DiT warm-starts on new shards (``NewShards.WARM_START``).
No dagster here: usable from a notebook.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from stages.core.checkpoints import load_module, restore_optimizer
from stages.core.lineage import NewShards, Progress, Start, Trained, fit_with_lineage
from stages.core.parallel import StepThreads
from stages.core.progress import LossWindow
from stages.core.training import batch_rows, warmup_cosine
from stages.core.progress import Progress as ProgressLog
from stages.core.store import FeatureStore, feature_key
from stages.ingest.manifest import ClipManifest

if TYPE_CHECKING:
    from models.mmldm import JointDiT, MmldmAutoencoder

AUTOENCODER_NAME = "mmldm_autoencoder"
DIT_NAME = "mmldm"
AUTOENCODER_CODE_VERSION = "1"
DIT_CODE_VERSION = "1"


# ---- data -------------------------------------------------------------------------------------------

@dataclass
class ClipLatents:
    """Every clip's KL-VAE latents (scaled posterior means), its class and split, in manifest order."""

    clip_ids: list[str]
    audio: np.ndarray  # [N, 4, h_a, w_a] float32
    frames: np.ndarray  # [N, T, 4, h_v, w_v] float32
    labels: np.ndarray  # [N] int64 index into ``classes``, -1 = no label
    splits: list[str]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def subset(self, rows: Sequence[int]) -> "ClipLatents":
        rows = list(rows)
        return ClipLatents([self.clip_ids[i] for i in rows], self.audio[rows], self.frames[rows], self.labels[rows],
                           [self.splits[i] for i in rows], self.classes)

    def of_split(self, split: str) -> "ClipLatents":
        return self.subset([i for i, s in enumerate(self.splits) if s == split])


def dataset_classes(manifest: ClipManifest) -> list[str]:
    """The sorted labels of every clip of the manifest (all splits): the class head's outputs."""
    return sorted({c.label for c in manifest.clips if c.label})


def load_clip_latents(store: FeatureStore, manifest: ClipManifest, vae_latent_key: str) -> ClipLatents:
    from stages.features.latents import read_latent_means

    table = read_latent_means(store, manifest.dataset, vae_latent_key, ["audio", "frames"], shards=sorted(manifest.by_shard()))
    rows = {c: i for i, c in enumerate(table.clip_ids)}
    ids = [c.id for c in manifest.clips if c.id in rows]
    if not ids:
        raise ValueError(f"no clip of {manifest.dataset!r} has audio and frame latents in vae_latents key {vae_latent_key}")
    classes = dataset_classes(manifest)
    class_index = {name: i for i, name in enumerate(classes)}
    index = manifest.index()
    order = [rows[c] for c in ids]
    return ClipLatents(ids, table.arrays["audio"][order].astype(np.float32), table.arrays["frames"][order].astype(np.float32),
                       np.array([class_index.get(index[c].label, -1) for c in ids], np.int64), [index[c].split for c in ids], classes)


def auto_audio_factor(audio_hw: Sequence[int]) -> int:
    """AutoencoderTrainConfig.audio_factor = 0: 4 where it divides both sides and leaves >= 5 rows, else 2, else 1."""
    height, width = (int(s) for s in audio_hw)
    if not height % 4 and not width % 4 and height // 4 >= 5:
        return 4
    return 2 if not height % 2 and not width % 2 else 1


def _restore(progress: Progress, model, optimizer, schedule, log, label: str, total: int) -> tuple[int, list]:
    restored = progress.load()
    if restored is None:
        return 1, []
    done, model_state, optimizer_state, groups = restored
    model.load_state_dict(model_state)
    restore_optimizer(optimizer, optimizer_state, groups)
    for _ in range(done):
        schedule.step()
    if log:
        log(f"{label}: resuming at step {done + 1} of {total}")
    return done + 1, list(groups.get("history", []))


# ---- the autoencoder -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AutoencoderTrainConfig:
    steps: int = 600
    batch_size: int = 12  # clips per step
    frames_per_step: int = 2  # frames of each clip the decoder reconstructs per step (Eq. 2 needs 2)
    learning_rate: float = 1e-3
    cl_weight: float = 0.1  # lambda_cl, lambda_co: the paper's 1e-1 (its Table 6's best)
    co_weight: float = 0.1
    # lambda_kl: the paper's 1e-8 / 1e-9 on its sums; 1e-6 here on the KL summed per clip (880 + 512 latent
    # numbers): the posterior stays nearly deterministic, as there, and the DiT rescales the latents anyway.
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0  # lambda_gan of Eq. (3); the paper's 0.1; 0 = off (the CPU default)
    adversarial_start: int = 0  # step from which the discriminator trains and the term counts
    discriminator_lr: float = 2e-4
    # The decoder's noise MSE over timesteps (models.mmldm.decoder_loss_weights): "eps" (the paper's
    # plain MSE), "min_snr" or "x0" (eps + x0 MSE truncated at snr_gamma); epsilon prediction in every
    # case. Chosen on val (BENCHMARKS "MM-LDM's signal decoder"): with "eps" the decoder's DDIM
    # reconstruction was 4x the mean latent's error; "x0" at gamma 200 brought it to 1.4x (audio).
    decoder_weighting: str = "x0"
    snr_gamma: float = 200.0
    latent_channels: int = 8
    # f_a: 0 = auto: 4 (the paper's) where it divides the audio KL latent and leaves 5 rows or more, else 2
    # (else 1): 4 on the f = 4 audio VAE's 20 x 88 and 2 on an f = 8 VAE's 10 x 44, z_a [C, 5, 22] on both.
    audio_factor: int = 0
    encoder_channels: int = 48
    decoder_channels: tuple[int, ...] = (48, 96)
    semantic_dim: int = 64
    class_embedding: str = "predicted"
    semantic: bool = True  # Table 5 ablations: without the semantic space ...
    shared_decoder: bool = True  # ... and with two decoders
    seed: int = 0
    threads: int = 0  # speed only; 0 = tuned while it trains (see CmmdTrainConfig.threads)
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        if self.steps < 1 or self.batch_size < 2 or self.frames_per_step < 1 or not self.learning_rate > 0:
            raise ValueError("need steps >= 1, batch_size >= 2, frames_per_step >= 1 and learning_rate > 0")
        if min(self.cl_weight, self.co_weight, self.kl_weight, self.adversarial_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        from models.mmldm import DECODER_WEIGHTINGS

        if self.decoder_weighting not in DECODER_WEIGHTINGS or not self.snr_gamma > 0:
            raise ValueError(f"decoder_weighting must be one of {DECODER_WEIGHTINGS} and snr_gamma > 0")
        if self.adversarial_weight > 0 and self.frames_per_step < 2:
            raise ValueError("the adversarial loss (Eq. 2) compares two frames of a clip: frames_per_step >= 2")

    def model_config(self, latents: ClipLatents):
        from models.mmldm import AutoencoderConfig

        return AutoencoderConfig(kl_channels=latents.audio.shape[1], audio_hw=latents.audio.shape[2:], frame_hw=latents.frames.shape[3:],
                                 frames=latents.frames.shape[1], latent_channels=self.latent_channels,
                                 audio_factor=self.audio_factor or auto_audio_factor(latents.audio.shape[2:]),
                                 encoder_channels=self.encoder_channels, decoder_channels=self.decoder_channels,
                                 semantic_dim=self.semantic_dim, classes=len(latents.classes), class_embedding=self.class_embedding,
                                 semantic=self.semantic, shared_decoder=self.shared_decoder)

    def params(self) -> dict:
        params = asdict(self)
        params.pop("threads")
        params["decoder_channels"] = list(self.decoder_channels)
        if not self.audio_factor:  # auto follows from the KL latents (their key is in this one's)
            params.pop("audio_factor")
        params["snr_gamma"] = float(self.snr_gamma)
        if self.decoder_weighting == "eps":  # the weighting before it was a field: those keys stay
            params.pop("decoder_weighting")
            params.pop("snr_gamma")
        return params

    @property
    def variant(self) -> str:
        parts = [] if self.semantic else ["without semantic space"]
        parts += [] if self.shared_decoder else ["two decoders"]
        parts += [f"GAN {self.adversarial_weight:g}"] if self.adversarial_weight > 0 else []
        return "MM-LDM autoencoder" + (f" ({', '.join(parts)})" if parts else "")


@dataclass
class TrainResult:
    model: object
    history: list[dict]
    steps_run: int
    resumed_from: int
    seconds: float


def train_autoencoder(train: ClipLatents, config: AutoencoderTrainConfig, progress: Progress | None = None,
                      log: Callable[[str], None] | None = None, device: str = "cpu", label: str = "mmldm autoencoder") -> TrainResult:
    """AdamW on Eq. (3); batches, frames, timesteps and noise drawn from (seed, step) on the host, so a
    run resumed from a progress save draws what the uninterrupted one would have."""
    import torch
    from models.devices import check_device, to_device
    from models.mmldm import Discriminator, adversarial_terms, autoencoder_loss, build_autoencoder, make_scheduler

    if len(train) < 2:
        raise ValueError(f"the MM-LDM autoencoder needs at least 2 training clips, got {len(train)}")
    check_device(device)
    progress = progress or Progress()
    start = time.perf_counter()
    with StepThreads(config.threads) as threads:
        model_config = config.model_config(train)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_autoencoder(model_config)
            discriminator = Discriminator(model_config) if config.adversarial_weight > 0 else None
        model.to(device)
        scheduler = make_scheduler(model_config.num_train_timesteps, model_config.beta_schedule)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        schedule = warmup_cosine(optimizer, config.steps)
        d_optimizer = None
        if discriminator is not None:
            discriminator.to(device)
            d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.discriminator_lr, betas=(0.5, 0.9))
        first, history = _restore(progress, model, optimizer, schedule, log, label, config.steps)
        batch = min(config.batch_size, len(train))
        frames = train.frames.shape[1]
        k = min(config.frames_per_step, frames)
        losses = LossWindow("MM-LDM autoencoder loss")
        shown = ProgressLog(label, config.steps, "steps", log, done=first - 1).start()
        model.train()
        for step in range(first, config.steps + 1):
            threads.tick()
            rng = np.random.default_rng([config.seed, step])
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            rows = rng.choice(len(train), batch, replace=len(train) < batch)
            frame_rows = np.stack([rng.choice(frames, k, replace=False) for _ in rows])
            x_a = to_device(torch.from_numpy(train.audio[rows]), device)
            x_v = to_device(torch.from_numpy(train.frames[rows]), device)
            labels = to_device(torch.from_numpy(train.labels[rows]), device)
            adversarial = discriminator is not None and step >= config.adversarial_start
            terms = autoencoder_loss(model, scheduler, x_a, x_v, labels, to_device(torch.from_numpy(frame_rows), device), generator,
                                     cl_weight=config.cl_weight, co_weight=config.co_weight, kl_weight=config.kl_weight,
                                     keep_x0=adversarial, weighting=config.decoder_weighting, snr_gamma=config.snr_gamma)
            loss = terms.loss
            if adversarial:
                loss_d, loss_ae = adversarial_terms(discriminator, x_a, x_v, terms)
                d_optimizer.zero_grad(set_to_none=True)
                loss_d.backward(retain_graph=True)
                d_optimizer.step()
                loss = loss + config.adversarial_weight * loss_ae
            losses.add(step, terms.mse)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 25 == 0 or step == config.steps:
                entry = {"step": step, "mse": round(float(np.mean(losses.take() or [losses.check()])), 5),
                         "contrastive": round(float(terms.contrastive), 4), "kl": round(float(terms.kl), 2)}
                if terms.classification is not None:
                    entry["classification"] = round(float(terms.classification), 4)
                    entry["accuracy"] = round(terms.accuracy, 3)
                history.append(entry)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                losses.check()
                progress.save(step, model, optimizer, history)
            if shown.due() or step == config.steps:
                shown.advance(step - shown.done, loss=losses.check)
        model.to("cpu").eval()
    return TrainResult(model, history, config.steps - first + 1, first - 1, time.perf_counter() - start)


def load_autoencoder(store: FeatureStore, dataset: str, key: str, device: str = "cpu") -> tuple[MmldmAutoencoder, dict]:
    from models.devices import check_device
    from models.mmldm import AutoencoderConfig, build_autoencoder

    model, sidecar = load_module(store, dataset, AUTOENCODER_NAME, key, lambda s: build_autoencoder(AutoencoderConfig(**s["model_config"])))
    return model.to(check_device(device)).eval(), sidecar


@dataclass
class Fit:
    key: str
    sidecar: dict
    status: str
    model: object

    @property
    def reused(self) -> bool:
        return self.status == "reused"


def autoencoder_key(config: AutoencoderTrainConfig, vae_latent_key: str, classes: Sequence[str]) -> str:
    return feature_key(AUTOENCODER_NAME, {**config.params(), "classes": list(classes)}, AUTOENCODER_CODE_VERSION, [vae_latent_key])


def fit_autoencoder(store: FeatureStore, manifest: ClipManifest, vae_latent_key: str, config: AutoencoderTrainConfig,
                    log: Callable[[str], None] | None = None, device: str = "cpu") -> Fit:
    """The autoencoder of ``vae_latent_key``: reused when its key exists (new shards included: it
    defines the latent space), trained on the train split otherwise, resumed after a kill."""
    classes = dataset_classes(manifest)
    key = autoencoder_key(config, vae_latent_key, classes)

    def train(start: Start) -> Trained:
        latents = load_clip_latents(store, manifest, vae_latent_key)
        split = latents.of_split("train")
        result = train_autoencoder(split, config, start.progress, log, device, f"{config.variant} seed {config.seed}")
        val = latents.of_split("val")
        metrics = autoencoder_metrics(result.model, val if len(val) >= 2 else split, config.seed, device)
        return Trained(result.model.state_dict(), result.model, result.steps_run, result.resumed_from, result.seconds, {
            "variant": config.variant, "train_config": config.params(), "model_config": result.model.config.params(),
            "vae_latent_key": vae_latent_key, "classes": classes, "clips_train": len(split),
            "metrics_split": "val" if len(val) >= 2 else "train", "metrics": metrics,
            "parameters": int(sum(p.numel() for p in result.model.parameters())), "history": result.history, "device": str(device),
        })

    fitted = fit_with_lineage(store, manifest.dataset, AUTOENCODER_NAME, key, sorted(manifest.by_shard()), train,
                              on_new_shards=NewShards.REUSE, load=lambda k: load_autoencoder(store, manifest.dataset, k))
    return Fit(fitted.key, fitted.sidecar, fitted.status, fitted.model)


def encode_posteriors(model: MmldmAutoencoder, audio: np.ndarray, frames: np.ndarray, batch_size: int = 16,
                      device: str = "cpu") -> dict[str, np.ndarray]:
    """Posterior mean and std of z_a and z_v for KL latents audio [N, 4, h, w], frames [N, T, 4, h, w]."""
    import torch
    from models.devices import to_device

    out: dict[str, list] = {"audio_mean": [], "audio_std": [], "video_mean": [], "video_std": []}
    with torch.no_grad():
        for start in range(0, len(audio), batch_size):
            x_a = to_device(torch.from_numpy(np.ascontiguousarray(audio[start : start + batch_size], np.float32)), device)
            x_v = to_device(torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size], np.float32)), device)
            (mu_a, lv_a), (mu_v, lv_v) = model.encode(x_a, x_v)
            for name, value in (("audio_mean", mu_a), ("audio_std", (0.5 * lv_a).exp()), ("video_mean", mu_v), ("video_std", (0.5 * lv_v).exp())):
                out[name].append(value.cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in out.items()}


def autoencoder_metrics(model: MmldmAutoencoder, latents: ClipLatents, seed: int = 0, device: str = "cpu",
                        max_clips: int = 32, steps: int = 25) -> dict:
    """Held-out quality of the autoencoder in the KL latent space: the decoder's reconstruction error
    (mean squared, DDIM from the posterior mean) against the mean-latent baseline, class accuracy
    and audio-video retrieval R@1 of the contrastive head (chance = 1 / clips)."""
    import torch
    import torch.nn.functional as F
    from models.devices import to_device
    from models.mmldm import decode_clips, make_scheduler

    c = model.config
    rows = latents.subset(range(min(max_clips, len(latents))))
    post = encode_posteriors(model, rows.audio, rows.frames, device=device)
    z_a = to_device(torch.from_numpy(post["audio_mean"]), device)
    z_v = to_device(torch.from_numpy(post["video_mean"]), device)
    scheduler = make_scheduler(c.num_train_timesteps, c.beta_schedule)
    with torch.no_grad():
        audio, frames = decode_clips(model, scheduler, z_a, z_v, steps, torch.Generator().manual_seed(seed))
        s_a, s_v, logits = model.semantics(z_a, z_v)
        e_a = F.normalize(model.contrastive_head.audio(s_a.mean(1)), dim=-1)
        e_v = F.normalize(model.contrastive_head.video(s_v.mean(1)), dim=-1)
        recall = float((( e_a @ e_v.t()).argmax(1).cpu() == torch.arange(len(e_a))).float().mean())
    audio, frames = audio.cpu().numpy(), frames.cpu().numpy()
    out = {"clips": len(rows), "decoder_steps": steps,
           "audio_mse": float(np.mean((audio - rows.audio) ** 2)), "frames_mse": float(np.mean((frames - rows.frames) ** 2)),
           "audio_mse_mean_latent": float(np.mean((rows.audio.mean(0, keepdims=True) - rows.audio) ** 2)),
           "frames_mse_mean_latent": float(np.mean((rows.frames.mean((0, 1), keepdims=True) - rows.frames) ** 2)),
           "audio_to_video_r1": recall, "r1_chance": 1.0 / len(rows)}
    if logits is not None and (rows.labels >= 0).any():
        known = rows.labels >= 0
        out["class_accuracy"] = float((logits.argmax(-1).cpu().numpy()[known] == rows.labels[known]).mean())
    return out


# ---- the DiT ---------------------------------------------------------------------------------------

@dataclass
class SemanticLatents:
    """Every clip's MM-LDM posterior (``mmldm_latents``), in manifest order."""

    clip_ids: list[str]
    audio_mean: np.ndarray  # [N, C, h_a, w_a]
    audio_std: np.ndarray
    video_mean: np.ndarray  # [N, C, h_v, w_v]
    video_std: np.ndarray
    splits: list[str]

    def __len__(self) -> int:
        return len(self.clip_ids)

    def subset(self, rows: Sequence[int]) -> "SemanticLatents":
        rows = list(rows)
        return SemanticLatents([self.clip_ids[i] for i in rows], self.audio_mean[rows], self.audio_std[rows],
                               self.video_mean[rows], self.video_std[rows], [self.splits[i] for i in rows])

    def of_split(self, split: str) -> "SemanticLatents":
        return self.subset([i for i, s in enumerate(self.splits) if s == split])


def load_semantic_latents(store: FeatureStore, manifest: ClipManifest, mmldm_latent_key: str) -> SemanticLatents:
    from stages.mmldm.latents import MMLDM_LATENT_FEATURE

    table = store.read_arrays(manifest.dataset, MMLDM_LATENT_FEATURE, mmldm_latent_key, shards=sorted(manifest.by_shard()))
    rows = {c: i for i, c in enumerate(table.clip_ids)}
    ids = [c.id for c in manifest.clips if c.id in rows]
    if not ids:
        raise ValueError(f"no clip of {manifest.dataset!r} has mmldm_latents (key {mmldm_latent_key})")
    order = [rows[c] for c in ids]
    index = manifest.index()
    arrays = {name: table.arrays[name][order].astype(np.float32) for name in ("audio_mean", "audio_std", "video_mean", "video_std")}
    return SemanticLatents(ids, splits=[index[c].split for c in ids], **arrays)


@dataclass(frozen=True)
class DitTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    conditional_share: float = 0.05  # the paper's 5% per conditional task
    sample_posterior: bool = True  # train on z = mean + std eps (LDM's), not the mean alone
    seed: int = 0
    threads: int = 0  # as AutoencoderTrainConfig.threads
    checkpoint_every: int = 250
    update_steps: int = 500  # warm start on new shards: steps on new + replayed clips
    replay_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or not self.learning_rate > 0:
            raise ValueError("need steps >= 1, batch_size >= 2 and learning_rate > 0")

    def model_config(self, audio_shape: Sequence[int], video_shape: Sequence[int]):
        from models.mmldm import DitConfig

        return DitConfig(audio_shape=tuple(audio_shape), video_shape=tuple(video_shape), audio_patch=(1,) * (len(audio_shape) - 1),
                         video_patch=(1,) * (len(video_shape) - 1), hidden=self.hidden, depth=self.depth, heads=self.heads,
                         conditional_share=self.conditional_share)

    def params(self) -> dict:
        params = asdict(self)
        params.pop("threads")
        return params


def latent_scales(train: SemanticLatents) -> dict[str, float]:
    """1 / std of each modality's posterior means over the train split: the DiT sees unit-std latents (LDM's scaling factor)."""
    return {"audio": float(1.0 / max(1e-6, train.audio_mean.std(dtype=np.float64))),
            "video": float(1.0 / max(1e-6, train.video_mean.std(dtype=np.float64)))}


def train_dit(train: SemanticLatents, config: DitTrainConfig, scales: Mapping[str, float], init_state: Mapping | None = None,
              new_rows: np.ndarray | None = None, progress: Progress | None = None, log: Callable[[str], None] | None = None,
              device: str = "cpu", label: str = "mmldm dit", model_config=None) -> TrainResult:
    """AdamW on Eq. (8) with the conditional tasks' null latents (models.mmldm.dit_loss); warm start
    (``init_state`` + ``new_rows``) runs ``update_steps`` on new clips mixed with replayed old ones.
    ``model_config`` (a DitConfig) replaces ``config.model_config``: the signal-space baseline's patches."""
    import torch
    from models.devices import check_device, to_device
    from models.mmldm import build_dit, dit_loss, make_scheduler

    if len(train) < 2:
        raise ValueError(f"the MM-LDM DiT needs at least 2 training clips, got {len(train)}")
    check_device(device)
    progress = progress or Progress()
    start = time.perf_counter()
    with StepThreads(config.threads) as threads:
        model_config = model_config or config.model_config(train.audio_mean.shape[1:], train.video_mean.shape[1:])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_dit(model_config)
        if init_state is not None:
            model.load_state_dict(init_state)
        model.to(device)
        scheduler = make_scheduler(model_config.num_train_timesteps, model_config.beta_schedule)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        warm = init_state is not None and new_rows is not None
        total = config.update_steps if warm else config.steps
        schedule = warmup_cosine(optimizer, total)
        first, history = _restore(progress, model, optimizer, schedule, log, label, total)
        rows_new = np.asarray(new_rows) if warm else np.arange(len(train))
        rows_old = np.setdiff1d(np.arange(len(train)), rows_new)
        if warm and not len(rows_new):
            raise ValueError("warm start asked for, but none of the new clips is in the training split")
        batch = min(config.batch_size, len(train))
        losses = LossWindow("MM-LDM DiT loss")
        shown = ProgressLog(label, total, "steps", log, done=first - 1).start()
        model.train()
        for step in range(first, total + 1):
            threads.tick()
            rng = np.random.default_rng([config.seed, step])
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            rows = batch_rows(rng, rows_new, rows_old, batch, warm, config.replay_fraction)
            z_a, z_v = train.audio_mean[rows], train.video_mean[rows]
            if config.sample_posterior:
                z_a = z_a + train.audio_std[rows] * rng.standard_normal(z_a.shape, dtype=np.float32)
                z_v = z_v + train.video_std[rows] * rng.standard_normal(z_v.shape, dtype=np.float32)
            z_a = to_device(torch.from_numpy(np.ascontiguousarray(z_a * scales["audio"], np.float32)), device)
            z_v = to_device(torch.from_numpy(np.ascontiguousarray(z_v * scales["video"], np.float32)), device)
            loss = dit_loss(model, scheduler, z_a, z_v, generator)
            losses.add(step, loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == total:
                history.append({"step": step, "loss": round(float(np.mean(losses.take() or [losses.check()])), 5)})
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                losses.check()
                progress.save(step, model, optimizer, history)
            if shown.due() or step == total:
                shown.advance(step - shown.done, loss=losses.check)
        model.to("cpu").eval()
    return TrainResult(model, history, total - first + 1, first - 1, time.perf_counter() - start)


def load_dit(store: FeatureStore, dataset: str, key: str, device: str = "cpu") -> tuple[JointDiT, dict]:
    from models.devices import check_device
    from models.mmldm import DitConfig, build_dit

    model, sidecar = load_module(store, dataset, DIT_NAME, key, lambda s: build_dit(DitConfig(**s["model_config"])))
    return model.to(check_device(device)).eval(), sidecar


def fit_dit(store: FeatureStore, manifest: ClipManifest, mmldm_latent_key: str, autoencoder_key: str, config: DitTrainConfig,
            log: Callable[[str], None] | None = None, device: str = "cpu") -> Fit:
    """The DiT of the manifest's shards: reused when its key exists, warm-started from the lineage's
    last checkpoint when only shards were added, resumed after a kill. Key = hash(lineage = config +
    autoencoder key, the latents key, shards)."""
    shards = sorted(manifest.by_shard())
    lineage = feature_key(DIT_NAME, config.params(), DIT_CODE_VERSION, [autoencoder_key])
    key = feature_key(DIT_NAME, {"lineage": lineage, "mmldm_latents": mmldm_latent_key}, DIT_CODE_VERSION, shards)
    shard_of = {c.id: shard for shard, clips in manifest.by_shard().items() for c in clips}

    def train(start: Start) -> Trained:
        latents = load_semantic_latents(store, manifest, mmldm_latent_key).of_split("train")
        new_rows = None
        if start.previous is not None:
            new = set(start.new_shards)
            new_rows = np.array([i for i, c in enumerate(latents.clip_ids) if shard_of[c] in new], np.int64)
            scales = dict(start.previous["latent_scales"])  # the warm-started model's scale: its inputs keep their meaning
        else:
            scales = latent_scales(latents)
        if start.previous is not None and not len(new_rows):
            from models.mmldm import build_dit

            model = build_dit(config.model_config(latents.audio_mean.shape[1:], latents.video_mean.shape[1:]))
            model.load_state_dict(start.state)
            result = TrainResult(model.eval(), [], 0, 0, 0.0)
        else:
            result = train_dit(latents, config, scales, start.state, new_rows, start.progress, log, device, f"mmldm DiT seed {config.seed}")
        return Trained(result.model.state_dict(), result.model, result.steps_run, result.resumed_from, result.seconds, {
            "train_config": config.params(), "model_config": result.model.config.params(), "latent_scales": scales,
            "mmldm_latent_key": mmldm_latent_key, "autoencoder_key": autoencoder_key, "clips_train": len(latents),
            "clips_new": len(new_rows) if new_rows is not None else len(latents),
            "parameters": int(sum(p.numel() for p in result.model.parameters())), "history": result.history, "device": str(device),
        })

    fitted = fit_with_lineage(store, manifest.dataset, DIT_NAME, key, shards, train, on_new_shards=NewShards.WARM_START,
                              lineage=lineage, load=lambda k: load_dit(store, manifest.dataset, k))
    return Fit(fitted.key, fitted.sidecar, fitted.status, fitted.model)
