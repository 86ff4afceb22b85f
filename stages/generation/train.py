"""Text-to-audio and video-to-audio generation in the audio VAE's latent space, with and without
DiffGAP, and its evaluation (Tables I and II of DiffGAP, on aiSFX).

    text / video --CLAP / CAVP--> embedding --(optional) DiffGAP T->A / V->A--> audio-space embedding
        --latent diffusion (models.generator, DDIM 50/20/5, classifier-free guidance)--> scaled VAE latent
        --stages.generation.vocode.latents_to_audio (VAE decode -> audio image -> mel -> HiFi-GAN)--> 22.05 kHz waveform

One generator per space (``audio_generator_clap``, ``audio_generator_cavp``), trained on the
train split with the clip's AUDIO embedding as condition (AudioLDM trains on CLAP audio
embeddings), so generation can take the text / video embedding directly (baseline) or the
DiffGAP-bridged audio embedding.

No dagster here: usable from a notebook.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from stages.embeddings.spaces import get_space
from stages.ingest.manifest import ClipManifest
from stages.core.parallel import StepThreads, torch_threads
from stages.core.lineage import NewShards, Start, Trained, fit_with_lineage
from stages.core.progress import LossWindow, Progress
from stages.core.store import FeatureStore, feature_key

if TYPE_CHECKING:
    from models.generator import GeneratorConfig, LatentGenerator


GENERATOR_CODE_VERSION = "2"  # 2: prediction_type in the key

# space -> (embedding feature, the other modality's array, its CLAP/CAVP head kind, task name)


def __getattr__(name: str):
    # The model class, re-exported as before; it loads models.generator (and so torch) on first use.
    if name == "LatentGenerator":
        from models.generator import LatentGenerator

        return LatentGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_name(space: str) -> str:
    get_space(space)  # one line naming the choices for an unknown space
    return f"audio_generator_{space}"


@dataclass(frozen=True)
class GeneratorTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 5e-4
    condition_dropout: float = 0.1
    seed: int = 0
    threads: int = 0  # speed only; 0 = tuned while it trains (stages.core.parallel.StepThreads)
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention: bool = False
    clip_sample_range: float = 6.0
    prediction_type: str = "epsilon"
    # Space-to-depth factor of the latents before the UNet (models.generator.GeneratorConfig.patch);
    # 0 = auto: 2 when the latent's shorter side is 16 or more (the f = 4 audio VAE's 20 x 88), else 1
    # (10 x 44), so a step costs about the same for either VAE.
    patch: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.patch < 0:
            raise ValueError(f"patch must be >= 0 (0 = auto), got {self.patch}")
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0 or not 0 <= self.condition_dropout < 1:
            raise ValueError("need steps, batch_size >= 1, learning_rate > 0 and 0 <= condition_dropout < 1")

    def generator_config(self, cond_dim: int, latent_channels: int, latent_size: int, latent_width: int = 0) -> GeneratorConfig:
        from models.generator import GeneratorConfig

        return GeneratorConfig(cond_dim=cond_dim, latent_channels=latent_channels, latent_size=latent_size,
                               latent_width=0 if latent_width == latent_size else latent_width,
                               patch=self.patch or self.auto_patch(latent_size, latent_width or latent_size),
                               block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                               norm_num_groups=self.norm_num_groups, attention=self.attention,
                               clip_sample_range=self.clip_sample_range, prediction_type=self.prediction_type)

    def auto_patch(self, height: int, width: int) -> int:
        down = 2 ** (len(self.block_out_channels) - 1)
        return 2 if min(height, width) >= 16 and not height % (2 * down) and not width % (2 * down) else 1

    def params(self) -> dict:
        params = {**asdict(self), "block_out_channels": list(self.block_out_channels)}
        params.pop("threads")  # does not change the weights' meaning
        if not self.patch:  # auto follows from the latents (their key is in the generator's): the key of before
            params.pop("patch")
        return params


@dataclass
class LatentPairs:
    """Audio latents [N, C, h, w] with the clip's audio embedding and the other modality's."""

    clip_ids: list[str]
    latents: np.ndarray
    audio: np.ndarray
    other: np.ndarray
    splits: list[str]
    per_second: dict[str, np.ndarray] = field(default_factory=dict)  # CAVP: audio/video per second

    def subset(self, split: str | None = None, clip_ids: Sequence[str] | None = None) -> "LatentPairs":
        if clip_ids is not None:
            where = {c: i for i, c in enumerate(self.clip_ids)}
            keep = [where[c] for c in clip_ids if c in where]
        else:
            keep = [i for i, s in enumerate(self.splits) if s == split]
        return LatentPairs([self.clip_ids[i] for i in keep], self.latents[keep], self.audio[keep], self.other[keep],
                           [self.splits[i] for i in keep], {k: v[keep] for k, v in self.per_second.items()})

    def __len__(self) -> int:
        return len(self.clip_ids)


def load_latent_pairs(store: FeatureStore, manifest: ClipManifest, space: str, latent_key: str, embedding_key: str) -> LatentPairs:
    """Clips of the manifest with both a stored audio latent and embeddings, in manifest order.

    The latents are the stored posterior means: the generator trained on them before vae_latents
    stored the std too (it never stored samples), so a generator's inputs stay the same numbers."""
    from stages.features.latents import read_latent_means

    feature, other = get_space(space).embedding_feature, get_space(space).other
    shards = sorted(manifest.by_shard())
    lat = read_latent_means(store, manifest.dataset, latent_key, ["audio"], shards=shards)
    names = ["audio", other] + (["audio_per_second", "video_per_second"] if space == "cavp" else [])
    emb = store.read_arrays(manifest.dataset, feature, embedding_key, shards=shards, names=names)
    lat_rows = {c: i for i, c in enumerate(lat.clip_ids)}
    emb_rows = {c: i for i, c in enumerate(emb.clip_ids)}
    index = manifest.index()
    ids = [c.id for c in manifest.clips if c.id in lat_rows and c.id in emb_rows]
    li, ei = [lat_rows[c] for c in ids], [emb_rows[c] for c in ids]
    if not ids:
        raise ValueError(f"no clip has both a vae_latents row (key {latent_key}) and a {feature} row (key {embedding_key})")
    per_second = {k: emb.arrays[k][ei].astype(np.float32) for k in names[2:]}
    return LatentPairs(ids, lat.arrays["audio"][li].astype(np.float32), emb.arrays["audio"][ei].astype(np.float32),
                       emb.arrays[other][ei].astype(np.float32), [index[c].split for c in ids], per_second)


# ---- training -------------------------------------------------------------------------------------

@dataclass
class GeneratorTrainResult:
    model: LatentGenerator
    history: list[dict]
    seconds: float


def train_generator(train: LatentPairs, config: GeneratorTrainConfig, log: Callable[[str], None] | None = None,
                    device: str = "cpu", label: str = "audio generator") -> GeneratorTrainResult:
    """AdamW on random batches of (latent, audio embedding); eps-MSE with condition dropout.

    On ``device``, with rows, noise, timesteps and dropout drawn on the host as on CPU
    (models.devices); ``log`` gets progress lines named by ``label``. The model is returned on the host.
    """
    import torch
    from models.devices import DeviceRows, check_device
    from models.generator import LatentGenerator, diffusion_loss, make_train_scheduler

    if len(train) < 2:
        raise ValueError(f"need at least 2 training clips with latents and embeddings, got {len(train)}")
    check_device(device)
    # The weights are initialised from the config's seed in a scope of its own (the caller's global
    # RNG is left as it was); noise, timesteps and dropout come from a generator of the same seed.
    with StepThreads(config.threads) as threads, torch.random.fork_rng(devices=[]):
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        _, channels, height, width = train.latents.shape
        model = LatentGenerator(config.generator_config(train.audio.shape[1], channels, height, width)).to(device)
        scheduler = make_train_scheduler(model.config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
        warmup = max(1, config.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) * (
            0.5 * (1 + np.cos(np.pi * min(1.0, max(0, i + 1 - warmup) / max(1, config.steps - warmup))))) + 1e-3)
        data = DeviceRows({"latents": train.latents, "cond": train.audio}, device)
        rng = np.random.default_rng(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        batch = min(config.batch_size, len(train))
        history = []
        losses = LossWindow("generator loss")
        progress = Progress(label, config.steps, "steps", log).start()
        rows = (torch.from_numpy(rng.choice(len(train), batch, replace=False)) for _ in range(config.steps))
        model.train()
        for step, chunk in enumerate(data.prefetch(rows), start=1):
            threads.tick()
            loss = diffusion_loss(model, scheduler, chunk["latents"], chunk["cond"], config.condition_dropout, generator)
            losses.add(step, loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == config.steps:
                history.append({"step": step, "loss": round(float(np.mean(losses.take())), 5)})
            if progress.due() or step == config.steps:
                progress.advance(step - progress.done, loss=losses.check)
        model.to("cpu").eval()  # the caller saves and measures on the host
        return GeneratorTrainResult(model, history, time.perf_counter() - start)


def condition_sensitivity(model: LatentGenerator, pairs: LatentPairs, timesteps: Sequence[int] = (300, 600, 900),
                          repeats: int = 4, seed: int = 0) -> dict[str, float]:
    """How much the generator uses its condition: its loss (eps / v MSE) on ``pairs`` at fixed timesteps with the
    clip's own condition, another clip's (a derangement) and the null condition, on the same noise.

    ``shuffled_over_matched`` > 1 means the condition carries information about the latent; about
    1 means the generator ignores it (it then samples the same audio for every prompt)."""
    import torch
    from models.generator import make_train_scheduler

    with torch.no_grad():
        from models.generator import diffusion_target, make_train_scheduler

        if len(pairs) < 2:
            raise ValueError(f"condition sensitivity needs at least 2 clips, got {len(pairs)}")
        scheduler = make_train_scheduler(model.config)
        model.eval()
        z0, cond = torch.from_numpy(pairs.latents), torch.from_numpy(pairs.audio)
        shift = int(np.random.default_rng(seed).integers(1, len(pairs)))
        others = torch.roll(cond, shift, dims=0)
        null = torch.ones(len(pairs), dtype=torch.bool)
        generator = torch.Generator().manual_seed(seed)
        totals = {"matched": 0.0, "shuffled": 0.0, "null": 0.0}
        for t in timesteps:
            tt = torch.full((len(pairs),), int(t), dtype=torch.long)
            for _ in range(repeats):
                noise = torch.randn(z0.shape, generator=generator)
                zt = scheduler.add_noise(z0, noise, tt)
                target = diffusion_target(scheduler, z0, noise, tt)
                for name, c, drop in (("matched", cond, None), ("shuffled", others, None), ("null", cond, null)):
                    totals[name] += torch.nn.functional.mse_loss(model(zt, tt, c, drop), target).item()
        count = len(timesteps) * repeats
        out = {f"loss_{k}": round(v / count, 5) for k, v in totals.items()}
        out["shuffled_over_matched"] = round(totals["shuffled"] / max(totals["matched"], 1e-12), 4)
        return out


@dataclass
class GeneratorFit:
    space: str
    key: str
    sidecar: dict
    reused: bool
    model: LatentGenerator


def load_generator(store: FeatureStore, dataset: str, space: str, key: str, device: str = "cpu") -> tuple[LatentGenerator, dict]:
    """A stored generator on ``device`` (sampling runs where the model is) and its sidecar."""
    from models.devices import check_device
    from models.generator import GeneratorConfig, LatentGenerator

    from stages.core.checkpoints import load_module

    model, sidecar = load_module(store, dataset, model_name(space), key,
                                 lambda s: LatentGenerator(GeneratorConfig(**s["generator_config"])))
    return model.to(check_device(device)), sidecar


def fit_generator(
    store: FeatureStore, manifest: ClipManifest, space: str, latent_key: str, embedding_key: str,
    config: GeneratorTrainConfig, log: Callable[[str], None] | None = None, device: str = "cpu",
) -> GeneratorFit:
    """Train the generator of one space on the train split (on ``device``; ``log`` gets progress
    lines), or reuse the checkpoint of the same key = hash(config, latent key, embedding key, shards)."""
    from stages.features.latents import latent_vaes

    name = model_name(space)
    shards = sorted(manifest.by_shard())
    key = feature_key(name, config.params(), GENERATOR_CODE_VERSION, [latent_key, embedding_key, *shards])

    def train(start: Start) -> Trained:
        pairs = load_latent_pairs(store, manifest, space, latent_key, embedding_key)
        train_pairs = pairs.subset("train")
        result = train_generator(train_pairs, config, log, device, label=f"audio generator {space} seed {config.seed}")
        held_out = pairs.subset("val") if len(pairs.subset("val")) >= 2 else train_pairs
        with torch_threads(config.threads):
            sensitivity = condition_sensitivity(result.model, held_out)
        if log:
            log(f"audio generator ({space}): loss with another clip's condition / its own = {sensitivity['shuffled_over_matched']:.3f}")
        vaes = latent_vaes(store, manifest.dataset, latent_key)
        if "audio" not in vaes:
            raise ValueError(f"vae_latents key {latent_key} holds no audio latents")
        return Trained(result.model.state_dict(), result.model, config.steps, 0, result.seconds, {
            "space": space,
            "condition": f"{get_space(space).embedding_feature}/audio (the clip's audio embedding)",
            "generator_config": result.model.config.params(),
            "train_config": config.params(),
            "latent_key": latent_key,
            "embedding_key": embedding_key,
            "audio_vae": vaes["audio"],
            "shards": shards,
            "clips_train": len(train_pairs),
            "history": result.history,
            "condition_sensitivity": {"split": held_out.splits[0], **sensitivity},
            "device": str(device),  # where it trained (provenance; not in the key)
        })

    # New shards train a new generator (its key hashes them); stages.core.lineage does reuse and the sidecar.
    fitted = fit_with_lineage(store, manifest.dataset, name, key, shards, train, on_new_shards=NewShards.RETRAIN,
                              load=lambda k: load_generator(store, manifest.dataset, space, k))
    return GeneratorFit(space, key, fitted.sidecar, fitted.reused, fitted.model)
