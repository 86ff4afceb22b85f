"""Wiring: the job, schedule and sensor; the exact CLI command; the UI; Postgres instance storage."""

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dagster import SensorResult, SkipReason, build_sensor_context

from assets.resources import ClipSourceResource
from pipelines.definitions import defs, new_media_sensor

PROJECT_DIR = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def test_definitions_wire_the_feature_graph():
    job = defs.resolve_job_def("refresh_features")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"clip_manifest", "mel_spectrograms", "audio_images",
                                                                                "mel_latents"}
    chain = {k.to_user_string() for k in defs.resolve_job_def("train_diffgap").asset_layer.executable_asset_keys}
    assert {"mel_spectrograms", "audio_images"} <= chain  # as the README says: manifest -> mels and audio images -> ...
    assert {"clip_manifest", "audio_tower", "frame_tower", "text_tower", "clap_head", "cavp_head",
            "clap_embeddings", "cavp_embeddings", "diffgap_clap", "diffgap_cavp", "diffgap_evaluation", "diffgap_ablations",
            "retrieval_evaluation"} <= chain
    vae_job = {k.to_user_string() for k in defs.resolve_job_def("train_vae").asset_layer.executable_asset_keys}
    assert {"video_frames", "audio_vae", "frame_vae", "vae_latents"} <= vae_job
    generation_job = {k.to_user_string() for k in defs.resolve_job_def("generate_audio").asset_layer.executable_asset_keys}
    assert {"audio_generator", "generated_audio", "generation_evaluation", "diffgap_clap", "vae_latents"} <= generation_job
    schedule = defs.resolve_schedule_def("daily_feature_refresh")
    assert schedule.cron_schedule == "0 3 * * *" and schedule.job_name == "refresh_features"
    assert defs.resolve_sensor_def("new_media_sensor").job_name == "refresh_features"


def test_sensor_requests_a_run_only_when_media_change(tmp_path, bad_media):
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(bad_media["good_wav"], folder / "a.wav")
    source = ClipSourceResource(kind="folder", path=str(folder))

    first = new_media_sensor(build_sensor_context(cursor=None, resources={"clip_source": source}))
    assert isinstance(first, SensorResult) and len(first.run_requests) == 1
    (request,) = first.run_requests
    assert request.partition_key == source.dataset  # the run names its dataset
    cursor = request.run_key.removeprefix("media-")
    same = new_media_sensor(build_sensor_context(cursor=cursor, resources={"clip_source": source}))
    assert isinstance(same, SkipReason)
    shutil.copy(bad_media["good_flac"], folder / "b.flac")
    after = new_media_sensor(build_sensor_context(cursor=cursor, resources={"clip_source": source}))
    assert isinstance(after, SensorResult) and after.run_requests[0].run_key != request.run_key


def _cli_env(tmp_path: Path, **extra) -> dict:
    """The README's environment minus anything a test runner may have set: the venv's .pth must
    supply the job module by itself."""
    from tests.fixtures.tiny import cli_env

    return cli_env(tmp_path, postgres_url=extra.pop("DAGSTER_PG_URL", ""), XMODAL_COMPUTE="local_cluster", **extra)


def _venv_has_job_module_default() -> bool:
    probe = subprocess.run(
        [str(VENV_BIN / "python"), "-c", "import os; print(os.environ.get('DAGSTER_CLI_JOB_EXECUTE_MODULE_NAME', ''))"],
        env={k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}, capture_output=True, text=True,
    )
    return probe.stdout.strip() == "pipelines.definitions"


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_dagster_job_execute_runs_refresh_features(tmp_path, storage, request):
    assert _venv_has_job_module_default(), "run scripts/setup.sh: the venv's xmodal_env.pth is missing"
    extra = {"DAGSTER_PG_URL": request.getfixturevalue("postgres_url")} if storage == "postgres" else {}
    env = _cli_env(tmp_path, **extra)
    done = subprocess.run(
        [str(VENV_BIN / "dagster"), "job", "execute", "-j", "refresh_features"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RUN_SUCCESS" in done.stderr or "Features of 'demo' are in" in done.stderr
    catalog = list((tmp_path / "data" / "features" / "catalog" / "demo").glob("*/*.json"))
    assert {p.parent.name for p in catalog} == {"mel_spectrograms", "audio_images", "mel_latents"}
    assert json.loads(catalog[0].read_text())["rows"] == 12

    if storage == "postgres":
        import psycopg2

        with psycopg2.connect(extra["DAGSTER_PG_URL"]) as connection, connection.cursor() as cursor:
            cursor.execute("select pipeline_name, status from runs")
            assert ("refresh_features", "SUCCESS") in cursor.fetchall()
    else:
        assert (tmp_path / "dagster_home" / "history" / "runs.db").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dagster_dev_serves_the_asset_graph(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "dagster"), "dev", "-p", str(port), "-h", "127.0.0.1"],
        cwd=PROJECT_DIR, env=_cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
    try:
        deadline, keys = time.time() + 120, None
        while time.time() < deadline and keys is None:
            time.sleep(1)
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    nodes = json.loads(response.read())["data"]["assetNodes"]
                    keys = {"/".join(n["assetKey"]["path"]) for n in nodes} if nodes else None
            except (OSError, KeyError, TypeError):
                continue
        assert keys is not None, "dagster dev did not serve the asset graph within 120 s"
        assert {"clip_manifest", "mel_spectrograms", "audio_images"} <= keys
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # dagster dev's graceful shutdown can outlast 30 s on a loaded machine
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
