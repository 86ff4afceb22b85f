"""The streaming form of a metric: ``update(...)`` with each batch, ``compute()`` at the end,
``reset()`` to start again (torchmetrics style, plain numpy).

A metric object only accumulates its inputs; ``compute()`` calls the metric's function on what it
has seen, so the object and the function always agree.
"""

from __future__ import annotations

import numpy as np


class Metric:
    """Base of the metric objects. Subclasses implement ``update`` and ``compute`` and keep their
    state in attributes that ``reset`` restores (override ``reset`` and call ``super().reset()``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.updates = 0

    def update(self, *args, **kwargs) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self):  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(updates={self.updates})"


class FeatureBuffer:
    """Rows [*, d] appended batch by batch; ``array()`` is their concatenation [N, d] (leading axes
    of each batch flattened, as the feature metrics do)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError("need features [..., d], got a scalar")
        x = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
        if self.parts and x.shape[1] != self.parts[0].shape[1]:
            raise ValueError(f"feature width changed between updates: {self.parts[0].shape[1]} then {x.shape[1]}")
        self.parts.append(x)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def array(self) -> np.ndarray:
        if not self.parts:
            raise ValueError("no features accumulated: call update() first")
        return np.concatenate(self.parts)
