"""Text-to-audio and video-to-audio generation in the audio VAE's latent space, with and without
DiffGAP, and its evaluation (Tables I and II of DiffGAP, on aiSFX).

    text / video --CLAP / CAVP--> embedding --(optional) DiffGAP T->A / V->A--> audio-space embedding
        --latent diffusion (models.generator, DDIM 50/20/5, classifier-free guidance)--> scaled VAE latent
        --stages.vocode.latents_to_audio (VAE decode -> audio image -> mel -> HiFi-GAN)--> 22.05 kHz waveform

One generator per space (``audio_generator_clap``, ``audio_generator_cavp``), trained on the
train split with the clip's AUDIO embedding as condition (AudioLDM trains on CLAP audio
embeddings), so generation can take the text / video embedding directly (baseline) or the
DiffGAP-bridged audio embedding.

No dagster here: usable from a notebook.
"""

from __future__ import annotations

import io
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from models.generator import GeneratorConfig, LatentGenerator, diffusion_loss, make_train_scheduler, sample_latents
from stages import audio_metrics as M
from stages.contrastive import CAVP_FEATURE, CAVP_HEAD, CLAP_FEATURE, CLAP_HEAD
from stages.manifest import ClipManifest
from stages.parallel import torch_threads
from stages.store import FeatureStore, feature_key

GENERATOR_CODE_VERSION = "2"  # 2: prediction_type in the key
# space -> (embedding feature, the other modality's array, its CLAP/CAVP head kind, task name)
SPACES = {"clap": (CLAP_FEATURE, "text", CLAP_HEAD, "T2A"), "cavp": (CAVP_FEATURE, "video", CAVP_HEAD, "V2A")}
BASELINE, WITH_DIFFGAP, ORACLE = "baseline (no DiffGAP)", "DiffGAP", "oracle: VAE + vocoder of the real latent"
REAL = "real audio (the reference itself)"
# The generator trains on audio embeddings; this row conditions it on the clip's real one, i.e.
# what a perfect text/video -> audio bridge would hand it: the most DiffGAP could gain.
AUDIO_CONDITION = "condition: the real audio embedding (a perfect bridge)"
SAMPLED = (BASELINE, WITH_DIFFGAP, AUDIO_CONDITION)  # rows that depend on the sampling seed and steps


def model_name(space: str) -> str:
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}: choose clap or cavp")
    return f"audio_generator_{space}"


@dataclass(frozen=True)
class GeneratorTrainConfig:
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 5e-4
    condition_dropout: float = 0.1
    seed: int = 0
    threads: int = 2
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention: bool = False
    clip_sample_range: float = 6.0
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0 or not 0 <= self.condition_dropout < 1:
            raise ValueError("need steps, batch_size >= 1, learning_rate > 0 and 0 <= condition_dropout < 1")

    def generator_config(self, cond_dim: int, latent_channels: int, latent_size: int) -> GeneratorConfig:
        return GeneratorConfig(cond_dim=cond_dim, latent_channels=latent_channels, latent_size=latent_size,
                               block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                               norm_num_groups=self.norm_num_groups, attention=self.attention,
                               clip_sample_range=self.clip_sample_range, prediction_type=self.prediction_type)

    def params(self) -> dict:
        params = {**asdict(self), "block_out_channels": list(self.block_out_channels)}
        params.pop("threads")  # does not change the weights' meaning
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
    """Clips of the manifest with both a stored audio latent and embeddings, in manifest order."""
    feature, other, _, _ = SPACES[space]
    shards = sorted(manifest.by_shard())
    lat = store.read_arrays(manifest.dataset, "vae_latents", latent_key, shards=shards, names=["audio"])
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


def train_generator(train: LatentPairs, config: GeneratorTrainConfig, log: Callable[[str], None] | None = None) -> GeneratorTrainResult:
    """AdamW on random batches of (latent, audio embedding); eps-MSE with condition dropout."""
    if len(train) < 2:
        raise ValueError(f"need at least 2 training clips with latents and embeddings, got {len(train)}")
    with torch_threads(config.threads):
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        _, channels, size, _ = train.latents.shape
        model = LatentGenerator(config.generator_config(train.audio.shape[1], channels, size))
        scheduler = make_train_scheduler(model.config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
        warmup = max(1, config.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) * (
            0.5 * (1 + np.cos(np.pi * min(1.0, max(0, i + 1 - warmup) / max(1, config.steps - warmup))))) + 1e-3)
        latents, cond = torch.from_numpy(train.latents), torch.from_numpy(train.audio)
        rng = np.random.default_rng(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        batch = min(config.batch_size, len(train))
        history, running = [], []
        model.train()
        for step in range(1, config.steps + 1):
            rows = torch.from_numpy(rng.choice(len(train), batch, replace=False))
            loss = diffusion_loss(model, scheduler, latents[rows], cond[rows], config.condition_dropout, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"generator loss became {loss.item()} at step {step}; lower learning_rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running.append(loss.item())
            if step % 50 == 0 or step == config.steps:
                history.append({"step": step, "loss": round(float(np.mean(running)), 5)})
                running = []
                if log and (step % 500 == 0 or step == config.steps):
                    log(f"audio generator step {step}/{config.steps}: loss {history[-1]['loss']:.4f}")
        model.eval()
        return GeneratorTrainResult(model, history, time.perf_counter() - start)


@torch.no_grad()
def condition_sensitivity(model: LatentGenerator, pairs: LatentPairs, timesteps: Sequence[int] = (300, 600, 900),
                          repeats: int = 4, seed: int = 0) -> dict[str, float]:
    """How much the generator uses its condition: its loss (eps / v MSE) on ``pairs`` at fixed timesteps with the
    clip's own condition, another clip's (a derangement) and the null condition, on the same noise.

    ``shuffled_over_matched`` > 1 means the condition carries information about the latent; about
    1 means the generator ignores it (it then samples the same audio for every prompt)."""
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


def load_generator(store: FeatureStore, dataset: str, space: str, key: str) -> tuple[LatentGenerator, dict]:
    from stages.checkpoints import load_module

    return load_module(store, dataset, model_name(space), key,
                       lambda s: LatentGenerator(GeneratorConfig(**s["generator_config"])))


def fit_generator(
    store: FeatureStore, manifest: ClipManifest, space: str, latent_key: str, embedding_key: str,
    config: GeneratorTrainConfig, log: Callable[[str], None] | None = None,
) -> GeneratorFit:
    """Train the generator of one space on the train split, or reuse the checkpoint of the same
    key = hash(config, latent key, embedding key, shards)."""
    from stages.checkpoints import has_checkpoint, save_checkpoint
    from stages.vae import latent_vaes

    name = model_name(space)
    shards = sorted(manifest.by_shard())
    key = feature_key(name, config.params(), GENERATOR_CODE_VERSION, [latent_key, embedding_key, *shards])
    if has_checkpoint(store, manifest.dataset, name, key):
        model, sidecar = load_generator(store, manifest.dataset, space, key)
        return GeneratorFit(space, key, sidecar, True, model)
    pairs = load_latent_pairs(store, manifest, space, latent_key, embedding_key)
    train = pairs.subset("train")
    result = train_generator(train, config, log)
    held_out = pairs.subset("val") if len(pairs.subset("val")) >= 2 else train
    with torch_threads(config.threads):
        sensitivity = condition_sensitivity(result.model, held_out)
    if log:
        log(f"audio generator ({space}): loss with another clip's condition / its own = {sensitivity['shuffled_over_matched']:.3f}")
    vaes = latent_vaes(store, manifest.dataset, latent_key)
    if "audio" not in vaes:
        raise ValueError(f"vae_latents key {latent_key} holds no audio latents")
    sidecar = save_checkpoint(store, manifest.dataset, name, key, result.model.state_dict(), {
        "space": space,
        "condition": f"{SPACES[space][0]}/audio (the clip's audio embedding)",
        "generator_config": result.model.config.params(),
        "train_config": config.params(),
        "latent_key": latent_key,
        "embedding_key": embedding_key,
        "audio_vae": vaes["audio"],
        "shards": shards,
        "clips_train": len(train),
        "history": result.history,
        "train_seconds": round(result.seconds, 2),
        "condition_sensitivity": {"split": held_out.splits[0], **sensitivity},
    })
    return GeneratorFit(space, key, sidecar, False, result.model)


# ---- generation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    seed: int = 0
    diffgap_steps: int = 50
    diffgap_samples: int = 16  # as in DiffGAP retrieval: the mean of 16 samples sits far closer to the real embedding than 1-4
    vocoder: str = "hifigan"  # or "griffinlim" (fast, low quality; for tests and previews)
    griffinlim_iters: int = 16
    threads: int = 2

    def params(self) -> dict:
        return asdict(self)


def bridge(diffgap_model, condition: np.ndarray, config: SampleConfig) -> np.ndarray:
    """DiffGAP: text / video embeddings -> generated audio-space embeddings (unit norm)."""
    from models.diffgap import TO_AUDIO
    from stages.diffgap import generate

    return generate(diffgap_model, np.asarray(condition, np.float32), TO_AUDIO, steps=config.diffgap_steps,
                    samples=config.diffgap_samples, seed=config.seed)


def make_vocoder(config: SampleConfig, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """log-mels [B, 80, T] (hifigan22k) -> waveforms [B, 256 T] at 22.05 kHz."""
    if config.vocoder == "hifigan":
        from models.vocoder import get_vocoder

        return get_vocoder(device)
    if config.vocoder == "griffinlim":
        return lambda mels: griffinlim(mels, config.griffinlim_iters)
    raise ValueError(f"vocoder must be 'hifigan' or 'griffinlim', got {config.vocoder!r}")


def griffinlim(mels: np.ndarray, n_iter: int = 16) -> np.ndarray:
    """A cheap vocoder: librosa mel inversion + Griffin-Lim of hifigan22k log-mels."""
    import librosa

    from stages.spectral import get_preset

    p = get_preset("hifigan22k")
    out = []
    for mel in np.asarray(mels, np.float32):
        wave = librosa.feature.inverse.mel_to_audio(np.exp(mel), sr=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop_length,
                                                    power=1.0, fmin=p.fmin, fmax=p.fmax, n_iter=n_iter, htk=False, norm="slaney")
        wave = np.pad(wave, (0, max(0, mel.shape[-1] * p.hop_length - len(wave))))[: mel.shape[-1] * p.hop_length]
        out.append(np.clip(wave, -1, 1).astype(np.float32))
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class Decoder:
    """VAE + vocoder of one latent key: scaled latents -> images, mels, waveforms."""

    vae: object
    scaling_factor: float
    preset: str
    seconds: float
    vocoder: Callable[[np.ndarray], np.ndarray]

    @property
    def sample_rate(self) -> int:
        from stages.vocode import check_vocoder_preset

        return check_vocoder_preset(self.preset).sample_rate

    def __call__(self, latents: np.ndarray) -> dict[str, np.ndarray]:
        from stages.vae import decode_latents
        from stages.vocode import check_vocoder_preset, images_to_mels

        p = check_vocoder_preset(self.preset)
        images = decode_latents(self.vae, np.asarray(latents, np.float32), self.scaling_factor)
        mels = images_to_mels(images, p, self.seconds)
        return {"images": images, "mels": mels, "audio": self.vocoder(mels)}


def make_decoder(store: FeatureStore, dataset: str, audio_vae: Mapping, config: SampleConfig, device: str = "cpu") -> Decoder:
    from stages.vae import load_vae

    vae, sidecar = load_vae(store, dataset, audio_vae["name"], audio_vae["key"], device)
    return Decoder(vae, float(audio_vae["scaling_factor"]), sidecar.get("mel_preset", "hifigan22k"),
                   float(sidecar.get("mel_seconds", 4.0)), make_vocoder(config, device))


def generate_latents(model: LatentGenerator, condition: np.ndarray, config: SampleConfig, seed_offset: int = 0) -> np.ndarray:
    with torch_threads(config.threads):
        generator = torch.Generator().manual_seed(config.seed * 1000003 + seed_offset)
        return sample_latents(model, torch.from_numpy(np.asarray(condition, np.float32)), steps=config.steps,
                              guidance_scale=config.guidance_scale, sampler=config.sampler, generator=generator).numpy()


def generate(model: LatentGenerator, decoder: Decoder, condition: np.ndarray, config: SampleConfig,
             diffgap_model=None) -> dict[str, np.ndarray]:
    """condition [B, d] (text / video embeddings) -> optionally DiffGAP -> latents -> audio."""
    cond = bridge(diffgap_model, condition, config) if diffgap_model is not None else np.asarray(condition, np.float32)
    latents = generate_latents(model, cond, config)
    with torch_threads(config.threads):
        out = decoder(latents)
    return {"condition": cond, "latents": latents, **out}


def text_condition(store: FeatureStore, dataset: str, embedding_key: str, texts: Sequence[str], device: str = "cpu") -> np.ndarray:
    """CLAP text embeddings of free text with the head behind a clap_embeddings key (text tower + head)."""
    from models.towers import TextTower, get_tower
    from stages.contrastive import load_head

    shards = store.committed_shards(dataset, CLAP_FEATURE, embedding_key)
    params = store.shard_manifest(dataset, CLAP_FEATURE, embedding_key, shards[0])["params"] if shards else {}
    if not params.get("head_key"):
        raise ValueError(f"clap_embeddings key {embedding_key} was not made by a trained CLAP head: free text needs one")
    head = load_head(store, dataset, CLAP_HEAD, params["head_key"])
    tokens = get_tower(TextTower, device).encode(list(texts))
    with torch.no_grad():
        return head.embed_text(torch.from_numpy(np.asarray(tokens, np.float32))).numpy()


def cavp_audio_head(store: FeatureStore, dataset: str, embedding_key: str):
    """The CAVP head behind a cavp_embeddings key (to embed generated audio per second), or None."""
    from stages.contrastive import load_head

    shards = store.committed_shards(dataset, CAVP_FEATURE, embedding_key)
    params = store.shard_manifest(dataset, CAVP_FEATURE, embedding_key, shards[0])["params"] if shards else {}
    return load_head(store, dataset, CAVP_HEAD, params["head_key"]) if params.get("head_key") else None


def write_wav(store: FeatureStore, path: str, audio: np.ndarray, rate: int = 22050) -> str:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, np.float32), rate, format="WAV", subtype="PCM_16")
    store.write_bytes(path, buffer.getvalue())
    return store.url(path)


# ---- evaluation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    max_clips: int = 64
    oracle: bool = True  # also score the VAE + vocoder reconstruction of the real latents (the ceiling)
    audio_condition: bool = True  # also generate from the real audio embedding (AUDIO_CONDITION)
    alignment: M.AlignmentConfig = M.AlignmentConfig()
    # The alignment classifier trains on this split: the CAVP head was fitted on "train", where
    # aligned pairs are far more similar (demo: cosine 0.51) than on held-out clips (0.23).
    alignment_split: str = "val"


def reference_audio(manifest: ClipManifest, clip_ids: Sequence[str], seconds: float, rate: int) -> tuple[list[str], np.ndarray]:
    """The real audio of the clips at ``rate`` (clips that fail to decode are left out).

    Evaluation loads it at the generated audio's rate, so that real and generated audio reach
    aiSFX (44.1 kHz) with the same bandwidth: otherwise every metric would also score the
    vocoder's missing top octave."""
    from stages.decode import AudioSpec, ClipError, load_audio

    spec = AudioSpec(sample_rate=rate, seconds=seconds, min_seconds=min(1.0, seconds), silence_dbfs=-120.0)
    index = manifest.index()
    kept, waves = [], []
    for clip_id in clip_ids:
        try:
            waves.append(load_audio(index[clip_id].uri, spec))
            kept.append(clip_id)
        except ClipError:
            continue
    return kept, np.stack(waves) if waves else np.zeros((0, spec.n_samples), np.float32)


def motion_envelopes(manifest: ClipManifest, clip_ids: Sequence[str], fps: float, seconds: float) -> np.ndarray:
    """Motion envelopes [N, round(seconds x fps)] of the clips' videos (the alignment classifier's timing cue)."""
    from stages.decode import ClipError, FrameSpec, load_frames

    index = manifest.index()
    spec = FrameSpec(fps=fps, size=64, seconds=seconds)
    envelopes = []
    for clip_id in clip_ids:
        try:
            envelopes.append(M.motion_envelope(load_frames(index[clip_id].uri, spec)))
        except ClipError as exc:
            raise ValueError(f"alignment: cannot decode the video of clip {clip_id}: {exc}") from None
    return np.stack(envelopes) if envelopes else np.zeros((0, spec.n_frames), np.float32)


def alignment_pairs(manifest: ClipManifest, pairs: LatentPairs, audio: np.ndarray, rate: int, seconds: float,
                    config: M.AlignmentConfig) -> M.AlignmentPairs:
    """The alignment classifier's view of the clips of ``pairs`` with the waveforms ``audio`` (rows paired)."""
    frames = int(round(seconds * config.fps))
    return M.AlignmentPairs(motion_envelopes(manifest, pairs.clip_ids, config.fps, seconds),
                            M.onset_envelopes(audio, rate, config.fps, frames),
                            pairs.per_second["video_per_second"], pairs.per_second["audio_per_second"])


def fit_alignment(manifest: ClipManifest, pairs: LatentPairs, evaluation: EvalConfig, seconds: float, rate: int):
    """Train the alignment classifier on the real pairs of ``evaluation.alignment_split`` (train
    when that split has < 2 clips)."""
    fit = pairs.subset(evaluation.alignment_split)
    if len(fit) < 2:
        fit = pairs.subset("train")
    ids, audio = reference_audio(manifest, fit.clip_ids, seconds, rate)
    fit = fit.subset(clip_ids=ids)
    with torch_threads(1):
        return M.train_alignment(alignment_pairs(manifest, fit, audio, rate, seconds, evaluation.alignment), evaluation.alignment)


def evaluate_space(
    store: FeatureStore, manifest: ClipManifest, space: str, generator: LatentGenerator, generator_sidecar: Mapping,
    diffgap_model, sample: SampleConfig, evaluation: EvalConfig, device: str = "cpu", log: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict[str, dict]]:
    """Rows of Table I (V2A: IS, KL, FD, Acc) or II (T2A: IS, KL, FAD, FD) on ``evaluation.split``:
    baseline, DiffGAP, (optionally) the real-audio-embedding condition and the oracle reconstruction,
    and the real audio; and per method its outputs (audio, and "aisfx": the aiSFX pooled /
    per-second / logits the metrics used)."""
    from models.towers import AudioTower, get_tower

    task = SPACES[space][3]
    pairs = load_latent_pairs(store, manifest, space, generator_sidecar["latent_key"], generator_sidecar["embedding_key"])
    test = pairs.subset(evaluation.split)
    decoder = make_decoder(store, manifest.dataset, generator_sidecar["audio_vae"], sample, device)
    rate = decoder.sample_rate
    ids, ref_wave = reference_audio(manifest, test.clip_ids[: evaluation.max_clips], decoder.seconds, rate)
    if len(ids) < 2:
        raise ValueError(f"{task}: need at least 2 {evaluation.split} clips with latents, embeddings and audio, got {len(ids)}")
    test = test.subset(clip_ids=ids)
    tower = get_tower(AudioTower, device)
    with torch_threads(sample.threads):
        reference = M.aisfx_outputs(tower, ref_wave, rate, decoder.seconds)
    alignment = head = real_pairs = None
    if space == "cavp":
        alignment = fit_alignment(manifest, pairs, evaluation, decoder.seconds, rate)
        real_pairs = alignment_pairs(manifest, test, ref_wave, rate, decoder.seconds, evaluation.alignment)
        head = cavp_audio_head(store, manifest.dataset, generator_sidecar["embedding_key"])
    methods: dict[str, dict] = {}
    start = time.perf_counter()
    methods[BASELINE] = generate(generator, decoder, test.other, sample)
    if diffgap_model is not None:
        methods[WITH_DIFFGAP] = generate(generator, decoder, test.other, sample, diffgap_model)
    if evaluation.audio_condition:
        methods[AUDIO_CONDITION] = generate(generator, decoder, test.audio, sample)
    if evaluation.oracle:
        with torch_threads(sample.threads):
            methods[ORACLE] = decoder(test.latents)
    methods[REAL] = {"audio": ref_wave}
    rows = []
    for method, out in methods.items():
        if method == REAL:
            scored = reference
        else:
            with torch_threads(sample.threads):
                scored = M.aisfx_outputs(tower, out["audio"], rate, decoder.seconds)
        out["aisfx"] = scored
        metrics = M.generation_metrics(scored, reference)
        row = {"task": task, "space": space, "method": method, "n": len(ids), "steps": sample.steps,
               "guidance_scale": sample.guidance_scale, "vocoder": sample.vocoder, **metrics}
        if alignment is not None:
            if method == REAL:
                row["Acc"] = M.alignment_accuracy(alignment, real_pairs)
            elif head is not None:
                video_seconds = test.per_second["video_per_second"].shape[1]
                with torch.no_grad():
                    audio_ps = head.embed_audio(torch.from_numpy(_fit_seconds(scored["per_second"], video_seconds))).numpy()
                onsets = M.onset_envelopes(out["audio"], rate, evaluation.alignment.fps, real_pairs.onsets.shape[1])
                row["Acc"] = M.alignment_accuracy(alignment, real_pairs.with_audio(onsets, audio_ps))
            else:
                row["Acc"] = float("nan")
            row["Acc (real pairs vs misaligned)"] = M.classifier_accuracy(alignment, real_pairs)
        if out.get("condition") is not None:
            row["cos(condition, real audio emb)"] = float(np.mean(np.sum(_unit(out["condition"]) * _unit(test.audio), axis=1)))
        rows.append(row)
    if log:
        log(f"{task}: generated and scored {len(ids)} clips x {len(methods)} methods in {time.perf_counter() - start:.1f} s")
    outputs = {m: {**o, "clip_ids": ids} for m, o in methods.items()}
    return rows, outputs


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _fit_seconds(per_second: np.ndarray, seconds: int) -> np.ndarray:
    per_second = np.asarray(per_second, np.float32)
    if per_second.shape[1] >= seconds:
        return per_second[:, :seconds]
    return np.concatenate([per_second, np.repeat(per_second[:, -1:], seconds - per_second.shape[1], axis=1)], axis=1)


TABLE_COLUMNS = {
    "V2A": ["method", "IS (aiSFX)", "KL (aiSFX)", "FD (aiSFX)", "Acc", "n"],
    "T2A": ["method", "IS (aiSFX)", "KL (aiSFX)", "FAD (aiSFX)", "FD (aiSFX)", "n"],
}


def table_markdown(rows: list[dict], task: str) -> str:
    columns = TABLE_COLUMNS[task]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        if row["task"] != task:
            continue
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    trust = [r["Acc (real pairs vs misaligned)"] for r in rows if r["task"] == task and "Acc (real pairs vs misaligned)" in r]
    if trust:
        lines.append(f"\nAlignment classifier accuracy on real aligned + misaligned pairs of this split: {trust[0]:.1f}%.")
    return "\n".join(lines)


def output_folder(store: FeatureStore, dataset: str, key: str) -> str:
    return store.path(dataset, "generated", key)


def save_outputs(store: FeatureStore, folder: str, outputs: Mapping[str, Mapping], tag: str) -> list[str]:
    """WAVs of every generated clip under ``folder`` as <clip or prompt>__<tag>__<method>.wav."""
    urls = []
    for method, out in outputs.items():
        slug = method.split(" ")[0].replace(":", "").lower()
        for name, wave in zip(out["clip_ids"], out["audio"]):
            urls.append(write_wav(store, posixpath.join(folder, f"{name}__{tag}__{slug}.wav"), wave))
    return urls


def rows_to_csv(rows: list[dict]) -> str:
    """CSV of rows whose keys differ (V2A rows carry Acc): the union of the keys, in first-seen order."""
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
