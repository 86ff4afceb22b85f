"""Every command-line entry point honours XMODAL_S3_ENDPOINT_URL, and an unreachable or wrong
endpoint is one line naming the fix (exit 2), not a traceback: real processes against the
loopback moto server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.core.store import FeatureStore

VENV_BIN = Path(sys.executable).parent
ENTRY_POINTS = {
    "python -m stages.store": lambda root: [sys.executable, "-m", "stages.store", root],
    "xmodal store ls": lambda root: [str(VENV_BIN / "xmodal"), "store", "ls", "--root", root],
}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list[str], endpoint: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    env.update(XMODAL_S3_ENDPOINT_URL=endpoint, XMODAL_S3_MAX_ATTEMPTS="1", XMODAL_DATA_DIR=str(tmp_path / "data"),
               DAGSTER_HOME=str(tmp_path))
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def s3_feature(s3_bucket):
    store = FeatureStore(s3_bucket["root"], s3_bucket["storage_options"])
    store.write_shard("ds", "mel_spectrograms", "key000000000042", "s000000-aaaa", clip_ids=["c0", "c1"],
                      arrays={"mel": np.zeros((2, 3), dtype=np.float32)}, manifest={"params": {}, "quarantined": []})
    store.update_catalog("ds", "mel_spectrograms", "key000000000042", params={}, code_version="1")
    return s3_bucket


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_points_use_the_endpoint_from_the_environment(entry, s3_feature, tmp_path):
    command = ENTRY_POINTS[entry]
    listed = _run(command(s3_feature["root"]), s3_feature["endpoint_url"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "key000000000042" in listed.stdout

    port = _closed_port()  # a wrong endpoint (nothing listens); a bad URL or bucket: tests/stages/core/test_settings.py
    failed = _run(command(s3_feature["root"]), f"http://127.0.0.1:{port}", tmp_path)
    assert failed.returncode == 2 and failed.stdout == "", failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in failed.stderr and "XMODAL_S3_ENDPOINT_URL" in failed.stderr


def test_a_dagster_run_on_an_unreachable_endpoint_fails_before_any_step_in_one_line(s3_bucket, tmp_path):
    from tests.fixtures.tiny import cli_env

    port = _closed_port()
    env = cli_env(tmp_path, XMODAL_STORE_ROOT=s3_bucket["root"], XMODAL_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                  XMODAL_S3_MAX_ATTEMPTS="1", XMODAL_SOURCE_PATH=str(tmp_path / "media"))
    run = subprocess.run([str(VENV_BIN / "dagster"), "job", "execute", "-j", "refresh_features"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "STEP_START" not in out  # the run's resources failed: no step ran
    failures = {line for line in out.splitlines() if line.startswith("dagster._core.definitions.events.Failure: ")}
    assert failures == {f"dagster._core.definitions.events.Failure: cannot reach the S3 endpoint http://127.0.0.1:{port} "
                        "(EndpointConnectionError): start the server, or set XMODAL_S3_ENDPOINT_URL to its URL (unset: AWS)"}
