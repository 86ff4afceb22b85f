"""Per-run cost (issue 14): whole `dagster job execute -j refresh_features` processes on the demo,
against the floor (`dagster job execute -j no_op`, a job that does nothing), measured in one run.

    .venv/bin/python bench/bench_rerun.py [--clips 1200] [--small 300] [--append 0.1] [--repeats 3]

Scenarios, each a fresh process as a user runs it (XMODAL_COMPUTE=in_process, so starting a Dask
cluster does not blur the picture; a temporary DAGSTER_HOME and XMODAL_DATA_DIR):

    floor      `-j no_op`: imports, definitions, instance, run records; no work
    cold       refresh_features on --clips demo clips, empty store
    no-op      refresh_features again, nothing new
    append     --append more clips (the demo grown in place), from the store the cold run left
    no-op@S    the no-op on a --small dataset: no-op work must not grow with the dataset

Demo media are generated before timing (not pipeline work). Floor runs are interleaved with the
no-op and append runs; medians of --repeats. Goals (issue 14): no-op <= floor + 3% of (cold -
floor); append of 10% <= floor + 15% of (cold - floor). Nothing here is asserted: it prints.
"""

from __future__ import annotations

import argparse
import os
import resource
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

DAGSTER = str(Path(sys.executable).parent / "dagster")


def _env(home: Path, data: Path, clips: int, shard_size: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "XMODAL_"))}
    env.update(DAGSTER_HOME=str(home), XMODAL_DATA_DIR=str(data), XMODAL_DEMO_CLIPS=str(clips),
               XMODAL_SHARD_SIZE=str(shard_size), XMODAL_COMPUTE="in_process",
               DAGSTER_CLI_JOB_EXECUTE_MODULE_NAME="pipelines.definitions", HF_HUB_OFFLINE="1")
    return env


def _run(job: str, env: dict, log: Path) -> tuple[float, float]:
    """(wall s, CPU s of the process and its children) of one `dagster job execute -j job`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "ab") as out:
        done = subprocess.run([DAGSTER, "job", "execute", "-j", job], env=env, cwd=PROJECT, stdout=out, stderr=out)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{job} failed (exit {done.returncode}): see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _generate(data: Path, clips: int) -> float:
    from stages.ingest.demo import DemoSpec, generate_demo

    start = time.perf_counter()
    generate_demo(data / "demo", DemoSpec(n_clips=clips))
    return time.perf_counter() - start


def _restore(snapshot: Path, store: Path) -> None:
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(snapshot, store, symlinks=True)  # copy2: mtimes kept, so verified stamps still match


def _median(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=1200)
    parser.add_argument("--small", type=int, default=300, help="clips of the second dataset for no-op growth (0: skip)")
    parser.add_argument("--append", type=float, default=0.1, help="fraction of new clips for the append scenario")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--keep", default="", help="work in this folder and keep it (default: a temporary one; "
                                                  "a kept folder's demo media are reused, its stores are not)")
    args = parser.parse_args()
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    print(f"load average at start: {_load()} (on {os.cpu_count()} cores)")
    work = Path(args.keep or tempfile.mkdtemp(prefix="rerun-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    home, log = work / "dagster_home", work / "runs.log"
    home.mkdir(exist_ok=True)
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    from dagster import DagsterInstance

    DagsterInstance.from_config(str(home)).dispose()  # created once, before the timed runs

    big, small = work / f"d{args.clips}", work / f"d{args.small}"
    grown = args.clips + max(1, round(args.clips * args.append))
    print(f"generating {args.clips} demo clips (untimed): {_generate(big, args.clips):.0f} s")
    env = _env(home, big, args.clips, args.shard_size)
    floor_env = _env(home, work / "unused", args.clips, args.shard_size)
    times: dict[str, list[tuple[float, float]]] = {"floor": [], "cold": [], "no-op": [], "append": []}
    # The floor runs paired with each scenario (the machine's load drifts between phases).
    paired: dict[str, list[tuple[float, float]]] = {"no-op": [], "append": []}
    times["floor"].append(_run("no_op", floor_env, log))
    shutil.rmtree(big / "features", ignore_errors=True)  # cold: an empty store (a kept folder may hold one)
    times["cold"].append(_run("refresh_features", env, log))
    print(f"cold: {times['cold'][0][0]:.1f} s wall, {times['cold'][0][1]:.1f} CPU-s")
    snapshot = work / "store_after_cold"
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(big / "features", snapshot, symlinks=True)
    for i in range(args.repeats):  # interleaved, order alternating
        pair = [("floor", "no_op", floor_env), ("no-op", "refresh_features", env)]
        for name, job, job_env in (pair if i % 2 == 0 else pair[::-1]):
            times[name].append(_run(job, job_env, log))
        paired["no-op"].append(times["floor"][-1])

    print(f"growing the demo to {grown} clips (untimed): {_generate(big, grown):.0f} s")
    env_grown = _env(home, big, grown, args.shard_size)
    for i in range(args.repeats):
        _restore(snapshot, big / "features")
        pair = [("floor", "no_op", floor_env), ("append", "refresh_features", env_grown)]
        for name, job, job_env in (pair if i % 2 == 0 else pair[::-1]):
            times[name].append(_run(job, job_env, log))
        paired["append"].append(times["floor"][-1])

    if args.small:
        print(f"generating {args.small} demo clips (untimed): {_generate(small, args.small):.0f} s")
        env_small = _env(home, small, args.small, args.shard_size)
        shutil.rmtree(small / "features", ignore_errors=True)
        times[f"cold@{args.small}"] = [_run("refresh_features", env_small, log)]
        times[f"no-op@{args.small}"], paired[f"no-op@{args.small}"] = [], []
        for i in range(args.repeats):
            pair = [("floor", "no_op", floor_env), (f"no-op@{args.small}", "refresh_features", env_small)]
            for name, job, job_env in (pair if i % 2 == 0 else pair[::-1]):
                times[name].append(_run(job, job_env, log))
            paired[f"no-op@{args.small}"].append(times["floor"][-1])

    median = {name: _median(samples) for name, samples in times.items() if samples}
    floor, cold = median["floor"], median["cold"]
    goals = {"no-op": 0.03, "append": 0.15}
    print(f"\nrefresh_features, demo {args.clips} clips (shard size {args.shard_size}), +{grown - args.clips} clips "
          f"for append; medians of {args.repeats} (cold: 1 run); load average at end: {_load()}")
    print("(x - floor) / (cold - floor) uses the median of the floor runs paired with x (their own phase)")
    print(f"{'scenario':<14}{'wall s':>9}{'CPU s':>9}{'runs':>6}{'its floor':>16}   (x - floor) / (cold - floor): wall, CPU   goal")
    for name, (wall, cpu) in median.items():
        share = ""
        if name in paired:
            own = _median(paired[name])
            shares = [(x - f) / max(c - f, 1e-9) for x, f, c in ((wall, own[0], cold[0]), (cpu, own[1], cold[1]))]
            goal = goals.get(name)
            verdict = "" if goal is None else f"<= {goal:.0%}: " + ("PASS" if shares[1] <= goal else "MISS") + " (CPU)"
            share = f"{own[0]:8.2f}{own[1]:8.2f}   {shares[0]:6.1%}, {shares[1]:6.1%}   {verdict}"
        print(f"{name:<14}{wall:9.2f}{cpu:9.2f}{len(times[name]):6d}{share}")
    if args.small:
        above = {n: median[n][1] - _median(paired[n])[1] for n in (f"no-op@{args.small}", "no-op")}
        print(f"no-op CPU s above its paired floor: {above[f'no-op@{args.small}']:.2f} at {args.small} clips, "
              f"{above['no-op']:.2f} at {args.clips} clips ({args.clips / args.small:.0f}x the clips)")
    print(f"work folder: {work}" + ("" if args.keep else " (temporary; --keep DIR keeps it)"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
