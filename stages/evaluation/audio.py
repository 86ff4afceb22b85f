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


EPS = 1e-12


# ---- Frechet distance ---------------------------------------------------------------------------

def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of rows [N, d]; N >= 2."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need [N >= 2, d] samples for a Gaussian fit, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (the FID / FAD formula)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals (as the reference FID code does)
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def frechet_distance_of(generated: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two sets of embeddings [N, d] (leading axes flattened)."""
    g = np.asarray(generated).reshape(-1, np.asarray(generated).shape[-1])
    r = np.asarray(reference).reshape(-1, np.asarray(reference).shape[-1])
    return frechet_distance(*gaussian_fit(g), *gaussian_fit(r))


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
