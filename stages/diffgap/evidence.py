"""Evidence over trainings: is one retrieval method better than another, beyond training noise?

Input: per training (one seed of the heads and of DiffGAP), the 1-based rank of every test
query's match under each method (``stages.diffgap.evaluate.direction_ranks``). Two levels:

- within a training, the two methods are paired over the same queries: the difference of their
  hits at k per query, its mean (the R@k gain in points) and standard error;
- over trainings, those per-training gains are the sample: their mean, spread (std, ddof 1), a
  one-sample t test against 0 (T - 1 degrees of freedom) and how many trainings the method won.

With one training only the within-training paired test is left (said by ``trainings`` = 1 and an
empty over-trainings p).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def hits(ranks: Sequence[int], k: int = 1) -> np.ndarray:
    return (np.asarray(ranks) <= k).astype(np.float64)


def _t_p(mean: float, se: float, df: int) -> tuple[float, float]:
    """Two-sided one-sample t test of mean = 0; (nan, nan) when undefined."""
    if df < 1 or not np.isfinite(se):
        return float("nan"), float("nan")
    if se == 0:
        return (float("inf") if mean else float("nan")), (0.0 if mean else 1.0)
    from scipy import stats

    t = mean / se
    return float(t), float(2 * stats.t.sf(abs(t), df))


def paired_within(method: Sequence[int], baseline: Sequence[int], k: int = 1) -> dict:
    """One training: gain of ``method`` over ``baseline`` in R@k points, paired over queries."""
    diff = 100 * (hits(method, k) - hits(baseline, k))
    if len(diff) != len(hits(baseline, k)) or not len(diff):
        raise ValueError("paired ranks need the same, non-empty query list")
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    t, p = _t_p(float(diff.mean()), se, len(diff) - 1)
    return {"gain": float(diff.mean()), "se": se, "t": t, "p": p, "queries": int(len(diff))}


def paired_over_trainings(trainings: Sequence[Mapping[str, Sequence[int]]], method: str, baseline: str, k: int = 1) -> dict:
    """Gain of ``method`` over ``baseline`` (R@k points): paired over queries within each training,
    then the spread of that gain over trainings and a t test of it against 0."""
    within = [paired_within(t[method], t[baseline], k) for t in trainings]
    gains = np.array([w["gain"] for w in within])
    n = len(gains)
    spread = float(gains.std(ddof=1)) if n > 1 else float("nan")
    t, p = _t_p(float(gains.mean()), spread / math.sqrt(n) if n > 1 else float("nan"), n - 1)
    return {
        "gain": float(gains.mean()), "gain_std": spread, "t": t, "p": p,
        "wins": int((gains > 0).sum()), "losses": int((gains < 0).sum()), "trainings": n,
        "within_se": float(np.mean([w["se"] for w in within])),  # typical per-training standard error
        "within_p": [w["p"] for w in within],
        "queries": sorted({w["queries"] for w in within}),
    }


def recall_over_trainings(trainings: Sequence[Mapping[str, Sequence[int]]], method: str, k: int = 1) -> dict:
    """R@k (%) of one method: mean and std over trainings."""
    values = np.array([100 * hits(t[method], k).mean() for t in trainings])
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "trainings": int(len(values))}
