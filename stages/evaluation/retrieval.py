"""Cross-modal retrieval metrics: query i's match is gallery item i."""

from __future__ import annotations

import numpy as np


def match_ranks(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of the true match (the diagonal) in each query's row; ties count against it."""
    similarity = np.asarray(similarity, np.float64)
    true = np.diag(similarity)[:, None]
    return 1 + (similarity > true).sum(axis=1) + ((similarity == true).sum(axis=1) - 1)


def retrieval_metrics(query: np.ndarray, gallery: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k (in %), mean and median rank of L2-normalised (or any) embeddings by dot product."""
    if len(query) != len(gallery) or not len(query):
        raise ValueError(f"need as many queries as gallery items (>0), got {len(query)} and {len(gallery)}")
    ranks = match_ranks(np.asarray(query) @ np.asarray(gallery).T)
    metrics = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    metrics.update(mean_rank=float(ranks.mean()), median_rank=float(np.median(ranks)), n=int(len(ranks)))
    return metrics


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
