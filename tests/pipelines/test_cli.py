"""The `xmodal` console script, run as a real process against real stores (local and S3)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.core.store import FeatureStore
from stages.ingest.manifest import Clip, ClipManifest, save_manifest

XMODAL = Path(sys.executable).parent / "xmodal"


def xmodal(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    assert XMODAL.exists(), f"{XMODAL} missing: run `.venv/bin/python -m pip install --no-deps -e .`"
    return subprocess.run([str(XMODAL), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def cli_env(tmp_path) -> dict:
    """No default store to fall back on, and a throwaway Dagster home (the venv's .pth would
    otherwise point DAGSTER_HOME at the project's own instance)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {"XMODAL_STORE_ROOT": str(tmp_path / "no-default-store"), "DAGSTER_HOME": str(home),
            "XMODAL_S3_ENDPOINT_URL": ""}


def write_feature(store: FeatureStore, dataset: str, feature: str, key: str, shards: dict[str, dict],
                  params: dict) -> dict:
    """Commit shards ({shard: {"ids": [...], "quarantined": [...]}}) of one feature key, then catalog it."""
    for shard, content in shards.items():
        ids = content["ids"]
        store.write_shard(dataset, feature, key, shard, clip_ids=ids,
                          arrays={"emb": np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4)},
                          manifest={"params": params, "quarantined": content.get("quarantined", [])})
    return store.update_catalog(dataset, feature, key, params=params, code_version="1")


def save_clip_manifest(store: FeatureStore, dataset: str, ids: list[str], quarantined: list[dict]) -> None:
    clips = [Clip(id=i, uri=f"/media/{i}.wav", content_hash=f"h{n}", shard_id="s000000") for n, i in enumerate(ids)]
    save_manifest(store, ClipManifest(dataset, 8, clips, quarantined))


@pytest.fixture
def filled_store(tmp_path) -> FeatureStore:
    """Dataset "ds": a clip manifest with 2 rejects, mels (2 shards, 1 silent clip) and embeddings
    (1 shard, the silent clip missing again); dataset "other": one feature, nothing quarantined."""
    store = FeatureStore(str(tmp_path / "features"))
    save_clip_manifest(store, "ds", ["c0", "c1", "c2", "c3", "c4"], [
        {"id": "bad_1", "source": "/media/bad_1.wav", "reason": "cannot decode audio"},
        {"id": "bad_2", "source": "/media/bad_2.wav", "reason": "cannot decode audio"},
    ])
    write_feature(store, "ds", "mel_spectrograms", "key000000000001", {
        "s000000-aaaa": {"ids": ["c0", "c1"], "quarantined": [{"id": "c2", "reason": "silent (peak -80 dBFS)"}]},
        "s000001-bbbb": {"ids": ["c3", "c4"]},
    }, {"preset": "hifigan22k"})
    write_feature(store, "ds", "clap_embeddings", "key000000000002", {
        "s000000-aaaa": {"ids": ["c0", "c1"], "quarantined": [{"id": "c2", "reason": "no audio_tower row"}]},
    }, {"dim": 4})
    write_feature(store, "other", "mel_spectrograms", "key000000000003", {"s000000-cccc": {"ids": ["x0"]}},
                  {"preset": "audioldm16k"})
    return store


def table(stdout: str) -> dict[str, list[str]]:
    """The store ls table, keyed by feature key."""
    lines = stdout.splitlines()
    assert lines[0].split()[:6] == ["dataset", "feature", "key", "shards", "rows", "MB"]
    return {line.split()[2]: line.split() for line in lines[1:]}


def test_help_lists_the_subcommands_and_imports_nothing_heavy():
    result = xmodal("--help")
    assert result.returncode == 0, result.stderr
    for command in ("store", "dataset", "quarantine", "features", "generate"):
        assert command in result.stdout
    # --help builds every subcommand's parser without importing torch or dagster.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pipelines.cli import build_parser; build_parser(); "
                               "print(sorted(m for m in ('torch', 'dagster') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_store_ls_prints_the_catalog_with_filters(filled_store, cli_env):
    result = xmodal("store", "ls", "--root", filled_store.url_root, env=cli_env)
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert set(rows) == {"key000000000001", "key000000000002", "key000000000003"}
    assert rows["key000000000001"][:5] == ["ds", "mel_spectrograms", "key000000000001", "2", "4"]
    assert rows["key000000000002"][:5] == ["ds", "clap_embeddings", "key000000000002", "1", "2"]
    assert rows["key000000000003"][:5] == ["other", "mel_spectrograms", "key000000000003", "1", "1"]
    assert rows["key000000000001"][-1] == '{"preset":"hifigan22k"}'

    only_ds = table(xmodal("store", "ls", "--root", filled_store.url_root, "--dataset", "ds", env=cli_env).stdout)
    assert set(only_ds) == {"key000000000001", "key000000000002"}
    mels = table(xmodal("store", "ls", "--root", filled_store.url_root, "--feature", "mel_spectrograms", env=cli_env).stdout)
    assert set(mels) == {"key000000000001", "key000000000003"}

    # The default root is $XMODAL_STORE_ROOT, as for the jobs.
    default = xmodal("store", "ls", env={**cli_env, "XMODAL_STORE_ROOT": filled_store.url_root})
    assert set(table(default.stdout)) == set(rows)


def test_dataset_add_then_ls_and_the_dagster_partition(tmp_path, cli_env):
    root = str(tmp_path / "features")
    media = tmp_path / "media"
    media.mkdir()
    added = xmodal("dataset", "add", "vgg", "--kind", "vggsound", "--path", str(tmp_path / "vgg.csv"),
                   "--media-dir", str(media), "--default-split", "test", "--root", root, env=cli_env)
    assert added.returncode == 0, added.stderr
    assert "Dagster partition 'vgg' added" in added.stdout
    again = xmodal("dataset", "add", "vgg", "--kind", "vggsound", "--path", str(tmp_path / "vgg.csv"),
                   "--media-dir", str(media), "--default-split", "test", "--root", root, env=cli_env)
    assert again.returncode == 0 and "already exists" in again.stdout
    # Without DAGSTER_HOME: registered in the store, the partition skipped with a note.
    folder = xmodal("dataset", "add", "local", "--kind", "folder", "--path", str(media), "--root", root,
                    env={**cli_env, "DAGSTER_HOME": ""})
    assert folder.returncode == 0, folder.stderr
    assert "DAGSTER_HOME is not set" in folder.stdout

    listed = xmodal("dataset", "ls", "--root", root, env=cli_env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["dataset", "kind", "path", "media_dir", "default_split"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["vgg"] == ["vgg", "vggsound", str(tmp_path / "vgg.csv"), str(media), "test"]
    assert rows["local"] == ["local", "folder", str(media), "-", "assigned"]  # no split given: grouped 80/10/10

    from dagster import DagsterInstance

    from assets.datasets import DATASETS

    with DagsterInstance.from_config(cli_env["DAGSTER_HOME"]) as instance:
        assert instance.get_dynamic_partitions(DATASETS.name) == ["vgg"]

    # Errors a user can fix: one line on stderr, exit 2.
    bad = xmodal("dataset", "add", "../up", "--kind", "folder", "--path", str(media), "--root", root, env=cli_env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    kind = xmodal("dataset", "add", "x", "--kind", "nope", "--path", str(media), "--root", root, env=cli_env)
    assert kind.returncode == 2 and "invalid choice: 'nope'" in kind.stderr and "'vggsound'" in kind.stderr


def test_quarantine_counts_by_reason_then_lists_every_clip(filled_store, cli_env):
    result = xmodal("quarantine", "ds", "--root", filled_store.url_root, env=cli_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "dataset 'ds': 4 quarantined"
    assert lines[1].split() == ["count", "reason"]
    summary = {" ".join(line.split()[1:]): int(line.split()[0]) for line in lines[2:lines.index("")]}
    assert summary == {"cannot decode audio": 2, "silent (peak -80 dBFS)": 1, "no audio_tower row": 1}
    rows = [line.split(None, 2) for line in lines[lines.index("") + 2:]]
    assert sorted((where, clip) for where, clip, _ in rows) == sorted([
        ("clip_manifest", "bad_1"), ("clip_manifest", "bad_2"),
        ("mel_spectrograms/key000000000001/s000000-aaaa", "c2"),
        ("clap_embeddings/key000000000002/s000000-aaaa", "c2"),
    ])

    mels = xmodal("quarantine", "ds", "--feature", "mel_spectrograms", "--root", filled_store.url_root, env=cli_env)
    assert mels.returncode == 0 and mels.stdout.splitlines()[0] == "dataset 'ds': 1 quarantined"
    by_key = xmodal("quarantine", "ds", "--key", "key000000000002", "--root", filled_store.url_root, env=cli_env)
    assert by_key.returncode == 0 and "no audio_tower row" in by_key.stdout and "silent" not in by_key.stdout
    clean = xmodal("quarantine", "other", "--root", filled_store.url_root, env=cli_env)
    assert clean.returncode == 0 and clean.stdout.strip() == "dataset 'other': 0 quarantined"


def test_unknown_dataset_or_key_is_one_line_and_exit_2(filled_store, cli_env):
    result = xmodal("quarantine", "nope", "--root", filled_store.url_root, env=cli_env)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("xmodal: dataset 'nope' is unknown") and "ds, other" in line
    key = xmodal("quarantine", "ds", "--key", "key999", "--root", filled_store.url_root, env=cli_env)
    assert key.returncode == 2 and len(key.stderr.strip().splitlines()) == 1 and "key999" in key.stderr


def test_features_lists_the_registry(cli_env):
    from stages.features.base import all_features

    result = xmodal("features", env=cli_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["feature", "group", "code_version", "inputs", "description"]
    listed = {line.split()[0]: line.split() for line in lines[1:]}
    registry = all_features()
    assert set(listed) == set(registry)
    for name, feature in registry.items():
        assert listed[name][1:3] == [feature.group, feature.code_version]


def test_python_m_stages_store_is_the_same_table(filled_store, cli_env):
    via_module = subprocess.run([sys.executable, "-m", "stages.store", filled_store.url_root, "--dataset", "other"],
                                capture_output=True, text=True, timeout=120, env={**os.environ, **cli_env})
    assert via_module.returncode == 0, via_module.stderr
    via_cli = xmodal("store", "ls", "--root", filled_store.url_root, "--dataset", "other", env=cli_env)
    assert via_module.stdout == via_cli.stdout and "key000000000003" in via_cli.stdout


def test_store_ls_on_s3_with_the_endpoint_from_the_environment(s3_bucket, cli_env):
    store = FeatureStore(s3_bucket["root"], s3_bucket["storage_options"])
    write_feature(store, "ds", "mel_spectrograms", "key000000000007", {"s000000-aaaa": {"ids": ["c0", "c1", "c2"]}},
                  {"preset": "hifigan22k"})
    result = xmodal("store", "ls", "--root", s3_bucket["root"],
                    env={**cli_env, "XMODAL_S3_ENDPOINT_URL": s3_bucket["endpoint_url"]})
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["key000000000007"][:5] == ["ds", "mel_spectrograms", "key000000000007", "1", "3"]


@pytest.fixture
def mel_store(demo_dataset, tmp_path):
    """Real mels of the demo's first 20 clips (2 shards) in a fresh store, with their catalog entry."""
    from stages.core.parallel import InProcessExecutor
    from stages.features.base import run_feature
    from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, MelParams, compute_mel_shard
    from stages.ingest.manifest import build_manifest
    from stages.ingest.sources import SourceConfig, read_source

    store = FeatureStore(str(tmp_path / "features"))
    listing = read_source(SourceConfig(kind="jsonl", path=str(demo_dataset)))
    listing.clips = listing.clips[:20]
    manifest, _ = build_manifest("demo", listing, None, shard_size=10)
    save_manifest(store, manifest)
    params = MelParams(seconds=1.0)
    run = run_feature(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
                      compute_mel_shard, InProcessExecutor())
    return store, manifest, params, run


def _flip_first_chunk(store, key, shard):
    manifest = store.shard_manifest("demo", "mel_spectrograms", key, shard)
    _, zarr_path = store.shard_files("demo", "mel_spectrograms", key, shard, manifest)
    chunk = sorted(p for p in store.fs.find(f"{zarr_path}/mel") if "/c/" in p)[0]
    data = bytearray(store.fs.cat_file(chunk))
    data[-4] ^= 0xFF
    store.fs.pipe_file(chunk, bytes(data))


def test_store_verify_names_damage_and_repair_recomputes_it(mel_store, cli_env):
    store, _, params, run = mel_store
    before = store.read_arrays("demo", "mel_spectrograms", params.key()).arrays["mel"]
    result = xmodal("store", "verify", "--root", store.url_root, env=cli_env)
    assert result.returncode == 0 and "2 shards verified" in result.stdout and "0 damaged" in result.stdout

    _flip_first_chunk(store, params.key(), run.shards[1])
    result = xmodal("store", "verify", "--root", store.url_root, env=cli_env)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("damaged")]
    assert f"demo/mel_spectrograms/{params.key()}/{run.shards[1]}" in line and "sha256" in line

    result = xmodal("store", "verify", "--root", store.url_root, "--repair", env=cli_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "retired" in result.stdout and f"recomputed demo/mel_spectrograms/{params.key()}: 1 shards" in result.stdout
    result = xmodal("store", "verify", "--root", store.url_root, "--full", env=cli_env)
    assert result.returncode == 0 and "0 damaged" in result.stdout
    np.testing.assert_array_equal(store.read_arrays("demo", "mel_spectrograms", params.key()).arrays["mel"], before)

    # Leftovers of the retired attempt are collected by gc (grace 0 here), never committed files.
    result = xmodal("store", "gc", "--root", store.url_root, "--grace-seconds", "0", env=cli_env)
    assert result.returncode == 0 and "2 files of uncommitted attempts removed" in result.stdout  # its tar and zarr
    np.testing.assert_array_equal(store.read_arrays("demo", "mel_spectrograms", params.key()).arrays["mel"], before)


def test_the_next_refresh_recomputes_a_damaged_shard(mel_store):
    from stages.core.parallel import InProcessExecutor
    from stages.features.base import run_feature
    from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, compute_mel_shard

    store, manifest, params, run = mel_store
    before = store.read_arrays("demo", MEL_FEATURE, params.key()).arrays["mel"]
    _flip_first_chunk(store, params.key(), run.shards[0])
    again = run_feature(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
                        compute_mel_shard, InProcessExecutor())
    assert (again.shards_new, again.shards_reused) == (1, 1)
    assert len(again.retired) == 1 and again.retired[0].startswith(run.shards[0]) and "sha256" in again.retired[0]
    np.testing.assert_array_equal(store.read_arrays("demo", MEL_FEATURE, params.key()).arrays["mel"], before)
