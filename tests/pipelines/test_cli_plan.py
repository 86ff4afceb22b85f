"""`xmodal plan`: the dry run from the command line, as a real process on a fresh project environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures.tiny import cli_env

XMODAL = Path(sys.executable).parent / "xmodal"


def test_plan_before_the_first_run_lists_every_shard_of_the_new_demo(tmp_path):
    from stages.ingest.demo import DemoSpec, generate_demo

    env = cli_env(tmp_path)  # 12 demo clips, shards of 8
    generate_demo(Path(env["XMODAL_DATA_DIR"]) / "demo", DemoSpec(n_clips=12, seed=0))
    done = subprocess.run([str(XMODAL), "plan", "-j", "refresh_features"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    # feature, key, shards, cached, to compute, clips to compute, ...
    assert rows["mel_spectrograms"][1:6] == ["(new)", "2", "0", "2", "12"]
    assert rows["audio_images"][1:6] == ["(new)", "2", "0", "2", "12"]
    assert "audio_tower" not in rows  # not part of refresh_features
    assert "+12 new clips in 2 new shards" in done.stdout and "guess" in done.stdout
    assert not (Path(env["XMODAL_DATA_DIR"]) / "features").exists() or not any(
        (Path(env["XMODAL_DATA_DIR"]) / "features").rglob("*.json"))  # nothing written


def test_plan_of_an_unknown_job_is_one_line(capsys):
    from pipelines.cli import main

    assert main(["plan", "-j", "no_such_job", "--no-listing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmodal: unknown job 'no_such_job'") and "train_diffgap" in err and "\n" not in err
