"""The dry run (stages.core.plan) on a tiny real store: before a run every shard is to compute, after
it none, after the source grows only the new clips; it reads listings and manifests, never media."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from stages.core.parallel import InProcessExecutor
from stages.core.plan import plan_run
from stages.core.store import FeatureStore
from stages.features.base import run_feature
from stages.features.mel import (AUDIO_IMAGE_CODE_VERSION, AUDIO_IMAGE_FEATURE, MEL_CODE_VERSION, MEL_FEATURE, AudioImageParams,
                                 MelParams, compute_audio_image_shard, compute_mel_shard)
from stages.ingest.manifest import build_manifest, save_manifest
from stages.ingest.sources import SourceConfig, read_source

FEATURES = [MEL_FEATURE, AUDIO_IMAGE_FEATURE]


@pytest.fixture
def source(demo_dataset, tmp_path):
    """A private copy of the 40-clip demo whose JSONL starts with 32 clips (more are added later)."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_dataset.parent, folder)
    jsonl = folder / demo_dataset.name
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    return jsonl, rows


def _listing(jsonl):
    return read_source(SourceConfig(kind="jsonl", path=str(jsonl)))


def _files(store: FeatureStore) -> set[str]:
    return set(store.fs.find(store.root))


def by_feature(plan) -> dict:
    return {f.feature: f for f in plan.features}


def test_plan_counts_what_a_run_computes_before_after_and_when_clips_arrive(source, tmp_path):
    jsonl, rows = source
    store = FeatureStore(str(tmp_path / "features"))
    manifest, _ = build_manifest("demo", _listing(jsonl), None, 16)
    save_manifest(store, manifest)
    written = _files(store)

    before = by_feature(plan_run(store, "demo", FEATURES, listing=_listing(jsonl)))
    for feature in FEATURES:
        assert before[feature].key is None  # the dataset never computed it: no key yet
        assert (before[feature].shards_total, before[feature].shards_cached, before[feature].shards_to_compute) == (2, 0, 2)
        assert before[feature].clips_to_compute == 32
        assert not before[feature].rate.measured and before[feature].seconds > 0
    assert _files(store) == written  # a dry run writes nothing

    mel, image = MelParams(), AudioImageParams()
    run_feature(store, manifest, MEL_FEATURE, mel.key(), mel.params(), MEL_CODE_VERSION, compute_mel_shard, InProcessExecutor())
    run_feature(store, manifest, AUDIO_IMAGE_FEATURE, image.key(mel.key()), image.params(), AUDIO_IMAGE_CODE_VERSION,
                compute_audio_image_shard, InProcessExecutor(), input_keys=(mel.key(),))

    after = plan_run(store, "demo", FEATURES, listing=_listing(jsonl))
    assert after.changes.new == [] and after.changes.changed == []
    for feature, key in ((MEL_FEATURE, mel.key()), (AUDIO_IMAGE_FEATURE, image.key(mel.key()))):
        planned = by_feature(after)[feature]
        assert planned.key == key and (planned.shards_cached, planned.shards_to_compute, planned.clips_to_compute) == (2, 0, 0)
        assert planned.rate.measured and "2 shards, 32 clips" in planned.rate.source
        assert planned.rate.seconds_per_clip > 0 and planned.rate.bytes_per_clip > 0
    assert "mel_spectrograms" in after.table() and "measured" in after.table()

    # 8 clips arrive and one caption is edited: a new shard of 8, and the edited clip's shard again.
    # A touched file is only hashed again by clip_manifest (same bytes: same shard).
    rows[3]["caption"] = "an edited caption"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    touched = next(c for c in _listing(jsonl).clips if c.id == rows[20]["id"])
    os.utime(touched.uri, (1_000_000_000, 1_000_000_000))
    written = _files(store)
    grown = plan_run(store, "demo", FEATURES, listing=_listing(jsonl))
    assert len(grown.changes.new) == 8 and grown.changes.changed == [rows[3]["id"]] and grown.changes.new_shards == [8]
    assert grown.changes.restat == [touched.id] and "1 to re-hash" in grown.table()
    planned = by_feature(grown)[MEL_FEATURE]
    assert (planned.shards_total, planned.shards_cached, planned.shards_to_compute, planned.clips_to_compute) == (3, 1, 2, 24)
    assert planned.seconds == pytest.approx(24 * planned.rate.seconds_per_clip) and grown.clips == 40
    assert _files(store) == written

    # What a real run then computes is what the plan said.
    regrown, _ = build_manifest("demo", _listing(jsonl), manifest, 16)
    run = run_feature(store, regrown, MEL_FEATURE, mel.key(), mel.params(), MEL_CODE_VERSION, compute_mel_shard,
                      InProcessExecutor())
    assert (run.shards_new, run.clips_computed) == (planned.shards_to_compute, planned.clips_to_compute)


def test_plan_without_a_listing_plans_the_manifest_and_names_a_guess(source, tmp_path):
    jsonl, _ = source
    store = FeatureStore(str(tmp_path / "features"))
    save_manifest(store, build_manifest("demo", _listing(jsonl), None, 16)[0])
    plan = plan_run(store, "demo", ["audio_tower"])
    assert plan.changes is None and by_feature(plan)["audio_tower"].shards_to_compute == 2
    assert "guess" in plan.table() and "source not listed" in plan.table()
    empty = plan_run(store, "nothing", [MEL_FEATURE])
    assert empty.manifest is None and by_feature(empty)[MEL_FEATURE].shards_total == 0 and "no clip manifest" in empty.table()
