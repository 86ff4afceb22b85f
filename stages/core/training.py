"""Pieces every training loop of a lineage-fitted model shares (CMMD, MM-LDM's DiT and autoencoder)."""

from __future__ import annotations

import numpy as np


def warmup_cosine(optimizer, total: int):
    """LambdaLR: linear warm-up over 5% of ``total`` steps, then cosine to 1% of the peak."""
    import torch

    warmup = max(1, total // 20)
    lr_at = lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, max(0, i + 1 - warmup) / max(1, total - warmup)))) + 1e-2
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def batch_rows(rng: np.random.Generator, rows_new: np.ndarray, rows_old: np.ndarray, batch: int, warm: bool,
               replay_fraction: float) -> np.ndarray:
    """One step's rows: from scratch, ``batch`` of ``rows_new``; a warm start mixes new clips with
    ``replay_fraction`` of replayed old ones (so the model does not forget them)."""
    if warm and len(rows_old):
        n_old = int(round(batch * replay_fraction))
        return np.concatenate([rng.choice(rows_new, batch - n_old), rng.choice(rows_old, n_old)])
    return rng.choice(rows_new, batch, replace=len(rows_new) < batch)
