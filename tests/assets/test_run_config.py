"""A run's whole config is checked when it starts, before any step computes anything: one line
per bad asset config or setting, naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from assets.run_config import CONFIG_CHECKS, check_run_config
from pipelines.definitions import ALL_ASSETS
from tests.fixtures.tiny import cli_env, default_config, materialize_dataset, resources

DAGSTER = Path(sys.executable).parent / "dagster"


def test_every_asset_with_a_config_registers_a_check_that_accepts_its_defaults():
    configured = {key.path[-1] for a in ALL_ASSETS for key in a.keys
                  if a.op.config_schema is not None and a.op.config_schema.as_field().default_provided
                  and default_config(key.path[-1])}
    assert configured and configured <= set(CONFIG_CHECKS)
    defaults = {"ops": {name: {"config": default_config(name)} for name in configured}}
    assert check_run_config(defaults) == []


@pytest.mark.parametrize("asset, values, expected", [
    ("audio_images", {"size": 4}, "bad audio_images config: audio image size must be within 8..1024, got 4"),
    ("mel_spectrograms", {"preset": "nosuch"}, "bad mel_spectrograms config: unknown mel preset 'nosuch'"),
])
def test_a_bad_value_is_one_line_naming_the_asset(asset, values, expected):
    (line,) = check_run_config({"ops": {asset: {"config": {**default_config(asset), **values}}}})
    assert line.startswith(expected) and "\n" not in line


def test_a_bad_config_fails_the_run_before_any_shard_is_computed(demo_dataset, tmp_path):
    from assets.resources import ClipSourceResource

    source = ClipSourceResource(kind="jsonl", path=str(demo_dataset), dataset="demo", shard_size=16)
    result = materialize_dataset(
        [a for a in ALL_ASSETS if a.key.path[-1] in ("clip_manifest", "mel_spectrograms", "audio_images")],
        resources(tmp_path / "store", source), raise_on_error=False,
        run_config={"ops": {"audio_images": {"config": {"size": 4}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value in ("RESOURCE_INIT_FAILURE", "RUN_FAILURE",
                                                                         "STEP_FAILURE"))
    assert "audio image size must be within 8..1024" in str(failure.event_specific_data)
    assert not (tmp_path / "store" / "demo" / "mel_spectrograms").exists()  # nothing was computed


def test_a_bad_environment_variable_is_one_line_naming_it(tmp_path):
    env = cli_env(tmp_path, XMODAL_SHARD_SIZE="abc")
    result = subprocess.run([str(DAGSTER), "job", "execute", "-j", "refresh_features"], capture_output=True,
                            text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode != 0
    assert "xmodal: XMODAL_SHARD_SIZE='abc' is not an integer" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
