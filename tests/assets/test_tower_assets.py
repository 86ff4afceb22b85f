"""The tower feature assets materialized through Dagster on real demo media, then re-run."""

import json
import shutil

import numpy as np
import pytest
from dagster import DagsterInstance

from assets.features import clip_manifest
from assets.resources import ClipSourceResource
from assets.towers import TOWER_ASSETS, TOWER_CHECKS
from stages.core.store import FeatureStore
from tests.models import tower_weights_dir  # noqa: F401
from tests.fixtures.tiny import materialize_dataset, resources
from tests.fixtures.dagster_results import check_evaluations, materialization_metadata

pytestmark = pytest.mark.usefixtures("tower_weights_dir")

ASSETS = [clip_manifest, *TOWER_ASSETS, *TOWER_CHECKS]
NAMES = ("audio_tower", "frame_tower", "text_tower")


@pytest.fixture
def small_source(demo_dataset, bad_media, tmp_path):
    """7 clips in 2 shards: 5 demo clips, an audio-only m4a, and a demo clip without caption or label."""
    folder = tmp_path / "source"
    (folder / "media").mkdir(parents=True)
    records = [json.loads(line) for line in demo_dataset.read_text().splitlines()[:6]]
    rows = []
    for r in records[:5]:
        shutil.copy(demo_dataset.parent / r["path"], folder / r["path"])
        rows.append({"id": r["id"], "path": r["path"], "caption": r["caption"], "label": r["label"]})
    shutil.copy(bad_media["audio_only_m4a"], folder / "media" / "tone.m4a")
    rows.append({"id": "tone_only", "path": "media/tone.m4a", "caption": "a steady 440 Hz tone"})
    shutil.copy(demo_dataset.parent / records[5]["path"], folder / "media" / "bare.mp4")
    rows.append({"id": "bare", "path": "media/bare.mp4"})
    (folder / "clips.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "clips.jsonl"


def _resources(jsonl, root) -> dict:
    return resources(root, ClipSourceResource(kind="jsonl", path=str(jsonl), dataset="towers", shard_size=4))


def _version(result, asset_name: str) -> str:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset_name]
    return event.materialization.tags.get("dagster/data_version")


def test_tower_assets_materialize_check_and_reuse(small_source, tmp_path):
    instance = DagsterInstance.ephemeral()
    store_root = tmp_path / "store"
    first = materialize_dataset(ASSETS, _resources(small_source, store_root), instance=instance)
    assert first.success
    audio, frames, text = (materialization_metadata(first, name) for name in NAMES)
    assert (audio["shards_total"], audio["shards_new"], audio["clips_ok"], audio["clips_quarantined"]) == (2, 2, 7, 0)
    assert (frames["clips_ok"], frames["clips_quarantined"]) == (6, 1)
    assert "| tone_only |" in frames["quarantine"] and "no video stream" in frames["quarantine"]
    assert (text["clips_ok"], text["clips_quarantined"]) == (6, 1)
    assert "| bare |" in text["quarantine"] and "no caption or label" in text["quarantine"]
    for meta in (audio, frames, text):
        assert len(meta["feature_key"]) == 16 and meta["throughput_clips_per_s"] > 0 and meta["clips_computed"] == 7
    assert audio["tower"] == "aisfx 0.1.2" and frames["tower_settings"]["size"] == 128
    assert text["tower_settings"]["weights_sha256"].startswith("53aa5117")
    checks = check_evaluations(first)
    assert {name: c.passed for name, c in checks.items()} == {f"{n}_valid": True for n in NAMES}
    assert checks["text_tower_valid"].metadata["text_norm_max"].value == pytest.approx(1.0, abs=1e-3)
    assert checks["audio_tower_valid"].metadata["rows"].value == 7

    store = FeatureStore(str(store_root))
    table = store.read_arrays("towers", "audio_tower", audio["feature_key"])
    assert table.arrays["per_second"].shape == (7, 4, 512) and table.arrays["logits"].shape == (7, 69)
    table = store.read_arrays("towers", "frame_tower", frames["feature_key"])
    assert "tone_only" not in table.clip_ids and table.arrays["per_second"].shape == (6, 4, 1280)
    table = store.read_arrays("towers", "text_tower", text["feature_key"])
    assert "bare" not in table.clip_ids and np.allclose(np.linalg.norm(table.arrays["text"], axis=1), 1, atol=1e-5)

    again = materialize_dataset(ASSETS, _resources(small_source, store_root), instance=instance)
    assert again.success
    for name in NAMES:
        meta = materialization_metadata(again, name)
        assert (meta["shards_new"], meta["shards_reused"], meta["clips_computed"]) == (0, 2, 0)
        assert meta["feature_key"] == materialization_metadata(first, name)["feature_key"]
        assert _version(again, name) == _version(first, name) is not None
    assert all(c.passed for c in check_evaluations(again).values())


def test_a_changed_caption_recomputes_only_its_shard(small_source, tmp_path):
    """Captions are part of a shard's fingerprint: editing one re-keys that shard, the text is
    embedded again, and the check (which compares rows with the current captions) passes."""
    instance = DagsterInstance.ephemeral()
    resources = _resources(small_source, tmp_path / "store")
    only_text = [clip_manifest, TOWER_ASSETS[2], TOWER_CHECKS[2]]
    first = materialize_dataset(only_text, resources, instance=instance)
    assert first.success
    rows = [json.loads(line) for line in small_source.read_text().splitlines()]
    rows[0]["caption"] = "a completely different caption"
    small_source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    second = materialize_dataset(only_text, resources, instance=instance)
    metadata = materialization_metadata(second, "text_tower")
    assert metadata["shards_new"] == 1 and metadata["shards_reused"] == metadata["shards_total"] - 1
    assert check_evaluations(second)["text_tower_valid"].passed


def test_bad_tower_config_fails_with_one_line(small_source, tmp_path):
    result = materialize_dataset([clip_manifest, TOWER_ASSETS[1]], _resources(small_source, tmp_path / "store"),
        instance=DagsterInstance.ephemeral(), raise_on_error=False,
        run_config={"ops": {"frame_tower": {"config": {"size": 8}}}},
    )
    # The run's config is checked when it starts (assets/run_config.py): no step ran.
    assert not result.success and not [e for e in result.all_events if e.event_type_value == "STEP_START"]
    (failure,) = [e for e in result.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE"]
    message = failure.event_specific_data.error.message.strip()
    assert message.startswith("dagster._core.definitions.events.Failure: bad frame_tower config:")
    assert "size must be within 32..512" in message and "\n" not in message
