"""Beat / onset hit rate against explicit event lists, and the librosa wrappers on click trains."""

import math

import numpy as np
import pytest

from stages.evaluation import rhythm

REFERENCE = [1.0, 2.0, 3.0, 4.0]
ESTIMATED = [1.05, 2.3, 3.6, 10.0]


def test_hit_rate_of_explicit_event_lists():
    # nearest estimated event: 1.0 -> 0.05, 2.0 -> 0.3, 3.0 -> 0.6 (3.6), 4.0 -> 0.4 (3.6)
    assert rhythm.hit_counts(REFERENCE, ESTIMATED, 0.1) == (1, 4)
    assert rhythm.hit_rate(REFERENCE, ESTIMATED, 0.1) == 0.25
    assert rhythm.hit_rate(REFERENCE, ESTIMATED, 0.5) == 0.75
    assert rhythm.hit_rate(REFERENCE, ESTIMATED, 1.0) == 1.0
    # order does not matter
    assert rhythm.hit_rate(REFERENCE[::-1], ESTIMATED[::-1], 0.5) == 0.75
    # the other way round: of the estimated events, 1.05, 2.3 (2.0) and 3.6 (4.0) are within 0.5 s
    assert rhythm.hit_rate(ESTIMATED, REFERENCE, 0.5) == 0.75


def test_hit_rate_window_is_inclusive_and_tolerates_rounding():
    assert rhythm.hit_rate([1.0], [1.5], 0.5) == 1.0
    assert rhythm.hit_rate([1.0], [1.5000001], 0.5) == 0.0
    assert 3 * 0.1 - 0.2 > 0.1  # a frame time that rounding pushes just past the window...
    assert rhythm.hit_rate([3 * 0.1], [0.2], 0.1) == 1.0  # ...still counts


def test_one_estimated_event_may_serve_several_reference_events():
    assert rhythm.hit_rate([1.0, 1.1], [1.05], 0.1) == 1.0
    assert rhythm.coverage([1.0, 1.1], [1.05]) == 0.5
    assert rhythm.coverage(REFERENCE, ESTIMATED) == 1.0


def test_empty_sets():
    assert math.isnan(rhythm.hit_rate([], [1.0], 0.1))  # nothing to hit: undefined
    assert math.isnan(rhythm.hit_rate([], [], 0.1))
    assert rhythm.hit_rate([1.0, 2.0], [], 0.1) == 0.0  # nothing generated: no hits
    assert rhythm.hit_counts([], [1.0], 0.1) == (0, 0)
    assert math.isnan(rhythm.coverage([], [1.0]))
    with pytest.raises(ValueError, match="tolerance"):
        rhythm.hit_rate([1.0], [1.0], -0.1)


def test_mean_hit_rate_macro_and_micro_by_hand():
    pairs = [(REFERENCE, ESTIMATED), ([5.0], [5.0]), ([], [1.0])]  # 1 of 4, 1 of 1, undefined
    assert rhythm.mean_hit_rate(pairs, 0.1, "macro") == pytest.approx((0.25 + 1.0) / 2)  # 0.625
    assert rhythm.mean_hit_rate(pairs, 0.1, "micro") == pytest.approx(2 / 5)
    assert math.isnan(rhythm.mean_hit_rate([([], [])], 0.1))
    with pytest.raises(ValueError, match="average"):
        rhythm.mean_hit_rate(pairs, 0.1, "weighted")


def test_hit_rate_object_equals_the_function_after_several_updates():
    pairs = [(REFERENCE, ESTIMATED), ([5.0], [5.0]), ([], [1.0]), ([0.5, 7.0], [0.9, 7.2])]
    for average in ("macro", "micro"):
        for tolerance in rhythm.CMMD_TOLERANCES:
            metric = rhythm.HitRate(tolerance, average)
            for reference, estimated in pairs:
                metric.update(reference, estimated)
            assert metric.compute() == pytest.approx(rhythm.mean_hit_rate(pairs, tolerance, average))
            metric.reset()
            assert metric.updates == 0 and math.isnan(metric.compute())
    # by hand, +-0.5 s macro: 0.75, 1.0, (skipped), 1.0 (0.4 and 0.2 away) -> 2.75 / 3
    metric = rhythm.HitRate(0.5)
    for reference, estimated in pairs:
        metric.update(reference, estimated)
    assert metric.compute() == pytest.approx(2.75 / 3)


# ---- librosa wrappers ---------------------------------------------------------------------------

RATE = 22050
CLICKS = np.arange(0.5, 4.0, 0.5)  # 120 bpm


def _click_train(times, seconds=4.5, rate=RATE):
    wave = np.zeros(int(seconds * rate), np.float32)
    burst = (np.sin(2 * np.pi * 1000 * np.arange(int(0.02 * rate)) / rate) * np.exp(-np.arange(int(0.02 * rate)) / 60.0))
    for t in times:
        i = round(t * rate)
        wave[i : i + len(burst)] += burst.astype(np.float32)
    return wave


def test_onset_times_find_the_clicks_and_onset_hit_rate_sees_a_quarter_second_shift():
    wave = _click_train(CLICKS)
    onsets = rhythm.onset_times(wave, RATE)
    assert len(onsets) == len(CLICKS)
    assert rhythm.hit_rate(CLICKS, onsets, 0.05) == 1.0
    late = _click_train(CLICKS + 0.25)
    assert rhythm.onset_hit_rate(late, wave, RATE, tolerance=0.1) == 0.0
    assert rhythm.onset_hit_rate(late, wave, RATE, tolerance=0.5) == 1.0


def test_beat_times_follow_a_steady_click_train():
    wave = _click_train(CLICKS)
    beats = rhythm.beat_times(wave, RATE)
    assert len(beats) >= 4
    assert rhythm.hit_rate(CLICKS[1:-1], beats, 0.1) >= 0.8
    assert rhythm.beat_hit_rate(wave, wave, RATE, tolerance=0.1) == 1.0
    silence = np.zeros_like(wave)
    assert len(rhythm.beat_times(silence, RATE)) == 0 and len(rhythm.onset_times(silence, RATE)) == 0
    assert rhythm.beat_hit_rate(silence, wave, RATE) == 0.0  # the reference has beats, the generated none
    with pytest.raises(ValueError, match="mono"):
        rhythm.beat_times(np.zeros((2, 100)), RATE)
