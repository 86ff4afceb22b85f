"""A no-op re-run of `train_diffgap` against a cold one: whole `dagster job execute` processes on the demo.

    .venv/bin/python bench/bench_noop_train.py [--clips 96] [--shard-size 32] [--colds 1] [--noops 3] [--keep]
    .venv/bin/python bench/bench_noop_train.py --work DIR --cold-seconds S [--noops 3]   # more no-ops on a kept run

Each cold run starts from an empty store (the demo media are generated once, before any timing);
the no-op runs that follow it re-run the same job on that store, with every feature, checkpoint and
result cached. With ``--colds 2`` the second cold run comes after the first one's no-ops, so the
machine's noise hits both kinds. XMODAL_COMPUTE=in_process. Prints the ratio no-op / cold (goal
<= 3%) and, per run, where the time went: process start to the first log line (imports, loading
the definitions, resources), the logged steps, and the end (the run's teardown). ``--work`` continues
on a folder kept by ``--keep`` (its first run settles anything the code changed since, untimed as a
no-op); the cold time then comes from that earlier run (``--cold-seconds``), which the output says.
"""

from __future__ import annotations

import argparse
import calendar
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

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 - dagster - ", re.M)
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
    """Seconds of one whole `dagster job execute` process, and where they went."""
    env = {**env, "XMODAL_STORE_ROOT": str(store)}
    command = [str(PROJECT / ".venv" / "bin" / "dagster"), "job", "execute", "-j", "train_diffgap"]
    wall_start = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    log.write_text(output)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}); its log: {log}")
    return seconds, phases(output, wall_start, wall_start + seconds)


def phases(output: str, start: float, end: float) -> str:
    """start -> first INFO line (imports, definitions, resources), first -> last line (the steps),
    last line -> exit; log times have 1 s resolution."""
    stamps = [calendar.timegm(time.strptime(t, "%Y-%m-%d %H:%M:%S")) for t in LOG_TIME.findall(output)]
    if not stamps:
        return "no log lines"
    first, last = min(stamps), max(stamps) + 1
    reused = len(REUSE_LINE.findall(output))
    return (f"start to first step ~{max(0.0, first - start):.0f} s, steps ~{last - first:.0f} s, "
            f"after the last ~{max(0.0, end - last):.0f} s; {reused} reuse lines")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=96, help="XMODAL_DEMO_CLIPS")
    parser.add_argument("--shard-size", type=int, default=32, help="XMODAL_SHARD_SIZE")
    parser.add_argument("--colds", type=int, default=1, help="cold runs, each on an empty store")
    parser.add_argument("--noops", type=int, default=3, help="no-op re-runs after each cold run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores)")
    parser.add_argument("--work", default=None, help="continue on a folder kept by --keep (no cold run)")
    parser.add_argument("--cold-seconds", type=float, default=None, help="with --work: the cold time of that folder's run")
    args = parser.parse_args()
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="noop-train-bench-"))
    env = environment(work, args.clips, args.shard_size)
    from dagster import DagsterInstance

    from stages.ingest.demo import DemoSpec, generate_demo

    DagsterInstance.from_config(env["DAGSTER_HOME"]).dispose()  # create the SQLite instance once
    generate_demo(work / "data" / "demo", DemoSpec(n_clips=args.clips, seed=0))  # media are not part of a run

    colds, noops = [], []
    if args.work:
        if args.cold_seconds is None:
            parser.error("--work needs --cold-seconds (the cold time of the run that made the folder)")
        colds.append(args.cold_seconds)
        seconds, where = run_job(env, work / "store0", work / "settle.log")
        print(f"cold 0: {args.cold_seconds:7.1f} s (earlier run, --cold-seconds); settling run {seconds:.1f} s: {where}",
              flush=True)
    cold_indices = [0] if args.work else range(args.colds)
    for cold_index in cold_indices:
        store = work / f"store{cold_index}"
        if not args.work:
            seconds, where = run_job(env, store, work / f"cold{cold_index}.log")
            colds.append(seconds)
            print(f"cold {cold_index}: {seconds:7.1f} s   {where}", flush=True)
        for noop_index in range(args.noops):
            seconds, where = run_job(env, store, work / f"noop{cold_index}-{noop_index}.log")
            noops.append(seconds)
            print(f"  no-op {noop_index}: {seconds:6.1f} s   {where}", flush=True)
    cold, noop = statistics.median(colds), statistics.median(noops)
    print(f"\n{args.clips} demo clips, shards of {args.shard_size}, XMODAL_COMPUTE=in_process; "
          f"median cold {cold:.1f} s ({len(colds)}), median no-op {noop:.1f} s ({len(noops)})")
    print(f"no-op / cold = {100 * noop / cold:.1f}% (goal <= 3%)")
    if args.keep or args.work:
        print(f"logs and stores in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
