"""Tower feature shards: real media, real weights, quarantine reasons, keys."""

import json
from dataclasses import replace

import numpy as np
import pytest

from models.towers import AudioTower, FrameTower, TextTower, get_tower
from stages.features import towers as T
from stages.ingest.decode import AudioSpec, FrameSpec, load_audio, load_frames
from stages.features.base import ShardJob
from stages.core.store import FeatureStore
from tests.models import tower_weights_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("tower_weights_dir")


@pytest.fixture(scope="module")
def clips(demo_dataset, bad_media):
    """Three demo clips and three special files: (id, uri, hash) and caption-or-label texts."""
    records = [json.loads(line) for line in demo_dataset.read_text().splitlines()[:3]]
    demo = [(r["id"], str(demo_dataset.parent / r["path"]), f"h{i}") for i, r in enumerate(records)]
    special = [
        ("audio_only", str(bad_media["audio_only_m4a"]), "h3"),
        ("silent", str(bad_media["silent_mp4"]), "h4"),
        ("ramp", str(bad_media["ramp_video_mp4"]), "h5"),
    ]
    texts = [r["caption"] for r in records] + ["a 440 Hz tone", "   ", ""]
    return tuple(demo + special), tuple(texts)


def _job(tmp_path, clips, feature: str, params) -> ShardJob:
    members, texts = clips
    return ShardJob(
        store_root=str(tmp_path), storage_options={}, dataset="d", feature=feature, key=params.key(),
        shard="s000000-abc", clips=members, params=params.params(), code_version="1", texts=texts,
    )


def _reasons(result) -> dict:
    return {q["id"]: q["reason"] for q in result.quarantined}


def test_audio_tower_shard(tmp_path, clips):
    params = T.AudioTowerParams()
    result = T.compute_audio_tower_shard(_job(tmp_path, clips, T.AUDIO_TOWER_FEATURE, params))
    assert result.rows == 5 and result.computed
    assert _reasons(result) == {"silent": "silent audio (peak -inf dBFS < -60 dBFS)"}
    table = FeatureStore(str(tmp_path)).read_arrays("d", T.AUDIO_TOWER_FEATURE, params.key())
    assert table.clip_ids == ["demo_000000", "demo_000001", "demo_000002", "audio_only", "ramp"]
    pooled, per_second, logits = (table.arrays[k] for k in ("pooled", "per_second", "logits"))
    assert pooled.shape == (5, 512) and per_second.shape == (5, 4, 512) and logits.shape == (5, 69)
    assert (pooled.dtype, per_second.dtype, logits.dtype) == (np.float32, np.float16, np.float32)
    # The stored rows are the tower's numbers on the same decoded audio (per_second within float16).
    audio = np.stack([load_audio(uri, params.audio_spec()) for _, uri, _ in clips[0][:2]])
    direct = get_tower(AudioTower).embed(audio, seconds=4.0)
    assert np.allclose(pooled[:2], direct["pooled"], atol=1e-4)
    assert np.abs(per_second[:2].astype(np.float32) - direct["per_second"]).max() <= 4e-4 * np.abs(direct["per_second"]).max()
    assert np.allclose(logits[:2], direct["logits"], atol=1e-3)
    manifest = FeatureStore(str(tmp_path)).shard_manifest("d", T.AUDIO_TOWER_FEATURE, params.key(), "s000000-abc")
    assert manifest["params"]["tower"]["weights_sha256"] == AudioTower.describe()["weights_sha256"]


def test_frame_tower_shard_quarantines_audio_only_media(tmp_path, clips):
    params = T.FrameTowerParams(size=64, fps=2)  # the demo's own size: fast
    result = T.compute_frame_tower_shard(_job(tmp_path, clips, T.FRAME_TOWER_FEATURE, params))
    assert _reasons(result) == {"audio_only": "no video stream"}
    table = FeatureStore(str(tmp_path)).read_arrays("d", T.FRAME_TOWER_FEATURE, params.key())
    assert table.clip_ids == ["demo_000000", "demo_000001", "demo_000002", "silent", "ramp"]
    pooled, per_second = table.arrays["pooled"], table.arrays["per_second"]
    assert pooled.shape == (5, 1280) and per_second.shape == (5, 4, 1280) and per_second.dtype == np.float16
    # Two frames per second, averaged within the second; pooled = mean of all frames.
    frames = load_frames(clips[0][5][1], params.frame_spec())  # the ramp: brightness grows frame by frame
    emb = get_tower(FrameTower, size=64).embed(frames)
    expected = emb[2:4].mean(0)
    assert np.abs(per_second[4, 1].astype(np.float32) - expected).max() <= 1e-3 * np.abs(expected).max()
    assert np.allclose(pooled[4], emb.mean(0), atol=1e-4)
    assert not np.allclose(per_second[4, 0], per_second[4, 3], atol=1e-2)
    assert params.second_of_frame().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_text_tower_shard_quarantines_empty_texts(tmp_path, clips):
    params = T.TextTowerParams()
    result = T.compute_text_tower_shard(_job(tmp_path, clips, T.TEXT_TOWER_FEATURE, params))
    assert _reasons(result) == {"silent": "no caption or label", "ramp": "no caption or label"}
    store = FeatureStore(str(tmp_path))
    table = store.read_arrays("d", T.TEXT_TOWER_FEATURE, params.key())
    assert table.clip_ids == ["demo_000000", "demo_000001", "demo_000002", "audio_only"]
    text = table.arrays["text"]
    assert text.shape == (4, 384) and text.dtype == np.float32
    assert np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    assert np.allclose(text, get_tower(TextTower).encode(list(clips[1][:4])), atol=1e-5)
    manifest = store.shard_manifest("d", T.TEXT_TOWER_FEATURE, params.key(), "s000000-abc")
    assert manifest["text_digests"]["audio_only"] == T.text_digest("a 440 Hz tone")
    samples = {s["__key__"]: s for s in store.webdataset("d", T.TEXT_TOWER_FEATURE, params.key())}
    assert samples["audio_only"]["json"]["text"] == "a 440 Hz tone"


def test_a_shard_of_only_bad_clips_is_written_empty(tmp_path, clips):
    members, texts = clips
    params = T.AudioTowerParams()
    job = _job(tmp_path, ((members[4],), texts[4:5]), T.AUDIO_TOWER_FEATURE, params)  # the silent clip
    result = T.compute_audio_tower_shard(job)
    assert result.rows == 0 and len(result.quarantined) == 1
    manifest = FeatureStore(str(tmp_path)).shard_manifest("d", T.AUDIO_TOWER_FEATURE, params.key(), "s000000-abc")
    assert manifest["rows"] == 0 and manifest["arrays"]["per_second"]["shape"] == [0, 4, 512]


def test_a_worker_with_another_tower_refuses_to_write_under_the_key(tmp_path, clips):
    params = T.TextTowerParams()
    job = _job(tmp_path, clips, T.TEXT_TOWER_FEATURE, params)
    other = dict(job.params, tower=dict(job.params["tower"], package_version="9.9"))
    with pytest.raises(RuntimeError, match="package_version"):
        T.compute_text_tower_shard(replace(job, params=other))
    with pytest.raises(ValueError, match="texts"):
        T.compute_text_tower_shard(replace(job, texts=()))


def test_keys_follow_parameters_and_tower_settings():
    audio = T.AudioTowerParams()
    assert audio.params()["tower"] == AudioTower.describe()
    assert audio.key() == T.AudioTowerParams().key() and len(audio.key()) == 16
    assert T.AudioTowerParams(per_second_dtype="float32").key() != audio.key()
    assert T.AudioTowerParams(seconds=5.0).key() != audio.key()
    frame = T.FrameTowerParams()
    assert frame.params()["tower"]["size"] == frame.size == 128
    assert T.FrameTowerParams(size=112).key() != frame.key() and T.FrameTowerParams(fps=8).key() != frame.key()
    assert T.AudioTowerParams.from_params(audio.params()) == audio
    assert T.FrameTowerParams.from_params(frame.params()) == frame
    assert len({audio.key(), frame.key(), T.TextTowerParams().key()}) == 3
    assert T.AudioTowerParams().audio_spec() == AudioSpec(sample_rate=44100, seconds=4.0)
    assert T.FrameTowerParams().frame_spec() == FrameSpec(fps=4.0, size=128, seconds=4.0)
    for bad in ({"seconds": 0.5}, {"fit": "loop"}, {"per_second_dtype": "int8"}, {"min_seconds": 5.0}):
        with pytest.raises(ValueError):
            T.AudioTowerParams(**bad)
    for bad in ({"fps": 0.5}, {"size": 8}, {"seconds": 0.2}):
        with pytest.raises(ValueError):
            T.FrameTowerParams(**bad)
