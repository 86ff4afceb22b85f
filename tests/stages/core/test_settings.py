"""S3 storage options from stages.core.settings, on a real (loopback moto) S3 server: botocore's
adaptive retries reach the clients s3fs builds, nothing recorded or cached depends on them, and
endpoint / credential problems are one line naming the fix."""

from __future__ import annotations

import pickle
import socket
from dataclasses import asdict

import pytest

from stages.core.errors import ConfigError
from stages.core.settings import S3_MAX_ATTEMPTS, check_bucket, open_store, s3_options, s3_problem, storage_options_for
from stages.core.store import FeatureStore, StoreError


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_s3fs_client_of_a_store_uses_adaptive_retries(s3_bucket, monkeypatch):
    monkeypatch.setenv("XMODAL_S3_ENDPOINT_URL", s3_bucket["endpoint_url"])
    store = open_store(s3_bucket["root"])
    store.write_json(store.path("probe.json"), {"ok": 1})  # a real request: the client exists now
    assert store.read_json(store.path("probe.json")) == {"ok": 1}
    client = store.fs.s3
    assert client.meta.endpoint_url == s3_bucket["endpoint_url"]
    assert client._client_config.retries == {"mode": "adaptive", "total_max_attempts": S3_MAX_ATTEMPTS}
    # Adaptive mode (not only its name in the config): botocore put a client-side rate limiter in
    # front of every request, which slows this client down after throttling answers.
    handlers = client.meta.events._emitter._handlers.prefix_search("before-send.s3.PutObject")
    limiters = [h for h in handlers if type(getattr(h, "__self__", None)).__name__.endswith("ClientRateLimiter")]
    assert limiters, "no adaptive rate limiter on the client"


def test_max_attempts_comes_from_the_environment_and_bad_values_are_one_line(monkeypatch):
    monkeypatch.setenv("XMODAL_S3_MAX_ATTEMPTS", "9")
    assert s3_options()["config_kwargs"]["retries"] == {"mode": "adaptive", "total_max_attempts": 9}
    monkeypatch.setenv("XMODAL_S3_MAX_ATTEMPTS", "lots")
    with pytest.raises(ConfigError, match="XMODAL_S3_MAX_ATTEMPTS='lots'"):
        s3_options()
    assert storage_options_for("/a/local/store") == {}  # local roots take no S3 options


def test_retry_options_change_nothing_recorded_or_cached(s3_bucket, tmp_path):
    """The source record, shard jobs (pickled to Dask workers) and the per-process model caches
    see the new options without a changed key or a crash."""
    import torch

    from models.contrastive import HeadConfig
    from stages.core.checkpoints import save_checkpoint
    from stages.embeddings.heads import CLAP_HEAD, build_head, load_head
    from stages.features.base import ShardJob
    from stages.ingest.datasets import register_source
    from stages.ingest.sources import SourceConfig

    options = s3_options(s3_bucket["endpoint_url"])
    store = FeatureStore(s3_bucket["root"], options)
    plain = FeatureStore(s3_bucket["root"], s3_bucket["storage_options"])
    source = SourceConfig(kind="jsonl", path="s3://media/clips.jsonl")
    recorded = register_source(store, "ds", SourceConfig(**{**source.__dict__, "storage_options": options}))
    assert recorded == register_source(plain, "ds", source) and "storage_options" not in recorded

    job = ShardJob(store_root=store.url_root, storage_options=store.storage_options, dataset="ds", feature="f",
                   key="k", shard="s000000", clips=(), params={}, code_version="1")
    assert pickle.loads(pickle.dumps(job)) == job

    config = HeadConfig(embed_dim=8, hidden_dim=16)
    head = build_head(CLAP_HEAD, {"audio": 4, "text": 6}, config)
    save_checkpoint(store, "ds", CLAP_HEAD, "headkey", head.state_dict(),
                    {"input_dims": {"audio": 4, "text": 6}, "head_config": asdict(config)})
    loaded = load_head(store, "ds", CLAP_HEAD, "headkey")  # cached by its options: they must be hashable
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_endpoint_problems_are_one_line_naming_the_fix(s3_bucket, monkeypatch):
    monkeypatch.setenv("XMODAL_S3_MAX_ATTEMPTS", "1")
    port = _closed_port()
    cases = {
        f"http://127.0.0.1:{port}": f"cannot reach the S3 endpoint http://127.0.0.1:{port}",
        "127.0.0.1:9000": "must be a URL with its scheme",
    }
    for endpoint, expected in cases.items():
        monkeypatch.setenv("XMODAL_S3_ENDPOINT_URL", endpoint)
        with pytest.raises(StoreError) as info:
            check_bucket(open_store(s3_bucket["root"]))
        assert expected in str(info.value) and "XMODAL_S3_ENDPOINT_URL" in str(info.value)
        assert "\n" not in str(info.value)

    monkeypatch.setenv("XMODAL_S3_ENDPOINT_URL", s3_bucket["endpoint_url"])
    check_bucket(open_store(s3_bucket["root"]))  # the right endpoint and bucket: no complaint
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' .* does not exist at http"):
        check_bucket(open_store("s3://no-such-bucket/features"))
    assert s3_problem(ValueError("a bug, not S3")) is None  # anything else keeps its traceback
