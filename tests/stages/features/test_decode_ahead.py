"""Decoding ahead (stages.ingest.decode.DecodedAhead): same values, order and quarantine as inline
decoding, bounded, inline on a Dask worker; and the stages that use it store the same rows."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from stages.core.store import FeatureStore
from stages.features import towers as T
from stages.features.base import ShardJob, iter_decoded, registered_feature
from stages.features.mel import MEL_FEATURE, MelParams, compute_mel_shard
from stages.ingest.decode import AudioSpec, ClipError, DecodeAhead, DecodedAhead, load_audio
from tests.models import tower_weights_dir  # noqa: F401


@pytest.fixture(scope="module")
def shard_clips(demo_dataset, bad_media):
    """Demo clips with unusable files between them: (id, uri, hash) in shard order."""
    records = [json.loads(line) for line in demo_dataset.read_text().splitlines()[:4]]
    demo = [(r["id"], str(demo_dataset.parent / r["path"]), f"h{i}") for i, r in enumerate(records)]
    bad = [("silent", str(bad_media["silent_mp4"]), "hs"), ("empty", str(bad_media["zero_byte_mp4"]), "he")]
    return (demo[0], bad[0], demo[1], demo[2], bad[1], demo[3])


def _job(root, clips, feature, params) -> ShardJob:
    return ShardJob(store_root=str(root), storage_options={}, dataset="d", feature=feature, key=params.key(),
                    shard="s000000-abc", clips=clips, params=params.params(), code_version="1")


def _decoded(job, decode, ahead):
    quarantined: list[dict] = []
    with DecodedAhead.of_shard(decode, job, ahead) as decode_next:
        rows = [(clip_id, value) for clip_id, _, value in iter_decoded(job, decode_next, quarantined)]
    return rows, quarantined


def test_decoding_ahead_keeps_values_order_and_quarantine(tmp_path, shard_clips):
    spec = AudioSpec()
    job = _job(tmp_path, shard_clips, MEL_FEATURE, MelParams())
    decode = lambda uri, span: load_audio(uri, spec, None, span)  # noqa: E731
    inline, inline_quarantine = _decoded(job, decode, DecodeAhead(threads=0))
    assert [q["id"] for q in inline_quarantine] == ["silent", "empty"]
    for ahead in (DecodeAhead(threads=1, depth=1), DecodeAhead(threads=2, depth=3)):
        rows, quarantined = _decoded(job, decode, ahead)
        assert [r[0] for r in rows] == [r[0] for r in inline] == ["demo_000000", "demo_000001", "demo_000002", "demo_000003"]
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(rows, inline))
        assert quarantined == inline_quarantine


def test_decoding_ahead_is_bounded_and_inline_without_threads(tmp_path, shard_clips):
    spec = AudioSpec()
    job = _job(tmp_path, shard_clips * 3, MEL_FEATURE, MelParams())
    started, consumed, threads, most_ahead = [0], [0], set(), [0]

    def decode(uri, span):
        started[0] += 1
        most_ahead[0] = max(most_ahead[0], started[0] - consumed[0])
        threads.add(threading.current_thread().name)
        return load_audio(uri, spec, None, span)

    for ahead in (DecodeAhead(threads=1, depth=2), DecodeAhead(threads=0)):
        started[0] = consumed[0] = most_ahead[0] = 0
        threads.clear()
        with DecodedAhead.of_shard(decode, job, ahead) as decode_next:
            def ask(uri, span, decode_next=decode_next):  # every clip the consumer takes, good or quarantined
                consumed[0] += 1
                return decode_next(uri, span)

            for _ in iter_decoded(job, ask, []):
                time.sleep(0.01)  # the consumer is the slow side: the decoder must stop at the bound
        if ahead.threads:
            # decoded or decoding but not yet taken: at most depth
            assert most_ahead[0] <= ahead.depth and all(t.startswith("decode-ahead") for t in threads)
        else:
            assert most_ahead[0] <= 1 and threads == {threading.current_thread().name}
    with pytest.raises(ValueError, match="expected"):  # asked out of order: a bug, not a quarantine
        with DecodedAhead.of_shard(decode, job, DecodeAhead(threads=1)) as decode_next:
            decode_next(shard_clips[2][1])
    with pytest.raises(ValueError, match="depth"):
        DecodeAhead(depth=0)


def test_no_decode_thread_on_a_dask_worker():
    distributed = pytest.importorskip("distributed")
    assert DecodeAhead().resolved_threads() == 1 and DecodeAhead(threads=0).resolved_threads() == 0
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        assert client.submit(lambda: DecodeAhead().resolved_threads(), pure=False).result() == 0
        assert client.submit(lambda: DecodeAhead(threads=2).resolved_threads(), pure=False).result() == 2


def test_stages_store_the_same_rows_decoded_ahead_or_inline(tmp_path, shard_clips, monkeypatch, tower_weights_dir):  # noqa: F811
    def stored(feature, params, compute, root):
        result = compute(_job(root, shard_clips, feature, params))
        table = FeatureStore(str(root)).read_arrays("d", feature, params.key())
        return table.clip_ids, table.arrays, [q["id"] for q in result.quarantined]

    mel = registered_feature(MEL_FEATURE)
    inline = DecodeAhead(threads=0)
    ahead = stored(MEL_FEATURE, MelParams(), compute_mel_shard, tmp_path / "mel-ahead")
    monkeypatch.setattr(mel, "decode_ahead", inline)
    alone = stored(MEL_FEATURE, MelParams(), compute_mel_shard, tmp_path / "mel-inline")
    assert ahead[0] == alone[0] and ahead[2] == alone[2] == ["silent", "empty"]
    assert np.array_equal(ahead[1]["mel"], alone[1]["mel"])

    # The audio tower in groups of 2 clips (a group boundary falls between quarantined clips)
    # against one group, decoded inline: the same rows.
    tower = registered_feature(T.AUDIO_TOWER_FEATURE)
    grouped = stored(T.AUDIO_TOWER_FEATURE, T.AudioTowerParams(), T.compute_audio_tower_shard, tmp_path / "a-ahead")
    monkeypatch.setattr(T, "_EMBED_CLIPS", 2)
    monkeypatch.setattr(tower, "decode_ahead", inline)
    whole = stored(T.AUDIO_TOWER_FEATURE, T.AudioTowerParams(), T.compute_audio_tower_shard, tmp_path / "a-inline")
    assert grouped[0] == whole[0] and len(grouped[0]) == 4 and grouped[2] == whole[2] == ["silent", "empty"]
    for name in ("pooled", "per_second", "logits"):
        assert np.allclose(grouped[1][name].astype(np.float32), whole[1][name].astype(np.float32), atol=1e-5, rtol=0), name
