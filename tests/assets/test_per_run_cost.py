"""Issue 14, per-run cost: a re-run's checks and previews look only at the shards it wrote (reused
shards were verified by run_feature's stamps), and damage to a reused shard is still found."""

from pathlib import Path

import pytest
from dagster import DagsterInstance

from assets.resources import ClipSourceResource
from tests.assets.test_feature_assets import ASSETS
from tests.fixtures.dagster_results import check_evaluations, materialization_metadata
from tests.fixtures.tiny import materialize_dataset, resources


@pytest.fixture
def demo_source(demo_dataset):
    return ClipSourceResource(kind="jsonl", path=str(demo_dataset), dataset="demo", shard_size=16)


def _checked(result) -> dict:
    return {name: (c.passed, c.metadata["shards_checked"].value) for name, c in check_evaluations(result).items()}


def test_rerun_checks_and_previews_only_new_shards_and_still_finds_damage(demo_source, tmp_path):
    instance = DagsterInstance.ephemeral()
    first = materialize_dataset(ASSETS, resources(tmp_path, demo_source), instance=instance)
    assert _checked(first) == {"mel_spectrograms_valid": (True, 3), "audio_images_valid": (True, 3)}
    assert "preview" in materialization_metadata(first, "mel_spectrograms")

    again = materialize_dataset(ASSETS, resources(tmp_path, demo_source), instance=instance)
    assert _checked(again) == {"mel_spectrograms_valid": (True, 0), "audio_images_valid": (True, 0)}
    mel = materialization_metadata(again, "mel_spectrograms")
    assert mel["shards_reused"] == 3 and "preview" not in mel  # nothing new to show

    # Damage one reused shard's stored mel: its files changed since they verified, so the next
    # run reads it whole, retires it, computes it again, and the check looks at that shard.
    key_dir = Path(tmp_path) / "demo" / "mel_spectrograms" / mel["feature_key"]
    chunk = next(p for p in sorted(key_dir.glob("*.zarr/mel/c/**/*")) if p.is_file())
    chunk.write_bytes(bytes(b ^ 0xFF for b in chunk.read_bytes()))
    third = materialize_dataset(ASSETS, resources(tmp_path, demo_source), instance=instance)
    mel = materialization_metadata(third, "mel_spectrograms")
    assert (mel["shards_retired"], mel["shards_new"]) == (1, 1) and "preview" in mel
    assert _checked(third)["mel_spectrograms_valid"] == (True, 1)
