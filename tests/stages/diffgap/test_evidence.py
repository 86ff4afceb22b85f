"""The paired statistics behind the study: within a training over queries, then over trainings."""

import math

import numpy as np
import pytest
from scipy import stats

from stages.diffgap import evidence


def test_paired_within_is_the_mean_hit_difference_and_its_paired_standard_error():
    base = [1, 2, 1, 5, 1, 3]      # hits at 1: 1 0 1 0 1 0
    method = [1, 1, 2, 1, 1, 1]    # hits at 1: 1 1 0 1 1 1
    out = evidence.paired_within(method, base)
    diff = 100 * np.array([0, 1, -1, 1, 0, 1])
    assert out["gain"] == pytest.approx(diff.mean())  # 33.3 points
    assert out["se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(6))
    assert out["p"] == pytest.approx(stats.ttest_rel(100 * (np.array(method) <= 1), 100 * (np.array(base) <= 1)).pvalue)
    assert out["queries"] == 6
    assert evidence.paired_within(method, base, k=5)["gain"] == 0  # every match is in the top 5 for both


def test_over_trainings_tests_the_spread_of_the_per_training_gains():
    # Three trainings of 4 queries: gains of +50, +25 and 0 points.
    trainings = [
        {"m": [1, 1, 1, 9], "b": [1, 9, 9, 9]},
        {"m": [1, 1, 9, 9], "b": [1, 9, 9, 9]},
        {"m": [1, 9, 9, 9], "b": [1, 9, 9, 9]},
    ]
    out = evidence.paired_over_trainings(trainings, "m", "b")
    gains = np.array([50.0, 25.0, 0.0])
    assert out["gain"] == pytest.approx(25.0) and out["gain_std"] == pytest.approx(gains.std(ddof=1))
    assert out["p"] == pytest.approx(stats.ttest_1samp(gains, 0).pvalue)
    assert (out["wins"], out["losses"], out["trainings"], out["queries"]) == (2, 0, 3, [4])
    recall = evidence.recall_over_trainings(trainings, "m")
    assert recall["mean"] == pytest.approx(50.0) and recall["trainings"] == 3


def test_one_training_leaves_no_test_over_trainings_and_identical_methods_no_gain():
    one = evidence.paired_over_trainings([{"m": [1, 2, 3], "b": [2, 1, 3]}], "m", "b")
    assert one["trainings"] == 1 and math.isnan(one["p"]) and math.isnan(one["gain_std"])
    same = evidence.paired_over_trainings([{"m": [1, 2], "b": [1, 2]}] * 3, "m", "b")
    assert same["gain"] == 0 and same["p"] == 1.0 and same["wins"] == 0
