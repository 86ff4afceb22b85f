"""The store's integrity promises, with real processes: exclusive commits under racing writers,
verified reads of damaged shards (named, retired, recomputed), snapshot reads, loaders that yield
each sample once for any number of workers, and one-line errors for an unreachable server."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import numpy as np
import pytest

from stages.core.store import FeatureStore, ShardCorruptError, StoreError

from tests.stages.core.test_store import make_rows, write



# ---- exclusive commits -------------------------------------------------------------------------


def _racing_writer(root, options, seed, tasks, out):
    store = FeatureStore(root, options)
    rows = make_rows(4, seed=seed)
    store.fs.exists(store.root)  # connect before the race
    while True:
        task = tasks.get()
        if task is None:
            return
        shard, start_at = task
        while time.time() < start_at:  # released together: both pass the "committed?" check
            pass
        manifest = write(store, shard, [f"c{seed}-{i}" for i in range(4)], rows)
        out.put((seed, manifest["attempt"]))


ROUNDS = 4  # bench/soak_store.py runs many more


def test_two_processes_writing_one_shard_commit_exactly_one_attempt(store):
    context = multiprocessing.get_context("fork")
    out, queues = context.Queue(), [context.Queue(), context.Queue()]
    writers = [context.Process(target=_racing_writer, args=(store.url_root, store.storage_options, seed, tasks, out))
               for seed, tasks in zip((1, 2), queues)]
    for writer in writers:
        writer.start()
    for round_ in range(ROUNDS):
        shard = f"s{round_:06d}-race"
        start_at = time.time() + 0.3
        for tasks in queues:
            tasks.put((shard, start_at))
        results = [out.get(timeout=60) for _ in writers]
        committed = store.shard_manifest("ds", "feat", "k1", shard)
        # Both writers were told the same winner; the winner's rows are what is stored.
        assert {attempt for _, attempt in results} == {committed["attempt"]}
        winner = int(committed["clip_ids"][0][1])
        table = store.read_arrays("ds", "feat", "k1", shards=[shard])
        for name, array in make_rows(4, seed=winner).items():
            np.testing.assert_array_equal(table.arrays[name], array)
        assert [c.ok for c in store.verify_shards("ds", "feat", "k1", [shard], full=True)] == [True]
        # The loser discarded its attempt: only the winner's files are left.
        files = sorted(os.path.basename(p) for p in store.fs.glob(f"{store.key_dir('ds', 'feat', 'k1')}/{shard}.*"))
        assert files == sorted([f"{shard}.json", committed["files"]["tar"]["path"], committed["files"]["zarr"]["path"]])
    for tasks in queues:
        tasks.put(None)
    for writer in writers:
        writer.join(timeout=30)
        assert writer.exitcode == 0


# ---- verified reads, retire, heal --------------------------------------------------------------


def _first_chunk(store, manifest, name):
    _, zarr_path = store.shard_files("ds", "feat", "k1", manifest["shard"], manifest)
    chunks = sorted(p for p in store.fs.find(f"{zarr_path}/{name}") if "/c/" in p)
    return chunks[0]


def _flip(store, path, offset=-5):
    data = bytearray(store.fs.cat_file(path))
    data[offset] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))


DAMAGE = {
    "flipped zarr chunk": lambda store, m: _flip(store, _first_chunk(store, m, "emb"), -3),
    "truncated zarr chunk": lambda store, m: store.fs.pipe_file(_first_chunk(store, m, "mel"),
                                                                store.fs.cat_file(_first_chunk(store, m, "mel"))[:9]),
    "chunk of another shard": None,  # set up in the test: needs the other shard
    "deleted zarr": lambda store, m: store.fs.rm(store.shard_files("ds", "feat", "k1", m["shard"], m)[1], recursive=True),
    "garbage manifest": lambda store, m: store.fs.pipe_file(
        store.shard_manifest_path("ds", "feat", "k1", m["shard"]), b"{not json"),
    "flipped tar member": lambda store, m: _flip(store, store.shard_files("ds", "feat", "k1", m["shard"], m)[0], 700),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_at_rest_is_named_retired_and_recomputed(store, damage):
    rows, other_rows = make_rows(3, seed=5), make_rows(3, seed=6)
    manifest = write(store, "s000000-aaaa", ["a1", "a2", "a3"], rows)
    other = write(store, "s000001-bbbb", ["b1", "b2", "b3"], other_rows)
    if damage == "chunk of another shard":
        store.fs.pipe_file(_first_chunk(store, manifest, "emb"), store.fs.cat_file(_first_chunk(store, other, "emb")))
    else:
        DAMAGE[damage](store, manifest)

    with pytest.raises(ShardCorruptError) as info:
        if damage == "flipped tar member":
            list(store.webdataset("ds", "feat", "k1"))
        else:
            store.read_arrays("ds", "feat", "k1")
    message = str(info.value)
    assert "\n" not in message and "shard ds/feat/k1/s000000-aaaa" in message, message

    checks = {c.shard: c for c in store.verify_shards("ds", "feat", "k1", repair=True)}
    assert checks["s000001-bbbb"].ok
    assert not checks["s000000-aaaa"].ok and checks["s000000-aaaa"].retired
    assert store.committed_shards("ds", "feat", "k1") == ["s000001-bbbb"]
    retired = store.fs.glob(f"{store.key_dir('ds', 'feat', 'k1')}/_retired/s000000-aaaa.*.json")
    assert len(retired) == 1 and store.read_json(retired[0])["reason"]

    # The next writer recomputes the shard (same name), and reads are whole and right again.
    write(store, "s000000-aaaa", ["a1", "a2", "a3"], rows)
    table = store.read_arrays("ds", "feat", "k1")
    np.testing.assert_array_equal(table.arrays["emb"], np.concatenate([rows["emb"], other_rows["emb"]]))
    assert sorted(s["__key__"] for s in store.webdataset("ds", "feat", "k1")) == ["a1", "a2", "a3", "b1", "b2", "b3"]
    store.collect_garbage("ds", "feat", "k1", grace_seconds=0)  # the damaged files go; nothing committed does
    assert all(c.ok for c in store.verify_shards("ds", "feat", "k1", full=True))


def test_verification_skips_unchanged_shards_and_rechecks_changed_ones(tmp_path):
    store = FeatureStore(str(tmp_path / "features"))
    manifest = write(store, "s000000-aaaa", ["a1", "a2"], make_rows(2, seed=1))
    assert [c.skipped for c in store.verify_shards("ds", "feat", "k1")] == [False]
    assert [c.skipped for c in store.verify_shards("ds", "feat", "k1")] == [True]  # unchanged since verified
    time.sleep(0.01)
    _flip(store, _first_chunk(store, manifest, "emb"), -3)  # rewriting a file changes its mtime
    (check,) = store.verify_shards("ds", "feat", "k1")
    assert not check.skipped and not check.ok and "does not match its sha256" in check.problems[0]


# ---- snapshots ---------------------------------------------------------------------------------


def _ledger(store, hashes: dict[str, str]):
    from stages.ingest.manifest import Clip, ClipManifest, save_manifest

    clips = [Clip(id=c, uri=f"/m/{c}.wav", content_hash=h, shard_id="s000000") for c, h in sorted(hashes.items())]
    manifest = ClipManifest("ds", 16, clips)
    digest = save_manifest(store, manifest)
    (shard,) = manifest.by_shard()
    return digest, shard


def test_reads_are_snapshots_of_one_clip_manifest_version(tmp_path):
    store = FeatureStore(str(tmp_path / "features"))
    old_version, old_shard = _ledger(store, {"a": "h1", "b": "h2"})
    old_rows = make_rows(2, seed=1)
    write(store, old_shard, ["a", "b"], old_rows)
    assert store.read_arrays("ds", "feat").manifest == old_version

    # Clip b's file changes: the new version's shard sits beside the old one.
    new_version, new_shard = _ledger(store, {"a": "h1", "b": "h3"})
    with pytest.raises(StoreError, match="no 'feat' key of dataset 'ds' holds every shard"):
        store.read_arrays("ds", "feat")  # the current version is not computed yet: no stale rows
    new_rows = make_rows(2, seed=2)
    write(store, new_shard, ["a", "b"], new_rows)
    current = store.read_arrays("ds", "feat")
    assert (current.manifest, current.shards, current.clip_ids) == (new_version, [new_shard], ["a", "b"])
    np.testing.assert_array_equal(current.arrays["emb"], new_rows["emb"])  # not old + new rows
    old = store.read_arrays("ds", "feat", manifest=old_version)
    np.testing.assert_array_equal(old.arrays["emb"], old_rows["emb"])
    pipeline = store.webdataset("ds", "feat")
    assert (pipeline.manifest, pipeline.shards) == (new_version, [new_shard])
    assert [s["__key__"] for s in pipeline] == ["a", "b"]

    # Another key complete for the version: a read without a key names both instead of choosing.
    write(store, new_shard, ["a", "b"], new_rows, key="k2")
    with pytest.raises(StoreError, match="pass key="):
        store.read_arrays("ds", "feat")
    assert store.read_arrays("ds", "feat", "k2").feature_key == "k2"


# ---- loaders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_dataloader_yields_every_sample_once_for_any_number_of_workers(store, workers):
    import torch

    expected = []
    for index in range(5):
        ids = [f"x{index}_{i}" for i in range(3)]
        write(store, f"s{index:06d}-cccc", ids, make_rows(3, seed=index))
        expected += ids
    loader = torch.utils.data.DataLoader(store.webdataset("ds", "feat", "k1"), batch_size=None,
                                         num_workers=workers, multiprocessing_context="fork" if workers else None)
    for _epoch in range(2):
        seen = [sample["__key__"] for sample in loader]
        assert sorted(seen) == sorted(expected)


def test_dataloader_works_in_spawned_workers(tmp_path):
    import torch

    store = FeatureStore(str(tmp_path / "features"))
    write(store, "s000000-dddd", ["a", "b"], make_rows(2, seed=3))
    write(store, "s000001-dddd", ["c"], make_rows(1, seed=4))
    loader = torch.utils.data.DataLoader(store.webdataset("ds", "feat", "k1"), batch_size=None, num_workers=2,
                                         multiprocessing_context="spawn")
    assert sorted(s["__key__"] for s in loader) == ["a", "b", "c"]


# ---- an unreachable server ---------------------------------------------------------------------


def test_an_unreachable_s3_endpoint_is_one_line(s3_server):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "config_kwargs": {
        "retries": {"max_attempts": 1}, "connect_timeout": 1}}
    store = FeatureStore("s3://nowhere/features", options)
    with pytest.raises(StoreError) as info:
        store.check_writable()
    message = str(info.value)
    assert "\n" not in message and "cannot reach the feature store" in message and str(port) in message


def test_quarantined_clips_of_a_snapshot_are_readable_with_their_reasons(tmp_path):
    store = FeatureStore(str(tmp_path / "features"))
    old_version, old_shard = _ledger(store, {"a": "h1", "b": "h2"})
    write(store, old_shard, ["a"], make_rows(1, seed=1),
          manifest={"params": {}, "quarantined": [{"id": "b", "reason": "no audio stream"}]})
    assert store.quarantined("ds", "feat") == [{"id": "b", "reason": "no audio stream", "shard": old_shard}]
    new_version, new_shard = _ledger(store, {"a": "h1", "b": "h3"})  # b's file was replaced
    write(store, new_shard, ["a", "b"], make_rows(2, seed=2))
    assert store.quarantined("ds", "feat") == []  # the current version's shard has b
    assert store.quarantined("ds", "feat", manifest=old_version)[0]["reason"] == "no audio stream"
