"""Mean and std per index of one axis, over every other axis, accumulated part by part.

Statistics of a split (the mel statistics of mel latents, the latent statistics of a VAE) are read
shard by shard; ``AxisMoments`` merges the parts exactly (Chan et al.'s pairwise update, float64),
so no split is ever held in memory whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AxisMoments:
    count: int  # values per index of the axis
    mean: np.ndarray  # [size of the axis] float64
    m2: np.ndarray  # sum of squared deviations from ``mean``, per index

    @classmethod
    def of(cls, values: np.ndarray, axis: int) -> "AxisMoments":
        x = np.asarray(values, np.float64)
        x = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        mean = x.mean(axis=1)
        return cls(x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(axis=1))

    def merged(self, other: "AxisMoments") -> "AxisMoments":
        count = self.count + other.count
        delta = other.mean - self.mean
        return AxisMoments(count, self.mean + delta * (other.count / count),
                           self.m2 + other.m2 + delta**2 * (self.count * other.count / count))

    @staticmethod
    def add(total: "AxisMoments | None", values: np.ndarray, axis: int) -> "AxisMoments":
        """``total`` merged with the moments of ``values`` (``total`` None: those moments alone)."""
        part = AxisMoments.of(values, axis)
        return part if total is None else total.merged(part)

    @property
    def std(self) -> np.ndarray:
        """Population std per index."""
        return np.sqrt(self.m2 / self.count)

    def overall(self) -> tuple[float, float]:
        """(mean, population std) of every value together (each index holds ``count`` values)."""
        mean = float(self.mean.mean())
        second = float(np.mean(self.m2 / self.count + self.mean**2))
        return mean, max(second - mean**2, 0.0) ** 0.5
