"""FeatureStore: keys, shard round trips (local and S3), atomic commit, manifests, catalog, names."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest

from stages.core.ids import UnsafeNameError
from stages.core.store import FeatureStore, StoreError, feature_key

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))



@pytest.fixture
def local_store(tmp_path) -> FeatureStore:
    return FeatureStore(str(tmp_path / "features"))


def make_rows(n: int, seed: int) -> dict[str, np.ndarray]:
    """One row per clip of each dtype the store keeps: float16 mels, float32 embeddings, uint8 images."""
    rng = np.random.default_rng(seed)
    return {
        "mel": rng.normal(-4.0, 2.0, (n, 8, 10)).astype(np.float16),
        "emb": rng.normal(0.0, 1.0, (n, 16)).astype(np.float32),
        "image": rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8),
    }


def write(store: FeatureStore, shard: str, clip_ids: list[str], arrays: dict, *, key: str = "k1",
          dataset: str = "ds", feature: str = "feat", manifest: dict | None = None) -> dict:
    return store.write_shard(
        dataset, feature, key, shard,
        clip_ids=clip_ids,
        arrays=arrays,
        manifest=manifest if manifest is not None else {"params": {"p": 1}, "quarantined": []},
        tar_encodings={"image": "png"},
        sample_meta=[{"content_hash": f"h-{c}"} for c in clip_ids],
    )


# ---- feature keys ----------------------------------------------------------------------------


def test_feature_key_changes_with_every_input_and_is_stable_otherwise():
    base = feature_key("mel", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2]}, "1", ["abc"])
    assert len(base) == 16 and int(base, 16) >= 0
    # Stable: same inputs, dict order, tuples vs lists (canonical JSON).
    assert feature_key("mel", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2]}, "1", ["abc"]) == base
    assert feature_key("mel", {"sizes": (1, 2), "seconds": 4.0, "preset": "hifigan22k"}, "1", ("abc",)) == base

    variants = [
        feature_key("mel2", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2]}, "1", ["abc"]),
        feature_key("mel", {"preset": "audioldm16k", "seconds": 4.0, "sizes": [1, 2]}, "1", ["abc"]),
        feature_key("mel", {"preset": "hifigan22k", "seconds": 4.5, "sizes": [1, 2]}, "1", ["abc"]),
        feature_key("mel", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2], "extra": 0}, "1", ["abc"]),
        feature_key("mel", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2]}, "2", ["abc"]),
        feature_key("mel", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2]}, "1", ["abd"]),
        feature_key("mel", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2]}, "1", ["abc", "def"]),
        feature_key("mel", {"preset": "hifigan22k", "seconds": 4.0, "sizes": [1, 2]}, "1", []),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


# ---- round trip ------------------------------------------------------------------------------


def test_write_shard_read_arrays_and_webdataset_round_trip(store):
    ids_a = ["clip_03", "clip_01", "clip_02"]  # rows stay in the order they were written
    ids_b = ["clip_10", "clip_11"]
    rows_a, rows_b = make_rows(3, seed=1), make_rows(2, seed=2)
    write(store, "s000000-aaaa", ids_a, rows_a)
    write(store, "s000001-bbbb", ids_b, rows_b)

    assert store.committed_shards("ds", "feat", "k1") == ["s000000-aaaa", "s000001-bbbb"]
    assert store.feature_keys("ds", "feat") == ["k1"]

    table = store.read_arrays("ds", "feat")  # newest (only) key
    assert table.feature_key == "k1"
    assert table.clip_ids == ids_a + ids_b
    assert table.shards == ["s000000-aaaa", "s000001-bbbb"]
    assert len(table) == 5
    for name in ("mel", "emb", "image"):
        expected = np.concatenate([rows_a[name], rows_b[name]])
        assert table.arrays[name].dtype == expected.dtype
        assert table.arrays[name].shape == expected.shape
        np.testing.assert_array_equal(table.arrays[name], expected)

    # Subsets: by array name and by shard.
    only = store.read_arrays("ds", "feat", "k1", shards=["s000001-bbbb"], names=["emb"])
    assert only.clip_ids == ids_b and list(only.arrays) == ["emb"]
    np.testing.assert_array_equal(only.arrays["emb"], rows_b["emb"])

    # WebDataset: one sample per clip, the same values as the zarr rows.
    samples = {s["__key__"]: s for s in store.webdataset("ds", "feat", "k1")}
    assert sorted(samples) == sorted(table.clip_ids)
    for row, clip_id in enumerate(table.clip_ids):
        sample = samples[clip_id]
        assert sample["mel.npy"].dtype == np.float16
        np.testing.assert_array_equal(sample["mel.npy"], table.arrays["mel"][row])
        np.testing.assert_array_equal(sample["emb.npy"], table.arrays["emb"][row])
        assert sample["image.png"].dtype == np.uint8 and sample["image.png"].shape == (12, 12, 3)
        np.testing.assert_array_equal(sample["image.png"], table.arrays["image"][row])  # PNG is lossless
        assert sample["json"] == {"content_hash": f"h-{clip_id}"}

    # A shuffled pipeline holds the same samples, in an order fixed by the seed.
    order = [s["__key__"] for s in store.webdataset("ds", "feat", "k1", shuffle=10, seed=3)]
    assert sorted(order) == sorted(table.clip_ids)
    assert order == [s["__key__"] for s in store.webdataset("ds", "feat", "k1", shuffle=10, seed=3)]


def test_empty_shard_is_committed_and_read_as_no_rows(local_store):
    empty = {"mel": np.zeros((0, 8, 10), np.float16)}
    manifest = local_store.write_shard("ds", "feat", "k1", "s000000-empty", clip_ids=[], arrays=empty,
                                       manifest={"quarantined": [{"id": "bad", "reason": "silent audio"}]})
    assert manifest["rows"] == 0
    rows = make_rows(2, seed=5)
    local_store.write_shard("ds", "feat", "k1", "s000001-full", clip_ids=["a", "b"], arrays={"mel": rows["mel"]},
                            manifest={})
    table = local_store.read_arrays("ds", "feat", "k1")
    assert table.clip_ids == ["a", "b"]
    np.testing.assert_array_equal(table.arrays["mel"], rows["mel"])


def test_write_shard_rejects_row_count_mismatch_before_writing(local_store):
    with pytest.raises(ValueError, match="rows"):
        local_store.write_shard("ds", "feat", "k1", "s0", clip_ids=["a", "b"],
                                arrays={"mel": np.zeros((3, 4), np.float32)}, manifest={})
    assert not local_store.exists(local_store.path("ds"))


# ---- atomic commit ---------------------------------------------------------------------------


def test_crash_before_manifest_leaves_no_visible_shard_and_retry_commits(store, monkeypatch):
    good = make_rows(2, seed=7)
    write(store, "s000000-good", ["g1", "g2"], good)

    crashed_path = store.shard_manifest_path("ds", "feat", "k1", "s000001-late")
    real_create = FeatureStore.create_exclusive

    def crash_on_commit(self, path, data):
        if path == crashed_path:
            raise OSError("simulated crash before the commit")
        return real_create(self, path, data)

    # A hard crash (SIGKILL) runs no clean-up: the attempt's files stay behind.
    monkeypatch.setattr(FeatureStore, "create_exclusive", crash_on_commit)
    monkeypatch.setattr(FeatureStore, "_discard", lambda self, *paths: None)
    garbage = make_rows(5, seed=99)  # the crashed attempt had other (more) rows than the retry
    with pytest.raises(OSError, match="simulated crash"):
        write(store, "s000001-late", ["x1", "x2", "x3", "x4", "x5"], garbage)

    key_dir = store.key_dir("ds", "feat", "k1")
    # The crash happened after the data was written: its tar and zarr exist, the manifest does not.
    leftovers = store.fs.glob(f"{key_dir}/s000001-late.*")
    assert sorted(p.rsplit(".", 1)[1] for p in leftovers) == ["tar", "zarr"]
    assert not store.exists(crashed_path)
    assert not store.has_shard("ds", "feat", "k1", "s000001-late")
    assert store.committed_shards("ds", "feat", "k1") == ["s000000-good"]
    table = store.read_arrays("ds", "feat", "k1")
    assert table.clip_ids == ["g1", "g2"]
    np.testing.assert_array_equal(table.arrays["mel"], good["mel"])
    assert sorted(s["__key__"] for s in store.webdataset("ds", "feat", "k1")) == ["g1", "g2"]

    # Retry (no crash this time) commits the shard with the retry's data, under its own names.
    monkeypatch.undo()
    retry = make_rows(3, seed=8)
    manifest = write(store, "s000001-late", ["r1", "r2", "r3"], retry)
    assert manifest["rows"] == 3
    assert store.committed_shards("ds", "feat", "k1") == ["s000000-good", "s000001-late"]
    table = store.read_arrays("ds", "feat", "k1")
    assert table.clip_ids == ["g1", "g2", "r1", "r2", "r3"]
    for name in ("mel", "emb", "image"):
        np.testing.assert_array_equal(table.arrays[name], np.concatenate([good[name], retry[name]]))
    samples = {s["__key__"]: s for s in store.webdataset("ds", "feat", "k1")}
    assert sorted(samples) == ["g1", "g2", "r1", "r2", "r3"]
    np.testing.assert_array_equal(samples["r3"]["mel.npy"], retry["mel"][2])

    # The dead attempt is garbage: collected once past the grace period, committed files never.
    assert store.collect_garbage("ds", "feat", "k1") == []  # younger than the default grace
    removed = store.collect_garbage("ds", "feat", "k1", grace_seconds=0)
    assert sorted(removed) == sorted(leftovers)
    assert all(check.ok for check in store.verify_shards("ds", "feat", "k1", full=True))
    assert store.read_arrays("ds", "feat", "k1").clip_ids == ["g1", "g2", "r1", "r2", "r3"]


def test_crash_on_first_shard_means_no_feature_at_all(local_store, monkeypatch):
    def crash(self, path, data):
        raise OSError("simulated crash before the commit")

    monkeypatch.setattr(FeatureStore, "create_exclusive", crash)
    with pytest.raises(OSError):
        write(local_store, "s000000-only", ["a"], make_rows(1, seed=0))
    assert local_store.committed_shards("ds", "feat", "k1") == []
    assert local_store.feature_keys("ds", "feat") == []
    with pytest.raises(StoreError, match="no 'feat' features"):
        local_store.read_arrays("ds", "feat")


def test_a_committed_shard_is_never_rewritten(store):
    first = make_rows(2, seed=21)
    committed = write(store, "s000000-once", ["a", "b"], first)
    tar, _ = store.shard_files("ds", "feat", "k1", "s000000-once", committed)
    tar_bytes = store.fs.cat_file(tar)

    # A second writer of the same (key, shard) - e.g. a concurrent run - leaves the commit alone.
    again = write(store, "s000000-once", ["x", "y", "z"], make_rows(3, seed=22))
    assert again == json.loads(json.dumps(committed))
    assert store.fs.cat_file(tar) == tar_bytes
    assert len(store.fs.glob(f"{store.key_dir('ds', 'feat', 'k1')}/s000000-once.*")) == 3  # tar, zarr, manifest
    table = store.read_arrays("ds", "feat", "k1")
    assert table.clip_ids == ["a", "b"]
    for name in ("mel", "emb", "image"):
        np.testing.assert_array_equal(table.arrays[name], first[name])


def test_shards_committed_by_another_process_are_seen_on_s3(s3_bucket):
    """The Dagster process lists a key, Dask workers commit shards, the process must see them."""
    plain = {"client_kwargs": {"endpoint_url": s3_bucket["endpoint_url"]}}  # no cache setting given
    reader = FeatureStore(s3_bucket["root"], plain)
    # Other options give a separate s3fs instance (own listing cache), like a worker process's.
    worker = FeatureStore(s3_bucket["root"], {"client_kwargs": {**plain["client_kwargs"], "region_name": "us-east-1"}})
    assert worker.fs is not reader.fs
    rows = make_rows(1, seed=4)
    write(worker, "s000000-a", ["a"], rows)
    assert reader.committed_shards("ds", "feat", "k1") == ["s000000-a"]  # the reader has listed the key now

    write(worker, "s000001-b", ["b"], rows)
    assert reader.committed_shards("ds", "feat", "k1") == ["s000000-a", "s000001-b"]
    assert reader.has_shard("ds", "feat", "k1", "s000001-b")
    assert reader.read_arrays("ds", "feat", "k1").clip_ids == ["a", "b"]
    assert reader.update_catalog("ds", "feat", "k1", params={}, code_version="1")["rows"] == 2
    write(worker, "s000000-a", ["a"], rows, key="k2")
    assert reader.feature_keys("ds", "feat") == ["k1", "k2"]


def test_committed_manifest_carries_provenance_and_checksums(store):
    import zarr

    rows = make_rows(3, seed=11)
    quarantined = [{"id": "broken", "reason": "not a readable media file: invalid data"}]
    extra = {"params": {"preset": "x", "n": 3}, "code_version": "7", "input_keys": ["abc"],
             "clips": [{"id": c, "content_hash": f"h{c}"} for c in ("a", "b", "c", "broken")],
             "quarantined": quarantined}
    returned = write(store, "s000000-prov", ["a", "b", "c"], rows, manifest=extra)
    manifest = store.shard_manifest("ds", "feat", "k1", "s000000-prov")
    assert manifest == json.loads(json.dumps(returned))  # what was returned is what was committed

    assert manifest["format"] == 2
    assert (manifest["dataset"], manifest["feature"], manifest["feature_key"], manifest["shard"]) == (
        "ds", "feat", "k1", "s000000-prov")
    assert manifest["rows"] == 3
    assert manifest["clip_ids"] == ["a", "b", "c"]
    assert manifest["quarantined"] == quarantined
    assert manifest["params"] == {"preset": "x", "n": 3}
    assert manifest["code_version"] == "7" and manifest["input_keys"] == ["abc"]
    assert [c["id"] for c in manifest["clips"]] == ["a", "b", "c", "broken"]

    tar_path, zarr_path = store.shard_files("ds", "feat", "k1", "s000000-prov", manifest)
    tar_bytes = store.fs.cat_file(tar_path)
    assert manifest["files"]["tar"] == {"bytes": len(tar_bytes), "sha256": hashlib.sha256(tar_bytes).hexdigest(),
                                        "path": f"s000000-prov.{manifest['attempt']}.tar"}
    assert manifest["files"]["zarr"]["path"] == f"s000000-prov.{manifest['attempt']}.zarr"
    assert zarr_path.endswith(manifest["files"]["zarr"]["path"])
    for name, array in rows.items():
        info = manifest["arrays"][name]
        assert info["shape"] == list(array.shape)
        assert info["dtype"] == str(array.dtype)
        assert info["sha256"] == hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        assert info["nbytes_stored"] > 0
    assert manifest["files"]["zarr"]["bytes"] == sum(i["nbytes_stored"] for i in manifest["arrays"].values())

    versions = manifest["versions"]
    assert versions["numpy"] == np.__version__
    assert versions["zarr"] == zarr.__version__
    assert versions["webdataset"] == version("webdataset")
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["created"].endswith("+00:00")


# ---- catalog ---------------------------------------------------------------------------------


def test_catalog_lists_what_exists_and_cli_prints_it(local_store):
    store = local_store
    rows = make_rows(4, seed=3)
    write(store, "s000000-a", ["a1", "a2", "a3"], {k: v[:3] for k, v in rows.items()}, key="key000000000001")
    write(store, "s000001-b", ["b1"], {k: v[3:] for k, v in rows.items()}, key="key000000000001")
    write(store, "s000000-a", ["a1", "a2"], {"emb": rows["emb"][:2]}, key="key000000000002",
          feature="emb_feat")
    write(store, "s000000-z", ["z1"], {"mel": rows["mel"][:1]}, key="key000000000003", dataset="other")

    first = store.update_catalog("ds", "feat", "key000000000001", params={"preset": "hifigan22k"},
                                 code_version="1", shards=["s000000-a"])
    second = store.update_catalog("ds", "emb_feat", "key000000000002", params={"dim": 16}, code_version="2",
                                  input_keys=["key000000000001"])
    third = store.update_catalog("other", "feat", "key000000000003", params={"preset": "audioldm16k"},
                                 code_version="1")

    manifests = [store.shard_manifest("ds", "feat", "key000000000001", s) for s in ("s000000-a", "s000001-b")]
    assert first["rows"] == 4
    assert first["shards_committed"] == 2
    assert first["current_shards"] == ["s000000-a"]
    assert first["bytes"] == sum(m["files"]["tar"]["bytes"] + m["files"]["zarr"]["bytes"] for m in manifests)
    tar_sizes = sum(m["files"]["tar"]["bytes"] for m in manifests)
    assert first["bytes"] > tar_sizes
    assert second["rows"] == 2 and second["input_keys"] == ["key000000000001"]
    assert second["current_shards"] == ["s000000-a"]  # default: every committed shard
    assert third["rows"] == 1

    everything = store.catalog()
    assert [e["feature_key"] for e in everything] == ["key000000000003", "key000000000002", "key000000000001"]
    by_key = {e["feature_key"]: e for e in everything}
    assert by_key["key000000000001"] == first
    assert (by_key["key000000000002"]["dataset"], by_key["key000000000002"]["feature"]) == ("ds", "emb_feat")
    assert by_key["key000000000002"]["params"] == {"dim": 16}
    assert by_key["key000000000003"]["params"] == {"preset": "audioldm16k"}
    assert {e["dataset"] for e in everything} == {"ds", "other"}
    assert [e["feature_key"] for e in store.catalog("ds")] == ["key000000000002", "key000000000001"]
    assert [e["feature_key"] for e in store.catalog("ds", "feat")] == ["key000000000001"]
    assert store.catalog("nothing") == []

    # A second key of the same feature: readers must name one (a read never switches keys silently).
    write(store, "s000000-a", ["a1"], {"mel": rows["mel"][:1]}, key="key000000000009")
    store.update_catalog("ds", "feat", "key000000000009", params={"preset": "audioldm16k"}, code_version="1")
    assert store.feature_keys("ds", "feat") == ["key000000000009", "key000000000001"]
    with pytest.raises(StoreError, match="has 2 'feat' keys: pass key= one of key000000000009"):
        store.read_arrays("ds", "feat")
    assert store.read_arrays("ds", "feat", "key000000000009").feature_key == "key000000000009"
    assert store.read_arrays("ds", "feat", "key000000000001").clip_ids == ["a1", "a2", "a3", "b1"]

    result = subprocess.run([sys.executable, "-m", "stages.store", store.url_root], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["dataset", "feature", "key", "shards", "rows", "MB"]
    table = {line.split()[2]: line.split() for line in lines[1:]}
    assert set(table) == {"key000000000001", "key000000000002", "key000000000003", "key000000000009"}
    assert table["key000000000001"][:5] == ["ds", "feat", "key000000000001", "2", "4"]
    assert table["key000000000002"][:5] == ["ds", "emb_feat", "key000000000002", "1", "2"]
    assert table["key000000000003"][:5] == ["other", "feat", "key000000000003", "1", "1"]
    assert '{"preset":"hifigan22k"}' in " ".join(table["key000000000001"])


# ---- writability and names -------------------------------------------------------------------


def test_check_writable_passes_on_a_writable_root(store):
    store.check_writable()
    store.check_writable()  # idempotent: the probe is removed again


def test_check_writable_fails_with_one_line_under_a_regular_file(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file")
    store = FeatureStore(str(blocker / "features"))
    with pytest.raises(StoreError) as info:
        store.check_writable()
    message = str(info.value)
    assert "\n" not in message
    assert "is not writable" in message and str(blocker / "features") in message


def test_check_writable_fails_for_a_missing_bucket(s3_bucket):
    store = FeatureStore(f"s3://{s3_bucket['bucket']}-missing/features", s3_bucket["storage_options"])
    with pytest.raises(StoreError) as info:
        store.check_writable()
    assert "\n" not in str(info.value) and "is not writable" in str(info.value)


UNSAFE = ["..", "a/b", "x.y", "", ".", "../etc", "a b", "-", "abc\n", 5]


@pytest.mark.parametrize("bad", UNSAFE)
def test_unsafe_names_are_rejected(local_store, bad):
    store = local_store
    rows = {"mel": np.zeros((1, 2), np.float32)}
    with pytest.raises(UnsafeNameError):
        store.key_dir(bad, "feat", "k1")
    with pytest.raises(UnsafeNameError):
        store.key_dir("ds", bad, "k1")
    with pytest.raises(UnsafeNameError):
        store.key_dir("ds", "feat", bad)
    with pytest.raises(UnsafeNameError):
        store.write_shard(bad, "feat", "k1", "s0", clip_ids=["a"], arrays=rows, manifest={})
    with pytest.raises(UnsafeNameError):
        store.write_shard("ds", "feat", bad, "s0", clip_ids=["a"], arrays=rows, manifest={})
    with pytest.raises(UnsafeNameError):
        store.write_shard("ds", "feat", "k1", bad, clip_ids=["a"], arrays=rows, manifest={})
    with pytest.raises(UnsafeNameError):
        store.write_shard("ds", "feat", "k1", "s0", clip_ids=[bad], arrays=rows, manifest={})
    with pytest.raises(UnsafeNameError):
        store.write_shard("ds", "feat", "k1", "s0", clip_ids=["a"], arrays={bad: rows["mel"]}, manifest={})
    with pytest.raises(UnsafeNameError):
        store.shard_manifest_path("ds", "feat", "k1", bad)
    # Nothing was written, inside the root or next to it.
    assert not store.exists(store.root)
    assert sorted(os.listdir(os.path.dirname(store.root))) == []


def test_a_create_whose_response_was_lost_is_still_ours_when_retried(store):
    # botocore retries a PUT whose response was lost; the retry meets our own object (412 on S3).
    # Equal bytes are ours (callers' documents carry a unique id), other bytes are someone else's.
    path = store.path("demo", "_tmp", "doc.json")
    assert store.create_exclusive(path, b'{"attempt": "a1"}')
    assert store.create_exclusive(path, b'{"attempt": "a1"}')  # the retry of our own create
    assert not store.create_exclusive(path, b'{"attempt": "b2"}')  # another writer's
    assert store.fs.cat_file(path) == b'{"attempt": "a1"}'
