"""Generation metrics against hand-computed values on tiny inputs."""

import math

import numpy as np
import pytest

from stages import audio_metrics as M


def test_frechet_distance_of_identical_gaussians_is_zero():
    sigma = np.array([[2.0, 0.3], [0.3, 1.0]])
    mu = np.array([1.0, -2.0])
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_shifted_gaussians_is_squared_shift():
    sigma = np.array([[2.0, 0.3], [0.3, 1.0]])
    mu = np.array([1.0, -2.0])
    m = np.array([3.0, 4.0])
    assert M.frechet_distance(mu, sigma, mu + m, sigma) == pytest.approx(25.0, abs=1e-8)


def test_frechet_distance_of_scaled_isotropic_gaussians():
    # d = 3, S1 = I, S2 = 4 I: tr(I + 4I - 2 * 2I) = 3 * (1 + 4 - 4) = 3
    assert M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), 4 * np.eye(3)) == pytest.approx(3.0, abs=1e-9)


def test_frechet_distance_from_samples_matches_the_fit():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    b = a + np.array([1.0, 0.0, 0.0, 0.0])  # same covariance, mean shifted by a unit vector
    assert M.frechet_distance_of(a, b) == pytest.approx(1.0, abs=1e-8)
    # leading axes are flattened (per-second embeddings [N, S, d])
    assert M.frechet_distance_of(a.reshape(25, 2, 4), a.reshape(25, 2, 4)) == pytest.approx(0.0, abs=1e-8)


def test_kl_of_identical_distributions_is_zero_and_known_value():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    assert M.paired_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert M.kl_divergence(p, q)[0] == pytest.approx(expected)
    assert M.paired_kl(np.log(p), np.log(q)) == pytest.approx(expected)


def test_inception_score_of_one_hot_uniform_predictions_is_the_class_count():
    probs = np.eye(5)  # each sample certain, classes uniform over the set
    assert M.inception_score_from_probs(np.repeat(probs, 3, axis=0)) == pytest.approx(5.0)
    # identical predictions for every sample: no diversity, IS = 1
    assert M.inception_score_from_probs(np.tile([[0.2, 0.3, 0.5]], (4, 1))) == pytest.approx(1.0)
    # from logits: large one-hot logits behave like one-hot probabilities
    assert M.inception_score(50.0 * np.eye(4)) == pytest.approx(4.0, rel=1e-6)


def test_alignment_classifier_tells_aligned_from_swapped_and_shifted():
    rng = np.random.default_rng(0)
    n, seconds, dim = 200, 4, 8
    video = rng.normal(size=(n, seconds, dim)).astype(np.float32)
    audio = (video + 0.1 * rng.normal(size=video.shape)).astype(np.float32)  # audio follows video second by second
    model = M.train_alignment(video[:150], audio[:150], M.AlignmentConfig(steps=300, hidden=32))
    assert M.alignment_accuracy(model, video[150:], audio[150:]) >= 90.0
    assert M.classifier_accuracy(model, video[150:], audio[150:]) >= 85.0
    shifted = np.roll(audio[150:], 1, axis=1)
    assert M.alignment_accuracy(model, video[150:], shifted) <= 20.0


def test_aisfx_outputs_resample_and_pad():
    class FakeTower:
        sample_rate = 44100

        def embed(self, audio, seconds):
            self.seen = audio.shape
            b = len(audio)
            return {"pooled": np.ones((b, 3)), "per_second": np.ones((b, int(seconds), 3)), "logits": np.zeros((b, 2))}

    tower = FakeTower()
    out = M.aisfx_outputs(tower, np.zeros((3, 22050), np.float32), 22050, 2.0, batch=2)
    assert tower.seen[1] == 88200 and out["per_second"].shape == (3, 2, 3)
