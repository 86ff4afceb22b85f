"""Progress of a long step: `done/total`, rate and ETA, logged at a sensible rate.

Stages take a ``log: Callable[[str], None]`` (assets pass ``context.log.info``, which reaches the
Dagster event log and the terminal); a ``Progress`` turns many small advances into one line every
``interval`` seconds, plus the first and the last, so a 3000-step fit logs a dozen lines, not 3000.
Training loops keep their losses in a ``LossWindow``: read back from the device in batches, checked
for NaN / Inf with the step they came from.
"""

from __future__ import annotations

import time
from typing import Callable


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`: short and unambiguous in a log line."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Progress:
    """Counts work done toward a known total and logs `label: done/total unit (pct), rate, ETA`.

    ``label`` says which work this is (e.g. ``diffgap clap seed 1``); ``extra`` keyword values given
    to ``advance`` (a loss, the current split) are appended to the line; a value may be a function
    of no arguments, called only when a line is logged (a loss on the GPU is read, and the device
    waited for, a dozen times per fit rather than every step). Nothing is logged when ``log`` is
    None, so stages can always make one. ``done`` starts a resumed run part-way: the rate and the
    ETA count only the work of this run.
    """

    def __init__(self, label: str, total: int, unit: str = "", log: Callable[[str], None] | None = None,
                 interval: float = 10.0, clock: Callable[[], float] = time.monotonic, done: int = 0):
        self.label = label
        self.total = max(0, int(total))
        self.unit = unit
        self.log = log
        self.interval = interval
        self.clock = clock
        self.done = self._first = max(0, int(done))
        self.started = clock()
        self._last_logged: float | None = None
        self.lines: list[str] = []  # what was logged, for summaries and tests

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta_seconds(self) -> float | None:
        """Seconds left at the mean rate so far; None before the first unit of work is done."""
        if self.done <= self._first or self.total <= 0:
            return None
        return self.elapsed / (self.done - self._first) * max(0, self.total - self.done)

    def line(self, **extra) -> str:
        unit = f" {self.unit}" if self.unit else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.label}: {self.done}/{self.total}{unit}{pct}"]
        elapsed = self.elapsed
        if self.done > self._first and elapsed > 0:
            rate = (self.done - self._first) / elapsed
            parts.append(f"{rate:.3g} {self.unit or 'items'}/s" if rate >= 1 else f"{1 / rate:.3g} s per {self.unit.rstrip('s') or 'item'}")
        eta = self.eta_seconds()
        if self.done >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        elif eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        for name, value in extra.items():
            value = value() if callable(value) else value
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        return ", ".join(parts)

    def _emit(self, **extra) -> None:
        self._last_logged = self.clock()
        text = self.line(**extra)
        self.lines.append(text)
        if self.log is not None:
            self.log(text)

    def start(self, **extra) -> "Progress":
        """Log the first line (`0/total`), so a long step says what it is about to do."""
        self._emit(**extra)
        return self

    def due(self) -> bool:
        """Whether the next ``advance`` logs a line unless it finishes (``interval`` seconds passed)."""
        return self._last_logged is None or self.clock() - self._last_logged >= self.interval

    def advance(self, count: int = 1, **extra) -> bool:
        """Count ``count`` more units; log when ``interval`` seconds passed since the last line, and at
        the end. Returns whether it logged."""
        self.done = min(self.total, self.done + count) if self.total else self.done + count
        finished = self.total and self.done >= self.total
        if finished or self.due():
            self._emit(**extra)
            return True
        return False


class LossWindow:
    """A training loop's losses, read back from the device in batches instead of every step.

    ``add`` keeps each step's loss tensor; ``check`` reads the pending ones at once (one wait for
    the device), fails on the first non-finite one with the step it came from, and returns the
    latest value; ``take`` returns the values checked since the last ``take`` (for running means).
    On CPU reading a loss costs nothing, and the values are exactly ``loss.item()``'s.
    """

    PENDING_LIMIT = 256  # read back at least this often, whatever the evaluation interval

    def __init__(self, what: str):
        self.what = what  # "DiffGAP loss": the error says "<what> became nan at step 7"
        self.last = float("nan")
        self._pending: list = []
        self._values: list[float] = []

    def add(self, step: int, loss) -> None:
        self._pending.append((step, loss.detach()))
        if len(self._pending) >= self.PENDING_LIMIT:
            self.check()

    def check(self) -> float:
        if self._pending:
            import math

            import torch

            values = torch.stack([loss for _, loss in self._pending]).tolist()
            for (step, _), value in zip(self._pending, values):
                if not math.isfinite(value):
                    raise FloatingPointError(f"{self.what} became {value} at step {step}; lower learning_rate")
            self._pending.clear()
            self._values.extend(values)
            self.last = values[-1]
        return self.last

    def take(self) -> list[float]:
        self.check()
        values, self._values = self._values, []
        return values
