"""Mel latents on the demo's stored mels: the exact inverse, train-split statistics, reuse, bad input."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from stages.core.errors import ConfigError
from stages.core.moments import AxisMoments
from stages.core.parallel import InProcessExecutor
from stages.core.store import FeatureStore
from stages.features import mel_latent as ML
from stages.features.base import all_features, run_feature
from stages.ingest.manifest import split_digest
from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, MelParams, compute_mel_shard
from stages.ingest.manifest import ClipManifest, build_manifest
from stages.ingest.sources import SourceConfig, read_source

MEL = MelParams()


def _run_mels(store: FeatureStore, manifest: ClipManifest):
    return run_feature(store, manifest, MEL_FEATURE, MEL.key(), MEL.params(), MEL_CODE_VERSION, compute_mel_shard,
                       InProcessExecutor())


def _run_latents(store: FeatureStore, manifest: ClipManifest, statistics_key: str, compute=ML.compute_mel_latent_shard):
    params = ML.MelLatentParams(statistics_key)
    return run_feature(store, manifest, ML.MEL_LATENT_FEATURE, params.key(MEL.key()), params.params(),
                       ML.MEL_LATENT_CODE_VERSION, compute, InProcessExecutor(), input_keys=(MEL.key(),))


@pytest.fixture(scope="module")
def demo(demo_dataset, tmp_path_factory):
    """The demo's 40 clips with their mels stored, and the manifest before its last train clip was added."""
    listing = read_source(SourceConfig(kind="jsonl", path=str(demo_dataset)))
    full, _ = build_manifest("demo", listing, None, 16)
    last_train = [c.id for c in full.clips if c.split == "train"][-1]
    fewer = read_source(SourceConfig(kind="jsonl", path=str(demo_dataset)))
    fewer.clips = [c for c in fewer.clips if c.id != last_train]
    before, _ = build_manifest("demo", fewer, None, 16)
    root = tmp_path_factory.mktemp("mel_latent") / "store"
    _run_mels(FeatureStore(str(root)), before)
    return {"root": root, "before": before, "listing": listing}


@pytest.fixture
def store(demo, tmp_path) -> FeatureStore:
    """A copy of the demo store per test: each test sees statistics computed by itself only."""
    shutil.copytree(demo["root"], tmp_path / "store")
    return FeatureStore(str(tmp_path / "store"))


def _train_mels(store: FeatureStore, manifest: ClipManifest) -> np.ndarray:
    train = {c.id for c in manifest.clips if c.split == "train"}
    table = store.read_arrays("demo", MEL_FEATURE, MEL.key(), shards=list(manifest.by_shard()), names=["mel"])
    return table.arrays["mel"][[i for i, c in enumerate(table.clip_ids) if c in train]]


def _float32_rounding_only(back, mel, z, statistics) -> bool:
    """Two float32 roundings (of z, then of the mel it gives back), at most half an ulp each, and nothing else."""
    bound = (np.abs(z) * statistics.std[:, None] + np.abs(mel)) * 2.0**-24 * 1.01
    return bool(np.all(np.abs(back - mel) <= bound))


def test_the_inverse_gives_back_the_stored_mels_up_to_float32_rounding(demo, store):
    assert ML.MEL_LATENT_FEATURE in all_features()  # registered: the asset factory and Dask workers find it
    manifest = demo["before"]
    key, statistics, computed = ML.ensure_statistics(store, manifest, MEL.key())
    assert computed and len(statistics.mean) == 80
    run = _run_latents(store, manifest, key)
    assert (run.shards_new, run.clips_ok, run.clips_quarantined) == (3, 39, 0)
    latents = store.read_arrays("demo", ML.MEL_LATENT_FEATURE, run.key)
    mels = store.read_arrays("demo", MEL_FEATURE, MEL.key(), shards=run.shards)
    assert latents.clip_ids == mels.clip_ids
    z, mel = latents.arrays["mel_latent"], mels.arrays["mel"].astype(np.float32)
    assert z.dtype == np.float32 and z.shape == mel.shape == (39, 80, 345)
    back = ML.denormalise(z, statistics)
    assert _float32_rounding_only(back, mel, z, statistics), np.abs(back - mel).max()
    stored = ML.latent_statistics(store, "demo", run.key)  # what a reader of the key denormalises with
    assert np.array_equal(stored.mean, statistics.mean) and np.array_equal(stored.std, statistics.std)
    # Normalised per bin over the train split: zero mean, unit std there.
    train = ML.normalise(_train_mels(store, manifest), statistics).astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=(0, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=(0, 2)), 1.0, atol=1e-5)


def test_statistics_come_from_the_train_split_only(demo, store):
    manifest = demo["before"]
    key, statistics, _ = ML.ensure_statistics(store, manifest, MEL.key())
    # Merged shard by shard, equal to the statistics of the train mels at once, and not of every split's.
    train = _train_mels(store, manifest)
    direct = ML.bin_statistics(train)
    np.testing.assert_allclose(statistics.mean, direct.mean, rtol=1e-12)
    np.testing.assert_allclose(statistics.std, direct.std, rtol=1e-10)
    assert statistics.clips == len(train) == sum(c.split == "train" for c in manifest.clips) and statistics.frames == len(train) * 345
    every = ML.bin_statistics(store.read_arrays("demo", MEL_FEATURE, MEL.key(), names=["mel"]).arrays["mel"])
    assert not np.allclose(every.mean, statistics.mean, rtol=1e-6)

    # Val / test clips changed (new media, new captions) or removed: the same statistics, not recomputed.
    held_out = [c for c in manifest.clips if c.split != "train"]
    changed = [dataclasses.replace(c, content_hash="0" * 32, caption="another") for c in held_out[::2]]
    others = ClipManifest("demo", manifest.shard_size, [c for c in manifest.clips if c.split == "train"] + changed)
    same_key, _, computed = ML.ensure_statistics(store, others, MEL.key())
    assert (same_key, computed) == (key, False)

    # A train clip added: new statistics, so a new mel_latents key.
    added, _ = build_manifest("demo", demo["listing"], manifest, 16)
    with pytest.raises(ConfigError, match=r"lacks 1 shards with train clips .* materialize mel_spectrograms first"):
        ML.ensure_statistics(store, added, MEL.key())
    _run_mels(store, added)
    new_key, new_statistics, computed = ML.ensure_statistics(store, added, MEL.key())
    assert computed and new_key != key and new_statistics.clips == statistics.clips + 1
    assert ML.MelLatentParams(new_key).key(MEL.key()) != ML.MelLatentParams(key).key(MEL.key())
    # A train clip changed (same id, other media): new statistics too.
    train_clip = next(c for c in manifest.clips if c.split == "train")
    edited = ClipManifest("demo", 16, [dataclasses.replace(c, content_hash="1" * 32) if c is train_clip else c
                                       for c in manifest.clips])
    assert ML.statistics_key(MEL.key(), split_digest(edited.clips)) != key


def test_a_second_call_computes_nothing(demo, store):
    manifest = demo["before"]
    key, statistics, computed = ML.ensure_statistics(store, manifest, MEL.key())
    first = _run_latents(store, manifest, key)
    assert computed and first.shards_new == 3
    # The statistics are read back (bit for bit), not computed: the mels are not even read.
    shutil.rmtree(store.path("demo", MEL_FEATURE))
    again_key, again, computed = ML.ensure_statistics(store, manifest, MEL.key())
    assert (again_key, computed) == (key, False)
    assert np.array_equal(again.mean, statistics.mean) and np.array_equal(again.std, statistics.std)

    def must_not_compute(job):
        raise AssertionError(f"shard {job.shard} was computed again")

    second = _run_latents(store, manifest, key, compute=must_not_compute)
    assert (second.key, second.shards_new, second.shards_reused, second.clips_computed) == (first.key, 0, 3, 0)


def test_a_dataset_without_train_clips_is_one_line(demo, store):
    held_out = ClipManifest("demo", 16, [dataclasses.replace(c, split="val") for c in demo["before"].clips])
    with pytest.raises(ConfigError) as raised:
        ML.ensure_statistics(store, held_out, MEL.key())
    message = str(raised.value)
    assert message == "dataset 'demo' has no train clips: mel statistics come from the train split only"
    with pytest.raises(ConfigError, match="need the key of their mel statistics"):
        ML.MelLatentParams("")
    with pytest.raises(ConfigError, match="no mel statistics nokey in .*: materialize mel_latents"):
        ML.load_statistics(store, "demo", "nokey")


def test_bin_statistics_by_hand():
    mels = np.array([[[0.0, 2.0], [5.0, 5.0]], [[4.0, 6.0], [5.0, 5.0]]], np.float16)  # 2 clips, 2 bins, 2 frames
    stats = ML.bin_statistics(mels)
    np.testing.assert_allclose(stats.mean, [3.0, 5.0])
    np.testing.assert_allclose(stats.std[0], np.sqrt(5.0))  # (9 + 1 + 1 + 9) / 4
    assert stats.std[1] == 1.0  # a constant bin keeps std 1: its latent is the offset from the mean
    assert (stats.clips, stats.frames) == (2, 4)
    halves = ML._statistics(AxisMoments.of(mels[:1], axis=1).merged(AxisMoments.of(mels[1:], axis=1)), clips=2)
    np.testing.assert_allclose(halves.mean, stats.mean)
    np.testing.assert_allclose(halves.std, stats.std)
    z = ML.normalise(mels, stats)
    assert _float32_rounding_only(ML.denormalise(z, stats), mels.astype(np.float32), z, stats)
    with pytest.raises(ValueError, match="need mels"):
        ML.bin_statistics(np.zeros((0, 80, 10)))
