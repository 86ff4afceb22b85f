"""A no-op re-run of `train_diffgap` against a cold one: whole `dagster job execute` processes on the demo.

    .venv/bin/python bench/bench_noop_train.py [--clips 96] [--shard-size 32] [--colds 1] [--noops 3]

Each cold run starts from an empty store (the demo media are generated once, before any timing);
the no-op runs that follow it re-run the same job on that store, with every feature, checkpoint and
result cached. With ``--colds 2`` the second cold run comes after the first one's no-ops, so the
machine's noise hits both kinds. XMODAL_COMPUTE=in_process. Prints the ratio no-op / cold (goal
<= 3%) and, per no-op, the slowest steps as Dagster logged them (what a no-op still pays for).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

STEP_LINE = re.compile(r'Finished execution of step "([^"]+)" in ([0-9.]+)(ms|s|m)')
REUSE_LINE = re.compile(r"(reused the stored result|: reused;|\d+ new / \d+ reused shards)")


def environment(work: Path, clips: int, shard_size: int) -> dict:
    """A user's environment after set-up, minus anything of the caller's (as tests/fixtures/tiny.cli_env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "XMODAL_"))}
    home = work / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    env.update(DAGSTER_HOME=str(home), XMODAL_DATA_DIR=str(work / "data"), XMODAL_DEMO_CLIPS=str(clips),
               XMODAL_SHARD_SIZE=str(shard_size), XMODAL_COMPUTE="in_process", HF_HUB_OFFLINE="1",
               DAGSTER_CLI_JOB_EXECUTE_MODULE_NAME="pipelines.definitions")
    return env


def run_job(env: dict, store: Path, log: Path) -> tuple[float, str]:
    env = {**env, "XMODAL_STORE_ROOT": str(store)}
    command = [str(PROJECT / ".venv" / "bin" / "dagster"), "job", "execute", "-j", "train_diffgap"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}); its log: {log}")
    return seconds, done.stdout + done.stderr


def slowest_steps(output: str, n: int = 5) -> str:
    steps = []
    for name, value, unit in STEP_LINE.findall(output):
        seconds = float(value) / 1000 if unit == "ms" else float(value) * (60 if unit == "m" else 1)
        steps.append((seconds, name))
    return ", ".join(f"{name} {seconds:.2f} s" for seconds, name in sorted(steps, reverse=True)[:n])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=96, help="XMODAL_DEMO_CLIPS")
    parser.add_argument("--shard-size", type=int, default=32, help="XMODAL_SHARD_SIZE")
    parser.add_argument("--colds", type=int, default=1, help="cold runs, each on an empty store")
    parser.add_argument("--noops", type=int, default=3, help="no-op re-runs after each cold run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores)")
    args = parser.parse_args()
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="noop-train-bench-"))
    env = environment(work, args.clips, args.shard_size)
    from dagster import DagsterInstance

    from stages.ingest.demo import DemoSpec, generate_demo

    DagsterInstance.from_config(env["DAGSTER_HOME"]).dispose()  # create the SQLite instance once
    generate_demo(work / "data" / "demo", DemoSpec(n_clips=args.clips, seed=0))  # media are not part of a run

    colds, noops = [], []
    for cold_index in range(args.colds):
        store = work / f"store{cold_index}"
        seconds, output = run_job(env, store, work / f"cold{cold_index}.log")
        colds.append(seconds)
        print(f"cold {cold_index}: {seconds:7.1f} s   slowest steps: {slowest_steps(output)}", flush=True)
        for noop_index in range(args.noops):
            seconds, output = run_job(env, store, work / f"noop{cold_index}-{noop_index}.log")
            noops.append(seconds)
            reused = len(REUSE_LINE.findall(output))
            print(f"  no-op {noop_index}: {seconds:6.1f} s   ({reused} reuse lines)   slowest steps: {slowest_steps(output)}",
                  flush=True)
    cold, noop = statistics.median(colds), statistics.median(noops)
    print(f"\n{args.clips} demo clips, shards of {args.shard_size}, XMODAL_COMPUTE=in_process; "
          f"median cold {cold:.1f} s ({len(colds)}), median no-op {noop:.1f} s ({len(noops)})")
    print(f"no-op / cold = {100 * noop / cold:.1f}% (goal <= 3%)")
    if args.keep:
        print(f"logs and stores in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
