"""Tables I (V2A) and II (T2A) of generated audio on aiSFX: reference audio, alignment, rows.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from stages.evaluation import alignment as alignment_metrics
from stages.evaluation import audio as audio_metrics
from stages.ingest.manifest import ClipManifest
from stages.core.parallel import torch_threads
from stages.core.store import FeatureStore
from stages.generation.sample import SampleConfig, cavp_audio_head, generate, make_decoder, write_wav
from stages.embeddings.spaces import get_space
from stages.generation.train import LatentPairs, load_latent_pairs

if TYPE_CHECKING:
    from models.generator import LatentGenerator


BASELINE, WITH_DIFFGAP, ORACLE = "baseline (no DiffGAP)", "DiffGAP", "oracle: VAE + vocoder of the real latent"
REAL = "real audio (the reference itself)"
# The generator trains on audio embeddings; this row conditions it on the clip's real one, i.e.
# what a perfect text/video -> audio bridge would hand it: the most DiffGAP could gain.
AUDIO_CONDITION = "condition: the real audio embedding (a perfect bridge)"
SAMPLED = (BASELINE, WITH_DIFFGAP, AUDIO_CONDITION)  # rows that depend on the sampling seed and steps


# ---- evaluation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    max_clips: int = 64
    oracle: bool = True  # also score the VAE + vocoder reconstruction of the real latents (the ceiling)
    audio_condition: bool = True  # also generate from the real audio embedding (AUDIO_CONDITION)
    alignment: alignment_metrics.AlignmentConfig = alignment_metrics.AlignmentConfig()
    # The alignment classifier trains on this split: the CAVP head was fitted on "train", where
    # aligned pairs are far more similar (demo: cosine 0.51) than on held-out clips (0.23).
    alignment_split: str = "val"


def reference_audio(manifest: ClipManifest, clip_ids: Sequence[str], seconds: float, rate: int) -> tuple[list[str], np.ndarray]:
    """The real audio of the clips at ``rate`` (clips that fail to decode are left out).

    Evaluation loads it at the generated audio's rate, so that real and generated audio reach
    aiSFX (44.1 kHz) with the same bandwidth: otherwise every metric would also score the
    vocoder's missing top octave."""
    from stages.ingest.decode import AudioSpec, ClipError, load_audio

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
    from stages.ingest.decode import ClipError, FrameSpec, load_frames

    index = manifest.index()
    spec = FrameSpec(fps=fps, size=64, seconds=seconds)
    envelopes = []
    for clip_id in clip_ids:
        try:
            envelopes.append(alignment_metrics.motion_envelope(load_frames(index[clip_id].uri, spec)))
        except ClipError as exc:
            raise ValueError(f"alignment: cannot decode the video of clip {clip_id}: {exc}") from None
    return np.stack(envelopes) if envelopes else np.zeros((0, spec.n_frames), np.float32)


def alignment_pairs(manifest: ClipManifest, pairs: LatentPairs, audio: np.ndarray, rate: int, seconds: float,
                    config: alignment_metrics.AlignmentConfig) -> alignment_metrics.AlignmentPairs:
    """The alignment classifier's view of the clips of ``pairs`` with the waveforms ``audio`` (rows paired)."""
    frames = int(round(seconds * config.fps))
    return alignment_metrics.AlignmentPairs(motion_envelopes(manifest, pairs.clip_ids, config.fps, seconds),
                            alignment_metrics.onset_envelopes(audio, rate, config.fps, frames),
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
        return alignment_metrics.train_alignment(alignment_pairs(manifest, fit, audio, rate, seconds, evaluation.alignment), evaluation.alignment)


def evaluate_space(
    store: FeatureStore, manifest: ClipManifest, space: str, generator: LatentGenerator, generator_sidecar: Mapping,
    diffgap_model, sample: SampleConfig, evaluation: EvalConfig, device: str = "cpu", log: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict[str, dict]]:
    """Rows of Table I (V2A: IS, KL, FD, Acc) or II (T2A: IS, KL, FAD, FD) on ``evaluation.split``:
    baseline, DiffGAP, (optionally) the real-audio-embedding condition and the oracle reconstruction,
    and the real audio; and per method its outputs (audio, and "aisfx": the aiSFX pooled /
    per-second / logits the metrics used)."""
    import torch

    from models.towers import AudioTower, get_tower

    task = get_space(space).task
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
        reference = audio_metrics.aisfx_outputs(tower, ref_wave, rate, decoder.seconds)
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
                scored = audio_metrics.aisfx_outputs(tower, out["audio"], rate, decoder.seconds)
        out["aisfx"] = scored
        metrics = audio_metrics.generation_metrics(scored, reference)
        row = {"task": task, "space": space, "method": method, "n": len(ids), "steps": sample.steps,
               "guidance_scale": sample.guidance_scale, "vocoder": sample.vocoder, **metrics}
        if alignment is not None:
            if method == REAL:
                row["Acc"] = alignment_metrics.alignment_accuracy(alignment, real_pairs)
            elif head is not None:
                video_seconds = test.per_second["video_per_second"].shape[1]
                with torch.no_grad():
                    audio_ps = head.embed_audio(torch.from_numpy(_fit_seconds(scored["per_second"], video_seconds))).numpy()
                onsets = alignment_metrics.onset_envelopes(out["audio"], rate, evaluation.alignment.fps, real_pairs.onsets.shape[1])
                row["Acc"] = alignment_metrics.alignment_accuracy(alignment, real_pairs.with_audio(onsets, audio_ps))
            else:
                row["Acc"] = float("nan")
            row["Acc (real pairs vs misaligned)"] = alignment_metrics.classifier_accuracy(alignment, real_pairs)
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
