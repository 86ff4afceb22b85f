"""Two "machines" running steps of one job: two DAGSTER_HOMEs (separate folders, each with
deploy/dagster-postgres.yaml) on one Postgres instance, one feature store on S3 (the loopback moto
server), and one Dask cluster (a scheduler and a worker, separate processes) doing the shard
work of both. Every service is started by the tests, on loopback.

Machine A materializes clip_manifest and mel_spectrograms (`dagster job execute` with an op
selection); machine B, started while A holds the dataset's lease (A's process is paused with
SIGSTOP right after taking it, so the overlap is certain, not a race), materializes audio_images
(`dg launch`): B waits for A's lease, then builds on A's committed mels and recomputes none of
them. The shard work of both ran once, on the shared cluster; both instances see both runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from stages.core.cluster import start_cluster
from stages.core.store import FeatureStore
from tests.fixtures.tiny import cli_env

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 300


class Machine:
    """One machine's environment; each command's output goes to a file, readable while it runs."""

    def __init__(self, name: str, env: dict, folder: Path):
        self.name, self.env, self.folder = name, env, folder
        self.processes: list[subprocess.Popen] = []

    def start(self, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"{self.name}-{len(self.processes) + 1}.log"
        with open(log, "w") as out:
            # cwd = the project: `dg` finds its [tool.dg] config there, as a user runs it.
            process = subprocess.Popen(args, cwd=PROJECT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes.append(process)
        return process, log

    def kill(self) -> None:
        """End whatever is still running (a failed test), paused or not."""
        for process in self.processes:
            if process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _finish(process: subprocess.Popen, log: Path) -> str:
    process.wait(timeout=TIMEOUT)
    text = log.read_text()
    assert process.returncode == 0, text[-4000:]
    return text


def _wait_for(condition, what: str, timeout: float, *processes: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        for process in processes:
            assert process.poll() is None, f"exited ({process.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def _lease_owner(store: FeatureStore) -> str | None:
    try:
        return json.loads(store.fs.cat_file(store.path("demo", "_lease.json")))["owner"]
    except FileNotFoundError:
        return None


def _has_partition(home: str) -> bool:
    from dagster import DagsterInstance

    from assets.datasets import DATASETS

    instance = DagsterInstance.from_config(home)
    try:
        return instance.has_dynamic_partition(DATASETS.name, "demo")
    finally:
        instance.dispose()


def _run_of(log: str) -> str:
    """The run id in a run's "lease taken" line."""
    line = next(line for line in log.splitlines() if "lease taken after waiting" in line)
    return re.search(r" - ([0-9a-f-]{36}) - ", line).group(1)


def _shard_files(store: FeatureStore, feature: str) -> dict[str, str]:
    """Every data and manifest file of a feature (all keys) with its ETag: a recomputed shard changes
    this (verification stamps under _verified/ do not count: a reader may add them)."""
    found = store.fs.find(store.path("demo", feature), detail=True)
    return {path: info.get("ETag", "") for path, info in found.items() if "/_verified/" not in path}


def _materialization_runs(home: Path, asset: str) -> set[str]:
    """Run ids of ``asset``'s materializations as the instance of ``home`` sees them (its
    dagster.yaml reads DAGSTER_PG_URL)."""
    from dagster import AssetKey, DagsterInstance

    instance = DagsterInstance.from_config(str(home))
    try:
        return {record.run_id for record in instance.fetch_materializations(AssetKey(asset), limit=100).records}
    finally:
        instance.dispose()


@pytest.mark.timeout(900)
def test_two_machines_share_one_instance_one_store_and_one_dask_cluster(tmp_path, postgres_url, s3_bucket, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_URL", postgres_url)
    # One worker, no nanny: the cheapest real cluster (its processes were most of this test's CPU
    # with two workers and nannies); spreading over workers is tests/stages/core/test_dask_cluster.py's.
    cluster = start_cluster(n_workers=1, nanny=False, folder=str(tmp_path / "dask"))  # S3 credentials: this env
    machines: dict[str, Machine] = {}
    try:
        shared = {"XMODAL_STORE_ROOT": s3_bucket["root"], "XMODAL_S3_ENDPOINT_URL": s3_bucket["endpoint_url"],
                  "XMODAL_SOURCE_PATH": str(tmp_path / "media"), "XMODAL_DEMO_CLIPS": "8", "XMODAL_SHARD_SIZE": "4",
                  "XMODAL_COMPUTE": "scheduler", "XMODAL_DASK_SCHEDULER": cluster.address, "PYTHONUNBUFFERED": "1"}
        for name in ("a", "b"):
            folder = tmp_path / f"machine_{name}"
            folder.mkdir()
            machines[name] = Machine(name, cli_env(folder, home="dagster_home", postgres_url=postgres_url, **shared),
                                     folder)
        a, b = machines["a"], machines["b"]
        assert a.env["DAGSTER_HOME"] != b.env["DAGSTER_HOME"]
        store = FeatureStore(s3_bucket["root"], s3_bucket["storage_options"])

        # 1. Machine A: the manifest and the mels, paused once it holds the dataset's lease (and has
        #    added the dataset's partition to the shared instance).
        run_a, log_path_a = a.start([str(VENV_BIN / "dagster"), "job", "execute", "-j", "refresh_features",
                                     "--op-selection", "clip_manifest,mel_spectrograms"])
        owner_a = _wait_for(lambda: (owner := _lease_owner(store)) and _has_partition(a.env["DAGSTER_HOME"]) and owner,
                            "lease and partition taken by machine A", TIMEOUT, run_a)
        os.killpg(run_a.pid, signal.SIGSTOP)

        # 2. Machine B, meanwhile: audio images of the same dataset. It must wait for A's lease
        #    (A is paused: under the lease's 60 s TTL), then build on A's committed mels.
        run_b, log_path_b = b.start([str(VENV_BIN / "dg"), "launch", "--assets", "audio_images", "--partition", "demo"])
        _wait_for(lambda: f"is busy: waiting for run {owner_a}" in log_path_b.read_text(),
                  "wait for A's lease in B's log", 50, run_b)
        os.killpg(run_a.pid, signal.SIGCONT)
        log_a = _finish(run_a, log_path_a)
        mels = _shard_files(store, "mel_spectrograms")
        log_b = _finish(run_b, log_path_b)

        assert "mel_spectrograms" in log_a and "2 new / 0 reused shards" in log_a  # A computed the mels
        assert "lease taken after waiting" in log_b and "audio_images" in log_b and "2 new / 0 reused shards" in log_b
        assert _shard_files(store, "mel_spectrograms") == mels  # B recomputed none of A's mels
        assert not store.exists(store.path("demo", "_lease.json"))  # given back by both
        images = json.loads(store.fs.cat_file(store.path("demo", "_outputs", "audio_images.json")))["value"]
        assert store.read_arrays("demo", "audio_images", images["key"], shards=images["shards"]).arrays["image"].shape[0] == 8

        # The shard work of both machines ran on the shared cluster's workers (their logs), once.
        done = "".join(cluster.log(f"worker-{i}") for i in range(len(cluster.workers)))
        assert done.count("task done: mel_spectrograms shard") == 2 and done.count("task done: audio_images shard") == 2

        # One shared event log: each instance sees both machines' runs.
        owner_b = _run_of(log_b)
        for home in (a.env["DAGSTER_HOME"], b.env["DAGSTER_HOME"]):
            assert _materialization_runs(Path(home), "mel_spectrograms") == {owner_a}
            assert _materialization_runs(Path(home), "audio_images") == {owner_b}
    finally:
        for machine in machines.values():
            machine.kill()
        cluster.stop()
