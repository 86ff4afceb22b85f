"""Rhythm metrics of generated audio: beat / onset hit rate (as in CMMD's evaluation).

    hit rate   share of the reference (ground-truth) events that have an estimated (generated-audio)
               event within +-tolerance seconds; CMMD reports it at +-0.1 s and +-0.5 s
    coverage   estimated events per reference event (a high hit rate from a flood of events shows here)

The metrics are pure functions of event times in seconds (1-D arrays, any order); ``beat_times``
and ``onset_times`` get those times from a mono waveform with librosa, and ``beat_hit_rate`` /
``onset_hit_rate`` chain the two for one (generated, reference) pair of waveforms.

Conventions:

* matching is not one-to-one: one estimated event may serve several reference events closer than
  2 * tolerance apart (the CMMD / mir_eval-free definition: "has an estimated event nearby");
* the window is inclusive: |t_ref - t_est| <= tolerance (+ 1e-9 s, so that times computed from
  frame indices are not lost to rounding);
* no reference events: the hit rate is undefined and returned as NaN; such clips are left out of
  the averages (``mean_hit_rate`` / ``HitRate``), and an average over no defined clip is NaN;
* reference events but no estimated event: hit rate 0.

No dagster here: usable from a notebook.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from stages.evaluation.base import Metric

CMMD_TOLERANCES = (0.1, 0.5)  # seconds: the +-100 ms and +-500 ms windows CMMD reports
_SLACK = 1e-9  # seconds added to the tolerance against floating-point rounding of event times


def _times(t) -> np.ndarray:
    t = np.asarray(t, np.float64).ravel()
    if not np.isfinite(t).all():
        raise ValueError("event times must be finite seconds")
    return np.sort(t)


def hit_counts(reference_times, estimated_times, tolerance: float) -> tuple[int, int]:
    """(hits, reference events): how many reference events have an estimated event within
    +-tolerance seconds, out of how many reference events."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 seconds, got {tolerance}")
    ref, est = _times(reference_times), _times(estimated_times)
    if not len(ref) or not len(est):
        return 0, len(ref)
    right = np.searchsorted(est, ref)  # first estimated event at or after each reference event
    after = np.abs(est[np.minimum(right, len(est) - 1)] - ref)
    before = np.abs(ref - est[np.maximum(right - 1, 0)])
    nearest = np.minimum(after, before)
    return int(np.sum(nearest <= tolerance + _SLACK)), len(ref)


def hit_rate(reference_times, estimated_times, tolerance: float) -> float:
    """Share (0..1) of reference events with an estimated event within +-tolerance seconds.
    NaN when there are no reference events; 0 when there are no estimated events."""
    hits, total = hit_counts(reference_times, estimated_times, tolerance)
    return hits / total if total else float("nan")


def coverage(reference_times, estimated_times) -> float:
    """Estimated events per reference event (NaN without reference events)."""
    total = len(_times(reference_times))
    return len(_times(estimated_times)) / total if total else float("nan")


def _average(hits: list[int], totals: list[int], average: str) -> float:
    h, t = np.asarray(hits, np.float64), np.asarray(totals, np.float64)
    if average == "micro":
        return float(h.sum() / t.sum()) if t.sum() else float("nan")
    if average == "macro":
        defined = t > 0
        return float(np.mean(h[defined] / t[defined])) if defined.any() else float("nan")
    raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")


def mean_hit_rate(pairs: Iterable[tuple[np.ndarray, np.ndarray]], tolerance: float, average: str = "macro") -> float:
    """Hit rate over clips, ``pairs`` = [(reference_times, estimated_times), ...].

    average="macro": mean of the clips' hit rates (clips without reference events left out);
    average="micro": all clips' hits over all their reference events."""
    counts = [hit_counts(r, e, tolerance) for r, e in pairs]
    return _average([h for h, _ in counts], [t for _, t in counts], average)


class HitRate(Metric):
    """Streaming ``mean_hit_rate``: ``update(reference_times, estimated_times)`` once per clip."""

    def __init__(self, tolerance: float = 0.1, average: str = "macro") -> None:
        if average not in ("macro", "micro"):
            raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
        self.tolerance, self.average = tolerance, average
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.hits: list[int] = []
        self.totals: list[int] = []

    def update(self, reference_times, estimated_times) -> None:
        hits, total = hit_counts(reference_times, estimated_times, self.tolerance)
        self.hits.append(hits)
        self.totals.append(total)
        self.updates += 1

    def compute(self) -> float:
        return _average(self.hits, self.totals, self.average)


# ---- event times of waveforms (librosa) ---------------------------------------------------------

def _mono(wave: np.ndarray) -> np.ndarray:
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
        raise ValueError(f"need a mono waveform [L], got shape {wave.shape}")
    return wave


def beat_times(wave: np.ndarray, rate: int, hop_length: int = 512, **kwargs) -> np.ndarray:
    """Beat times (s) of a mono waveform by ``librosa.beat.beat_track`` (``kwargs`` go to it);
    empty for audio shorter than two hops."""
    import librosa

    wave = _mono(wave)
    if wave.size < 2 * hop_length:
        return np.zeros(0)
    _, beats = librosa.beat.beat_track(y=wave, sr=rate, hop_length=hop_length, units="time", **kwargs)
    return np.asarray(beats, np.float64)


def onset_times(wave: np.ndarray, rate: int, hop_length: int = 512, **kwargs) -> np.ndarray:
    """Onset times (s) of a mono waveform by ``librosa.onset.onset_detect`` (``kwargs`` go to it,
    e.g. ``backtrack=True``); empty for audio shorter than two hops."""
    import librosa

    wave = _mono(wave)
    if wave.size < 2 * hop_length:
        return np.zeros(0)
    return np.asarray(librosa.onset.onset_detect(y=wave, sr=rate, hop_length=hop_length, units="time", **kwargs), np.float64)


def beat_hit_rate(generated: np.ndarray, reference: np.ndarray, rate: int, tolerance: float = 0.1,
                  reference_rate: int | None = None, **kwargs) -> float:
    """Hit rate of the generated audio's beats against the reference audio's beats."""
    return hit_rate(beat_times(reference, reference_rate or rate, **kwargs), beat_times(generated, rate, **kwargs), tolerance)


def onset_hit_rate(generated: np.ndarray, reference: np.ndarray, rate: int, tolerance: float = 0.1,
                   reference_rate: int | None = None, **kwargs) -> float:
    """Hit rate of the generated audio's onsets against the reference audio's onsets."""
    return hit_rate(onset_times(reference, reference_rate or rate, **kwargs), onset_times(generated, rate, **kwargs), tolerance)
