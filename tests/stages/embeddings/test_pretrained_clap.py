"""stages.embeddings.pretrained_clap on a tiny ClapModel saved to disk the way LAION ships one (config.json,
model.safetensors, preprocessor_config.json, tokenizer files): it loads offline, embeds audio and
text into unit vectors deterministically, keys on the weights, names what a bad folder lacks, and
a shard of real WAV files stores the same vectors as calling the model directly."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from stages.embeddings.heads import CLAP_FEATURE  # noqa: E402
from stages.ingest.decode import AudioSpec, load_audio  # noqa: E402
from stages.features.base import ShardJob  # noqa: E402
from stages.embeddings.pretrained_clap import (  # noqa: E402
    PRETRAINED_CLAP_CODE_VERSION,
    PretrainedClap,
    PretrainedClapError,
    PretrainedClapParams,
    compute_pretrained_clap_shard,
    load_pretrained_clap,
    pretrained_clap_settings,
)
from stages.core.store import FeatureStore

RATE = 16000
WINDOW_S = 1  # the tiny feature extractor's max_length_s
DIM = 8
WORDS = "a the dog cat bird rain sound of barking meowing chirping falling engine car loud soft".split()


def build_tiny_clap(folder: Path, seed: int = 0, fusion: bool = False) -> Path:
    """A randomly initialised ClapModel of ~10k parameters with its feature extractor and a
    WordLevel tokenizer (RoBERTa's special tokens), all written locally: nothing is downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, PreTrainedTokenizerFast

    # spec_size // num_mel_bins = 4 (as LAION's 256 // 64): the mel [101 frames, 16 bins] is folded
    # into a 64 x 64 image; 2 Swin stages of 8 -> 16 channels, window 4. The audio hidden_size must
    # be patch_embeds_hidden_size * 2 ** (stages - 1).
    audio = dict(
        num_mel_bins=16, spec_size=64, window_size=4, patch_embeds_hidden_size=8, depths=[1, 1],
        num_attention_heads=[1, 2], hidden_size=16, num_hidden_layers=2,
        enable_fusion=fusion, fusion_type="aff_2d" if fusion else None,
    )
    text = dict(
        vocab_size=4 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=40,
    )
    torch.manual_seed(seed)
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=DIM)).save_pretrained(folder)
    ClapFeatureExtractor(
        feature_size=16, sampling_rate=RATE, hop_length=160, max_length_s=WINDOW_S, fft_window_size=256,
        frequency_min=50, frequency_max=8000, truncation="fusion" if fusion else "rand_trunc", padding="repeatpad",
    ).save_pretrained(folder)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=38,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> Path:
    return build_tiny_clap(tmp_path_factory.mktemp("models") / "tiny-clap")


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory) -> Path:
    return build_tiny_clap(tmp_path_factory.mktemp("models") / "tiny-clap-fused", seed=1, fusion=True)


@pytest.fixture(scope="module")
def clap(clap_dir) -> PretrainedClap:
    return load_pretrained_clap(str(clap_dir))


def tone(freq: float, seconds: float = 1.0, amp: float = 0.3, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def unit_norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=1)


# ---------------------------------------------------------------- loading


def test_folder_looks_like_laions_and_loads_offline_without_network(clap_dir, monkeypatch):
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in clap_dir.iterdir()
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("pretrained CLAP tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = PretrainedClap(str(clap_dir))  # not the cached one: really load it here
    assert model.sample_rate == RATE and model.dim == DIM and model.fusion is False
    assert model.embed_text(["a dog"]).shape == (1, DIM)


def test_roberta_tokenizer_from_vocab_and_merges_files_loads_too(clap_dir, tmp_path):
    # LAION's folders also carry the slow tokenizer's vocab.json + merges.txt (byte-level BPE).
    folder = tmp_path / "bpe-clap"
    shutil.copytree(clap_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "d": 5, "o": 6, "g": 7, "\u0120": 8,
             "do": 9, "dog": 10, "\u0120dog": 11, "\u0120a": 12, "<mask>": 13}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nd o\ndo g\n\u0120 dog\n\u0120 a\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    model = PretrainedClap(str(folder))
    assert model.tokenizer(["a dog"])["input_ids"] == [[0, 4, 11, 2]]
    vectors = model.embed_text(["a dog", "dog"])
    assert vectors.shape == (2, DIM) and not np.allclose(vectors[0], vectors[1], atol=1e-3)


def test_load_is_cached_per_process(clap_dir, clap):
    assert load_pretrained_clap(str(clap_dir)) is clap
    assert load_pretrained_clap(str(clap_dir) + "/") is clap  # the same folder spelled differently


# ---------------------------------------------------------------- embeddings


def test_embeddings_have_the_projection_dim_and_unit_norm(clap):
    audio = np.stack([tone(220), tone(440), tone(880, amp=0.05)])
    vectors = clap.embed_audio(audio)
    assert vectors.shape == (3, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(unit_norms(vectors), 1.0, atol=1e-5)
    texts = clap.embed_text(["a dog barking", "rain falling", "the sound of a car engine"])
    assert texts.shape == (3, DIM) and texts.dtype == np.float32
    np.testing.assert_allclose(unit_norms(texts), 1.0, atol=1e-5)
    assert clap.embed_audio(np.zeros((0, RATE), np.float32)).shape == (0, DIM)
    assert clap.embed_text([]).shape == (0, DIM)


def test_different_inputs_give_different_embeddings(clap):
    texts = clap.embed_text(["a dog barking", "rain falling", "a dog barking"])
    assert not np.allclose(texts[0], texts[1], atol=1e-3)
    np.testing.assert_allclose(texts[0], texts[2], atol=1e-6)
    audio = clap.embed_audio(np.stack([tone(220), tone(2000)]))
    assert not np.allclose(audio[0], audio[1], atol=1e-3)


def test_deterministic_across_loads_and_independent_of_batching(clap_dir, clap):
    audio = np.stack([tone(220), tone(440), tone(660)])
    texts = ["a dog barking", "the soft sound of rain", "car"]
    other = PretrainedClap(str(clap_dir))
    assert other is not clap
    np.testing.assert_array_equal(other.embed_audio(audio), clap.embed_audio(audio))
    np.testing.assert_array_equal(other.embed_text(texts), clap.embed_text(texts))
    # A clip's vector does not depend on its neighbours (padding, batch size).
    np.testing.assert_allclose(clap.embed_audio(audio, batch_size=1), clap.embed_audio(audio), atol=1e-6)
    np.testing.assert_allclose(clap.embed_text(texts, batch_size=1), clap.embed_text(texts), atol=1e-6)


def test_matches_transformers_own_pipeline_for_clips_within_the_window(clap):
    import torch

    audio = np.stack([tone(300, seconds=0.6), tone(500, seconds=0.6)])  # repeat-padded to 1 s by the extractor
    inputs = clap.feature_extractor(list(audio), sampling_rate=RATE, return_tensors="pt")
    tokens = clap.tokenizer(["a dog", "rain falling"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clap.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         input_features=inputs["input_features"], is_longer=inputs["is_longer"])
    expect_audio = torch.nn.functional.normalize(out.audio_embeds, dim=-1).numpy()
    expect_text = torch.nn.functional.normalize(out.text_embeds, dim=-1).numpy()
    np.testing.assert_allclose(clap.embed_audio(audio), expect_audio, atol=1e-5)
    np.testing.assert_allclose(clap.embed_text(["a dog", "rain falling"]), expect_text, atol=1e-5)


def test_unfused_model_crops_a_longer_clip_at_its_centre(clap):
    long = tone(330, seconds=1.5) * np.linspace(0.2, 1.0, int(1.5 * RATE), dtype=np.float32)
    start = (len(long) - RATE) // 2
    np.testing.assert_allclose(
        clap.embed_audio(long[None]), clap.embed_audio(long[None, start : start + RATE]), atol=1e-6
    )


def test_fused_model_is_deterministic_for_short_and_long_clips(fused_dir):
    fused = load_pretrained_clap(str(fused_dir))
    assert fused.fusion and fused.settings()["audio_mode"] == "fusion"
    for seconds in (1.0, 2.5):  # within the window (4 equal channels), longer (shrunk whole + 3 crops)
        audio = np.stack([tone(f, seconds=seconds) * np.linspace(1, 0.1, int(seconds * RATE)) for f in (250, 700, 1200)])
        features, longer = fused.audio_inputs(audio)
        assert features.shape == (3, 4, WINDOW_S * RATE // 160 + 1, 16)
        assert longer.ravel().tolist() == [seconds > WINDOW_S] * 3
        np.random.seed(0)
        first = fused.embed_audio(audio)
        np.random.seed(123)  # transformers' own fusion path draws from numpy's global RNG; ours must not care
        np.testing.assert_array_equal(fused.embed_audio(audio), first)
        np.testing.assert_allclose(fused.embed_audio(audio[1:2]), first[1:2], atol=1e-6)
        np.testing.assert_allclose(unit_norms(first), 1.0, atol=1e-5)


# ---------------------------------------------------------------- feature key


def test_feature_key_follows_the_weights_not_the_absolute_path(clap_dir, tmp_path):
    params = PretrainedClapParams(model_dir=str(clap_dir), seconds=1.0, min_seconds=0.5)
    key = params.key()
    settings = pretrained_clap_settings(str(clap_dir))
    assert settings["model"] == "tiny-clap" and settings["projection_dim"] == DIM
    assert set(settings["weights_sha256"]) == {"model.safetensors"}
    assert settings == load_pretrained_clap(str(clap_dir)).settings()
    assert params.params()["model"] == settings

    moved = tmp_path / "elsewhere" / "tiny-clap"
    shutil.copytree(clap_dir, moved)
    assert PretrainedClapParams(model_dir=str(moved), seconds=1.0, min_seconds=0.5).key() == key
    assert PretrainedClapParams(model_dir=str(clap_dir), seconds=1.0, min_seconds=0.5, batch_size=3).key() == key
    assert PretrainedClapParams(model_dir=str(clap_dir), seconds=2.0, min_seconds=0.5).key() != key

    renamed = tmp_path / "tiny-clap-copy"
    shutil.copytree(clap_dir, renamed)
    assert PretrainedClapParams(model_dir=str(renamed), seconds=1.0, min_seconds=0.5).key() != key

    retrained = build_tiny_clap(tmp_path / "other" / "tiny-clap", seed=7)
    assert pretrained_clap_settings(str(retrained))["weights_sha256"] != settings["weights_sha256"]
    assert PretrainedClapParams(model_dir=str(retrained), seconds=1.0, min_seconds=0.5).key() != key

    # Weights replaced in place: new key, and the cached model is not reused for the new files.
    before = load_pretrained_clap(str(moved))
    shutil.copy(retrained / "model.safetensors", moved / "model.safetensors")
    assert PretrainedClapParams(model_dir=str(moved), seconds=1.0, min_seconds=0.5).key() != key
    after = load_pretrained_clap(str(moved))
    assert after is not before
    assert not np.allclose(after.embed_text(["a dog"]), before.embed_text(["a dog"]), atol=1e-4)


# ---------------------------------------------------------------- bad folders


def one_line_error(model_dir) -> str:
    with pytest.raises(PretrainedClapError) as info:
        PretrainedClap(str(model_dir))
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    with pytest.raises(PretrainedClapError):
        load_pretrained_clap(str(model_dir))
    return message


def test_missing_folder_is_a_one_line_error(tmp_path):
    message = one_line_error(tmp_path / "no-such-clap")
    assert str(tmp_path / "no-such-clap") in message and "does not exist" in message


def test_folder_without_weights_names_what_is_missing(clap_dir, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(clap_dir, broken)
    (broken / "model.safetensors").unlink()
    (broken / "preprocessor_config.json").unlink()
    message = one_line_error(broken)
    assert str(broken) in message and "model.safetensors" in message and "preprocessor_config.json" in message
    assert "config.json is" not in message and "tokenizer" not in message

    (broken / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "pickled" in one_line_error(broken)


def test_folder_with_weights_of_another_model_is_refused(clap_dir, tmp_path):
    from safetensors.numpy import save_file

    broken = tmp_path / "wrong-weights"
    shutil.copytree(clap_dir, broken)
    save_file({"something.else": np.zeros(3, np.float32)}, str(broken / "model.safetensors"))
    message = one_line_error(broken)
    assert str(broken) in message and "weight" in message


def test_empty_folder_lists_every_missing_file(tmp_path):
    message = one_line_error(tmp_path)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer"):
        assert name in message


# ---------------------------------------------------------------- a shard of real media


def test_shard_of_wav_files_stores_what_the_model_computes(clap_dir, clap, tmp_path):
    import soundfile

    media = tmp_path / "media"
    media.mkdir()
    clips, texts = [], []
    # 44.1 kHz and 16 kHz files, one shorter than `seconds` (tiled), one silent, one uncaptioned.
    for clip_id, audio, rate, text in [
        ("dog", tone(220, 1.2, rate=44100), 44100, "a dog barking"),
        ("rain", tone(660, 0.8), RATE, "rain falling"),
        ("car", tone(1500, 1.0), RATE, "the sound of a car engine"),
        ("hush", np.zeros(RATE, np.float32), RATE, "silence"),
        ("nolabel", tone(440, 1.0), RATE, ""),
    ]:
        path = media / f"{clip_id}.wav"
        soundfile.write(str(path), audio, rate, subtype="PCM_16")
        clips.append((clip_id, str(path), f"sha-{clip_id}"))
        texts.append(text)
    params = PretrainedClapParams(model_dir=str(clap_dir), seconds=1.0, min_seconds=0.5, fit="tile", batch_size=2)
    store = FeatureStore(str(tmp_path / "features"))
    job = ShardJob(
        store_root=store.url_root, storage_options={}, dataset="demo", feature=CLAP_FEATURE, key=params.key(),
        shard="s00000", clips=tuple(clips), params=params.params(), code_version=PRETRAINED_CLAP_CODE_VERSION,
        texts=tuple(texts),
    )
    result = compute_pretrained_clap_shard(job)

    assert result.rows == 3 and result.computed
    reasons = {q["id"]: q["reason"] for q in result.quarantined}
    assert set(reasons) == {"hush", "nolabel"}
    assert reasons["hush"].startswith("silent audio") and reasons["nolabel"] == "no caption or label"

    table = store.read_arrays("demo", CLAP_FEATURE, params.key())
    assert table.clip_ids == ["dog", "rain", "car"]
    spec = AudioSpec(sample_rate=RATE, seconds=1.0, min_seconds=0.5, fit="tile")
    audio = np.stack([load_audio(clips[i][1], spec) for i in range(3)])
    np.testing.assert_allclose(table.arrays["audio"], clap.embed_audio(audio), atol=1e-5)
    np.testing.assert_allclose(table.arrays["text"], clap.embed_text(texts[:3]), atol=1e-5)
    for name in ("audio", "text"):
        assert table.arrays[name].dtype == np.float32 and table.arrays[name].shape == (3, DIM)
        np.testing.assert_allclose(unit_norms(table.arrays[name]), 1.0, atol=1e-5)

    manifest = store.shard_manifest("demo", CLAP_FEATURE, params.key(), "s00000")
    assert manifest["params"]["model"]["weights_sha256"] == pretrained_clap_settings(str(clap_dir))["weights_sha256"]
    assert manifest["code_version"] == PRETRAINED_CLAP_CODE_VERSION and manifest["input_keys"] == []
    assert [c["id"] for c in manifest["clips"]] == [c[0] for c in clips]
    assert manifest["quarantined"] == result.quarantined
    json.dumps(manifest)  # the params went into JSON as they are


def test_shard_refuses_weights_that_changed_after_the_key(clap_dir, tmp_path):
    params = PretrainedClapParams(model_dir=str(clap_dir), seconds=1.0, min_seconds=0.5)
    stale = dict(params.params(), model=dict(params.params()["model"], weights_sha256={"model.safetensors": "0" * 64}))
    job = ShardJob(
        store_root=str(tmp_path / "features"), storage_options={}, dataset="demo", feature=CLAP_FEATURE,
        key=params.key(), shard="s00000", clips=(), params=stale, code_version=PRETRAINED_CLAP_CODE_VERSION,
    )
    with pytest.raises(PretrainedClapError, match="changed since its feature key was computed"):
        compute_pretrained_clap_shard(job)


def test_params_are_validated():
    with pytest.raises(ValueError, match="fit"):
        PretrainedClapParams(model_dir="x", fit="stretch")
    with pytest.raises(ValueError, match="min_seconds"):
        PretrainedClapParams(model_dir="x", seconds=1.0, min_seconds=2.0)
    assert PretrainedClapParams.from_params({"model_dir": "x", "seconds": 2.0, "model": {}}).seconds == 2.0
