"""Frechet distance, kernel distance (KID) and the bootstrap against hand-computed values."""

import numpy as np
import pytest

from stages.evaluation import distribution as dist

# ---- Frechet distance ---------------------------------------------------------------------------

def test_frechet_distance_of_1d_gaussians_is_mean_gap_plus_std_gap_squared():
    # x: mean 3, unbiased var (4 + 0 + 4) / 2 = 4 (s = 2); y: mean 11, var (1 + 0 + 1) / 2 = 1 (s = 1)
    x = np.array([1.0, 3.0, 5.0])[:, None]
    y = np.array([10.0, 11.0, 12.0])[:, None]
    mu, sigma = dist.gaussian_fit(x)
    assert mu == pytest.approx([3.0]) and sigma == pytest.approx(4.0)
    # (3 - 11)^2 + (2 - 1)^2 = 65
    assert dist.frechet_distance_of(x, y) == pytest.approx(65.0, abs=1e-9)
    # scalar moments: (0 - 1)^2 + (sqrt 4 - sqrt 9)^2 = 2
    assert dist.frechet_distance(0.0, 4.0, 1.0, 9.0) == pytest.approx(2.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_sums_over_dimensions():
    # (0-1)^2 + (0-2)^2 + (1-3)^2 + (2-4)^2 = 1 + 4 + 4 + 4 = 13
    value = dist.frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([9.0, 16.0]))
    assert value == pytest.approx(13.0, abs=1e-9)


def test_gaussian_fit_refuses_a_single_sample():
    with pytest.raises(ValueError, match="N >= 2"):
        dist.gaussian_fit(np.zeros((1, 3)))


def test_frechet_distance_object_equals_the_function_after_several_updates():
    rng = np.random.default_rng(0)
    gen = [rng.normal(size=(5, 2, 3)), rng.normal(size=(7, 3)) + 1.0, rng.normal(size=(4, 3))]
    ref = [rng.normal(size=(6, 3)), 2.0 * rng.normal(size=(9, 3))]
    metric = dist.FrechetDistance()
    metric.update(gen[0], ref[0])
    metric.update(generated=gen[1])
    metric.update(reference=ref[1])
    metric.update(generated=gen[2])
    expected = dist.frechet_distance_of(np.concatenate([gen[0].reshape(-1, 3), gen[1], gen[2]]), np.concatenate(ref))
    assert metric.compute() == pytest.approx(expected, rel=1e-12)
    assert metric.compute() > 0.5  # genuinely different sets
    metric.reset()
    with pytest.raises(ValueError, match="no features"):
        metric.compute()
    metric.update(gen[1], gen[1])
    assert metric.compute() == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_object_refuses_a_change_of_width():
    metric = dist.FrechetDistance()
    metric.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="width"):
        metric.update(np.zeros((3, 5)))


# ---- kernel distance ----------------------------------------------------------------------------

def test_polynomial_kernel_is_kid_kernel_with_gamma_one_over_d():
    x = np.array([[1.0, 1.0], [0.0, 0.0]])
    y = np.array([[2.0, 0.0]])
    # (x.y / 2 + 1)^3: (2/2 + 1)^3 = 8, (0 + 1)^3 = 1
    assert dist.polynomial_kernel(x, y) == pytest.approx(np.array([[8.0], [1.0]]))


def test_unbiased_mmd_of_identical_two_point_sets_by_hand():
    # k(a, b) = (ab + 1)^3 on {1, 2}: K = [[8, 27], [27, 125]]
    # within x: 2 * 27 / (2 * 1) = 27; within y: 27; across: (8 + 27 + 27 + 125) / 4 = 46.75
    # MMD^2 = 27 + 27 - 2 * 46.75 = -39.5 (unbiased: identical small sets can come out negative)
    x = np.array([[1.0], [2.0]])
    assert dist.mmd2_unbiased(x, x) == pytest.approx(-39.5)
    assert dist.kernel_distance(x, x.copy()) == pytest.approx(-39.5)


def test_unbiased_mmd_of_separated_sets_by_hand():
    # x = {0, 0}, y = {1, 1} (d = 1): within x k(0,0) = 1, within y k(1,1) = 8, across k(0,1) = 1
    # MMD^2 = 1 + 8 - 2 = 7
    assert dist.kernel_distance(np.zeros((2, 1)), np.ones((2, 1))) == pytest.approx(7.0)
    # d = 2 (gamma = 1/2): x = {(1,1), (0,0)}, y = {(2,0), (0,0)}; within x 1, within y 1,
    # across (8 + 1 + 1 + 1) / 4 = 2.75  ->  1 + 1 - 5.5 = -3.5
    x = np.array([[1.0, 1.0], [0.0, 0.0]])
    y = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert dist.kernel_distance(x, y) == pytest.approx(-3.5)


def test_kernel_distance_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    same = dist.kernel_distance(a, b)
    shifted = dist.kernel_distance(a, b + 1.0)
    assert abs(same) < 0.02
    assert shifted > 0.3
    # leading axes are flattened like the Frechet distance's
    assert dist.kernel_distance(a.reshape(200, 2, 4), b) == pytest.approx(same)


def test_kernel_distance_subsets_are_seeded_and_full_subsets_equal_the_full_estimate():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) + 0.5
    full = dist.kernel_distance(a, b)
    # subsets at least as large as the sets are permutations of them: same estimate every time
    assert dist.kernel_distance_subsets(a, b, subsets=3, subset_size=100) == pytest.approx([full] * 3)
    one = dist.kernel_distance_subsets(a, b, subsets=8, subset_size=10, seed=3)
    assert one.shape == (8,) and np.ptp(one) > 0
    assert dist.kernel_distance_subsets(a, b, subsets=8, subset_size=10, seed=3) == pytest.approx(one)
    assert not np.allclose(dist.kernel_distance_subsets(a, b, subsets=8, subset_size=10, seed=4), one)
    assert dist.kernel_distance(a, b, subsets=8, subset_size=10, seed=3) == pytest.approx(one.mean())


def test_kernel_distance_refuses_single_rows_and_width_mismatch():
    with pytest.raises(ValueError):
        dist.kernel_distance(np.zeros((1, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        dist.kernel_distance(np.zeros((3, 2)), np.zeros((3, 4)))


def test_kernel_distance_object_equals_the_function_after_several_updates():
    rng = np.random.default_rng(2)
    gen = [rng.normal(size=(6, 4)), rng.normal(size=(3, 2, 4))]
    ref = [rng.normal(size=(5, 4)) + 0.3, rng.normal(size=(8, 4))]
    for settings in ({}, {"subsets": 5, "subset_size": 6, "seed": 7}):
        metric = dist.KernelDistance(**settings)
        for g, r in zip(gen, ref):
            metric.update(g, r)
        expected = dist.kernel_distance(np.concatenate([gen[0], gen[1].reshape(-1, 4)]), np.concatenate(ref), **settings)
        assert metric.compute() == pytest.approx(expected, rel=1e-12)
        metric.reset()
        assert metric.updates == 0 and len(metric.generated) == 0


# ---- bootstrap ----------------------------------------------------------------------------------

def test_bootstrap_of_a_constant_is_a_point():
    ci = dist.bootstrap_interval(np.mean, np.full(5, 3.0), resamples=50)
    assert (ci.value, ci.low, ci.high, ci.confidence) == (3.0, 3.0, 3.0, 0.95)


def test_bootstrap_of_two_points_spans_them():
    # resampled means of {0, 1} are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles of 2000 of them are 0 and 1, the full-set value 0.5
    value, low, high, _ = dist.bootstrap_interval(np.mean, np.array([0.0, 1.0]), resamples=2000, seed=0)
    assert (value, low, high) == (0.5, 0.0, 1.0)


def test_paired_bootstrap_keeps_rows_together_and_unpaired_does_not():
    a = np.arange(10.0)
    b = a + 1.0

    def mean_gap(x, y):
        return float(np.mean(y - x))

    paired = dist.bootstrap_interval(mean_gap, a, b, paired=True, resamples=200)
    assert (paired.value, paired.low, paired.high) == (1.0, 1.0, 1.0)
    unpaired = dist.bootstrap_interval(mean_gap, a, b, paired=False, resamples=200)
    assert unpaired.value == 1.0 and unpaired.low < 0.5 and unpaired.high > 1.5
    with pytest.raises(ValueError, match="one length"):
        dist.bootstrap_interval(mean_gap, a, b[:5], paired=True)


def test_bootstrap_is_seeded_and_wraps_any_metric():
    rng = np.random.default_rng(5)
    gen, ref = rng.normal(size=(40, 2)), rng.normal(size=(30, 2)) + 1.0
    ci = dist.bootstrap_interval(dist.frechet_distance_of, gen, ref, paired=False, resamples=30, confidence=0.9, seed=1)
    assert ci.value == pytest.approx(dist.frechet_distance_of(gen, ref))
    assert ci.low < ci.value < ci.high and ci.confidence == 0.9
    assert dist.bootstrap_interval(dist.frechet_distance_of, gen, ref, paired=False, resamples=30, confidence=0.9, seed=1) == ci
    assert dist.bootstrap_interval(dist.frechet_distance_of, gen, ref, paired=False, resamples=30, confidence=0.9, seed=2) != ci


def test_frechet_distance_equals_the_matrix_square_root_formula_on_full_covariances():
    """The eigenvalue form of tr((S1 S2)^(1/2)) against scipy's sqrtm on correlated, full-rank covariances."""
    from scipy import linalg

    from stages.evaluation.distribution import frechet_distance, gaussian_fit

    rng = np.random.default_rng(3)
    mix = rng.normal(size=(24, 24))
    a, b = rng.normal(size=(400, 24)) @ mix, rng.normal(size=(400, 24)) @ (mix * 1.4) + 0.3
    (m1, s1), (m2, s2) = gaussian_fit(a), gaussian_fit(b)
    reference = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2))))
    assert np.isclose(frechet_distance(m1, s1, m2, s2), reference, rtol=1e-9)


def test_pca_keeps_the_largest_variance_directions_of_the_reference_only():
    rng = np.random.default_rng(0)
    # variance 100 along axis 0, 25 along axis 1, ~0 elsewhere
    reference = rng.standard_normal((400, 6)) * np.array([10.0, 5.0, 0.01, 0.01, 0.01, 0.01]) + 3.0
    pca = dist.pca_fit(reference, 2)
    assert pca.dims == 2 and pca.explained > 0.999
    assert np.allclose(np.abs(pca.components[:, :2]), np.eye(2), atol=0.02)
    projected = pca(reference)
    assert projected.shape == (400, 2) and np.allclose(projected.mean(axis=0), 0.0, atol=1e-9)
    # the projection is the reference's: another set moves it by its own offset, it is not refitted
    shifted = pca(reference + np.array([1.0, 0, 0, 0, 0, 0]))
    assert np.allclose(np.abs(shifted.mean(axis=0)), [1.0, 0.0], atol=0.03)
    with pytest.raises(ValueError, match="PCA to 7 dims"):
        dist.pca_fit(reference, 7)


def test_full_rank_dims_leaves_room_for_a_bootstrap_resample():
    assert dist.full_rank_dims(35, 512) == 17
    assert dist.full_rank_dims(2000, 512) == 512
    assert dist.full_rank_dims(2, 512) == 1
