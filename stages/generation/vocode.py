"""The way back to sound: VAE latent -> audio image -> log-mel -> waveform (HiFi-GAN, 22.05 kHz).

    latents (scaled)  --stages.vae.train.decode_latents-->  audio images uint8 [B, 64, 64, 3]
                      --stages.features.spectral.audio_image_to_mel-->  log-mel [B, 80, T] (hifigan22k)
                      --models.vocoder.Vocoder-->  waveform float32 [B, 256 T]

Only the ``hifigan22k`` preset can be vocoded: the vocoder was trained on exactly that mel.
``log_mel_error`` is the figure the tests and the report use to say how close a waveform's
log-mel is to the one it was made from.

    from stages.generation.vocode import vocode_latents
    audio = vocode_latents(store, "demo", clip_ids=["demo_000001"])   # {clip id: waveform}

No dagster here: usable from a notebook.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from stages.core.errors import ConfigError
from models.constants import FMAX, FMIN, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE
from stages.features.spectral import MelPreset, MelSpectrogram, audio_image_to_mel, get_preset
from stages.core.store import FeatureStore

if TYPE_CHECKING:
    from models.vocoder import Vocoder

VOCODER_PRESET = "hifigan22k"
# Bins quieter than this (natural log) are inaudible and are not scored (the audio images' floor).
AUDIBLE_LOG_FLOOR = math.log(1e-5)


class VocodeError(ConfigError):
    """The mels cannot be vocoded as asked (wrong preset); one line saying what to use."""


def check_vocoder_preset(preset: str | MelPreset) -> MelPreset:
    """The preset, if the vocoder was trained on exactly its mel; else a one-line VocodeError."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    wanted = (SAMPLE_RATE, N_FFT, HOP_LENGTH, N_MELS, FMIN, FMAX, "ln", 1.0, "slaney")
    have = (p.sample_rate, p.n_fft, p.hop_length, p.n_mels, p.fmin, p.fmax, p.compression, p.power, p.mel_norm)
    if have != wanted:
        raise VocodeError(
            f"mel preset {p.name!r} cannot be vocoded: the HiFi-GAN vocoder needs the {VOCODER_PRESET!r} mel "
            "(22050 Hz, n_fft 1024, hop 256, 80 slaney mels 0-8000 Hz, natural log)"
        )
    return p


def images_to_mels(images: np.ndarray, preset: str | MelPreset = VOCODER_PRESET, seconds: float = 4.0) -> np.ndarray:
    """Audio images uint8 [B, H, W, 3] -> log-mels [B, n_mels, frames of ``seconds``]."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return audio_image_to_mel(np.asarray(images), p, p.n_frames(seconds))


def mels_to_audio(mels: np.ndarray, vocoder: Vocoder | None = None, preset: str | MelPreset = VOCODER_PRESET) -> np.ndarray:
    """Log-mels [B, 80, T] of the hifigan22k preset -> float32 waveforms [B, 256 T] at 22.05 kHz."""
    from models.vocoder import get_vocoder

    check_vocoder_preset(preset)
    return (vocoder or get_vocoder())(mels)


def latents_to_audio(
    vae, latents: np.ndarray, scaling_factor: float, vocoder: Vocoder | None = None,
    preset: str | MelPreset = VOCODER_PRESET, seconds: float = 4.0,
) -> dict[str, np.ndarray]:
    """Scaled audio latents [B, C, h, w] -> {"images", "mels", "audio"} along the whole way back."""
    from stages.vae.train import decode_latents

    p = check_vocoder_preset(preset)
    images = decode_latents(vae, latents, scaling_factor)
    mels = images_to_mels(images, p, seconds)
    return {"images": images, "mels": mels, "audio": mels_to_audio(mels, vocoder, p)}


def vocode_latents(
    store: FeatureStore, dataset: str, key: str | None = None, clip_ids: Sequence[str] | None = None,
    vocoder: Vocoder | None = None, device: str = "cpu", seconds: float | None = None,
) -> dict[str, np.ndarray]:
    """Waveforms of stored ``vae_latents`` audio posterior means (all, or ``clip_ids``), with the VAE and scaling
    factor named in the shards' manifests. ``seconds`` defaults to the mels' clip length."""
    from stages.features.latents import LATENT_FEATURE, latent_vaes, read_latent_means
    from stages.vae.train import load_vae

    key = store.resolve_key(dataset, LATENT_FEATURE, key)
    vaes = latent_vaes(store, dataset, key)
    if "audio" not in vaes:
        raise VocodeError(f"{LATENT_FEATURE} key {key} holds no audio latents (modalities: {sorted(vaes)})")
    table = read_latent_means(store, dataset, key, ["audio"])  # the posterior means: the clip's own reconstruction
    rows = list(range(len(table))) if clip_ids is None else [table.clip_ids.index(c) for c in clip_ids]
    vae, sidecar = load_vae(store, dataset, vaes["audio"]["name"], vaes["audio"]["key"], device)
    preset = sidecar.get("mel_preset", VOCODER_PRESET)
    seconds = float(seconds if seconds is not None else sidecar.get("mel_seconds", 4.0))
    out = latents_to_audio(vae, table.arrays["audio"][rows], vaes["audio"]["scaling_factor"], vocoder, preset, seconds)
    return {table.clip_ids[i]: wave for i, wave in zip(rows, out["audio"])}


# ---- how close is it ------------------------------------------------------------------------------

def log_mel_error(reference: np.ndarray, estimate: np.ndarray, floor: float = AUDIBLE_LOG_FLOOR) -> float:
    """Mean |delta log-mel| (natural log) over the bins where the reference is above ``floor``.

    Frames are aligned at the start and cut to the shorter of the two.
    """
    reference, estimate = np.asarray(reference, np.float32), np.asarray(estimate, np.float32)
    frames = min(reference.shape[-1], estimate.shape[-1])
    reference, estimate = reference[..., :frames], estimate[..., :frames]
    audible = reference > floor
    if not audible.any():
        raise ValueError(f"no reference bin above {floor:.2f}: nothing audible to compare")
    return float(np.abs(reference - estimate)[audible].mean())


def waveform_log_mel_error(reference_mels: np.ndarray, audio: np.ndarray, preset: str | MelPreset = VOCODER_PRESET) -> float:
    """``log_mel_error`` between log-mels and the log-mel of waveforms (re-analysed with the preset)."""
    return log_mel_error(reference_mels, MelSpectrogram(preset)(np.asarray(audio, np.float32)))


@dataclass
class RealTimeFactor:
    audio_seconds: float
    compute_seconds: float

    @property
    def ratio(self) -> float:
        """Seconds of audio per second of compute (> 1: faster than real time)."""
        return self.audio_seconds / self.compute_seconds if self.compute_seconds > 0 else float("inf")


def measure_real_time_factor(vocoder: Vocoder, mels: np.ndarray, repeats: int = 1) -> tuple[RealTimeFactor, np.ndarray]:
    """Best-of-``repeats`` wall time of vocoding ``mels`` (after a warm-up call on a short slice),
    and the waveforms."""
    vocoder(mels[:1, :, :16])
    best, waves = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        waves = vocoder(mels)
        best = min(best, time.perf_counter() - start)
    return RealTimeFactor(mels.shape[0] * mels.shape[-1] * HOP_LENGTH / SAMPLE_RATE, best), waves
