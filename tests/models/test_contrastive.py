"""Contrastive heads: losses against hand-computed values, and learning on a toy paired set."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.contrastive import CavpHead, ClapHead, HeadConfig, info_nce, per_second_nce
from stages.embeddings.heads import CAVP_HEAD, CLAP_HEAD, HeadTrainConfig, PairedFeatures, embed, train_head
from stages.evaluation.retrieval import retrieval_metrics


def test_info_nce_matches_hand_computation():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    b = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    logits = 2.0 * (a @ b.T)
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2)))
    assert torch.isclose(info_nce(a, b, scale), expected)
    # a perfect, confident match costs almost nothing
    eye = torch.eye(4)
    assert info_nce(eye, eye, torch.tensor(100.0)) < 1e-6


def test_per_second_loss_uses_other_clips_and_shifted_seconds():
    # One clip, two seconds: without temporal negatives the only candidate is the positive (loss 0);
    # with them, the other second of the same clip competes.
    a = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), dim=-1)
    v = F.normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), dim=-1)
    scale = torch.tensor(1.0)
    assert per_second_nce(a, v, scale, temporal_negatives=False) == 0
    with_shift = per_second_nce(a, v, scale, temporal_negatives=True)
    # second 0: positive sim 1 vs shifted sim 1 -> log 2; second 1: positive 0 vs shifted 0 -> log 2
    assert math.isclose(float(with_shift), math.log(2), rel_tol=1e-6)


def test_heads_output_unit_vectors():
    clap = ClapHead(12, 8, HeadConfig(embed_dim=16, hidden_dim=32))
    assert torch.allclose(clap.embed_audio(torch.randn(5, 12)).norm(dim=-1), torch.ones(5))
    cavp = CavpHead(12, 20, HeadConfig(embed_dim=16, hidden_dim=32))
    per_second = cavp.embed_video(torch.randn(3, 4, 20))
    assert per_second.shape == (3, 4, 16) and torch.allclose(cavp.pool(per_second).norm(dim=-1), torch.ones(3))


def _toy_pairs(n: int, seed: int, seconds: int | None = None) -> PairedFeatures:
    """Two noisy linear views of shared latents: learnable, not identical."""
    rng = np.random.default_rng(seed)
    shape = (n, seconds, 6) if seconds else (n, 6)
    latent = rng.normal(size=shape)
    a = latent @ np.random.default_rng(100).normal(size=(6, 24)) + 0.3 * rng.normal(size=shape[:-1] + (24,))
    b = latent @ np.random.default_rng(101).normal(size=(6, 16)) + 0.3 * rng.normal(size=shape[:-1] + (16,))
    name = "video" if seconds else "text"
    return PairedFeatures([f"c{i}" for i in range(n)], {"audio": a.astype(np.float32), name: b.astype(np.float32)}, ["train"] * n)


def test_trained_clap_head_ranks_matching_pairs_first():
    config = HeadTrainConfig(steps=150, batch_size=32, eval_every=50, embed_dim=16, hidden_dim=32, dropout=0.0)
    result = train_head(CLAP_HEAD, _toy_pairs(200, 0), _toy_pairs(40, 1), config)
    test = _toy_pairs(40, 2)
    trained = embed(result.model, CLAP_HEAD, test.arrays)
    untrained = embed(ClapHead(24, 16, config.head_config()), CLAP_HEAD, test.arrays)
    assert retrieval_metrics(trained["text"], trained["audio"])["R@1"] > 60
    assert retrieval_metrics(trained["text"], trained["audio"])["R@1"] > 2 * retrieval_metrics(untrained["text"], untrained["audio"])["R@1"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # on a fixed pair, the matching caption scores above a mismatched one
    sims = trained["text"][:5] @ trained["audio"][:5].T
    assert (np.diag(sims) > sims.max(axis=1, initial=-1, where=~np.eye(5, dtype=bool))).sum() >= 4


def test_trained_cavp_head_aligns_per_second_and_pooled():
    config = HeadTrainConfig(steps=150, batch_size=32, eval_every=50, embed_dim=16, hidden_dim=32, dropout=0.0)
    result = train_head(CAVP_HEAD, _toy_pairs(150, 0, seconds=3), _toy_pairs(30, 1, seconds=3), config)
    out = embed(result.model, CAVP_HEAD, _toy_pairs(40, 2, seconds=3).arrays)
    assert out["audio_per_second"].shape == (40, 3, 16)
    assert retrieval_metrics(out["video"], out["audio"])["R@1"] > 50
