"""CMMD training on cached features: windows of frame latents and mel latents, the joint contrastive
loss (models.cmmd), through the shared lineage mechanism (reuse, warm start on new shards, resume).

    from stages.cmmd.train import CmmdTrainConfig, fit_cmmd, load_windows
    fit = fit_cmmd(store, manifest, mel_latent_key, frame_latent_key, CmmdTrainConfig())

No dagster here: usable from a notebook.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from stages.cmmd.data import CMMD_FPS, FRAME_RATIO, ClipWindows, NegativeConfig, draw_batch, valid_frame_counts
from stages.core.checkpoints import load_module, restore_optimizer
from stages.core.lineage import NewShards, Progress, Start, Trained, fit_with_lineage
from stages.core.parallel import StepThreads
from stages.core.progress import LossWindow
from stages.core.training import batch_rows, warmup_cosine
from stages.core.progress import Progress as ProgressLog
from stages.core.store import FeatureStore, feature_key
from stages.ingest.manifest import ClipManifest

if TYPE_CHECKING:
    from models.cmmd import CmmdConfig, JointUNet

CMMD_NAME = "cmmd"
CMMD_CODE_VERSION = "1"


@dataclass(frozen=True)
class CmmdTrainConfig:
    steps: int = 1500
    batch_size: int = 12
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    window_frames: int = 16  # 16 video frames = 160 mel frames = 1.858 s (the paper: 18 frames, 1.8 s)
    eta: float = 0.05  # weight of each negative term of Eq. (6); 0 = nCMMD
    negative_cap: float = 2.0  # a negative's loss counts up to this x its positive's (0 = uncapped)
    negatives: NegativeConfig = field(default_factory=NegativeConfig)
    audio_weight: float = 1.0
    fusion: bool = True
    video_levels: tuple[int, ...] = (32, 64, 64)
    audio_levels: tuple[int, ...] = (64, 96, 128)
    video_patch: int = 2
    seed: int = 0
    # Speed only. 0: tuned while it trains (stages.core.parallel.StepThreads): the step is many small
    # convolutions, and two OpenMP threads on a busy 2-core machine spin at every barrier (measured
    # 3.8 s a step against 1.0 s with one, at load 5), so a fixed count is wrong on one machine or the other.
    threads: int = 0
    checkpoint_every: int = 250
    update_steps: int = 500  # warm start on new shards: steps on new + replayed clips
    replay_fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "video_levels", tuple(int(c) for c in self.video_levels))
        object.__setattr__(self, "audio_levels", tuple(int(c) for c in self.audio_levels))
        if isinstance(self.negatives, Mapping):
            object.__setattr__(self, "negatives", NegativeConfig(**self.negatives))
        if self.steps < 1 or self.batch_size < 2 or not self.learning_rate > 0 or self.eta < 0 or self.negative_cap < 0:
            raise ValueError("need steps >= 1, batch_size >= 2, learning_rate > 0, eta >= 0 and negative_cap >= 0")
        if self.window_frames % self.model_config().time_divisor:
            raise ValueError(f"window_frames {self.window_frames} must be a multiple of {self.model_config().time_divisor} "
                             f"(the U-Net halves time {len(self.video_levels) - 1} times)")

    def model_config(self, video_channels: int = 4) -> CmmdConfig:
        from models.cmmd import CmmdConfig

        return CmmdConfig(video_channels=video_channels, frame_ratio=FRAME_RATIO, video_levels=self.video_levels,
                          audio_levels=self.audio_levels, fusion=self.fusion, video_patch=self.video_patch)

    def params(self) -> dict:
        params = asdict(self)
        params.pop("threads")  # speed only
        params["video_levels"], params["audio_levels"] = list(self.video_levels), list(self.audio_levels)
        params["negatives"]["kinds"] = list(self.negatives.kinds)
        return params

    @property
    def variant(self) -> str:
        """CMMD, nCMMD (eta 0) or either without fusion: the name the tables use."""
        name = "CMMD" if self.eta > 0 else "nCMMD"
        return name if self.fusion else f"{name} without fusion"


def load_windows(store: FeatureStore, manifest: ClipManifest, mel_latent_key: str, frame_latent_key: str) -> ClipWindows:
    """Clips with both a mel latent and frame latents, in manifest order, with their splits."""
    from stages.features.latents import read_latent_means
    from stages.features.mel_latent import MEL_LATENT_FEATURE

    shards = sorted(manifest.by_shard())
    mels = store.read_arrays(manifest.dataset, MEL_LATENT_FEATURE, mel_latent_key, shards=shards, names=["mel_latent"])
    frames = read_latent_means(store, manifest.dataset, frame_latent_key, ["frames"], shards=shards)
    mel_rows = {c: i for i, c in enumerate(mels.clip_ids)}
    frame_rows = {c: i for i, c in enumerate(frames.clip_ids)}
    ids = [c.id for c in manifest.clips if c.id in mel_rows and c.id in frame_rows]
    if not ids:
        raise ValueError(f"no clip has both a mel_latents row (key {mel_latent_key}) and frame latents (key {frame_latent_key})")
    index = manifest.index()
    video = frames.arrays["frames"][[frame_rows[c] for c in ids]].astype(np.float32)
    return ClipWindows(ids, video, mels.arrays["mel_latent"][[mel_rows[c] for c in ids]].astype(np.float32),
                       valid_frame_counts(video), [index[c].split for c in ids])


# ---- training -------------------------------------------------------------------------------------

@dataclass
class CmmdTrainResult:
    model: JointUNet
    history: list[dict]
    steps_run: int
    resumed_from: int
    seconds: float
    negative_kinds: dict[str, int]


def train_cmmd(train: ClipWindows, config: CmmdTrainConfig, init_state: Mapping | None = None,
               new_rows: np.ndarray | None = None, progress: Progress | None = None,
               log: Callable[[str], None] | None = None, device: str = "cpu", label: str = "cmmd") -> CmmdTrainResult:
    """AdamW on random windows; Eq. (6) with ``config.eta`` (0: the joint loss alone, nCMMD).

    From scratch: ``steps`` steps. Warm start (``init_state`` and ``new_rows``): ``update_steps``
    whose batches mix new clips with replayed old ones (``replay_fraction``). A progress save every
    ``checkpoint_every`` steps lets a killed run resume where it was. Windows, negatives, noise and
    timesteps are drawn on the host from the seed (and the step resumed at), so a resumed run draws
    what the uninterrupted one would have from there on.
    """
    import torch
    from models.cmmd import build_model, contrastive_loss, make_scheduler
    from models.devices import check_device, to_device

    if len(train) < 2:
        raise ValueError(f"CMMD needs at least 2 training clips with mel and frame latents, got {len(train)}")
    check_device(device)
    progress = progress or Progress()
    start_time = time.perf_counter()
    with StepThreads(config.threads) as threads:
        model_config = config.model_config(train.frames.shape[2])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_model(model_config, train.frames.shape[3:])
        if init_state is not None:
            model.load_state_dict(init_state)
        model.to(device)
        scheduler = make_scheduler(model_config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        warm = init_state is not None and new_rows is not None
        total = config.update_steps if warm else config.steps
        schedule = warmup_cosine(optimizer, total)
        first, history, kinds = 1, [], {}
        restored = progress.load()
        if restored is not None:
            done, model_state, optimizer_state, groups = restored
            model.load_state_dict(model_state)
            restore_optimizer(optimizer, optimizer_state, groups)
            saved = list(groups.get("history", []))
            history = [h for h in saved if "kinds" not in h]
            kinds = next((dict(h["kinds"]) for h in saved if "kinds" in h), {})
            first = done + 1
            for _ in range(done):
                schedule.step()
            if log:
                log(f"{label}: resuming at step {first} of {total}")
        rows_new = np.asarray(new_rows) if warm else np.arange(len(train))
        rows_old = np.setdiff1d(np.arange(len(train)), rows_new)
        if warm and not len(rows_new):
            raise ValueError("warm start asked for, but none of the new clips is in the training split")
        batch = min(config.batch_size, len(train))
        negatives = config.negatives if config.eta > 0 else None
        losses = LossWindow("CMMD loss")
        shown = ProgressLog(label, total, "steps", log, done=first - 1).start()
        model.train()
        for step in range(first, total + 1):
            threads.tick()
            rng = np.random.default_rng([config.seed, step])
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            rows = batch_rows(rng, rows_new, rows_old, batch, warm, config.replay_fraction)
            drawn = draw_batch(train, rows, config.window_frames, rng, negatives)
            for name, count in drawn.kinds.items():
                kinds[name] = kinds.get(name, 0) + count
            v0, a0 = to_device(torch.from_numpy(drawn.video), device), to_device(torch.from_numpy(drawn.audio), device)
            t = to_device(torch.randint(0, model_config.num_train_timesteps, (len(rows),), generator=generator), device)
            eps_v = to_device(torch.randn(v0.shape, generator=generator), device)
            eps_a = to_device(torch.randn(a0.shape, generator=generator), device)

            def negative(pair):
                return None if pair is None else (to_device(torch.from_numpy(pair[0]), device), to_device(torch.from_numpy(pair[1]), device))

            terms = contrastive_loss(model, scheduler, v0, a0, t, eps_v, eps_a, eta=config.eta,
                                     negative_audio=negative(drawn.negative_audio), negative_video=negative(drawn.negative_video),
                                     cap=config.negative_cap, audio_weight=config.audio_weight)
            losses.add(step, terms.positive)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == total:
                entry = {"step": step, "loss": round(float(np.mean(losses.take() or [losses.check()])), 5)}
                for name, value in (("negative_audio", terms.negative_audio), ("negative_video", terms.negative_video)):
                    if value is not None:
                        entry[name] = round(float(value), 5)
                history.append(entry)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                losses.check()
                progress.save(step, model, optimizer, history + [{"kinds": kinds}])
            if shown.due() or step == total:
                shown.advance(step - shown.done, loss=losses.check)
        model.to("cpu").eval()
    history = [h for h in history if "kinds" not in h]
    return CmmdTrainResult(model, history, total - first + 1, first - 1, time.perf_counter() - start_time, kinds)


# ---- fitting with lineage -------------------------------------------------------------------------

def lineage_key(config: CmmdTrainConfig, mel_key: str, frame_latent_key: str) -> str:
    """What stays the same across warm starts: the config and the inputs' spaces. The mel *key*
    (the spectrogram's parameters), not the mel latents key: that one also hashes the train split's
    statistics, which move a little with every new shard, and the warm start adapts to them."""
    return feature_key(CMMD_NAME, config.params(), CMMD_CODE_VERSION, [mel_key, frame_latent_key])


def load_cmmd(store: FeatureStore, dataset: str, key: str, device: str = "cpu") -> tuple[JointUNet, dict]:
    from models.cmmd import CmmdConfig, build_model
    from models.devices import check_device

    model, sidecar = load_module(store, dataset, CMMD_NAME, key,
                                 lambda s: build_model(CmmdConfig(**s["model_config"]), s["latent_hw"]))
    return model.to(check_device(device)), sidecar


@dataclass
class CmmdFit:
    key: str
    sidecar: dict
    status: str
    model: JointUNet

    @property
    def reused(self) -> bool:
        return self.status == "reused"


def fit_cmmd(store: FeatureStore, manifest: ClipManifest, mel_latent_key: str, frame_latent_key: str,
             config: CmmdTrainConfig, mel_key: str = "", log: Callable[[str], None] | None = None,
             device: str = "cpu") -> CmmdFit:
    """The CMMD model for the manifest's shards: reused when its key exists, warm-started from the
    lineage's last checkpoint when only shards were added, resumed after a kill (stages.core.lineage).

    Key = hash(lineage, mel latents key, shards); ``mel_key`` (the mel_spectrograms key the latents
    normalise) defines the lineage, falling back to the mel latents key."""
    name = CMMD_NAME
    shards = sorted(manifest.by_shard())
    lineage = lineage_key(config, mel_key or mel_latent_key, frame_latent_key)
    key = feature_key(name, {"lineage": lineage, "mel_latents": mel_latent_key}, CMMD_CODE_VERSION, shards)
    shard_of = {c.id: shard for shard, clips in manifest.by_shard().items() for c in clips}

    def train(start: Start) -> Trained:
        windows = load_windows(store, manifest, mel_latent_key, frame_latent_key).of_split("train")
        new_rows = None
        if start.previous is not None:
            new = set(start.new_shards)
            new_rows = np.array([i for i, c in enumerate(windows.clip_ids) if shard_of[c] in new], np.int64)
        label = f"cmmd {config.variant} seed {config.seed}"
        if start.previous is not None and not len(new_rows):
            from models.cmmd import build_model

            model = build_model(config.model_config(windows.frames.shape[2]), windows.frames.shape[3:])
            model.load_state_dict(start.state)
            result = CmmdTrainResult(model.eval(), [], 0, 0, 0.0, {})
        else:
            result = train_cmmd(windows, config, start.state, new_rows, start.progress, log, device, label)
        return Trained(result.model.state_dict(), result.model, result.steps_run, result.resumed_from, result.seconds, {
            "variant": config.variant,
            "train_config": config.params(),
            "model_config": result.model.config.params(),
            "latent_hw": list(result.model.latent_hw),
            "mel_latent_key": mel_latent_key,
            "frame_latent_key": frame_latent_key,
            "mel_key": mel_key,
            "fps": CMMD_FPS,
            "frame_ratio": FRAME_RATIO,
            "window_frames": config.window_frames,
            "window_seconds": round(config.window_frames / CMMD_FPS, 4),
            "clips_train": len(windows),
            "clips_new": len(new_rows) if new_rows is not None else len(windows),
            "history": result.history,
            "negative_kinds": result.negative_kinds,
            "device": str(device),
        })

    fitted = fit_with_lineage(store, manifest.dataset, name, key, shards, train, on_new_shards=NewShards.WARM_START,
                              lineage=lineage, load=lambda k: load_cmmd(store, manifest.dataset, k))
    return CmmdFit(fitted.key, fitted.sidecar, fitted.status, fitted.model)

