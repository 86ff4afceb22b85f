"""The HiFi-GAN vocoder: its pickle is checked, unpickled once, cached as safetensors; real mels come back as sound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import models.vocoder as vocoder_module
from models.vocoder import (
    HIFIGAN_UNIVERSAL_SHA256,
    VocoderWeightsError,
    Vocoder,
    cache_paths,
    convert_hifigan_checkpoint,
    get_vocoder,
    hifigan_checkpoint_path,
)
from stages.ingest.decode import AudioSpec, load_audio
from stages.ingest.demo import DemoSpec, generate_demo
from stages.features.spectral import MelSpectrogram
from stages.generation.vocode import log_mel_error, measure_real_time_factor

# Mean |delta log-mel| over bins above ln(1e-5), vocoded demo audio vs its source mel: measured
# 0.35 on 4 s clips and 0.27-0.43 on 1.1-1.5 s excerpts; a pairing of the wrong clips scores > 1.
LOG_MEL_TOLERANCE = 0.6
EXCERPT_FRAMES = 96  # 1.1 s per clip keeps the test short (the vocoder runs ~0.5-2x real time here)


@pytest.fixture
def count_torch_load(monkeypatch):
    """Counts (and records the weights_only flag of) every torch.load call."""
    calls = []
    real = torch.load

    def counting(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return calls


def test_pinned_sha256_matches_the_installed_wheel():
    from models.towers import file_sha256

    assert file_sha256(hifigan_checkpoint_path()) == HIFIGAN_UNIVERSAL_SHA256


def test_a_changed_pickle_is_refused_before_unpickling(tmp_path, count_torch_load):
    fake = tmp_path / "generator_universal.pth.tar"
    fake.write_bytes(b"\x80\x04 not the real checkpoint")
    with pytest.raises(VocoderWeightsError) as info:
        convert_hifigan_checkpoint(tmp_path / "cache", source=fake)
    message = str(info.value)
    assert "\n" not in message and str(fake) in message and "sha256" in message
    assert count_torch_load == []  # nothing was unpickled
    assert not any(p.exists() for p in cache_paths(tmp_path / "cache"))


def test_the_pickle_is_unpickled_once_then_safetensors(tmp_path, count_torch_load):
    vocoder_module.clear_vocoder_cache()
    cache = tmp_path / "weights"
    first = Vocoder(cache_dir=cache)
    assert count_torch_load == [True]  # once, with the restricted unpickler
    tensors_path, meta_path = cache_paths(cache)
    meta = json.loads(meta_path.read_text())
    assert meta["source_sha256"] == HIFIGAN_UNIVERSAL_SHA256 and meta["weight_norm"] == "folded"
    # Every later load reads the safetensors: a second instance, and the per-process one.
    second = Vocoder(cache_dir=cache)
    assert get_vocoder(cache_dir=cache) is get_vocoder(cache_dir=cache)
    assert count_torch_load == [True]
    assert not any("weight_g" in name for name in second.model.state_dict())  # weight norm removed
    mel = np.full((1, 80, 8), -5.0, np.float32)
    assert np.array_equal(first(mel), second(mel)) and first(mel).shape == (1, 8 * 256)
    # A damaged cache says what to delete instead of loading wrong weights.
    tensors_path.write_bytes(tensors_path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(VocoderWeightsError, match="delete .*to convert again"):
        Vocoder(cache_dir=cache)
    vocoder_module.clear_vocoder_cache()


def test_real_demo_mels_come_back_as_their_sound(tmp_path):
    jsonl = generate_demo(tmp_path / "demo", DemoSpec(n_clips=4))
    uris = sorted(str(p) for p in (jsonl.parent / "media").glob("*.mp4"))
    audio = np.stack([load_audio(uri, AudioSpec(sample_rate=22050, seconds=4.0)) for uri in uris])
    mels = MelSpectrogram("hifigan22k")(audio)[:, :, 8 : 8 + EXCERPT_FRAMES]  # inside every clip (>= 2 s)
    vocoder = get_vocoder(cache_dir=tmp_path / "weights")
    rtf, waves = measure_real_time_factor(vocoder, mels)
    assert waves.shape == (4, EXCERPT_FRAMES * 256) and waves.dtype == np.float32
    assert np.isfinite(waves).all() and np.abs(waves).max() <= 1.0 and np.abs(waves).max() > 0.1
    again = MelSpectrogram("hifigan22k")(waves)
    errors = [log_mel_error(mels[i], again[i]) for i in range(4)]
    wrong_pairs = [log_mel_error(mels[i], again[(i + 1) % 4]) for i in range(4)]
    print(f"\nvocoder: mean |delta log-mel| over bins > ln(1e-5): {np.round(errors, 3)} (wrong pairs "
          f"{np.round(wrong_pairs, 3)}); real-time factor {rtf.ratio:.2f} on {torch.get_num_threads()} thread(s)")
    assert max(errors) < LOG_MEL_TOLERANCE
    assert min(wrong_pairs) > 2 * max(errors)
    assert rtf.ratio > 0 and math.isfinite(rtf.ratio)
    vocoder_module.clear_vocoder_cache()
