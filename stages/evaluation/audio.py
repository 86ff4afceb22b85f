"""Generation metrics on the packaged aiSFX audio model (AudioLDM / Diff-Foley metric set).

    FD (aiSFX)   Frechet distance of Gaussian fits of pooled aiSFX embeddings, generated vs reference
    FAD (aiSFX)  the same on per-block (per-second) aiSFX embeddings (as FAD uses per-frame VGGish)
    KL (aiSFX)   paired: mean KL(softmax(ref logits) || softmax(gen logits)) over the 69 ucsMixed classes
    IS (aiSFX)   exp E_x[KL(p(y|x) || p(y))] of the generated audio's class posteriors
    Acc          share of (video, generated audio) pairs a small alignment classifier calls aligned
                 (evidence: motion/onset envelope cross-correlation + CAVP per-second similarities)

The numbers are on aiSFX (6.2M-param CNN, 69 classes), not PANNs / VGGish: they are comparable
between rows of one table, not with the paper's values.

No dagster here: usable from a notebook.
"""

from __future__ import annotations

import numpy as np

# FD / FAD are feature-agnostic: they live in stages.evaluation.distribution (with FVD, KID, the
# bootstrap) and keep their old names here.
from stages.evaluation.distribution import (  # noqa: F401
    frechet_distance,
    frechet_distance_of,
    gaussian_fit,
)

EPS = 1e-12


# ---- class-posterior metrics --------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) of probability vectors (0 log 0 = 0)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return np.sum(np.where(p > 0, p * (np.log(np.maximum(p, EPS)) - np.log(np.maximum(q, EPS))), 0.0), axis=-1)


def paired_kl(reference_logits: np.ndarray, generated_logits: np.ndarray) -> float:
    """Mean over pairs of KL(softmax(reference) || softmax(generated))."""
    if np.shape(reference_logits) != np.shape(generated_logits):
        raise ValueError(f"paired KL needs equal shapes, got {np.shape(reference_logits)} and {np.shape(generated_logits)}")
    return float(np.mean(kl_divergence(softmax(reference_logits), softmax(generated_logits))))


def inception_score_from_probs(probs: np.ndarray) -> float:
    """exp(E_x[KL(p(y|x) || p(y))]) with p(y) the mean of the rows."""
    probs = np.asarray(probs, np.float64)
    marginal = probs.mean(axis=0, keepdims=True)
    return float(np.exp(np.mean(kl_divergence(probs, marginal))))


def inception_score(logits: np.ndarray) -> float:
    return inception_score_from_probs(softmax(logits))


# ---- aiSFX embeddings of waveforms --------------------------------------------------------------

def to_aisfx_rate(audio: np.ndarray, rate: int, target: int = 44100) -> np.ndarray:
    """Resample [B, L] float waveforms to aiSFX's rate (soxr HQ)."""
    audio = np.asarray(audio, np.float32)
    if rate == target:
        return audio
    import soxr

    return np.stack([soxr.resample(a, rate, target, quality="HQ").astype(np.float32) for a in audio]) if len(audio) else audio


def aisfx_outputs(tower, audio: np.ndarray, rate: int, seconds: float, batch: int = 8) -> dict[str, np.ndarray]:
    """The AudioTower's pooled [B, 512], per_second [B, S, 512] and logits [B, 69] of waveforms at
    ``rate``, cut or zero-padded to ``seconds``."""
    wave = to_aisfx_rate(audio, rate, tower.sample_rate)
    length = int(round(seconds * tower.sample_rate))
    if wave.shape[1] < length:
        wave = np.pad(wave, ((0, 0), (0, length - wave.shape[1])))
    wave = wave[:, :length]
    parts = [tower.embed(wave[i : i + batch], seconds) for i in range(0, len(wave), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("pooled", "per_second", "logits")}


def generation_metrics(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """IS, KL, FAD, FD (aiSFX) of generated vs reference aiSFX outputs (rows paired by clip)."""
    return {
        "IS (aiSFX)": inception_score(generated["logits"]),
        "KL (aiSFX)": paired_kl(reference["logits"], generated["logits"]),
        "FAD (aiSFX)": frechet_distance_of(generated["per_second"], reference["per_second"]),
        "FD (aiSFX)": frechet_distance_of(generated["pooled"], reference["pooled"]),
    }
