"""Runs as users start them, as real processes: two datasets side by side, one dataset twice at
once, a run killed while it holds its dataset, and a second machine (its own DAGSTER_HOME, the
same Postgres instance and the same S3 store) continuing another machine's work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.core.store import FeatureStore
from tests.fixtures.tiny import cli_env

VENV_BIN = Path(sys.executable).parent
TIMEOUT = 420


def _start(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "dagster"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, out[-4000:]
    return out


def _dataset_env(tmp_path: Path, dataset: str, clips: int, **extra) -> dict:
    """A demo dataset of its own (its own media folder and size) in the shared store."""
    return cli_env(tmp_path, XMODAL_DATASET=dataset, XMODAL_DEMO_CLIPS=str(clips),
                   XMODAL_SOURCE_PATH=str(tmp_path / "media" / dataset), XMODAL_STORE_ROOT=str(tmp_path / "store"), **extra)


def _output(store: FeatureStore, dataset: str, asset: str) -> dict:
    return store.read_json(store.path(dataset, "_outputs", f"{asset}.json"))


def _mel_clip_ids(store: FeatureStore, dataset: str) -> set[str]:
    ref = _output(store, dataset, "mel_spectrograms")["value"]
    return set(store.read_arrays(dataset, "mel_spectrograms", ref["key"], shards=ref["shards"]).clip_ids)


def _manifest_clip_ids(store: FeatureStore, dataset: str) -> set[str]:
    from stages.ingest.manifest import load_manifest

    return {c.id for c in load_manifest(store, dataset).clips}


def test_two_datasets_run_side_by_side_without_crossing(tmp_path):
    envs = {"alpha": _dataset_env(tmp_path, "alpha", 12), "beta": _dataset_env(tmp_path, "beta", 8)}
    runs = {name: _start(["job", "execute", "-j", "refresh_features"], env, tmp_path) for name, env in envs.items()}
    logs = {name: _finish(run) for name, run in runs.items()}
    store = FeatureStore(str(tmp_path / "store"))
    for name, clips in (("alpha", 12), ("beta", 8)):
        manifest = _output(store, name, "clip_manifest")
        assert manifest["dataset"] == name and manifest["value"]["dataset"] == name and manifest["value"]["clips"] == clips
        assert _mel_clip_ids(store, name) == _manifest_clip_ids(store, name)  # A's features from A's clips only
        assert "is busy" not in logs[name]  # different datasets never wait for each other
        (entry,) = store.catalog(name, "mel_spectrograms")
        assert entry["rows"] == clips  # 12 and 8: neither run computed the other's clips into its dataset
    for name in envs:
        assert not store.exists(store.path(name, "_lease.json"))  # given back at the end


def test_one_dataset_twice_at_once_ends_with_one_runs_result(tmp_path):
    env = _dataset_env(tmp_path, "demo", 12)
    first = _start(["job", "execute", "-j", "refresh_features"], env, tmp_path)
    second = _start(["job", "execute", "-j", "refresh_features"], env, tmp_path)
    logs = [_finish(first), _finish(second)]
    waited = [log for log in logs if "is busy: waiting for run" in log]
    lease_lines = [line[11:19] + line[-110:] for log in logs for line in log.splitlines() if "lease" in line or "is busy" in line or "STEP_START" in line]
    assert len(waited) == 1, f"exactly one run waited for the other's lease: {lease_lines}"
    computed = [log for log in logs if "mel_spectrograms" in log and "2 new / 0 reused" in log]
    reused = [log for log in logs if "0 new / 2 reused" in log]
    assert len(computed) == 1 and len(reused) == 1 and reused[0] is waited[0]
    store = FeatureStore(str(tmp_path / "store"))
    (entry,) = store.catalog("demo", "mel_spectrograms")
    assert entry["rows"] == 12 and entry["shards_committed"] == 2
    assert _mel_clip_ids(store, "demo") == _manifest_clip_ids(store, "demo")


def test_a_run_killed_while_holding_its_dataset_does_not_block_the_next(tmp_path):
    env = _dataset_env(tmp_path, "demo", 12)
    store = FeatureStore(str(tmp_path / "store"))
    doomed = _start(["job", "execute", "-j", "refresh_features"], env, tmp_path)
    lease = Path(store.path("demo", "_lease.json"))
    deadline = time.time() + 120
    while not lease.exists() and time.time() < deadline and doomed.poll() is None:
        time.sleep(0.05)
    assert lease.exists(), "the run never took its dataset's lease"
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=30)
    log = _finish(_start(["job", "execute", "-j", "refresh_features"], env, tmp_path))
    assert "breaking the lease" in log
    (entry,) = store.catalog("demo", "mel_spectrograms")
    assert entry["rows"] == 12


@pytest.mark.timeout(900)
def test_a_second_machine_continues_from_the_shared_instance_and_store(tmp_path, postgres_url, s3_bucket):
    shared = {"XMODAL_STORE_ROOT": s3_bucket["root"], "XMODAL_S3_ENDPOINT_URL": s3_bucket["endpoint_url"],
              "XMODAL_SOURCE_PATH": str(tmp_path / "media" / "demo")}
    machine_a = cli_env(tmp_path, home="home_a", postgres_url=postgres_url, **shared)
    _finish(_start(["job", "execute", "-j", "refresh_features"], machine_a, tmp_path))

    # Machine B: another DAGSTER_HOME, another working folder, no access to A's local storage.
    elsewhere = tmp_path / "machine_b"
    elsewhere.mkdir()
    machine_b = cli_env(elsewhere, home="home_b", postgres_url=postgres_url, **shared)
    config = elsewhere / "run.yaml"
    config.write_text(json.dumps({"ops": {"audio_images": {"config": {"size": 32}}}}))
    log = _finish(_start(["asset", "materialize", "--select", "audio_images", "--partition", "demo", "-c", str(config)],
                         machine_b, elsewhere))
    assert "FileNotFoundError" not in log
    store = FeatureStore(s3_bucket["root"], s3_bucket["storage_options"])
    images = _output(store, "demo", "audio_images")["value"]
    table = store.read_arrays("demo", "audio_images", images["key"], shards=images["shards"])
    assert table.arrays["image"].shape[1:] == (32, 32, 3) and len(table) == 12

    import psycopg2

    with psycopg2.connect(postgres_url) as connection, connection.cursor() as cursor:
        cursor.execute("select count(*) from event_logs where asset_key like '%audio_images%' and partition = 'demo' "
                       "and dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert cursor.fetchone()[0] == 2  # one per machine, both in the shared instance's history of "demo"
