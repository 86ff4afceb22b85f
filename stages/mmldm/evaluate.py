"""MM-LDM evaluation (as Tables 1 and 5 of the paper, on our extractors, named for them).

Every clip of the split (up to ``max_clips``) in manifest order. Rows (one table):
    ground truth (KL-VAE reconstruction)    the stored KL latents through the KL-VAE decoders (and
                                            the vocoder): the perceptual space's ceiling
    autoencoder reconstruction (rFAD, rFVD) the clip's MM-LDM latents through the signal decoder,
                                            then the KL-VAE: Table 5's metric
    control: other real clips (train)       as many real train clips: the distances' floor at this n
    MM-LDM svg                              joint generation, both modalities from noise
    MM-LDM a2v / v2a (phi)                  the other modality given the clip's real latent (Eq. 9)
Metrics: FAD (aiSFX) per set (Frechet distance of aiSFX per-second embeddings against the real
audio of the same clips, PCA of the reference to full rank at this n) and FVD / KVD (EffNet-lite0:
mean and std over frames of per-frame features; Frechet in the same PCA, polynomial-kernel MMD).
Never compare them with published numbers: other extractors, other data, tiny sets.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from stages.core.parallel import StepThreads
from stages.core.store import FeatureStore
from stages.ingest.manifest import ClipManifest

VOCODER_RATE = 22050
GROUND_TRUTH = "ground truth (KL-VAE reconstruction)"
RECONSTRUCTION = "MM-LDM autoencoder reconstruction"
CONTROL = "control: other real clips (train)"
FRAMES_FPS = 4  # the cached video_frames MM-LDM's KL latents were made from


@dataclass(frozen=True)
class MmldmEvalConfig:
    split: str = "test"
    max_clips: int = 64
    steps: int = 50  # DiT DDIM steps
    decoder_steps: int = 25  # signal decoder DDIM steps per frame / audio image
    # phi of Eq. (9) for a2v / v2a. 1 = the conditional model alone; not tuned (no val sweep was run),
    # both reported.
    phi: tuple[float, ...] = (1.0, 3.0)
    tasks: tuple[str, ...] = ("svg", "a2v", "v2a")
    seed: int = 0
    batch_size: int = 16
    threads: int = 0  # speed only; 0 = tuned on its DDIM steps (stages.core.parallel.StepThreads)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phi", tuple(float(p) for p in self.phi))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.steps < 1 or self.decoder_steps < 1 or self.max_clips < 2 or not self.phi:
            raise ValueError("need steps >= 1, decoder_steps >= 1, max_clips >= 2 and at least one phi")
        if not set(self.tasks) <= {"svg", "a2v", "v2a"}:  # empty: the reconstruction rows alone (Table 5)
            raise ValueError(f"tasks must be a subset of ['svg', 'a2v', 'v2a'], got {list(self.tasks)}")

    def params(self) -> dict:
        params = asdict(self)
        params.pop("threads")
        params.pop("batch_size")
        params["phi"], params["tasks"] = list(self.phi), list(self.tasks)
        return params


@dataclass
class KlDecoders:
    """KL latents -> media: the audio VAE (+ mel preset, vocoder) and the frame VAE, with their scaling factors."""

    audio_vae: object
    audio_scale: float
    frame_vae: object
    frame_scale: float
    preset: str
    seconds: float
    vocoder: object = None

    def audio(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(waves [N, samples], mels [N, 80, T])."""
        from stages.generation.vocode import latents_to_audio

        out = latents_to_audio(self.audio_vae, np.asarray(latents, np.float32), self.audio_scale, self.vocoder, self.preset, self.seconds)
        return out["audio"], out["mels"]

    def frames(self, latents: np.ndarray) -> np.ndarray:
        """[N, T, C, h, w] -> uint8 [N, T, H, W, 3]."""
        from stages.vae.train import decode_latents

        return decode_latents(self.frame_vae, np.asarray(latents, np.float32), self.frame_scale)


def load_kl_decoders(store: FeatureStore, dataset: str, vae_latent_key: str, device: str = "cpu") -> KlDecoders:
    from models.vocoder import get_vocoder
    from stages.features.latents import latent_vaes
    from stages.generation.vocode import VOCODER_PRESET
    from stages.vae.train import load_vae

    vaes = latent_vaes(store, dataset, vae_latent_key)
    audio_vae, sidecar = load_vae(store, dataset, vaes["audio"]["name"], vaes["audio"]["key"], device)
    frame_vae, _ = load_vae(store, dataset, vaes["frames"]["name"], vaes["frames"]["key"], device)
    return KlDecoders(audio_vae, float(vaes["audio"]["scaling_factor"]), frame_vae, float(vaes["frames"]["scaling_factor"]),
                      sidecar.get("mel_preset", VOCODER_PRESET), float(sidecar.get("mel_seconds", 4.0)), get_vocoder(device))


def frames_key_of(store: FeatureStore, dataset: str, vae_latent_key: str) -> str:
    """The video_frames key the KL frame latents were encoded from."""
    from stages.features.latents import LATENT_FEATURE

    shard = store.committed_shards(dataset, LATENT_FEATURE, vae_latent_key)[0]
    return store.shard_manifest(dataset, LATENT_FEATURE, vae_latent_key, shard)["params"]["inputs"]["frames"]["key"]


# ---- generation -------------------------------------------------------------------------------------

def generate_latents(dit, scheduler, scales: Mapping[str, float], task: str, count: int, known: np.ndarray | None, phi: float,
                     steps: int, seed: int, batch_size: int, device: str = "cpu",
                     on_step: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(z_a, z_v) in the autoencoder's units (the DiT's scale undone) for ``count`` samples; batch b
    draws from seed (seed, b), so a row's sample does not depend on how many follow it."""
    import torch
    from models.devices import to_device
    from models.mmldm import sample_dit

    scale_known = scales["audio"] if task == "a2v" else scales["video"]
    out_a, out_v = [], []
    for b, start in enumerate(range(0, count, batch_size)):
        n = min(batch_size, count - start)
        given = None
        if known is not None:
            given = to_device(torch.from_numpy(np.ascontiguousarray(known[start : start + n] * scale_known, np.float32)), device)
        generator = torch.Generator().manual_seed(seed * 100_003 + b)
        z_a, z_v = sample_dit(dit, scheduler, n, task if task != "svg" else "joint", known=given, phi=phi, steps=steps,
                              generator=generator, device=device, on_step=on_step)
        out_a.append(z_a.cpu().numpy() / scales["audio"])
        out_v.append(z_v.cpu().numpy() / scales["video"])
    return np.concatenate(out_a), np.concatenate(out_v)


def decode_to_kl(autoencoder, z_a: np.ndarray, z_v: np.ndarray, steps: int, seed: int, batch_size: int = 16,
                 device: str = "cpu", on_step: Callable[[int], None] | None = None,
                 modalities: Sequence[str] = ("audio", "video")) -> tuple[np.ndarray | None, np.ndarray | None]:
    """MM-LDM latents -> KL latents (audio [N, 4, h, w], frames [N, T, 4, h, w]) through the signal decoder;
    only ``modalities`` are decoded (the others: None), each exactly as when both are."""
    import torch
    from models.devices import to_device
    from models.mmldm import decode_clips, make_scheduler

    c = autoencoder.config
    scheduler = make_scheduler(c.num_train_timesteps, c.beta_schedule)
    audio, frames = [], []
    for b, start in enumerate(range(0, len(z_a), batch_size)):
        sl = slice(start, start + batch_size)
        a, v = decode_clips(autoencoder, scheduler, to_device(torch.from_numpy(np.ascontiguousarray(z_a[sl], np.float32)), device),
                            to_device(torch.from_numpy(np.ascontiguousarray(z_v[sl], np.float32)), device), steps,
                            torch.Generator().manual_seed(seed * 7_919 + b), on_step=on_step, modalities=modalities)
        audio += [a.cpu().numpy()] if a is not None else []
        frames += [v.cpu().numpy()] if v is not None else []
    return (np.concatenate(audio) if audio else None), (np.concatenate(frames) if frames else None)


# ---- the evaluation ---------------------------------------------------------------------------------

@dataclass
class MmldmEvaluation:
    rows: list[dict]
    clip_ids: list[str]
    samples: dict  # name -> {"audio": waves, "frames": uint8, "mels": ...} of the first clips
    seconds: float


def evaluate_mmldm(store: FeatureStore, manifest: ClipManifest, autoencoder, dit, dit_sidecar: Mapping, vae_latent_key: str,
                   config: MmldmEvalConfig, device: str = "cpu", log: Callable[[str], None] | None = None,
                   keep_samples: int = 4, towers: tuple | None = None, label: str = "MM-LDM",
                   baseline=None) -> MmldmEvaluation:
    """The rows above for ``dit`` (None: the reconstruction rows alone); ``autoencoder`` None skips its
    reconstruction row. ``baseline`` (a ``stages.mmldm.signal_baseline.SignalBaseline``) adds its svg,
    a2v and v2a rows at each phi, scored against the same references."""
    from models.mmldm import make_scheduler
    from stages.cmmd.evaluate import audio_embeddings, load_towers, set_and_sample_distances, video_features
    from stages.evaluation.distribution import kernel_distance
    from stages.generation.evaluate import reference_audio
    from stages.mmldm.train import load_clip_latents, load_semantic_latents

    kl = load_clip_latents(store, manifest, vae_latent_key)
    semantic = load_semantic_latents(store, manifest, dit_sidecar["mmldm_latent_key"])
    sem_rows = {c: i for i, c in enumerate(semantic.clip_ids)}
    pool = [i for i, (c, s) in enumerate(zip(kl.clip_ids, kl.splits)) if s == config.split and c in sem_rows][: config.max_clips]
    if len(pool) < 2:
        raise ValueError(f"MM-LDM evaluation needs >= 2 {config.split} clips with latents, got {len(pool)}")
    clips = kl.subset(pool)
    ids = clips.clip_ids
    z = semantic.subset([sem_rows[c] for c in ids])
    decoders = load_kl_decoders(store, manifest.dataset, vae_latent_key, device)
    seconds = decoders.seconds
    kept, ref_audio = reference_audio(manifest, ids, seconds, VOCODER_RATE)
    if kept != ids:
        raise ValueError(f"MM-LDM evaluation: the audio of {len(ids) - len(kept)} clips no longer decodes")
    from stages.cmmd.evaluate import load_real_frames

    real = load_real_frames(store, manifest.dataset, frames_key_of(store, manifest.dataset, vae_latent_key), sorted(manifest.by_shard()))
    ref_frames = np.stack([real[c] for c in ids])
    train_ids = [c for c, s in zip(kl.clip_ids, kl.splits) if s == "train" and c in real][: len(ids)]
    _, control_audio = reference_audio(manifest, train_ids, seconds, VOCODER_RATE)
    control_frames = np.stack([real[c] for c in train_ids])
    audio_tower, frame_tower = towers if towers is not None else load_towers(device)
    ref_audio_emb = audio_embeddings(audio_tower, ref_audio, seconds)
    ref_video = video_features(frame_tower, ref_frames)

    rows: list[dict] = []
    samples: dict = {}

    def row(name: str, task: str, phi, waves: np.ndarray | None, frames: np.ndarray | None, mels=None, keep: bool = True) -> None:
        entry = {"model": name, "task": task, "phi": phi, "clips": len(ids), "split": config.split}
        if waves is not None:
            entry["FAD (aiSFX)"] = set_and_sample_distances(audio_embeddings(audio_tower, waves, seconds), ref_audio_emb, "FAD")["FAD per set"]
        if frames is not None:
            feats = video_features(frame_tower, frames)
            entry["FVD (EffNet-lite0)"] = set_and_sample_distances(feats, ref_video, "FVD")["FVD per set"]
            entry["KVD (EffNet-lite0)"] = kernel_distance(feats, ref_video)
        rows.append(entry)
        if keep and keep_samples:
            samples[f"{task} {name}" + ("" if phi is None else f" phi {phi:g}")] = {
                "audio": (waves if waves is not None else ref_audio)[:keep_samples],
                "frames": (frames if frames is not None else ref_frames)[:keep_samples],
                **({"mels": mels[:keep_samples]} if mels is not None else {})}

    with StepThreads(config.threads) as threads:
        tick = lambda _: threads.tick()  # noqa: E731  (DDIM steps of the decoder and the DiT tune the threads)
        waves, mels = decoders.audio(clips.audio)
        row(GROUND_TRUTH, "reconstruction", None, waves, decoders.frames(clips.frames))
        if autoencoder is not None:
            if log:
                log(f"mmldm evaluation: autoencoder reconstruction of {len(ids)} clips x {config.decoder_steps} decoder steps")
            kl_a, kl_v = decode_to_kl(autoencoder, z.audio_mean, z.video_mean, config.decoder_steps, config.seed, config.batch_size,
                                      device, tick)
            waves, mels = decoders.audio(kl_a)
            row(RECONSTRUCTION, "reconstruction", None, waves, decoders.frames(kl_v), mels)
        row(CONTROL, "reconstruction", None, control_audio, control_frames, keep=False)  # other clips: no sounding video of these ids
        runs = [("svg", None)] if "svg" in config.tasks else []
        runs += [(task, phi) for task in ("a2v", "v2a") if task in config.tasks for phi in config.phi]
        if runs:
            scheduler = make_scheduler(dit.config.num_train_timesteps, dit.config.beta_schedule)
            scales = dit_sidecar["latent_scales"]
        for task, phi in runs:
            if log:
                log(f"mmldm evaluation: {label} {task}" + ("" if phi is None else f" phi {phi:g}") + f", {len(ids)} clips x {config.steps} DDIM steps")
            known = z.audio_mean if task == "a2v" else z.video_mean if task == "v2a" else None
            g_a, g_v = generate_latents(dit, scheduler, scales, task, len(ids), known, 1.0 if phi is None else phi, config.steps,
                                        config.seed, config.batch_size, device, tick)
            # a2v is scored on its frames and v2a on its audio: the given modality is not decoded
            wanted = {"a2v": ("video",), "v2a": ("audio",)}.get(task, ("audio", "video"))
            kl_a, kl_v = decode_to_kl(autoencoder, g_a, g_v, config.decoder_steps, config.seed, config.batch_size, device, tick, wanted)
            waves, mels = decoders.audio(kl_a) if kl_a is not None else (None, None)
            frames = decoders.frames(kl_v) if kl_v is not None else None
            row(label, task, phi, waves, frames, mels)
        baseline_runs = [("svg", None)] + [(task, phi) for task in ("a2v", "v2a") for phi in config.phi]
        for task, phi in baseline_runs if baseline is not None else ():
            if log:
                log(f"mmldm evaluation: {baseline.label} {task}" + ("" if phi is None else f" phi {phi:g}")
                    + f", {len(ids)} clips x {config.steps} DDIM steps")
            waves, frames, mels = baseline.generate(task, ids, 1.0 if phi is None else phi, config.steps, config.seed,
                                                    config.batch_size, decoders, device, tick)
            row(baseline.label, task, phi, waves, frames, mels)
    return MmldmEvaluation(rows, ids, samples, seconds)


METRICS = ("FAD (aiSFX)", "FVD (EffNet-lite0)", "KVD (EffNet-lite0)")


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean and std over trainings (``seed``) of each (model, task, phi)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["phi"]), []).append(r)
    out = []
    for (name, task, phi), members in groups.items():
        entry = {"model": name, "task": task, "phi": phi, "clips": members[0]["clips"], "trainings": len({m.get("seed", 0) for m in members})}
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None and np.isfinite(m[metric])]
            if values:
                entry[metric] = (float(np.mean(values)), float(np.std(values)) if len(values) > 1 else None)
        out.append(entry)
    return out


def table_markdown(rows: Sequence[dict]) -> str:
    lines = ["| model | task | phi | trainings | clips | " + " | ".join(METRICS) + " |", "|---|---|---:|---:|---:|" + "---:|" * len(METRICS)]
    for r in summarise(rows):
        cells = []
        for m in METRICS:
            if m not in r:
                cells.append("")
                continue
            mean, std = r[m]
            cells.append(f"{mean:.3g}" + (f" +- {std:.2g}" if std is not None else ""))
        phi = "" if r["phi"] is None else f"{r['phi']:g}"
        lines.append(f"| {r['model']} | {r['task']} | {phi} | {r['trainings']} | {r['clips']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(store: FeatureStore, folder: str, evaluation: MmldmEvaluation) -> tuple[list[str], dict[str, str]]:
    """Sounding mp4s (H.264 + AAC) and a preview PNG (frame strip; mel) per sample set under ``folder``."""
    from stages.core.preview import preview_png
    from stages.features.frames import frames_preview_png
    from stages.ingest.demo import write_mp4

    urls, previews = [], {}
    for name, sample in evaluation.samples.items():
        slug = name.replace(" ", "_").replace(".", "p").replace(":", "").replace("(", "").replace(")", "")
        for i, clip in enumerate(evaluation.clip_ids[: len(sample["frames"])]):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "clip.mp4")
                write_mp4(path, sample["frames"][i], FRAMES_FPS, sample["audio"][i], VOCODER_RATE)
                target = posixpath.join(folder, f"{clip}__{slug}.mp4")
                with open(path, "rb") as handle:
                    store.write_bytes(target, handle.read())
                urls.append(store.url(target))
        png = frames_preview_png(sample["frames"], shown=16)
        path = posixpath.join(folder, f"{slug}__frames.png")
        store.write_bytes(path, png)
        previews[f"{name} frames"] = path
        if "mels" in sample:
            path = posixpath.join(folder, f"{slug}__mel.png")
            store.write_bytes(path, preview_png(mels=sample["mels"]))
            previews[f"{name} mel"] = path
    return urls, previews


def evaluate_reconstruction(store: FeatureStore, manifest: ClipManifest, autoencoder_key: str, mmldm_latent_key: str,
                            config: MmldmEvalConfig, device: str = "cpu", log: Callable[[str], None] | None = None,
                            towers: tuple | None = None, label: str = "MM-LDM") -> dict:
    """The reconstruction rows alone (ground truth, the autoencoder's reconstruction, the control) of the
    stored autoencoder ``autoencoder_key`` and its cached latents: Table 5's rFVD / rKVD / rFAD, no DiT."""
    from stages.mmldm.train import load_autoencoder

    if config.tasks:
        raise ValueError(f"a reconstruction-only evaluation takes no tasks, got {list(config.tasks)}")
    autoencoder, ae_sidecar = load_autoencoder(store, manifest.dataset, autoencoder_key, device)
    result = evaluate_mmldm(store, manifest, autoencoder, None, {"mmldm_latent_key": mmldm_latent_key}, ae_sidecar["vae_latent_key"],
                            config, device, log, 0, towers, label)
    for r in result.rows:
        r["seed"] = ae_sidecar["train_config"]["seed"]
        r["checkpoint"] = autoencoder_key
    return {"rows": result.rows, "table": table_markdown(result.rows), "clip_ids": result.clip_ids}


def evaluate_checkpoint(store: FeatureStore, manifest: ClipManifest, dit_key: str, config: MmldmEvalConfig, device: str = "cpu",
                        log: Callable[[str], None] | None = None, folder: str | None = None, keep_samples: int = 4,
                        towers: tuple | None = None, label: str = "MM-LDM") -> dict:
    """Evaluate the stored DiT ``dit_key`` (and the autoencoder it was trained on); write sounding
    mp4s and previews under ``folder`` when given. Returns {"rows", "table", "outputs", "previews", "clip_ids"}."""
    from stages.mmldm.train import load_autoencoder, load_dit

    dit, sidecar = load_dit(store, manifest.dataset, dit_key, device)
    autoencoder, ae_sidecar = load_autoencoder(store, manifest.dataset, sidecar["autoencoder_key"], device)
    result = evaluate_mmldm(store, manifest, autoencoder, dit, sidecar, ae_sidecar["vae_latent_key"], config, device, log,
                            keep_samples if folder else 0, towers, label)
    for r in result.rows:
        r["seed"] = sidecar["train_config"]["seed"]
        r["checkpoint"] = dit_key
    outputs, previews = write_outputs(store, folder, result) if folder else ([], {})
    return {"rows": result.rows, "table": table_markdown(result.rows), "outputs": outputs, "previews": previews,
            "clip_ids": result.clip_ids}
