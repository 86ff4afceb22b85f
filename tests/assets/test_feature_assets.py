"""The feature assets materialized through Dagster on real demo media and a bad-input folder."""

import shutil

import numpy as np
import pytest
from dagster import DagsterInstance

from assets.features import (audio_images, audio_images_valid, clip_manifest, mel_latents, mel_latents_valid, mel_spectrograms,
                             mel_spectrograms_valid)
from assets.resources import ClipSourceResource
from stages.features.mel import AUDIO_IMAGE_SHAPES, DEFAULT_AUDIO_IMAGE_SHAPE
from stages.features.spectral import get_preset
from stages.core.store import FeatureStore
from tests.fixtures.tiny import materialize_dataset, resources
from tests.fixtures.dagster_results import check_passed, materialization_metadata

ASSETS = [clip_manifest, mel_spectrograms, audio_images, mel_spectrograms_valid, audio_images_valid]
WITH_MEL_LATENTS = ASSETS + [mel_latents, mel_latents_valid]


def _resources(source: ClipSourceResource, root) -> dict:
    return resources(root, source)


@pytest.fixture
def demo_source(demo_dataset):
    return ClipSourceResource(kind="jsonl", path=str(demo_dataset), dataset="demo", shard_size=16)


def test_materialize_reports_and_reuses(demo_source, tmp_path):
    instance = DagsterInstance.ephemeral()
    first = materialize_dataset(WITH_MEL_LATENTS, _resources(demo_source, tmp_path), instance=instance)
    assert first.success
    manifest_meta = materialization_metadata(first, "clip_manifest")
    assert manifest_meta["clips"] == 40 and manifest_meta["shards"] == 3 and manifest_meta["clips_added"] == 40
    mel = materialization_metadata(first, "mel_spectrograms")
    assert (mel["shards_total"], mel["shards_new"], mel["shards_reused"]) == (3, 3, 0)
    assert mel["clips_ok"] == 40 and mel["clips_quarantined"] == 0
    assert mel["throughput_clips_per_s"] > 0 and len(mel["feature_key"]) == 16
    assert mel["preview"].startswith("![preview](data:image/png;base64,")
    images = materialization_metadata(first, "audio_images")
    assert images["mel_feature_key"] == mel["feature_key"] and images["clips_ok"] == 40
    assert "data:image/png;base64," in images["preview"]
    latents = materialization_metadata(first, "mel_latents")
    assert latents["mel_spectrograms_key"] == mel["feature_key"] and latents["clips_ok"] == 40
    assert latents["statistics_computed"] is True and 0 < latents["statistics_train_clips"] < 40
    assert check_passed(first) == {"mel_spectrograms_valid": True, "audio_images_valid": True, "mel_latents_valid": True}

    store = FeatureStore(str(tmp_path))
    table = store.read_arrays("demo", "mel_spectrograms", mel["feature_key"])
    preset = get_preset("hifigan22k")
    assert table.arrays["mel"].shape == (40, preset.n_mels, preset.n_frames(4.0))
    assert np.isfinite(table.arrays["mel"]).all()
    image_table = store.read_arrays("demo", "audio_images", images["feature_key"])
    assert image_table.arrays["image"].shape == (40, *AUDIO_IMAGE_SHAPES[DEFAULT_AUDIO_IMAGE_SHAPE], 3)

    again = materialize_dataset(WITH_MEL_LATENTS, _resources(demo_source, tmp_path), instance=instance)
    mel_again = materialization_metadata(again, "mel_spectrograms")
    assert (mel_again["shards_new"], mel_again["shards_reused"], mel_again["clips_computed"]) == (0, 3, 0)
    assert mel_again["feature_key"] == mel["feature_key"]
    latents_again = materialization_metadata(again, "mel_latents")
    assert latents_again["statistics_computed"] is False and latents_again["statistics_key"] == latents["statistics_key"]
    assert (latents_again["shards_new"], latents_again["shards_reused"], latents_again["feature_key"]) == (0, 3, latents["feature_key"])
    # Same shards, same key: the same data version, so nothing downstream looks stale.
    versions = [
        [e.materialization.tags.get("dagster/data_version") for e in r.get_asset_materialization_events()
         if e.asset_key.path[-1] == "mel_spectrograms"][0]
        for r in (first, again)
    ]
    assert versions[0] == versions[1] is not None


def test_changing_the_preset_builds_a_new_key_beside_the_old(demo_source, tmp_path):
    instance = DagsterInstance.ephemeral()
    first = materialize_dataset(ASSETS, _resources(demo_source, tmp_path), instance=instance)
    old_key = materialization_metadata(first, "mel_spectrograms")["feature_key"]
    second = materialize_dataset(ASSETS, _resources(demo_source, tmp_path),
        instance=instance,
        run_config={"ops": {"mel_spectrograms": {"config": {"preset": "audioldm16k"}}, "audio_images": {"config": {"size": 32}}}},
    )
    new = materialization_metadata(second, "mel_spectrograms")
    assert new["feature_key"] != old_key and new["shards_new"] == 3
    store = FeatureStore(str(tmp_path))
    assert store.read_arrays("demo", "mel_spectrograms", old_key).arrays["mel"].shape[1] == 80
    assert store.read_arrays("demo", "mel_spectrograms", new["feature_key"]).arrays["mel"].shape[1] == 64
    images_key = materialization_metadata(second, "audio_images")["feature_key"]
    assert store.read_arrays("demo", "audio_images", images_key).arrays["image"].shape[1:] == (32, 32, 3)
    assert {e["feature_key"] for e in store.catalog("demo", "mel_spectrograms")} == {old_key, new["feature_key"]}


def test_bad_clips_are_quarantined_and_the_rest_goes_on(demo_dataset, bad_media, tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    media_dir = demo_dataset.parent / "media"
    for path in sorted(media_dir.glob("*.mp4"))[:5]:
        shutil.copy(path, folder / path.name)
    for name in ("zero_byte_mp4", "corrupt_mp4", "no_audio_mp4", "silent_mp4", "too_short_mp4", "truncated_moov_mp4"):
        shutil.copy(bad_media[name], folder / f"bad_{name}.mp4")
    source = ClipSourceResource(kind="folder", path=str(folder), dataset="mixed", shard_size=8)
    result = materialize_dataset(ASSETS, _resources(source, tmp_path / "store"), instance=DagsterInstance.ephemeral())
    assert result.success
    manifest = materialization_metadata(result, "clip_manifest")
    mel = materialization_metadata(result, "mel_spectrograms")
    # An empty file is refused when it is hashed (manifest level); the rest when decoded.
    assert manifest["clips_quarantined"] == 1 and "empty file (0 bytes)" in manifest["quarantine"]
    assert mel["clips_ok"] == 5 and mel["clips_quarantined"] == 5
    for fragment in ("no audio stream", "silent", "too short", "bad_corrupt_mp4", "bad_truncated_moov_mp4"):
        assert fragment in mel["quarantine"]
    assert check_passed(result) == {"mel_spectrograms_valid": True, "audio_images_valid": True}


def test_whole_run_problems_fail_with_one_clear_line(tmp_path):
    missing = ClipSourceResource(kind="folder", path=str(tmp_path / "nowhere"), dataset="x")
    result = materialize_dataset(ASSETS, _resources(missing, tmp_path / "store"), instance=DagsterInstance.ephemeral(),
                         raise_on_error=False)
    assert not result.success
    message = _failure_message(result)
    assert "does not exist" in message and str(tmp_path / "nowhere") in message and "\n" not in message

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    demo = ClipSourceResource(kind="folder", path=str(tmp_path), dataset="x")
    result = materialize_dataset(ASSETS, _resources(demo, blocker / "store"), instance=DagsterInstance.ephemeral(),
                         raise_on_error=False)
    assert not result.success
    assert "not writable" in _failure_message(result)

    bad_name = ClipSourceResource(kind="folder", path=str(tmp_path), dataset="../up")
    result = materialize_dataset(ASSETS, _resources(bad_name, tmp_path / "store"), instance=DagsterInstance.ephemeral(),
                         raise_on_error=False)
    assert "dataset '../up' is not allowed" in _failure_message(result)


def _failure_message(result) -> str:
    """The one-line reason of a failed run: a step's failure, or (a whole-run problem, found before
    any step ran) the failure to set up the run's resources (store, dataset lease)."""
    failures = [e for e in result.all_events if e.event_type_value in ("STEP_FAILURE", "RESOURCE_INIT_FAILURE")]
    assert failures, "expected a step or resource failure"
    error = failures[0].event_specific_data.error
    while error.cause is not None and "Failure" not in error.cls_name:  # dagster wraps a resource's Failure
        error = error.cause
    return error.message.strip()


def test_a_dataset_registered_in_the_store_runs_by_its_partition(demo_dataset, tmp_path):
    """The default dataset's source is one resource; any other dataset runs from the source its
    name is registered with in the store, and an unregistered name fails before any work."""
    from stages.ingest.datasets import register_source
    from stages.ingest.sources import SourceConfig

    store = FeatureStore(str(tmp_path))
    register_source(store, "second", SourceConfig(kind="jsonl", path=str(demo_dataset)))
    default = ClipSourceResource(kind="folder", path=str(tmp_path / "nowhere"), dataset="demo", shard_size=16)
    result = materialize_dataset([clip_manifest, mel_spectrograms], _resources(default, tmp_path), dataset="second")
    assert result.success
    manifest = materialization_metadata(result, "clip_manifest")
    assert manifest["dataset"] == "second" and manifest["clips"] == 40
    assert store.read_json(store.path("second", "_outputs", "mel_spectrograms.json"))["value"]["dataset"] == "second"
    assert not store.exists(store.path("demo"))  # nothing written for the default dataset

    unknown = materialize_dataset([clip_manifest], _resources(default, tmp_path), dataset="third", raise_on_error=False)
    assert not unknown.success and "dataset 'third' is unknown" in _failure_message(unknown)
