"""CMMD evaluation (as Table 2 and Fig. 4 of the paper, on our extractors, named for them).

Every clip of the split contributes its first window (deterministic). Tasks:
    V2A  video latents -> audio: mel latent -> denormalise -> HiFi-GAN
    A2V  mel latents -> video: frame latents -> frame VAE decode -> frames
Rows per task: the model at each guidance lambda (0 = replacement), "ground truth" (the real
window through the same decoder: vocoded real mel / VAE-decoded real latents, the path's ceiling)
and a control ("other real clips": as many real windows of train clips, the distances' floor at
this n). Metrics:
    beat / onset hit rate      librosa beats (onsets) of generated vs real audio within +-100 / +-500 ms
    event hit rate             onsets of the generated audio (V2A) or motion onsets of the generated
                               video (A2V) against the demo's known event times (when known)
    FAD (aiSFX) per set        Frechet distance of aiSFX per-second embeddings, generated vs the real
                               windows of the same clips (equal set sizes: n vs n), in a PCA of the
                               reference fitted to full rank at this n
    FAD (aiSFX) per sample     the same distance from each sample's embedding to the reference set's
                               Gaussian (median over samples; one 1.86 s window is one aiSFX block)
    FVD / KVD (EffNet-lite0)   Frechet distance (PCA as above) and polynomial-kernel MMD of per-clip
                               video features (mean and std over frames of EfficientNet-lite0 features)
Never compare these with published numbers: other extractors, other data, tiny sets.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from stages.cmmd.data import CMMD_FPS, ClipWindows, evaluation_windows
from stages.core.parallel import StepThreads, torch_threads
from stages.core.store import FeatureStore
from stages.evaluation import rhythm
from stages.evaluation.distribution import frechet_distance, full_rank_dims, gaussian_fit, kernel_distance, pca_fit
from stages.ingest.manifest import ClipManifest

if TYPE_CHECKING:
    from models.cmmd import JointUNet

VOCODER_RATE = 22050
TOLERANCES = (0.1, 0.5)
GROUND_TRUTH = "ground truth (real window, same decoder)"
CONTROL = "control: other real clips (train)"
# The reconstruction-guidance weight used beside lambda = 0, chosen on the val split (never test)
# from {0, 0.05, 0.5, 5} by V2A onset F1 at 100 ms (bench/cmmd_tables.py --choose-lambda; BENCHMARKS.md
# "CMMD"): 62.3, 62.5, 63.5, 65.6%. Eq. (3) sums the known modality's squared error over its
# elements (16384 video, 12800 audio numbers per window); 5 is the grid's edge, larger was not tried.
DEFAULT_GUIDANCE = 5.0


@dataclass(frozen=True)
class CmmdEvalConfig:
    split: str = "test"
    max_clips: int = 64
    steps: int = 50  # DDIM steps
    guidance: tuple[float, ...] = (0.0, DEFAULT_GUIDANCE)
    seed: int = 0
    length_factor: int = 1  # 2: sample twice the training window (the paper's test setting); clips long enough only
    tasks: tuple[str, ...] = ("V2A", "A2V")
    batch_size: int = 16
    threads: int = 0  # speed only; 0 = tuned on its own DDIM steps (stages.core.parallel.StepThreads), N = fixed

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance", tuple(float(g) for g in self.guidance))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.steps < 1 or self.max_clips < 2 or self.length_factor < 1 or any(g < 0 for g in self.guidance) or not self.guidance:
            raise ValueError("need steps >= 1, max_clips >= 2, length_factor >= 1 and guidance values >= 0")
        if not set(self.tasks) <= {"V2A", "A2V"} or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of ['V2A', 'A2V'], got {list(self.tasks)}")

    def params(self) -> dict:
        params = asdict(self)
        params.pop("threads")
        params.pop("batch_size")
        params["guidance"], params["tasks"] = list(self.guidance), list(self.tasks)
        return params


# ---- sampling -----------------------------------------------------------------------------------

def generate(model: JointUNet, known: np.ndarray, known_is: str, steps: int, guidance: float, seed: int,
             batch_size: int = 16, device: str = "cpu", threads: int = 0) -> np.ndarray:
    """The other modality for every row of ``known`` (V2A: known video latents; A2V: known mel
    latents), in batches; batch b draws its noise from seed (seed, b), so a row's sample does not
    depend on how many clips are evaluated after it."""
    import torch
    from models.cmmd import make_scheduler, sample_conditional
    from models.devices import to_device

    scheduler = make_scheduler(model.config)
    out = []
    with StepThreads(threads) as tuner:
        for b, start in enumerate(range(0, len(known), batch_size)):
            chunk = to_device(torch.from_numpy(np.ascontiguousarray(known[start : start + batch_size])), device)
            generator = torch.Generator().manual_seed(seed * 100_003 + b)
            out.append(sample_conditional(model, scheduler, chunk, known_is, steps=steps, guidance=guidance,
                                          generator=generator, on_step=lambda _: tuner.tick()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ---- alignment ----------------------------------------------------------------------------------

def motion_onsets(frames: np.ndarray, fps: float, threshold: float = 0.3) -> np.ndarray:
    """Times (s) where a clip's motion starts: local maxima of the rise of its motion envelope
    (mean absolute frame difference) above ``threshold`` x the clip's largest rise."""
    from stages.evaluation.alignment import motion_envelope

    envelope = motion_envelope(frames)
    rise = np.maximum(0.0, np.diff(envelope, prepend=envelope[:1]))
    if not len(rise) or rise.max() <= 0:
        return np.zeros(0)
    padded = np.concatenate([[0.0], rise, [0.0]])
    peaks = [t for t in range(len(rise)) if padded[t + 1] >= padded[t] and padded[t + 1] > padded[t + 2]
             and rise[t] >= threshold * rise.max()]
    return np.asarray(peaks, np.float64) / fps


def _hit_rates(references: Sequence[np.ndarray | None], estimates: Sequence[np.ndarray], what: str,
               precision: bool = False) -> dict[str, float]:
    """Hit rates (the paper's: share of reference events with an estimated one within the tolerance)
    and, with ``precision``, the share of estimated events near a reference one at the first
    tolerance: a hit rate alone rewards audio that has onsets everywhere."""
    pairs = [(r, e) for r, e in zip(references, estimates) if r is not None]
    if not pairs:
        return {}
    out = {f"{what} hit {int(round(tol * 1000))} ms": rhythm.mean_hit_rate(pairs, tol) for tol in TOLERANCES}
    if precision:
        out[f"{what} precision {int(round(TOLERANCES[0] * 1000))} ms"] = rhythm.mean_hit_rate([(e, r) for r, e in pairs], TOLERANCES[0])
    return out


def audio_alignment(waves: np.ndarray, references: np.ndarray, events: Sequence[np.ndarray | None], seconds: float) -> dict[str, float]:
    """Beat and onset hit rates of generated audio against the real audio, and onsets against known event times."""
    beats_ref = [rhythm.beat_times(w, VOCODER_RATE) for w in references]
    beats = [rhythm.beat_times(w, VOCODER_RATE) for w in waves]
    onsets_ref = [rhythm.onset_times(w, VOCODER_RATE) for w in references]
    onsets = [rhythm.onset_times(w, VOCODER_RATE) for w in waves]
    within = [None if e is None else np.asarray([t for t in e if t < seconds]) for e in events]
    return {**_hit_rates(beats_ref, beats, "beat"), **_hit_rates(onsets_ref, onsets, "onset", True),
            **_hit_rates(within, onsets, "event", True)}


def video_alignment(frames: np.ndarray, references: np.ndarray, events: Sequence[np.ndarray | None], seconds: float) -> dict[str, float]:
    """Motion onsets of (generated) video against the real audio's onsets and against known event times."""
    motion = [motion_onsets(f, CMMD_FPS) for f in frames]
    onsets_ref = [rhythm.onset_times(w, VOCODER_RATE) for w in references]
    within = [None if e is None else np.asarray([t for t in e if t < seconds]) for e in events]
    return {**_hit_rates(onsets_ref, motion, "audio-onset"), **_hit_rates(within, motion, "event", True)}


# ---- distances ----------------------------------------------------------------------------------

def set_and_sample_distances(generated: np.ndarray, reference: np.ndarray, name: str) -> dict[str, float]:
    """``name`` per set (Frechet, PCA of the reference to full rank at its n) and per sample (median)."""
    dims = full_rank_dims(len(reference), generated.shape[1])
    pca = pca_fit(reference, dims)
    ref, gen = pca(reference), pca(generated)
    mu_r, sigma_r = gaussian_fit(ref)
    mu_g, sigma_g = gaussian_fit(gen)
    zero = np.zeros_like(sigma_r)
    per_sample = [frechet_distance(row, zero, mu_r, sigma_r) for row in gen]
    return {f"{name} per set": frechet_distance(mu_g, sigma_g, mu_r, sigma_r), f"{name} per sample": float(np.median(per_sample))}


def video_features(tower, frames: np.ndarray) -> np.ndarray:
    """Per clip: mean and std over its frames of the frame tower's features [N, 2 d]."""
    n, t = frames.shape[:2]
    embedded = tower.embed(frames.reshape(n * t, *frames.shape[2:])).reshape(n, t, -1)
    return np.concatenate([embedded.mean(1), embedded.std(1)], axis=1)


def audio_embeddings(tower, waves: np.ndarray, seconds: float) -> np.ndarray:
    from stages.evaluation.audio import aisfx_outputs

    return aisfx_outputs(tower, waves, VOCODER_RATE, max(1.0, seconds))["per_second"][:, 0]


# ---- the evaluation -----------------------------------------------------------------------------

@dataclass
class Decoders:
    """What turns latents back into media: the frame VAE (and its scaling factor), the mel statistics, the vocoder."""

    frame_vae: object
    scaling_factor: float
    mel_statistics: object
    vocoder: object = None

    def audio(self, mel_latents: np.ndarray) -> np.ndarray:
        from stages.features.mel_latent import denormalise
        from stages.generation.vocode import mels_to_audio

        return mels_to_audio(denormalise(mel_latents, self.mel_statistics), self.vocoder)

    def frames(self, latents: np.ndarray) -> np.ndarray:
        """[N, C, T, h, w] (the model's layout) -> uint8 [N, T, H, W, 3]."""
        from stages.vae.train import decode_latents

        return decode_latents(self.frame_vae, np.ascontiguousarray(np.asarray(latents).transpose(0, 2, 1, 3, 4)), self.scaling_factor)


@dataclass
class CmmdEvaluation:
    rows: list[dict]
    clip_ids: list[str]
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "<task> <row>" -> {"audio"/"frames"}
    reference_audio: np.ndarray | None = None
    reference_frames: np.ndarray | None = None


def evaluate_cmmd(store: FeatureStore, manifest: ClipManifest, model: JointUNet, windows: ClipWindows,
                  real_frames: Mapping[str, np.ndarray], decoders: Decoders, config: CmmdEvalConfig,
                  window_frames: int, variant: str, towers: tuple | None = None, device: str = "cpu",
                  log: Callable[[str], None] | None = None, keep_samples: int = 0) -> CmmdEvaluation:
    """The rows of both tasks for one trained model (``variant`` names it in the rows).

    ``windows``: every clip's cached latents (all splits; the control draws train clips);
    ``real_frames``: clip id -> uint8 frames [T, H, W, 3] of the cached video_frames at CMMD's fps;
    ``towers``: (AudioTower, FrameTower), loaded once by the caller when it evaluates several models."""
    from stages.generation.evaluate import reference_audio
    from stages.ingest.demo import known_event_times

    frames = window_frames * config.length_factor
    seconds = frames / CMMD_FPS
    pool = windows.of_split(config.split)
    keep = [i for i in range(len(pool)) if pool.valid_frames[i] >= frames and pool.clip_ids[i] in real_frames]
    pool = pool.subset(keep[: config.max_clips])
    if len(pool) < 2:
        raise ValueError(f"CMMD evaluation needs >= 2 {config.split} clips at least {seconds:.2f} s long, got {len(pool)}")
    video_in, audio_in, _ = evaluation_windows(pool, frames)
    ids = pool.clip_ids
    kept, ref_audio = reference_audio(manifest, ids, seconds, VOCODER_RATE)
    if kept != ids:
        raise ValueError(f"CMMD evaluation: the audio of {len(ids) - len(kept)} clips no longer decodes")
    ref_frames = np.stack([real_frames[c][:frames] for c in ids])
    index = manifest.index()
    events_known = known_event_times({c: index[c].uri for c in ids})
    events = [np.asarray(events_known[c]) if c in events_known else None for c in ids]
    audio_tower, frame_tower = towers if towers is not None else load_towers(device)

    control_pool = windows.of_split("train")
    control_ids = [c for c in control_pool.clip_ids if c in real_frames][: len(ids)]
    _, control_audio = reference_audio(manifest, control_ids, seconds, VOCODER_RATE)
    control_frames = np.stack([real_frames[c][:frames] for c in control_ids])

    ref_audio_emb = audio_embeddings(audio_tower, ref_audio, seconds)
    ref_video_feat = video_features(frame_tower, ref_frames)
    rows: list[dict] = []
    samples: dict[str, dict[str, np.ndarray]] = {}

    def audio_row(name: str, guidance, waves: np.ndarray, *, alignment: bool = True) -> dict:
        row = {"task": "V2A", "model": name, "lambda": guidance, "clips": len(waves), "steps": config.steps if guidance is not None else None,
               **set_and_sample_distances(audio_embeddings(audio_tower, waves, seconds), ref_audio_emb, "FAD (aiSFX)")}
        if alignment:
            row.update(audio_alignment(waves, ref_audio, events, seconds))
        return row

    def video_row(name: str, guidance, clip_frames: np.ndarray, *, alignment: bool = True) -> dict:
        feats = video_features(frame_tower, clip_frames)
        dist = set_and_sample_distances(feats, ref_video_feat, "FVD (EffNet-lite0)")
        row = {"task": "A2V", "model": name, "lambda": guidance, "clips": len(clip_frames), "steps": config.steps if guidance is not None else None,
               "FVD (EffNet-lite0)": dist["FVD (EffNet-lite0) per set"], "KVD (EffNet-lite0)": kernel_distance(feats, ref_video_feat)}
        if alignment:
            row.update(video_alignment(clip_frames, ref_audio, events, seconds))
        return row

    if "V2A" in config.tasks:
        rows.append(audio_row(GROUND_TRUTH, None, decoders.audio(audio_in)))
        rows.append(audio_row(CONTROL, None, control_audio, alignment=False))
        rows.append({"task": "V2A", "model": "real audio (the reference)", "lambda": None, "clips": len(ids),
                     **audio_alignment(ref_audio, ref_audio, events, seconds)})
        for guidance in config.guidance:
            if log:
                log(f"cmmd evaluation: {variant} V2A, lambda {guidance}, {len(ids)} clips x {config.steps} DDIM steps")
            mel = generate(model, video_in, "video", config.steps, guidance, config.seed, config.batch_size, device, config.threads)
            waves = decoders.audio(mel)
            rows.append(audio_row(variant, guidance, waves))
            if keep_samples:
                samples[f"V2A {variant} lambda {guidance}"] = {"audio": waves[:keep_samples], "mel": mel[:keep_samples]}
    if "A2V" in config.tasks:
        rows.append(video_row(GROUND_TRUTH, None, decoders.frames(video_in)))
        rows.append(video_row(CONTROL, None, control_frames, alignment=False))
        rows.append({"task": "A2V", "model": "real video (the reference)", "lambda": None, "clips": len(ids),
                     **video_alignment(ref_frames, ref_audio, events, seconds)})
        for guidance in config.guidance:
            if log:
                log(f"cmmd evaluation: {variant} A2V, lambda {guidance}, {len(ids)} clips x {config.steps} DDIM steps")
            latents = generate(model, audio_in, "audio", config.steps, guidance, config.seed, config.batch_size, device, config.threads)
            clip_frames = decoders.frames(latents)
            rows.append(video_row(variant, guidance, clip_frames))
            if keep_samples:
                samples[f"A2V {variant} lambda {guidance}"] = {"frames": clip_frames[:keep_samples]}
    for row in rows:
        row["split"] = config.split
        row["window_seconds"] = round(seconds, 4)
    return CmmdEvaluation(rows, ids, samples, ref_audio[:keep_samples] if keep_samples else None,
                          ref_frames[:keep_samples] if keep_samples else None)


def load_towers(device: str = "cpu") -> tuple:
    from models.towers import AudioTower, FrameTower, get_tower

    return get_tower(AudioTower, device), get_tower(FrameTower, device)


# ---- tables and outputs -------------------------------------------------------------------------

METRIC_ORDER = {
    "V2A": ("FAD (aiSFX) per set", "FAD (aiSFX) per sample", "beat hit 100 ms", "beat hit 500 ms", "onset hit 100 ms",
            "onset hit 500 ms", "onset precision 100 ms", "event hit 100 ms", "event hit 500 ms", "event precision 100 ms"),
    "A2V": ("FVD (EffNet-lite0)", "KVD (EffNet-lite0)", "audio-onset hit 100 ms", "audio-onset hit 500 ms",
            "event hit 100 ms", "event hit 500 ms", "event precision 100 ms"),
}


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean and std over trainings of each (task, model, lambda): ``rows`` may hold several seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["model"], row["lambda"]), []).append(row)
    out = []
    for (task, name, guidance), members in groups.items():
        entry = {"task": task, "model": name, "lambda": guidance, "trainings": len({m.get("seed", 0) for m in members}),
                 "clips": members[0]["clips"]}
        for metric in METRIC_ORDER[task]:
            values = [m[metric] for m in members if metric in m and m[metric] is not None and np.isfinite(m[metric])]
            if values:
                entry[metric] = (float(np.mean(values)), float(np.std(values)) if len(values) > 1 else None)
        out.append(entry)
    return out


def table_markdown(rows: Sequence[dict], task: str) -> str:
    summary = [r for r in summarise(rows) if r["task"] == task]
    metrics = [m for m in METRIC_ORDER[task] if any(m in r for r in summary)]
    lines = ["| model | lambda | trainings | clips | " + " | ".join(metrics) + " |", "|---|---:|---:|---:|" + "---:|" * len(metrics)]
    for r in summary:
        cells = []
        for m in metrics:
            if m not in r:
                cells.append("")
                continue
            mean, std = r[m]
            if "hit" in m or "precision" in m:
                cells.append(f"{mean * 100:.1f}%" + (f" +- {std * 100:.1f}" if std is not None else ""))
            else:
                cells.append(f"{mean:.3g}" + (f" +- {std:.2g}" if std is not None else ""))
        guidance = "" if r["lambda"] is None else f"{r['lambda']:g}"
        lines.append(f"| {r['model']} | {guidance} | {r['trainings']} | {r['clips']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(store: FeatureStore, folder: str, evaluation: CmmdEvaluation) -> list[str]:
    """WAVs of generated audio, mp4s (generated audio over the real video for V2A, generated video
    with the real audio for A2V) and frame-strip PNGs under ``folder``; returns their URLs."""
    from stages.generation.sample import write_wav
    from stages.ingest.demo import write_mp4

    urls = []
    fps = Fraction(22050, 2560)
    for name, sample in evaluation.samples.items():
        slug = name.replace(" ", "_").replace(".", "p")
        for i in range(len(sample.get("audio", sample.get("frames", [])))):
            clip = evaluation.clip_ids[i]
            if "audio" in sample:
                urls.append(write_wav(store, posixpath.join(folder, f"{clip}__{slug}.wav"), sample["audio"][i]))
                video, audio = evaluation.reference_frames[i], sample["audio"][i]
            else:
                video, audio = sample["frames"][i], evaluation.reference_audio[i]
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "clip.mp4")
                write_mp4(path, video, fps, audio, VOCODER_RATE)
                target = posixpath.join(folder, f"{clip}__{slug}.mp4")
                with open(path, "rb") as handle:
                    store.write_bytes(target, handle.read())
                urls.append(store.url(target))
    return urls


# ---- one stored checkpoint, from the store ---------------------------------------------------------

def load_real_frames(store: FeatureStore, dataset: str, frames_key: str, shards: Sequence[str]) -> dict[str, np.ndarray]:
    from stages.features.frames import VIDEO_FRAMES_FEATURE

    table = store.read_arrays(dataset, VIDEO_FRAMES_FEATURE, frames_key, shards=list(shards), names=["frames"])
    return {c: table.arrays["frames"][i] for i, c in enumerate(table.clip_ids)}


def load_decoders(store: FeatureStore, dataset: str, frame_vae_key: str, scaling_factor: float, mel_latent_key: str,
                  device: str = "cpu") -> Decoders:
    from models.vocoder import get_vocoder
    from stages.features.mel_latent import latent_statistics
    from stages.vae.train import FRAME_VAE, load_vae

    vae, _ = load_vae(store, dataset, FRAME_VAE, frame_vae_key, device)
    return Decoders(vae, scaling_factor, latent_statistics(store, dataset, mel_latent_key), get_vocoder(device))


def evaluate_checkpoint(store: FeatureStore, manifest: ClipManifest, cmmd_key: str, frames_key: str, frame_vae_key: str,
                        scaling_factor: float, config: CmmdEvalConfig, device: str = "cpu",
                        log: Callable[[str], None] | None = None, folder: str | None = None, keep_samples: int = 4,
                        towers: tuple | None = None, seed_label: int | None = None) -> dict:
    """Evaluate the stored CMMD checkpoint ``cmmd_key``; write its WAVs / mp4s / frame strips under
    ``folder`` (when given). Returns {"rows", "tables", "outputs", "previews"} (JSON-ready)."""
    from stages.cmmd.train import load_cmmd, load_windows
    from stages.core.preview import preview_png

    model, sidecar = load_cmmd(store, manifest.dataset, cmmd_key, device)
    windows = load_windows(store, manifest, sidecar["mel_latent_key"], sidecar["frame_latent_key"])
    real = load_real_frames(store, manifest.dataset, frames_key, sorted(manifest.by_shard()))
    decoders = load_decoders(store, manifest.dataset, frame_vae_key, scaling_factor, sidecar["mel_latent_key"], device)
    with torch_threads(config.threads or 1):  # towers and vocoder; the DDIM steps tune their own (generate)
        result = evaluate_cmmd(store, manifest, model, windows, real, decoders, config, sidecar["window_frames"],
                               sidecar["variant"], towers, device, log, keep_samples)
    seed = sidecar["train_config"]["seed"] if seed_label is None else seed_label
    for row in result.rows:
        row["seed"] = seed
        row["checkpoint"] = cmmd_key
    outputs = write_outputs(store, folder, result) if folder else []
    previews = {}  # name -> the preview PNG's path in the store (the asset shows them inline)
    for name, sample in result.samples.items() if folder else ():
        from stages.features.frames import frames_preview_png

        png = preview_png(mels=_denormalised(sample["mel"], decoders)) if "mel" in sample else frames_preview_png(sample["frames"], shown=16)
        path = posixpath.join(folder, name.replace(" ", "_").replace(".", "p") + "__preview.png")
        store.write_bytes(path, png)
        previews[name] = path
    tables = {task: table_markdown(result.rows, task) for task in config.tasks}
    return {"rows": result.rows, "tables": tables, "outputs": outputs, "previews": previews, "clip_ids": result.clip_ids}


def _denormalised(mel_latents: np.ndarray, decoders: Decoders) -> np.ndarray:
    from stages.features.mel_latent import denormalise

    return denormalise(mel_latents, decoders.mel_statistics)
