"""The clip manifest: deterministic, append-only shard assignment; change detection; hash reuse."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

import stages.ingest.manifest as manifest_module
from stages.ingest.manifest import ClipManifest, build_manifest, content_hash, load_manifest, save_manifest
from stages.core.ids import safe_id
from stages.ingest.sources import SourceConfig, read_source
from stages.core.store import FeatureStore

SR = 16000


def write_wav(path: Path, seed: int, seconds: float = 1.5) -> None:
    rng = np.random.default_rng(seed)
    soundfile.write(str(path), rng.uniform(-0.5, 0.5, int(seconds * SR)).astype(np.float32), SR, subtype="PCM_16")


class WavDataset:
    """Real WAV files in ``<root>/media`` and a clips.jsonl that lists some of them."""

    def __init__(self, root: Path):
        self.root = root
        self.media = root / "media"
        self.media.mkdir(parents=True, exist_ok=True)
        self.jsonl = root / "clips.jsonl"

    def add(self, clip_id: str, seed: int) -> None:
        write_wav(self.media / f"{clip_id}.wav", seed)

    def rewrite(self, clip_id: str, seed: int) -> None:
        """New content of the same length (so the same size); mtime moved on like a real edit."""
        path = self.media / f"{clip_id}.wav"
        before = path.stat()
        write_wav(path, seed)
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))

    def list(self, ids, extra_rows=()):
        rows = [{"id": i, "path": f"media/{i}.wav", "caption": f"caption of {i}", "label": "noise"} for i in ids]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra_rows]), encoding="utf-8")
        return read_source(SourceConfig(kind="jsonl", path=str(self.jsonl)))

    def uri(self, clip_id: str) -> str:
        return str(self.media / f"{clip_id}.wav")


@pytest.fixture
def wavs(tmp_path) -> WavDataset:
    dataset = WavDataset(tmp_path / "source")
    for n in range(10):
        dataset.add(f"c{n:03d}", seed=n)
    return dataset


IDS = [f"c{n:03d}" for n in range(10)]


def shard_of(manifest: ClipManifest) -> dict[str, str]:
    return {c.id: c.shard_id for c in manifest.clips}


def names_by_shard_id(manifest: ClipManifest) -> dict[str, str]:
    return {name.split("-")[0]: name for name in manifest.by_shard()}


def test_shard_assignment_is_deterministic(wavs):
    listing = wavs.list(IDS)
    first, delta = build_manifest("wav", listing, None, shard_size=4)
    assert delta.added == IDS and delta.changed == [] and delta.removed == []
    assert shard_of(first) == {**{i: "s000000" for i in IDS[:4]}, **{i: "s000001" for i in IDS[4:8]},
                               **{i: "s000002" for i in IDS[8:]}}
    shards = first.by_shard()
    assert [name.split("-")[0] for name in shards] == ["s000000", "s000001", "s000002"]
    assert all(len(name.split("-")[1]) == 10 for name in shards)
    assert [[c.id for c in clips] for clips in shards.values()] == [IDS[:4], IDS[4:8], IDS[8:]]

    # Real content hashes of the files, captions and labels carried along.
    index = first.index()
    assert index["c003"].content_hash == content_hash((wavs.media / "c003.wav").read_bytes())
    assert index["c003"].uri == wavs.uri("c003")
    assert (index["c003"].caption, index["c003"].label, index["c003"].split) == ("caption of c003", "noise", "train")
    assert len({c.content_hash for c in first.clips}) == 10

    # The same source, listed in another order, gives the same manifest byte for byte.
    again, _ = build_manifest("wav", wavs.list(list(reversed(IDS))), None, shard_size=4)
    assert again.to_jsonl() == first.to_jsonl()
    assert again.digest() == first.digest()
    assert list(again.by_shard()) == list(shards)


def test_adding_clips_appends_new_shards_and_never_moves_old_clips(wavs):
    old, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    # New ids sort before, between and after the old ones: still appended after the last shard.
    new_ids = ["a000", "c004b", "c100", "d000", "e000"]
    for n, clip_id in enumerate(new_ids):
        wavs.add(clip_id, seed=100 + n)
    grown, delta = build_manifest("wav", wavs.list(IDS + new_ids), old, shard_size=4)

    assert delta.added == sorted(new_ids)
    assert delta.changed == [] and delta.removed == []
    before, after = shard_of(old), shard_of(grown)
    assert {i: after[i] for i in IDS} == before  # no old clip moved
    assert {i: after[i] for i in new_ids} == {"a000": "s000003", "c004b": "s000003", "c100": "s000003",
                                              "d000": "s000003", "e000": "s000004"}
    # Every old shard keeps its store name (so its cached features); the new ones are appended.
    old_names, new_names = list(old.by_shard()), list(grown.by_shard())
    assert new_names[:3] == old_names
    assert [n.split("-")[0] for n in new_names[3:]] == ["s000003", "s000004"]


def test_changed_file_renames_only_its_shard_and_is_reported(wavs):
    old, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    old_hash = old.index()["c005"].content_hash
    wavs.rewrite("c005", seed=555)
    new, delta = build_manifest("wav", wavs.list(IDS), old, shard_size=4)

    assert delta.changed == ["c005"]
    assert delta.added == [] and delta.removed == []
    assert new.index()["c005"].content_hash == content_hash((wavs.media / "c005.wav").read_bytes()) != old_hash
    assert shard_of(new) == shard_of(old)
    before, after = names_by_shard_id(old), names_by_shard_id(new)
    assert after["s000000"] == before["s000000"]
    assert after["s000002"] == before["s000002"]
    assert after["s000001"] != before["s000001"]  # c005's shard: new fingerprint, recomputed beside the old
    assert {c.id: c.content_hash for c in new.clips if c.id != "c005"} == {
        c.id: c.content_hash for c in old.clips if c.id != "c005"}


def test_removed_clip_goes_to_delta_removed(wavs):
    old, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    remaining = [i for i in IDS if i != "c009"]
    new, delta = build_manifest("wav", wavs.list(remaining), old, shard_size=4)
    assert delta.removed == ["c009"]
    assert delta.added == [] and delta.changed == []
    assert "c009" not in new.index()
    before, after = names_by_shard_id(old), names_by_shard_id(new)
    assert after["s000000"] == before["s000000"] and after["s000001"] == before["s000001"]
    assert after["s000002"] != before["s000002"]
    assert [c.id for c in new.by_shard()[after["s000002"]]] == ["c008"]

    # The clip comes back later: it is new again and goes to a new shard, with c008 (alone in the
    # short last shard, which leaves this version); the full shards stay put.
    back, delta = build_manifest("wav", wavs.list(IDS), new, shard_size=4)
    assert delta.added == ["c009"] and delta.moved == ["c008"]
    assert shard_of(back)["c009"] == shard_of(back)["c008"] == "s000003"
    assert "s000002" not in names_by_shard_id(back)
    assert {k: names_by_shard_id(back)[k] for k in ("s000000", "s000001")} == {k: after[k] for k in ("s000000", "s000001")}


def test_duplicates_and_unreadable_clips_are_quarantined_with_a_reason(wavs):
    (wavs.media / "empty.wav").write_bytes(b"")
    extra = [
        {"id": "c002", "path": "media/c007.wav", "caption": "same id again"},
        {"id": "empty", "path": "media/empty.wav", "caption": "zero bytes"},
        {"id": "ghost", "path": "media/ghost.wav", "caption": "no such file"},
        {"id": "bad.id", "path": "media/c001.wav", "caption": "dot in the id"},
    ]
    manifest, delta = build_manifest("wav", wavs.list(IDS, extra), None, shard_size=4)
    derived = safe_id("bad.id")  # kept under a safe id, its original name beside it
    assert derived.startswith("bad_id-") and manifest.index()[derived].name == "bad.id"
    assert sorted(c.id for c in manifest.clips) == sorted(IDS + [derived])
    assert manifest.index()["c002"].uri == wavs.uri("c002")  # the first one seen wins
    reasons = {q["id"]: q["reason"] for q in manifest.quarantined}
    assert set(reasons) == {"c002", "empty", "ghost"}
    assert reasons["c002"].startswith("duplicate clip id") and wavs.uri("c002") in reasons["c002"]
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["ghost"] == "media file not found"
    assert delta.added == sorted(IDS + [derived])
    # c001 and the derived clip are one file: same group, same split, and listed as duplicate media.
    index = manifest.index()
    assert index[derived].group == index["c001"].group and index[derived].split == index["c001"].split
    assert manifest.metadata["duplicate_media"] == [sorted(["c001", derived])]
    # Quarantined clips survive a save/load round trip with their reasons.
    assert ClipManifest.from_jsonl(manifest.to_jsonl()).quarantined == manifest.quarantined


def test_unchanged_stat_reuses_the_hash_without_reading(wavs, monkeypatch):
    reads: list[str] = []
    real_hash = manifest_module.content_hash_of

    def counting_hash(uri, storage_options=None):
        reads.append(uri)
        return real_hash(uri, storage_options)

    monkeypatch.setattr(manifest_module, "content_hash_of", counting_hash)
    first, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    assert sorted(reads) == sorted(wavs.uri(i) for i in IDS)
    assert all(c.stat for c in first.clips)

    reads.clear()
    second, delta = build_manifest("wav", wavs.list(IDS), first, shard_size=4)
    assert reads == []  # nothing read: every stat matched
    assert second.to_jsonl() == first.to_jsonl()
    assert delta.added == delta.changed == delta.removed == []

    wavs.rewrite("c001", seed=1001)
    reads.clear()
    third, delta = build_manifest("wav", wavs.list(IDS), second, shard_size=4)
    assert reads == [wavs.uri("c001")]  # only the file whose stat changed
    assert delta.changed == ["c001"]

    # A touched file with the same bytes is re-read but is not a change.
    os.utime(wavs.media / "c002.wav", ns=(0, (wavs.media / "c002.wav").stat().st_mtime_ns + 7_000_000_000))
    reads.clear()
    fourth, delta = build_manifest("wav", wavs.list(IDS), third, shard_size=4)
    assert reads == [wavs.uri("c002")]
    assert delta.changed == []
    assert list(fourth.by_shard()) == list(third.by_shard())


def test_a_moved_copy_is_rehashed_and_keeps_every_shard_name(wavs, tmp_path):
    old, _ = build_manifest("wav", wavs.list(IDS), None, shard_size=4)
    moved = WavDataset(tmp_path / "moved")
    shutil.copytree(wavs.media, moved.media, dirs_exist_ok=True)
    new, delta = build_manifest("wav", moved.list(IDS), old, shard_size=4)
    assert delta.added == delta.changed == delta.removed == []
    assert new.index()["c000"].uri == moved.uri("c000")
    assert list(new.by_shard()) == list(old.by_shard())  # fingerprints hash ids and content only


def test_captions_with_unicode_line_separators_survive_save_and_load(wavs, tmp_path):
    captions = {"c000": "first line\u2028second line", "c001": "a \u0085 next-line char", "c002": "para\u2029graph"}
    rows = [{"id": i, "path": f"media/{i}.wav", "caption": captions.get(i, "plain")} for i in IDS]
    wavs.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    listing = read_source(SourceConfig(kind="jsonl", path=str(wavs.jsonl)))
    manifest, _ = build_manifest("wav", listing, None, shard_size=4)
    assert {i: manifest.index()[i].caption for i in captions} == captions
    assert ClipManifest.from_jsonl(manifest.to_jsonl()) == manifest
    store = FeatureStore(str(tmp_path / "features"))
    digest = save_manifest(store, manifest)
    loaded = load_manifest(store, "wav", digest)
    assert loaded == manifest
    assert loaded.index()["c000"].caption == "first line\u2028second line"


def test_shard_size_must_be_positive(wavs):
    with pytest.raises(ValueError, match="shard_size"):
        build_manifest("wav", wavs.list(IDS), None, shard_size=0)



def test_save_and_load_round_trip_keeps_history(wavs, store):
    assert load_manifest(store, "wav") is None
    first, _ = build_manifest("wav", wavs.list(IDS[:6]), None, shard_size=4)
    first_digest = save_manifest(store, first)
    assert first_digest == first.digest()
    loaded = load_manifest(store, "wav")
    assert loaded == first  # dataclass equality: every clip field, shard size, quarantine

    wavs.add("c100", seed=100)
    second, _ = build_manifest("wav", wavs.list(IDS + ["c100"]), loaded, shard_size=4)
    second_digest = save_manifest(store, second)
    assert second_digest != first_digest

    latest = store.read_json(store.path("wav", "clip_manifest", "latest.json"))
    assert latest["manifest"] == second_digest
    assert (latest["clips"], latest["shards"], latest["quarantined"]) == (11, 4, 0)
    assert load_manifest(store, "wav") == second
    assert load_manifest(store, "wav", first_digest) == first  # older manifests stay readable
    assert load_manifest(store, "wav").to_jsonl() == second.to_jsonl()


def test_a_damaged_ledger_pointer_falls_back_and_a_damaged_version_is_named(tmp_path):
    from stages.core.store import FeatureStore, StoreError
    from stages.ingest.manifest import Clip, ClipManifest, load_manifest, save_manifest

    store = FeatureStore(str(tmp_path / "features"))
    first = ClipManifest("ds", 4, [Clip(id="a", uri="/m/a.wav", content_hash="h1", shard_id="s000000")])
    save_manifest(store, first)
    second = ClipManifest("ds", 4, first.clips + [Clip(id="b", uri="/m/b.wav", content_hash="h2", shard_id="s000000")])
    digest = save_manifest(store, second)
    latest = tmp_path / "features" / "ds" / "clip_manifest" / "latest.json"
    latest.write_bytes(b"\x00garbage")
    assert load_manifest(store, "ds").digest() == digest  # the newest readable version
    (tmp_path / "features" / "ds" / "clip_manifest" / f"{digest}.jsonl").write_text('{"manifest": {"dataset": "ds"')
    with pytest.raises(StoreError, match=f"clip manifest .*{digest}.jsonl is damaged"):
        load_manifest(store, "ds", digest)
    assert load_manifest(store, "ds").digest() == first.digest()  # the damaged newest is skipped
