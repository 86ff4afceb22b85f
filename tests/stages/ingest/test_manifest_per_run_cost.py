"""Issue 14, per-run cost: hash reuse that is safe (what the stat token trusts), and small appends
that fill a short last shard instead of fragmenting the store, while full shards stay as they are."""

from __future__ import annotations

import os

from stages.core.store import FeatureStore
from stages.ingest.manifest import build_manifest, content_hash, load_manifest, save_manifest
import pytest

from tests.stages.ingest.test_manifest import IDS, WavDataset, names_by_shard_id, shard_of, write_wav


@pytest.fixture
def wavs(tmp_path) -> WavDataset:
    dataset = WavDataset(tmp_path / "wavs")
    for n in range(10):
        dataset.add(f"c{n:03d}", seed=n)
    return dataset


def test_a_same_size_rewrite_with_its_mtime_set_back_is_hashed_again(wavs):
    first, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    path = wavs.media / "c003.wav"
    before = path.stat()
    write_wav(path, seed=303)  # new bytes, same length
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    second, delta = build_manifest("wav", wavs.list(IDS), first, shard_size=4)
    assert delta.changed == ["c003"]  # ctime moved: the token differs, so the file was read again
    assert second.index()["c003"].content_hash == content_hash(path.read_bytes()) != first.index()["c003"].content_hash


def test_a_file_replaced_by_a_rename_with_the_same_size_and_mtime_is_hashed_again(wavs, tmp_path):
    first, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    path = wavs.media / "c004.wav"
    before = path.stat()
    staged = tmp_path / "staged.wav"  # how rsync and `cp -p` + `mv` replace a file: a new inode
    write_wav(staged, seed=404)
    os.utime(staged, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(staged, path)
    assert path.stat().st_ino != before.st_ino

    second, delta = build_manifest("wav", wavs.list(IDS), first, shard_size=4)
    assert delta.changed == ["c004"]
    assert second.index()["c004"].content_hash == content_hash(path.read_bytes())


def test_the_hash_cache_is_stored_with_the_dataset_and_survives_a_new_process(wavs, tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    first, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    save_manifest(store, first)
    loaded = load_manifest(FeatureStore(str(tmp_path / "store")), "wav")
    assert [c.stat for c in loaded.clips] == [c.stat for c in first.clips] and all(c.stat for c in loaded.clips)
    # A file gone since is not served from the cache: it is not listed, so it leaves the manifest.
    os.remove(wavs.media / "c009.wav")
    again, delta = build_manifest("wav", wavs.list(IDS), loaded, shard_size=4)
    assert delta.removed == ["c009"] and [q["id"] for q in again.quarantined] == ["c009"]


def test_an_unchanged_source_keeps_every_shard(wavs):
    first, _ = build_manifest("wav", wavs.list(IDS[:9]), None, shard_size=4)  # 4, 4, 1: a short last shard
    again, delta = build_manifest("wav", wavs.list(IDS[:9]), first, shard_size=4)
    assert again.to_jsonl() == first.to_jsonl() and delta.moved == [] and delta.added == []


def test_a_small_append_fills_the_short_last_shard_under_a_new_shard_id(wavs):
    old, _ = build_manifest("wav", wavs.list(IDS[:9]), None, shard_size=4)  # s0: 4, s1: 4, s2: c008 alone
    grown, delta = build_manifest("wav", wavs.list(IDS), old, shard_size=4)  # + c009
    assert delta.added == ["c009"] and delta.moved == ["c008"]
    assert shard_of(grown)["c008"] == shard_of(grown)["c009"] == "s000003"  # fresh id, never reused
    before, after = names_by_shard_id(old), names_by_shard_id(grown)
    assert after["s000000"] == before["s000000"] and after["s000001"] == before["s000001"]  # full shards kept
    assert "s000002" not in after
    assert [len(clips) for clips in grown.by_shard().values()] == [4, 4, 2]

    # A last shard at least half full stays: the next append opens a new shard beside it.
    for n, clip_id in enumerate(["d000", "d001", "d002"]):
        wavs.add(clip_id, seed=200 + n)
    third, delta = build_manifest("wav", wavs.list(IDS + ["d000", "d001", "d002"]), grown, shard_size=4)
    assert delta.moved == [] and names_by_shard_id(third)["s000003"] == after["s000003"]
    assert {shard_of(third)[i] for i in ("d000", "d001", "d002")} == {"s000004"}


def test_repeated_one_clip_appends_leave_at_most_the_last_shard_under_half_full(wavs):
    manifest, _ = build_manifest("wav", wavs.list(IDS[:4]), None, shard_size=8)
    ids = list(IDS[:4])
    for n in range(12):
        clip_id = f"e{n:03d}"
        wavs.add(clip_id, seed=300 + n)
        ids.append(clip_id)
        manifest, delta = build_manifest("wav", wavs.list(ids), manifest, shard_size=8)
        assert len(delta.moved) < 8 / 2  # an append recomputes fewer than half a shard of old clips
        sizes = [len(clips) for clips in manifest.by_shard().values()]
        assert all(2 * size >= 8 for size in sizes[:-1]), sizes
    assert sum(sizes) == 16 and len(sizes) <= 2 * 16 // 8  # shards at least half full, not one per append (13)


def test_a_version_damaged_after_it_was_read_in_this_process_is_read_and_refused(wavs, tmp_path):
    from stages.core.store import StoreError

    store = FeatureStore(str(tmp_path / "store"))
    manifest, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    digest = save_manifest(store, manifest)
    assert load_manifest(store, "wav", digest).to_jsonl() == manifest.to_jsonl()  # read once: kept in this process
    loaded = load_manifest(store, "wav", digest)
    loaded.clips.clear()  # a caller's copy: what the next reader gets is not changed by it
    assert len(load_manifest(store, "wav", digest).clips) == len(IDS)
    version = tmp_path / "store" / "wav" / "clip_manifest" / f"{digest}.jsonl"
    text = version.read_text()
    version.write_text(text.replace("caption of c001", "caption of c00X"))  # same size, new bytes and mtime
    with pytest.raises(StoreError, match="does not match its digest"):
        load_manifest(store, "wav", digest)
