"""Feature runs on the demo clips: shapes per preset, caching, new keys, appended clips, S3, Dask."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stages.ingest.decode import load_audio
from stages.ingest.demo import DemoSpec, generate_demo
from stages.features.mel import AUDIO_IMAGE_CODE_VERSION, AUDIO_IMAGE_FEATURE, MEL_CODE_VERSION, MEL_FEATURE, AudioImageParams, MelParams, compute_audio_image_shard, compute_mel_shard
from stages.features.base import FeatureRun, run_feature
from stages.ingest.manifest import ClipManifest, build_manifest
from stages.core.parallel import InProcessExecutor
from stages.ingest.sources import SourceConfig, read_source
from stages.features.spectral import MelSpectrogram, get_preset, mel_to_audio_image
from stages.core.store import FeatureStore, StoreError

SHARD_SIZE = 16


def demo_manifest(jsonl, previous: ClipManifest | None = None, limit: int | None = None,
                  shard_size: int = SHARD_SIZE) -> tuple[ClipManifest, object]:
    listing = read_source(SourceConfig(kind="jsonl", path=str(jsonl)))
    assert listing.rejected == []
    if limit is not None:
        listing.clips = listing.clips[:limit]
    return build_manifest("demo", listing, previous, shard_size)


def run_mels(store: FeatureStore, manifest: ClipManifest, params: MelParams, executor=None) -> FeatureRun:
    return run_feature(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
                       compute_mel_shard, executor or InProcessExecutor())


def run_images(store: FeatureStore, manifest: ClipManifest, params: AudioImageParams, mel_key: str) -> FeatureRun:
    return run_feature(store, manifest, AUDIO_IMAGE_FEATURE, params.key(mel_key), params.params(),
                       AUDIO_IMAGE_CODE_VERSION, compute_audio_image_shard, InProcessExecutor(),
                       input_keys=(mel_key,))


def must_not_compute(job):
    raise AssertionError(f"shard {job.shard} was computed again")


def manifest_order(manifest: ClipManifest) -> list[str]:
    return [c.id for clips in manifest.by_shard().values() for c in clips]


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(str(tmp_path / "features"))


def test_mels_have_preset_shapes_and_a_second_run_computes_nothing(demo_dataset, store):
    manifest, _ = demo_manifest(demo_dataset)
    assert len(manifest.clips) == 40 and len(manifest.by_shard()) == 3  # 16 + 16 + 8
    params = MelParams()  # hifigan22k, 4 s, float16
    run = run_mels(store, manifest, params)
    assert (run.shards_total, run.shards_new, run.shards_reused) == (3, 3, 0)
    assert (run.clips_ok, run.clips_computed, run.clips_quarantined) == (40, 40, 0)
    assert run.key == params.key() and run.shards == sorted(manifest.by_shard())

    preset = get_preset("hifigan22k")
    n_frames = preset.n_frames(4.0)
    assert n_frames == 4 * 22050 // 256 + 1
    table = store.read_arrays("demo", MEL_FEATURE, params.key())
    assert table.clip_ids == manifest_order(manifest)
    mel = table.arrays["mel"]
    assert mel.shape == (40, 80, n_frames) and mel.dtype == np.float16
    assert np.isfinite(mel.astype(np.float32)).all()
    # ln(clamp 1e-7) floor, and real signal: clips are 2-4 s long, then zero padded to 4 s.
    assert mel.min() >= np.float16(np.log(1e-7)) and mel.max() > 0
    # The stored rows are the preset's log-mel of the decoded clips, row for row.
    index = manifest.index()
    for row in (0, 17, 39):
        audio = load_audio(index[table.clip_ids[row]].uri, params.audio_spec())
        expected = MelSpectrogram(preset)(audio[None])[0].astype(np.float16)
        np.testing.assert_array_equal(mel[row], expected)

    manifests = {s: store.shard_manifest("demo", MEL_FEATURE, params.key(), s) for s in run.shards}
    again = run_feature(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
                        must_not_compute, InProcessExecutor())
    assert (again.shards_new, again.clips_computed, again.shards_reused) == (0, 0, 3)
    assert again.clips_ok == 40 and again.key == run.key
    assert {s: store.shard_manifest("demo", MEL_FEATURE, params.key(), s) for s in run.shards} == manifests
    entry = store.catalog("demo", MEL_FEATURE)[0]
    assert (entry["feature_key"], entry["rows"], entry["shards_committed"]) == (params.key(), 40, 3)
    assert entry["params"]["preset_values"]["hop_length"] == 256


def test_a_new_preset_gets_a_new_key_beside_the_old_one(demo_dataset, store):
    manifest, _ = demo_manifest(demo_dataset)
    hifigan, audioldm = MelParams(), MelParams(preset="audioldm16k")
    assert hifigan.key() != audioldm.key()
    run_mels(store, manifest, hifigan)
    before = store.read_arrays("demo", MEL_FEATURE, hifigan.key())

    run = run_mels(store, manifest, audioldm)
    assert (run.shards_new, run.clips_computed) == (3, 40)
    new = store.read_arrays("demo", MEL_FEATURE, audioldm.key())
    assert new.arrays["mel"].shape == (40, 64, 16000 * 4 // 160 + 1)
    assert new.clip_ids == before.clip_ids
    assert store.feature_keys("demo", MEL_FEATURE) == [audioldm.key(), hifigan.key()]
    with pytest.raises(StoreError, match="pass key="):  # two complete keys: a reader names one
        store.read_arrays("demo", MEL_FEATURE)

    old = store.read_arrays("demo", MEL_FEATURE, hifigan.key())
    assert old.clip_ids == before.clip_ids
    np.testing.assert_array_equal(old.arrays["mel"], before.arrays["mel"])
    assert old.arrays["mel"].shape == (40, 80, 345)

    # Other parameters are part of the key as well; the same parameters give the same key.
    assert MelParams(seconds=2.0).key() != hifigan.key()
    assert MelParams(dtype="float32").key() != hifigan.key()
    assert MelParams(preset="hifigan22k").key() == hifigan.key()


def test_added_clips_compute_only_the_new_shards(demo_dataset, store, tmp_path):
    # Grow a copy of the 40-clip demo to 48 clips: the generator reuses the first 40 files.
    folder = tmp_path / "demo48"
    shutil.copytree(demo_dataset.parent, folder)
    small, _ = demo_manifest(folder / demo_dataset.name)
    params = MelParams()
    run_mels(store, small, params)
    before = store.read_arrays("demo", MEL_FEATURE, params.key())

    jsonl = generate_demo(folder, DemoSpec(n_clips=48, seed=0))
    grown, delta = demo_manifest(jsonl, previous=small)
    assert delta.added == [f"demo_{i:06d}" for i in range(40, 48)]
    assert delta.changed == [] and delta.removed == []
    assert list(grown.by_shard())[:3] == list(small.by_shard())

    run = run_mels(store, grown, params)
    assert (run.shards_total, run.shards_new, run.shards_reused) == (4, 1, 3)
    assert (run.clips_computed, run.clips_ok) == (8, 48)
    after = store.read_arrays("demo", MEL_FEATURE, params.key(), shards=list(grown.by_shard()))
    assert after.clip_ids == before.clip_ids + delta.added
    np.testing.assert_array_equal(after.arrays["mel"][:40], before.arrays["mel"])
    assert after.arrays["mel"].shape == (48, 80, 345)
    assert np.abs(after.arrays["mel"][40:].astype(np.float32)).sum() > 0


def test_audio_images_from_cached_mels(demo_dataset, store):
    manifest, _ = demo_manifest(demo_dataset)
    hifigan, audioldm = MelParams(), MelParams(preset="audioldm16k")
    run_mels(store, manifest, hifigan)
    images = AudioImageParams(size=32)
    image_key = images.key(hifigan.key())
    assert image_key != images.key(audioldm.key())  # depends on the mel key
    assert image_key != AudioImageParams(size=64).key(hifigan.key())
    assert image_key == AudioImageParams(size=32).key(hifigan.key())

    run = run_images(store, manifest, images, hifigan.key())
    assert (run.key, run.shards_new, run.clips_computed, run.clips_ok) == (image_key, 3, 40, 40)
    table = store.read_arrays("demo", AUDIO_IMAGE_FEATURE, image_key)
    mels = store.read_arrays("demo", MEL_FEATURE, hifigan.key())
    assert table.clip_ids == mels.clip_ids
    image = table.arrays["image"]
    assert image.shape == (40, 32, 32, 3) and image.dtype == np.uint8
    assert image.min() < image.max()
    np.testing.assert_array_equal(image[..., 0], image[..., 1])  # grey mapped to RGB
    np.testing.assert_array_equal(
        image, mel_to_audio_image(mels.arrays["mel"].astype(np.float32), get_preset("hifigan22k"), 32))
    entry = store.catalog("demo", AUDIO_IMAGE_FEATURE)[0]
    assert entry["input_keys"] == [hifigan.key()]
    assert store.shard_manifest("demo", AUDIO_IMAGE_FEATURE, image_key, run.shards[0])["input_keys"] == [hifigan.key()]

    # WebDataset samples hold the same images (PNG) as the zarr rows.
    samples = {s["__key__"]: s["image.png"] for s in store.webdataset("demo", AUDIO_IMAGE_FEATURE, image_key)}
    assert sorted(samples) == sorted(table.clip_ids)
    for row, clip_id in enumerate(table.clip_ids):
        np.testing.assert_array_equal(samples[clip_id], image[row])

    again = run_feature(store, manifest, AUDIO_IMAGE_FEATURE, image_key, images.params(), AUDIO_IMAGE_CODE_VERSION,
                        must_not_compute, InProcessExecutor(), input_keys=(hifigan.key(),))
    assert (again.shards_new, again.clips_computed) == (0, 0)

    # Images of another mel key live under another key, from that key's mels.
    run_mels(store, manifest, audioldm)
    other = run_images(store, manifest, images, audioldm.key())
    assert other.key == images.key(audioldm.key()) and other.shards_new == 3
    assert set(store.feature_keys("demo", AUDIO_IMAGE_FEATURE)) == {image_key, other.key}


def test_bad_clips_are_quarantined_per_shard_and_a_shard_of_only_bad_clips_commits(tmp_path, store):
    import json

    import soundfile

    media = tmp_path / "wavs" / "media"
    media.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def wav(name, samples):
        soundfile.write(str(media / f"{name}.wav"), samples.astype(np.float32), 16000, subtype="PCM_16")

    for n, name in enumerate(["a_good0", "a_good1", "a_good2", "c_good3", "c_good4"]):
        wav(name, rng.uniform(-0.5, 0.5, 16000 + 4000 * n))
    wav("b_silent", np.zeros(32000))
    wav("b_short", rng.uniform(-0.5, 0.5, 800))  # 0.05 s: under the 0.1 s floor
    (media / "b_garbage.wav").write_bytes(b"this is not audio at all" * 40)
    ids = ["a_good0", "a_good1", "a_good2", "b_garbage", "b_short", "b_silent", "c_good3", "c_good4"]
    jsonl = tmp_path / "wavs" / "clips.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "path": f"media/{i}.wav", "label": "x"}) + "\n" for i in ids))
    manifest, _ = demo_manifest(jsonl, shard_size=3)
    shards = list(manifest.by_shard())
    assert [[c.id for c in clips] for clips in manifest.by_shard().values()] == [ids[:3], ids[3:6], ids[6:]]

    params = MelParams()
    run = run_mels(store, manifest, params)
    assert (run.shards_new, run.clips_computed, run.clips_ok, run.clips_quarantined) == (3, 8, 5, 3)
    reasons = {q["id"]: (q["shard"], q["reason"]) for q in run.quarantined}
    assert set(reasons) == {"b_garbage", "b_short", "b_silent"}
    assert all(shard == shards[1] for shard, _ in reasons.values())
    assert reasons["b_silent"][1].startswith("silent audio")
    assert reasons["b_short"][1] == "audio too short: 0.05 s < 0.1 s"
    assert reasons["b_garbage"][1].startswith("not a readable media file")

    table = store.read_arrays("demo", MEL_FEATURE, params.key())
    assert table.clip_ids == ["a_good0", "a_good1", "a_good2", "c_good3", "c_good4"]
    assert table.arrays["mel"].shape == (5, 80, 345)
    empty = store.shard_manifest("demo", MEL_FEATURE, params.key(), shards[1])
    assert empty["rows"] == 0 and empty["clip_ids"] == []
    assert sorted(q["id"] for q in empty["quarantined"]) == ["b_garbage", "b_short", "b_silent"]
    assert [c["id"] for c in empty["clips"]] == ids[3:6]  # what was asked, with content hashes
    assert store.catalog("demo", MEL_FEATURE)[0]["quarantined"] == 3

    again = run_feature(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
                        must_not_compute, InProcessExecutor())
    assert (again.clips_ok, again.clips_quarantined, again.clips_computed) == (5, 3, 0)
    assert {q["id"]: (q["shard"], q["reason"]) for q in again.quarantined} == reasons

    images = run_images(store, manifest, AudioImageParams(size=16), params.key())
    assert (images.clips_ok, images.clips_quarantined) == (5, 3)
    image_table = store.read_arrays("demo", AUDIO_IMAGE_FEATURE, images.key)
    assert image_table.clip_ids == table.clip_ids and image_table.arrays["image"].shape == (5, 16, 16, 3)


def test_mels_on_s3_equal_the_local_result(demo_dataset, store, s3_bucket):
    manifest, _ = demo_manifest(demo_dataset, limit=6, shard_size=4)
    params = MelParams()
    run_mels(store, manifest, params)
    local = store.read_arrays("demo", MEL_FEATURE, params.key())

    s3 = FeatureStore(s3_bucket["root"], s3_bucket["storage_options"])
    s3.check_writable()
    run = run_mels(s3, manifest, params)
    assert (run.shards_new, run.clips_computed, run.clips_ok) == (2, 6, 6)
    remote = s3.read_arrays("demo", MEL_FEATURE)
    assert remote.feature_key == params.key()
    assert remote.clip_ids == local.clip_ids
    np.testing.assert_array_equal(remote.arrays["mel"], local.arrays["mel"])
    assert s3.fs.exists(f"{s3_bucket['bucket']}/features/demo/{MEL_FEATURE}/{params.key()}/{run.shards[0]}.json")
    samples = {s["__key__"]: s["mel.npy"] for s in s3.webdataset("demo", MEL_FEATURE, params.key())}
    for row, clip_id in enumerate(local.clip_ids):
        np.testing.assert_array_equal(samples[clip_id], local.arrays["mel"][row])
    again = run_feature(s3, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
                        must_not_compute, InProcessExecutor())
    assert (again.shards_new, again.clips_computed, again.clips_ok) == (0, 0, 6)


@pytest.mark.timeout(60)
def test_dask_local_cluster_writes_byte_identical_arrays(demo_dataset, tmp_path):
    from stages.core.parallel import DaskExecutor

    manifest, _ = demo_manifest(demo_dataset)
    params = MelParams()
    here = FeatureStore(str(tmp_path / "in_process"))
    run_mels(here, manifest, params)

    there = FeatureStore(str(tmp_path / "dask"))
    executor = DaskExecutor(n_workers=2, threads_per_worker=1)
    try:
        run = run_mels(there, manifest, params, executor)
    finally:
        executor.close()
    assert (run.shards_new, run.clips_computed, run.clips_ok) == (3, 40, 40)

    assert there.committed_shards("demo", MEL_FEATURE, params.key()) == here.committed_shards(
        "demo", MEL_FEATURE, params.key())
    for shard in run.shards:
        a = here.read_shard_arrays("demo", MEL_FEATURE, params.key(), shard, names=["mel"])[1]["mel"]
        b = there.read_shard_arrays("demo", MEL_FEATURE, params.key(), shard, names=["mel"])[1]["mel"]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
        ma = here.shard_manifest("demo", MEL_FEATURE, params.key(), shard)
        mb = there.shard_manifest("demo", MEL_FEATURE, params.key(), shard)
        assert ma["arrays"] == mb["arrays"]  # same sha256 of the rows, same shapes
        assert ma["clip_ids"] == mb["clip_ids"]
