"""Distances between two sets of features, whatever tower made them.

    Frechet distance  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of Gaussian fits: FD / FAD on
                      audio-tower embeddings, FVD on frame- or video-tower embeddings, FID on images
    kernel distance   unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3: KID / KAD / KVD,
                      optionally averaged over random subsets (as the KID reference code)
    bootstrap         a seeded percentile confidence interval of any metric over paired or unpaired sets
    PCA               a projection fitted on reference / train features only, for Frechet distances of
                      sets too small for a full-rank covariance (n <= d)

Features are arrays [..., d]; leading axes are flattened into rows (per-second or per-frame
embeddings [N, S, d] count as N * S rows). No dagster here: usable from a notebook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from stages.evaluation.base import FeatureBuffer, Metric


def _rows(x: np.ndarray) -> np.ndarray:
    """[..., d] -> [N, d] (a 1-D array is one row)."""
    x = np.asarray(x)
    return x.reshape(-1, x.shape[-1])


# ---- Frechet distance ---------------------------------------------------------------------------

def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of rows [N, d]; N >= 2."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need [N >= 2, d] samples for a Gaussian fit, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (the FID / FAD formula).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
    symmetric PSD matrix with the same spectrum as S1 S2: two symmetric eigendecompositions instead of
    scipy's general sqrtm, which measured 20-50x slower at d = 512-1024 and needs an offset when the
    product is singular (here a zero eigenvalue is just a zero root).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    inner = root1 @ sigma2 @ root1
    trace_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)
    return max(value, 0.0)


def frechet_distance_of(generated: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two sets of embeddings [N, d] (leading axes flattened).

    Any tower's features: FD / FAD on audio embeddings, FVD on frame-tower embeddings [N, T, d]."""
    g = np.asarray(generated).reshape(-1, np.asarray(generated).shape[-1])
    r = np.asarray(reference).reshape(-1, np.asarray(reference).shape[-1])
    return frechet_distance(*gaussian_fit(g), *gaussian_fit(r))


class GeneratedVsReference(Metric):
    """A distance between two feature sets gathered in batches: ``update(generated=...,
    reference=...)`` with features [..., d] (either side may be left out of a call)."""

    def reset(self) -> None:
        super().reset()
        self.generated, self.reference = FeatureBuffer(), FeatureBuffer()

    def update(self, generated: np.ndarray | None = None, reference: np.ndarray | None = None) -> None:
        if generated is not None:
            self.generated.add(generated)
        if reference is not None:
            self.reference.add(reference)
        self.updates += 1


class FrechetDistance(GeneratedVsReference):
    """Streaming ``frechet_distance_of``; ``compute()`` fits both sets."""

    def compute(self) -> float:
        return frechet_distance_of(self.generated.array(), self.reference.array())


# ---- kernel distance (KID / KVD) ----------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef)^degree for rows [M, d] x [N, d] -> [M, N]; gamma = 1 / d by default."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                  coef: float = 1.0) -> float:
    """Unbiased MMD^2 of rows x [M, d] and y [N, d] (M, N >= 2) under the polynomial kernel:

        sum_{i != j} k(x_i, x_j) / (M (M - 1)) + sum_{i != j} k(y_i, y_j) / (N (N - 1)) - 2 mean_ij k(x_i, y_j)

    Zero in expectation when both sets come from one distribution, so it can come out negative."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) < 2 or len(y) < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need rows [M >= 2, d] and [N >= 2, d], got shapes {x.shape} and {y.shape}")
    m, n = len(x), len(y)
    kxx = polynomial_kernel(x, x, degree, gamma, coef)
    kyy = polynomial_kernel(y, y, degree, gamma, coef)
    kxy = polynomial_kernel(x, y, degree, gamma, coef)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_distance_subsets(generated: np.ndarray, reference: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                            seed: int = 0, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> np.ndarray:
    """``mmd2_unbiased`` on ``subsets`` random subsets [subsets]: each draws min(subset_size, N) rows
    of each set without replacement (generated first, then reference) from ``default_rng(seed)``."""
    g, r = _rows(generated), _rows(reference)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    rng = np.random.default_rng(seed)
    m, n = min(subset_size, len(g)), min(subset_size, len(r))
    values = []
    for _ in range(subsets):
        gi = rng.choice(len(g), m, replace=False)
        ri = rng.choice(len(r), n, replace=False)
        values.append(mmd2_unbiased(g[gi], r[ri], degree, gamma, coef))
    return np.asarray(values)


def kernel_distance(generated: np.ndarray, reference: np.ndarray, subsets: int | None = None, subset_size: int = 1000,
                    seed: int = 0, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """Kernel distance (KID-style; KVD on video features) of two feature sets [..., d]: the unbiased
    polynomial-kernel MMD^2 of all rows (``subsets=None``) or its mean over ``subsets`` random subsets
    (``kernel_distance_subsets``; their std is the spread KID reports)."""
    if subsets is None:
        return mmd2_unbiased(_rows(generated), _rows(reference), degree, gamma, coef)
    return float(np.mean(kernel_distance_subsets(generated, reference, subsets, subset_size, seed, degree, gamma, coef)))


class KernelDistance(GeneratedVsReference):
    """Streaming ``kernel_distance``; ``compute()`` runs it with the constructor's settings."""

    def __init__(self, subsets: int | None = None, subset_size: int = 1000, seed: int = 0, degree: int = 3,
                 gamma: float | None = None, coef: float = 1.0) -> None:
        self.settings = {"subsets": subsets, "subset_size": subset_size, "seed": seed, "degree": degree, "gamma": gamma, "coef": coef}
        super().__init__()

    def compute(self) -> float:
        return kernel_distance(self.generated.array(), self.reference.array(), **self.settings)


# ---- dimension reduction for small sets ---------------------------------------------------------

class PcaProjection(NamedTuple):
    """x -> (x - mean) @ components.T on the last axis; fitted by ``pca_fit``."""

    mean: np.ndarray  # [d]
    components: np.ndarray  # [k, d], orthonormal rows, largest variance first
    explained: float  # share of the fitted rows' variance the k components keep

    @property
    def dims(self) -> int:
        return len(self.components)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return (x - self.mean) @ self.components.T


def pca_fit(reference: np.ndarray, dims: int) -> PcaProjection:
    """PCA of ``reference`` rows [..., d] (leading axes flattened) to ``dims`` components.

    A Gaussian fit of n <= d rows has a singular covariance, and its Frechet distance then measures
    the sample size as much as the sets. Fit the projection on the reference side (e.g. the train
    split's real embeddings), never on the set under test, and apply it to both sets."""
    rows = _rows(reference).astype(np.float64)
    if not 1 <= dims <= rows.shape[1] or dims > len(rows) - 1:
        raise ValueError(f"PCA to {dims} dims needs 1 <= dims <= min(d, rows - 1), got d = {rows.shape[1]}, {len(rows)} rows")
    mean = rows.mean(axis=0)
    _, singular, vt = np.linalg.svd(rows - mean, full_matrices=False)
    variance = singular**2
    return PcaProjection(mean, vt[:dims], float(variance[:dims].sum() / max(variance.sum(), 1e-300)))


def full_rank_dims(rows: int, dim: int) -> int:
    """Dimension at which a set of ``rows`` rows (and a bootstrap resample of it, ~63% distinct
    rows) still has a full-rank covariance: min(dim, (rows - 1) // 2)."""
    return max(1, min(dim, (rows - 1) // 2))


# ---- bootstrap confidence interval --------------------------------------------------------------

class ConfidenceInterval(NamedTuple):
    value: float  # the metric on the full sets
    low: float
    high: float
    confidence: float


def bootstrap_interval(metric: Callable[..., float], *samples: np.ndarray, paired: bool = True, resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``metric(*samples)``.

    paired=True: the samples are rows of the same items (equal lengths; e.g. reference and generated
    logits of one clip for paired KL, or query/gallery pairs), so each resample draws one set of row
    indices, with replacement, used for every sample. paired=False: each sample is resampled on its
    own (e.g. generated vs reference features for FD / KID). The draws come from ``default_rng(seed)``
    in a fixed order, so one seed gives one interval. ``low``/``high`` are the (1 -+ confidence) / 2
    quantiles of the resampled metric values (numpy's linear interpolation)."""
    if not samples:
        raise ValueError("bootstrap_interval needs at least one sample")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    arrays = [np.asarray(s) for s in samples]
    lengths = [len(a) for a in arrays]
    if min(lengths) < 1:
        raise ValueError(f"cannot bootstrap an empty sample, got lengths {lengths}")
    if paired and len(set(lengths)) != 1:
        raise ValueError(f"paired bootstrap needs samples of one length, got {lengths}")
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for b in range(resamples):
        if paired:
            rows = rng.integers(0, lengths[0], size=lengths[0])
            values[b] = metric(*(a[rows] for a in arrays))
        else:
            values[b] = metric(*(a[rng.integers(0, len(a), size=len(a))] for a in arrays))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return ConfidenceInterval(float(metric(*arrays)), float(low), float(high), float(confidence))
