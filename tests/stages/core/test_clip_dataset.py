"""ClipDataset: each clip once per epoch across nodes and DataLoader workers (forked, local and on a
real S3 server, torch.distributed in real processes), seeded reshuffles, mid-epoch resume, joined
features with captions / labels / splits, quarantined clips left out with their reason, random
access that reads only the clip's shard, verified reads."""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest

from stages.core.store import FeatureStore, ShardCorruptError, StoreError
from stages.store import ClipDataset

from tests.fixtures.clip_store import build_clip_store, clip_arrays

FEATURES = ["mel_spectrograms", "clap_embeddings"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A store that the tests only read (built once per module)."""
    store = FeatureStore(str(tmp_path_factory.mktemp("clips") / "features"))
    return store, build_clip_store(store, clips=32, shard_size=4)


def _number(clip_id: str) -> int:
    return int(clip_id.rsplit("_", 1)[1])


def _ids(loader) -> list[str]:
    return [c for batch in loader for c in batch["clip_id"]]


def test_joined_features_carry_caption_label_split_and_leave_quarantined_clips_out(local):
    store, built = local
    clips = ClipDataset(store, "demo", FEATURES)
    assert clips.features == {"mel_spectrograms": "mel_key0001", "clap_embeddings": "clapkey0001"}
    assert clips.manifest == built["manifest"]
    # Clip 7 has no CLAP embedding: left out, with the reason the store records for it.
    assert clips.left_out == {"demo_000007": "clap_embeddings: no audio stream"}
    assert store.quarantined("demo", "clap_embeddings")[0]["id"] == "demo_000007"
    assert "demo_000007" not in clips and len(clips) == 31
    with pytest.raises(KeyError, match="no audio stream"):
        clips["demo_000007"]

    samples = list(clips)
    assert sorted(s["clip_id"] for s in samples) == sorted(c for c in built["clips"] if c != "demo_000007")
    for sample in samples:
        clip = built["clips"][sample["clip_id"]]
        assert (sample["caption"], sample["label"], sample["split"]) == (clip.caption, clip.label, clip.split)
        expected = clip_arrays(_number(sample["clip_id"]))
        for feature in FEATURES:
            for name, array in expected[feature].items():
                np.testing.assert_array_equal(sample[feature][name], array)
                assert sample[feature][name].dtype == array.dtype

    # Some arrays only; a split only.
    audio_only = ClipDataset(store, "demo", {"clap_embeddings": ["audio"]}, split="val")
    sample = audio_only.get("demo_000010")
    assert list(sample["clap_embeddings"]) == ["audio"] and "mel_spectrograms" not in sample
    assert {built["clips"][c].split for c in audio_only.clip_ids} == {"val"}
    assert len(audio_only) == sum(c.split == "val" for c in built["clips"].values())
    with pytest.raises(ValueError, match="has no split 'dev' \\(it has test, train, val\\)"):
        ClipDataset(store, "demo", FEATURES, split="dev")
    with pytest.raises(StoreError, match="no array 'nope'"):
        ClipDataset(store, "demo", {"clap_embeddings": ["nope"]})


@pytest.mark.parametrize("workers", [0, 2])
def test_each_clip_once_per_epoch_split_by_node_and_worker_with_a_seeded_order(local, workers):
    store, _ = local
    orders = {}
    for rank in (0, 1):
        clips = ClipDataset(store, "demo", FEATURES, split="train", seed=3, rank=rank, world_size=2)
        loader = clips.loader(batch_size=3, num_workers=workers, multiprocessing_context="fork" if workers else None)
        for epoch in (0, 1, 0):
            clips.set_epoch(epoch)
            ids = _ids(loader)
            assert len(ids) == len(set(ids)) == len(clips)
            orders.setdefault((rank, epoch), ids)
            assert orders[(rank, epoch)] == ids  # same seed and epoch: same order
    everything = ClipDataset(store, "demo", FEATURES, split="train", seed=3).clip_ids
    for epoch in (0, 1):
        assert not set(orders[(0, epoch)]) & set(orders[(1, epoch)])  # the nodes read different shards
        assert sorted(orders[(0, epoch)] + orders[(1, epoch)]) == sorted(everything)
    assert orders[(0, 0)] != orders[(0, 1)]  # reshuffled per epoch
    other_seed = ClipDataset(store, "demo", FEATURES, split="train", seed=4)
    assert [s["clip_id"] for s in other_seed] != [s["clip_id"] for s in ClipDataset(store, "demo", FEATURES,
                                                                                     split="train", seed=3)]


def _distributed_reader(root, rank, init_file, out):
    import torch.distributed as dist

    clips = ClipDataset(FeatureStore(root), "demo", FEATURES)  # made before the process group exists
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # A spawned worker has no process group: it reads the node the pass started with.
        loader = clips.loader(batch_size=4, num_workers=1, multiprocessing_context="spawn")
        out.put((rank, clips.node(), _ids(loader)))
    finally:
        dist.destroy_process_group()


def test_nodes_come_from_torch_distributed_when_it_is_initialised(local, tmp_path):
    store, built = local
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    readers = [context.Process(target=_distributed_reader, args=(store.url_root, rank, tmp_path / "init", out))
               for rank in (0, 1)]
    for reader in readers:
        reader.start()
    results = {rank: (node, ids) for rank, node, ids in (out.get(timeout=60) for _ in readers)}
    for reader in readers:
        reader.join(timeout=30)
        assert reader.exitcode == 0
    assert results[0][0] == (0, 2) and results[1][0] == (1, 2)
    assert not set(results[0][1]) & set(results[1][1])
    assert sorted(results[0][1] + results[1][1]) == sorted(c for c in built["clips"] if c != "demo_000007")


@pytest.mark.parametrize("before, after", [(0, 0), (2, 2), (2, 0), (0, 2)])
def test_resuming_mid_epoch_yields_exactly_the_rest_of_it(local, before, after):
    store, _ = local

    def make():
        return ClipDataset(store, "demo", FEATURES, split="train", seed=7)

    def loader(clips, workers, batch_size):
        return clips.loader(batch_size=batch_size, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)

    first = make()
    first.set_epoch(2)
    seen = []
    for batch in loader(first, before, 4):
        seen += batch["clip_id"]
        if len(seen) >= 9:
            break
    state = pickle.loads(pickle.dumps(first.state_dict()))  # saved and loaded as a checkpoint would be

    second = make()
    second.load_state_dict(state)
    second.set_epoch(2)  # a training loop sets the epoch it resumes in: the position stays
    iterator = iter(loader(second, after, 3))
    seen += next(iterator)["clip_id"]
    state = second.state_dict()  # saved again, after resuming
    del iterator

    third = make()
    third.load_state_dict(state)
    seen += _ids(loader(third, after, 5))
    assert sorted(seen) == sorted(make().clip_ids), "the passes together are one epoch, each clip once"
    assert third.state_dict()["segments"] == []  # the epoch finished: the next pass is a whole one
    assert sorted(_ids(loader(third, 0, 8))) == sorted(make().clip_ids)

    with pytest.raises(ValueError, match="cannot resume: the saved state has seed=7, this dataset 8"):
        ClipDataset(store, "demo", FEATURES, split="train", seed=8).load_state_dict(state)


def test_direct_iteration_in_the_main_process_counts_its_own_position(local):
    store, _ = local
    clips = ClipDataset(store, "demo", FEATURES, seed=1)
    iterator = iter(clips)
    seen = [next(iterator)["clip_id"] for _ in range(5)]
    state = clips.state_dict()
    resumed = ClipDataset(store, "demo", FEATURES, seed=1)
    resumed.load_state_dict(state)
    assert sorted(seen + [s["clip_id"] for s in resumed]) == sorted(clips.clip_ids)
    assert sorted(s["clip_id"] for s in pickle.loads(pickle.dumps(resumed))) == sorted(clips.clip_ids)
    stored_order = ClipDataset(store, "demo", FEATURES, shuffle=False)
    assert [s["clip_id"] for s in stored_order] == stored_order.clip_ids == sorted(stored_order.clip_ids)


def test_random_access_reads_only_the_clips_shard_and_verifies_it(tmp_path):
    store = FeatureStore(str(tmp_path / "features"))
    built = build_clip_store(store, clips=12, shard_size=4)
    clips = ClipDataset(store, "demo", FEATURES)
    for shard in built["shards"][1:]:  # every other shard's mel arrays are damaged
        committed = store.shard_manifest("demo", "mel_spectrograms", "mel_key0001", shard)
        _, zarr_path = store.shard_files("demo", "mel_spectrograms", "mel_key0001", shard, committed)
        (chunk,) = [p for p in store.fs.find(f"{zarr_path}/mel") if "/c/" in p]
        data = bytearray(store.fs.cat_file(chunk))
        data[-3] ^= 0xFF
        store.fs.pipe_file(chunk, bytes(data))
    sample = clips["demo_000002"]
    np.testing.assert_array_equal(sample["mel_spectrograms"]["mel"], clip_arrays(2)["mel_spectrograms"]["mel"])
    assert set(clips._cache) == {("mel_spectrograms", 0), ("clap_embeddings", 0)}  # clips 0-3's shard only
    with pytest.raises(ShardCorruptError, match=f"shard demo/mel_spectrograms/mel_key0001/{built['shards'][1]}"):
        clips.get("demo_000004")
    with pytest.raises(KeyError, match="'nobody' is not in 'demo'"):
        clips["nobody"]


def test_forked_workers_read_a_real_s3_store_each_clip_once(s3_bucket):
    store = FeatureStore(s3_bucket["root"], s3_bucket["storage_options"])
    built = build_clip_store(store, clips=8, shard_size=4)  # one shard per worker
    clips = ClipDataset(store, "demo", FEATURES, seed=5)
    clips.get("demo_000001")  # the parent's s3fs is live (its event loop running) when the workers fork
    batches = list(clips.loader(batch_size=4, num_workers=2, multiprocessing_context="fork"))
    ids = [c for b in batches for c in b["clip_id"]]
    assert sorted(ids) == sorted(c for c in built["clips"] if c != "demo_000007")
    for batch in batches:
        for clip_id, mel in zip(batch["clip_id"], batch["mel_spectrograms"]["mel"]):
            np.testing.assert_array_equal(mel.numpy(), clip_arrays(_number(clip_id))["mel_spectrograms"]["mel"])
