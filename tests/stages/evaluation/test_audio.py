"""Generation metrics against hand-computed values on tiny inputs."""

import math

import numpy as np
import pytest

from stages.evaluation import alignment
from stages.evaluation import audio as audio_metrics


def test_frechet_distance_of_identical_gaussians_is_zero():
    sigma = np.array([[2.0, 0.3], [0.3, 1.0]])
    mu = np.array([1.0, -2.0])
    assert audio_metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_shifted_gaussians_is_squared_shift():
    sigma = np.array([[2.0, 0.3], [0.3, 1.0]])
    mu = np.array([1.0, -2.0])
    m = np.array([3.0, 4.0])
    assert audio_metrics.frechet_distance(mu, sigma, mu + m, sigma) == pytest.approx(25.0, abs=1e-8)


def test_frechet_distance_of_scaled_isotropic_gaussians():
    # d = 3, S1 = I, S2 = 4 I: tr(I + 4I - 2 * 2I) = 3 * (1 + 4 - 4) = 3
    assert audio_metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), 4 * np.eye(3)) == pytest.approx(3.0, abs=1e-9)


def test_frechet_distance_from_samples_matches_the_fit():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    b = a + np.array([1.0, 0.0, 0.0, 0.0])  # same covariance, mean shifted by a unit vector
    assert audio_metrics.frechet_distance_of(a, b) == pytest.approx(1.0, abs=1e-8)
    # leading axes are flattened (per-second embeddings [N, S, d])
    assert audio_metrics.frechet_distance_of(a.reshape(25, 2, 4), a.reshape(25, 2, 4)) == pytest.approx(0.0, abs=1e-8)


def test_kl_of_identical_distributions_is_zero_and_known_value():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    assert audio_metrics.paired_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p = np.array([[0.5, 0.5]])
    q = np.array([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert audio_metrics.kl_divergence(p, q)[0] == pytest.approx(expected)
    assert audio_metrics.paired_kl(np.log(p), np.log(q)) == pytest.approx(expected)


def test_inception_score_of_one_hot_uniform_predictions_is_the_class_count():
    probs = np.eye(5)  # each sample certain, classes uniform over the set
    assert audio_metrics.inception_score_from_probs(np.repeat(probs, 3, axis=0)) == pytest.approx(5.0)
    # identical predictions for every sample: no diversity, IS = 1
    assert audio_metrics.inception_score_from_probs(np.tile([[0.2, 0.3, 0.5]], (4, 1))) == pytest.approx(1.0)
    # from logits: large one-hot logits behave like one-hot probabilities
    assert audio_metrics.inception_score(50.0 * np.eye(4)) == pytest.approx(4.0, rel=1e-6)


def _synthetic_alignment_pairs(n: int, rng: np.random.Generator, frames: int = 32, seconds: int = 4, dim: int = 8) -> alignment.AlignmentPairs:
    """Videos with 1-3 motion spikes; their audio has onsets at the same frames (plus noise), and
    per-second embeddings that follow the video's content."""
    motion = 0.05 * rng.random((n, frames))
    for row in motion:
        row[rng.choice(np.arange(2, frames - 2), size=rng.integers(1, 4), replace=False)] += 1.0
    onsets = motion + 0.1 * rng.random((n, frames))
    video = rng.normal(size=(n, seconds, dim))
    audio = video + 0.3 * rng.normal(size=video.shape)
    return alignment.AlignmentPairs(motion, onsets, video, audio)


def test_alignment_classifier_tells_aligned_from_swapped_and_shifted():
    rng = np.random.default_rng(0)
    pairs = _synthetic_alignment_pairs(200, rng)
    train, test = pairs.take(np.arange(150)), pairs.take(np.arange(150, 200))
    model = alignment.train_alignment(train, alignment.AlignmentConfig(steps=600))
    assert alignment.alignment_accuracy(model, test) >= 90.0
    assert alignment.classifier_accuracy(model, test) >= 85.0
    # the clip's own audio three frames late: same content, wrong timing
    late = test.with_audio(np.roll(test.onsets, 3, axis=1), test.audio_per_second)
    assert alignment.alignment_accuracy(model, late) <= 20.0
    # another clip's audio at its own timing
    swapped = test.with_audio(test.onsets[::-1], test.audio_per_second[::-1])
    assert alignment.alignment_accuracy(model, swapped) <= 20.0


def test_negatives_shift_by_at_least_min_shift_frames_or_swap():
    rng = np.random.default_rng(1)
    pairs = _synthetic_alignment_pairs(64, rng)
    neg = alignment.negatives(pairs, np.random.default_rng(2), fps=8.0, min_shift=2)
    for i in range(len(pairs)):
        swapped = not np.allclose(neg.audio_per_second[i], pairs.audio_per_second[i]) and \
            not any(np.allclose(neg.audio_per_second[i], np.roll(pairs.audio_per_second[i], k, axis=0)) for k in range(4))
        if swapped:
            continue
        shift = next(k for k in range(32) if np.allclose(neg.onsets[i], np.roll(pairs.onsets[i], k)))
        assert 2 <= shift <= 30


def test_motion_and_onset_envelopes_mark_the_event_frame():
    frames = np.zeros((16, 8, 8, 3), np.float32)
    frames[6:] = 255.0  # the picture changes at frame 6
    motion = alignment.motion_envelope(frames)
    assert motion.shape == (16,) and int(np.argmax(motion)) == 6 and motion[0] == 0
    rate, fps = 22050, 8.0
    wave = np.zeros(2 * rate, np.float32)
    onset = int(0.77 * rate)  # inside frame 6 (0.75-0.875 s)
    wave[onset : onset + 2000] = np.sin(np.arange(2000) * 2 * np.pi * 800 / rate)
    envelope = alignment.onset_envelope(wave, rate, fps, 16)
    assert envelope.shape == (16,) and int(np.argmax(envelope)) == 6


def test_alignment_pairs_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree in shape"):
        alignment.AlignmentPairs(np.zeros((3, 8)), np.zeros((3, 9)), np.zeros((3, 2, 4)), np.zeros((3, 2, 4)))


def test_aisfx_outputs_resample_and_pad():
    class FakeTower:
        sample_rate = 44100

        def embed(self, audio, seconds):
            self.seen = audio.shape
            b = len(audio)
            return {"pooled": np.ones((b, 3)), "per_second": np.ones((b, int(seconds), 3)), "logits": np.zeros((b, 2))}

    tower = FakeTower()
    out = audio_metrics.aisfx_outputs(tower, np.zeros((3, 22050), np.float32), 22050, 2.0, batch=2)
    assert tower.seen[1] == 88200 and out["per_second"].shape == (3, 2, 3)
