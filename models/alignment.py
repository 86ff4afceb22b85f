"""The alignment classifier of Diff-Foley's Acc: aligned vs shifted (video, audio) envelope pairs.

Trained and scored by stages.evaluation.alignment, whose AlignmentConfig it takes.
"""

from __future__ import annotations

import torch
from torch import nn


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)


class AlignmentClassifier(nn.Module):
    """p(aligned | video, audio) from two kinds of evidence, never from raw embeddings:

    * timing: the cross-correlation of the standardised motion and onset envelopes at lags
      -max_lag..max_lag frames (aligned pairs peak at lag 0; shifted pairs elsewhere or nowhere);
    * content: the S x S cosine matrix of CAVP per-second embeddings (swapped pairs are all low).

    An MLP on the raw embeddings memorised the demo's training pairs (train positives p 0.86, test
    positives 0.001); the similarity matrix alone scored 55% on held-out real pairs, because
    per-second embeddings barely see a shift smaller than a second.
    """

    def __init__(self, seconds: int, config):
        # config: stages.evaluation.alignment.AlignmentConfig (max_lag, hidden; kept for fps / min_shift)
        super().__init__()
        self.seconds, self.config, self.max_lag = seconds, config, config.max_lag
        self.net = nn.Sequential(nn.Linear(seconds * seconds + 2 * config.max_lag + 1, config.hidden), nn.SiLU(),
                                 nn.Linear(config.hidden, 1))

    def features(self, motion: torch.Tensor, onsets: torch.Tensor, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        zm, zo = _standardise(motion), _standardise(onsets)
        lags = torch.stack([(zm * torch.roll(zo, k, dims=-1)).mean(-1) for k in range(-self.max_lag, self.max_lag + 1)], dim=-1)
        sims = torch.einsum("bsd,btd->bst", nn.functional.normalize(video, dim=-1), nn.functional.normalize(audio, dim=-1))
        return torch.cat([lags, 5.0 * sims.flatten(1)], dim=1)

    def forward(self, motion, onsets, video, audio) -> torch.Tensor:
        return self.net(self.features(motion, onsets, video, audio)).squeeze(-1)
