"""Cross-modal retrieval metrics: query i's match is gallery item i, or any gallery item a
relevance matrix marks (several captions per clip; duplicates counted as hits)."""

from __future__ import annotations

import numpy as np

from stages.evaluation.base import FeatureBuffer, Metric


def match_ranks(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of the true match (the diagonal) in each query's row; ties count against it."""
    similarity = np.asarray(similarity, np.float64)
    true = np.diag(similarity)[:, None]
    return 1 + (similarity > true).sum(axis=1) + ((similarity == true).sum(axis=1) - 1)


def relevant_ranks(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scoring relevant gallery item (``relevant`` [Q, G] bool,
    at least one per row); ties with irrelevant items count against it. With the identity as
    ``relevant`` this is ``match_ranks``."""
    similarity, relevant = np.asarray(similarity, np.float64), np.asarray(relevant, bool)
    if relevant.shape != similarity.shape or not relevant.any(axis=1).all():
        raise ValueError(f"relevance {relevant.shape} must match similarity {similarity.shape} with a relevant item per query")
    best = np.where(relevant, similarity, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((similarity >= best) & ~relevant).sum(axis=1)


def owner_relevance(query_owner, gallery_owner) -> np.ndarray:
    """[Q, G] True where a query and a gallery item belong to the same clip (e.g. its captions)."""
    return np.asarray(query_owner)[:, None] == np.asarray(gallery_owner)[None, :]


def retrieval_metrics(query: np.ndarray, gallery: np.ndarray, ks=(1, 5, 10), relevant: np.ndarray | None = None) -> dict[str, float]:
    """R@k (in %), mean and median rank of L2-normalised (or any) embeddings by dot product.
    Without ``relevant`` query i's match is gallery item i; with it ([Q, G] bool) a query hits
    when any relevant item is in its top k (AudioCaps / Clotho: one query per caption)."""
    if relevant is None and len(query) != len(gallery) or not len(query):
        raise ValueError(f"need as many queries as gallery items (>0), got {len(query)} and {len(gallery)}")
    similarity = np.asarray(query) @ np.asarray(gallery).T
    ranks = match_ranks(similarity) if relevant is None else relevant_ranks(similarity, relevant)
    metrics = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    metrics.update(mean_rank=float(ranks.mean()), median_rank=float(np.median(ranks)), n=int(len(ranks)))
    return metrics


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class RetrievalRecall(Metric):
    """Streaming ``retrieval_metrics``: ``update(query, gallery)`` with row-paired batches [B, d]
    (query row i's match is gallery row i of the same call); ``compute()`` ranks every query
    against the whole accumulated gallery and returns R@k (%), mean / median rank and n.
    ``normalize=True`` L2-normalises both sides first (as ``normalize``)."""

    def __init__(self, ks=(1, 5, 10), normalize: bool = False) -> None:
        self.ks, self.normalize = tuple(ks), normalize
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.query, self.gallery = FeatureBuffer(), FeatureBuffer()

    def update(self, query: np.ndarray, gallery: np.ndarray) -> None:
        if len(query) != len(gallery):
            raise ValueError(f"need as many queries as gallery items per update, got {len(query)} and {len(gallery)}")
        self.query.add(query)
        self.gallery.add(gallery)
        self.updates += 1

    def compute(self) -> dict[str, float]:
        query, gallery = self.query.array(), self.gallery.array()
        if self.normalize:
            query, gallery = normalize(query), normalize(gallery)
        return retrieval_metrics(query, gallery, self.ks)
