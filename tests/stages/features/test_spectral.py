"""Mel presets against librosa, batching, devices, the audio-image round trip and audio image shapes."""

import librosa
import numpy as np
import pytest
import torch

from stages.core.errors import ConfigError
from stages.features.mel import AUDIO_IMAGE_SHAPES, DEFAULT_AUDIO_IMAGE_SHAPE, AudioImageParams
from stages.features.spectral import PRESETS, MelSpectrogram, audio_image_to_mel, get_preset, mel_to_audio_image

# Stated tolerance against librosa.feature.melspectrogram: max |difference| of the log-mel
# wherever the linear mel is above 1e-5 (-100 dB re full scale). Below that, float32 rounding
# (~1e-7 absolute, checked separately in linear units) is all the log sees near the 1e-7 floor.
LIBROSA_LOG_TOLERANCE = 1e-2  # worst bin (the quietest audible ones)
LIBROSA_LOG_MEAN_TOLERANCE = 1e-4
LIBROSA_LINEAR_TOLERANCE = 1e-5
AUDIBLE = 1e-5


def _test_audio(sr: int, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    chirp = np.sin(2 * np.pi * (200 + 1500 * t) * t)
    bursts = rng.normal(0, 0.2, len(t)) * (np.sin(2 * np.pi * 3 * t) > 0.7)
    return (0.4 * chirp + bursts).astype(np.float32)


def _librosa_mel(audio: np.ndarray, name: str) -> np.ndarray:
    p = get_preset(name)
    return librosa.feature.melspectrogram(
        y=audio, sr=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop_length, win_length=p.window,
        window="hann", center=p.center, pad_mode=p.pad_mode, power=p.power, n_mels=p.n_mels,
        fmin=p.fmin, fmax=p.fmax, norm=p.mel_norm,
    )


def _compress(mel: np.ndarray, name: str) -> np.ndarray:
    p = get_preset(name)
    mel = np.maximum(mel, p.floor)
    if p.compression == "ln":
        return np.log(mel)
    return np.clip((20 * np.log10(mel) + 80) / 100, 0, 1)


def _linear(log_mel: np.ndarray, name: str) -> np.ndarray:
    p = get_preset(name)
    return np.exp(log_mel) if p.compression == "ln" else 10 ** ((log_mel * 100 - 80) / 20)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_matches_librosa(name):
    preset = get_preset(name)
    audio = np.stack([_test_audio(preset.sample_rate, seed=s) for s in range(3)])
    ours = MelSpectrogram(name)(audio)
    for row in range(len(audio)):
        linear = _librosa_mel(audio[row], name)
        reference = _compress(linear, name)
        assert ours[row].shape == reference.shape == (preset.n_mels, preset.n_frames(2.0))
        audible = linear > AUDIBLE
        assert audible.mean() > 0.5  # the comparison covers most of the spectrogram
        difference = np.abs(ours[row] - reference)[audible]
        assert difference.max() < LIBROSA_LOG_TOLERANCE and difference.mean() < LIBROSA_LOG_MEAN_TOLERANCE
        if preset.compression == "ln":
            assert np.max(np.abs(_linear(ours[row], name) - np.maximum(linear, preset.floor))) < LIBROSA_LINEAR_TOLERANCE


def test_batching_does_not_change_values():
    audio = np.stack([_test_audio(22050, seed=s) for s in range(11)])  # 11 spans two STFT sub-batches
    batched = MelSpectrogram("hifigan22k")(audio)
    single = np.stack([MelSpectrogram("hifigan22k")(a)[0] for a in audio])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_preset_values_from_the_architecture():
    h, a, d = PRESETS["hifigan22k"], PRESETS["audioldm16k"], PRESETS["difffoley16k"]
    assert (h.sample_rate, h.n_fft, h.hop_length, h.n_mels, h.fmin, h.fmax) == (22050, 1024, 256, 80, 0, 8000)
    assert (a.sample_rate, a.n_fft, a.hop_length, a.n_mels, a.fmax, a.floor) == (16000, 1024, 160, 64, 8000, 1e-5)
    assert (d.sample_rate, d.hop_length, d.n_mels, d.fmin, d.fmax) == (16000, 256, 128, 125, 7600)
    # difffoley16k lives in [0, 1]; a full-scale tone reaches the top half, silence the floor.
    mel = MelSpectrogram("difffoley16k")(np.stack([_test_audio(16000), np.zeros(32000, np.float32)]))
    assert mel.min() >= 0 and mel.max() <= 1 and mel[0].max() > 0.5 and mel[1].max() == 0


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mel preset 'nope'.*hifigan22k"):
        get_preset("nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    audio = np.stack([_test_audio(22050, seed=s) for s in range(2)])
    np.testing.assert_allclose(MelSpectrogram("hifigan22k", "cuda")(audio), MelSpectrogram("hifigan22k")(audio), atol=1e-3)


@pytest.mark.parametrize("size", [64, 128])
def test_audio_image_shape_and_round_trip(size):
    preset = get_preset("hifigan22k")
    t = np.arange(4 * 22050) / 22050
    low_tone = 0.5 * np.sin(2 * np.pi * 300 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    audio = np.stack([_test_audio(22050, seconds=4.0), low_tone.astype(np.float32)])
    mels = MelSpectrogram(preset)(audio)
    images = mel_to_audio_image(mels, preset, size)
    assert images.shape == (2, size, size, 3) and images.dtype == np.uint8
    # grayscale -> RGB: the three channels are equal
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 1], images[..., 2])
    # high mel bins are drawn at the top: a 300 Hz tone lights the bottom rows, not the top ones
    assert images[1, -size // 4 :].mean() > images[1, : size // 4].mean() + 50
    back = audio_image_to_mel(images, preset, mels.shape[2])
    clipped = np.clip(mels, preset.image_low, preset.image_high)
    # Downsampling 80x345 to size x size loses detail; the coarse envelope must survive.
    error = np.abs(back - clipped).mean()
    assert error < (1.6 if size == 64 else 1.2), error


def _two_clips() -> np.ndarray:
    t = np.arange(4 * 22050) / 22050
    low_tone = 0.5 * np.sin(2 * np.pi * 300 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    return MelSpectrogram("hifigan22k")(np.stack([_test_audio(22050, seconds=4.0), low_tone.astype(np.float32)]))


def test_audio_images_of_the_mel_shape_keep_more_than_squares():
    preset = get_preset("hifigan22k")
    mels = _two_clips()
    clipped = np.clip(mels, preset.image_low, preset.image_high)
    errors = {}
    for shape in ((64, 64), (80, 344), (80, mels.shape[2])):
        images = mel_to_audio_image(mels, preset, shape)
        assert images.shape == (2, *shape, 3) and images.dtype == np.uint8
        assert images[1, -shape[0] // 4:].mean() > images[1, : shape[0] // 4].mean() + 50  # high bins on top
        errors[shape] = np.abs(audio_image_to_mel(images, preset, mels.shape[2]) - clipped).mean()
    assert errors[(80, 344)] < errors[(64, 64)] / 3, errors
    # At the mel's own n_mels x frames nothing is resampled: only the 8-bit quantisation is lost.
    step = (preset.image_high - preset.image_low) / 255
    back = audio_image_to_mel(mel_to_audio_image(mels, preset, (80, mels.shape[2])), preset, mels.shape[2])
    assert np.abs(back - clipped).max() <= step / 2 + 1e-4


def test_audio_image_params_name_shapes_sizes_and_sides():
    assert (AudioImageParams().height, AudioImageParams().width) == AUDIO_IMAGE_SHAPES[DEFAULT_AUDIO_IMAGE_SHAPE]
    assert AUDIO_IMAGE_SHAPES["frame64"] == (64, 64)  # MM-LDM's frame size on the demo stays a preset
    for name, (height, width) in AUDIO_IMAGE_SHAPES.items():
        params = AudioImageParams(shape=name)
        assert (params.height, params.width) == (height, width)
        assert AudioImageParams.from_params(params.params()).params() == params.params()
    assert AudioImageParams(size=64).params() == {"size": 64} == AudioImageParams(shape="frame64").params()
    assert AudioImageParams(height=80, width=344).params() == {"height": 80, "width": 344}
    assert AudioImageParams(shape="frame64", size=64) == AudioImageParams(shape="frame64", size=64)  # agreeing: fine
    for kwargs, message in (
        ({"shape": "huge"}, "unknown audio image shape 'huge': choose one of frame64"),
        ({"size": 4}, "audio image size must be within 8..1024, got 4"),
        ({"height": 80}, "give both the audio image height and width"),
        ({"height": 80, "width": 2000}, "audio image sides must be within 8..1024, got 80 x 2000"),
        ({"shape": "square128", "size": 64}, "disagree (64 x 64 vs 128 x 128): give one of them"),
        ({"size": 64, "height": 80, "width": 344}, "disagree (64 x 64 vs 80 x 344)"),
    ):
        with pytest.raises(ConfigError) as raised:
            AudioImageParams(**kwargs)
        assert message in str(raised.value) and "\n" not in str(raised.value), (kwargs, str(raised.value))


def test_audio_image_uses_the_fixed_range():
    preset = get_preset("hifigan22k")
    low = np.full((1, preset.n_mels, 100), preset.image_low - 5, np.float32)
    high = np.full((1, preset.n_mels, 100), preset.image_high + 5, np.float32)
    assert mel_to_audio_image(low, preset, 32).max() == 0
    assert mel_to_audio_image(high, preset, 32).min() == 255


def _audio_image_through_rgb(mels: np.ndarray, preset, size: int) -> np.ndarray:
    """The audio image as it was first written (grey -> RGB, then a resize of all three bands)."""
    from PIL import Image

    scaled = (np.asarray(mels, np.float32) - preset.image_low) / (preset.image_high - preset.image_low)
    gray = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)[:, ::-1, :]
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(g), mode="L").convert("RGB")
                                .resize((size, size), Image.Resampling.BICUBIC)) for g in gray])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_audio_image_bytes_are_those_of_the_rgb_resize(name):
    # The grey plane is resized once and copied to three bands: the stored bytes must not change.
    preset = get_preset(name)
    rng = np.random.default_rng(1)
    mels = rng.uniform(preset.image_low - 1, preset.image_high + 1, (3, preset.n_mels, 251)).astype(np.float32)
    for size in (32, 64, 257):
        assert np.array_equal(mel_to_audio_image(mels, preset, size), _audio_image_through_rgb(mels, preset, size))
