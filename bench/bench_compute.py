"""Where shard work pays on this machine: in this process, a LocalCluster per run, or a Dask cluster
that stays up between runs (a scheduler and 2 single-threaded workers, separate processes).

Interleaved repeats, medians, ratios against the in-process run of the same repeat round:

  (A) `dagster job execute -j refresh_features` on N demo clips (default 300), whole processes, each
      into a fresh store: XMODAL_COMPUTE = in_process | local_cluster | scheduler (the external
      cluster, warmed by an untimed first run).
  (B1) `dagster asset materialize --select audio_tower,frame_tower,text_tower`, whole processes on a
      copy of a store holding only the clip manifest: in_process (one torch thread) vs the external
      cluster of 2 single-threaded workers (warm: imports done, towers loaded by the untimed run).
  (B2) the same three tower features through run_feature in this process, both sides warm (towers
      loaded here, workers warmed): the parallel speed-up alone, without imports and tower loads.

No asserts: a benchmark reports. The machine is shared; the load average is printed at the start
and the end of each part.

    .venv/bin/python bench/bench_compute.py [--clips 300] [--repeats 3] [--parts A,B1,B2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
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
TOWER_ASSETS = ("audio_tower", "frame_tower", "text_tower")


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def base_env(folder: Path, clips: int) -> dict:
    """A user's environment after setup: own DAGSTER_HOME (SQLite), own data dir, the demo of ``clips``."""
    from dagster import DagsterInstance

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "XMODAL_"))}
    home = folder / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    DagsterInstance.from_config(str(home)).dispose()  # created once: concurrent creation races
    env.update(DAGSTER_HOME=str(home), XMODAL_DATA_DIR=str(folder / "data"), XMODAL_DEMO_CLIPS=str(clips),
               DAGSTER_CLI_JOB_EXECUTE_MODULE_NAME="pipelines.definitions",
               DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME="pipelines.definitions", HF_HUB_OFFLINE="1")
    return env


def timed(command: list[str], env: dict, label: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{label} failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def dagster() -> str:
    return str(Path(sys.executable).with_name("dagster"))


def compute_env(env: dict, mode: str, cluster) -> dict:
    out = {**env, "XMODAL_COMPUTE": mode}
    if mode == "scheduler":
        out["XMODAL_DASK_SCHEDULER"] = cluster.address
    return out


def table(title: str, rows: dict[str, list[float]], baseline: str, clips: int) -> None:
    print(f"\n{title}")
    print(f"{'mode':<34} {'median s':>9} {'clips/s':>8} {'speed-up vs ' + baseline:>22}   runs (s)")
    for mode, walls in rows.items():
        med = statistics.median(walls)
        # the ratio per repeat round (each round ran every mode once, back to back), then its median
        ratios = [b / w for b, w in zip(rows[baseline], walls)]
        print(f"{mode:<34} {med:9.1f} {clips / med:8.2f} {statistics.median(ratios):21.2f}x   "
              + " ".join(f"{w:.1f}" for w in walls))


def part_a(folder: Path, env: dict, cluster, clips: int, repeats: int) -> None:
    print(f"\n(A) refresh_features, {clips} clips, whole processes, fresh store per run; {load()}")
    command = [dagster(), "job", "execute", "-j", "refresh_features"]
    timed(command, {**compute_env(env, "scheduler", cluster), "XMODAL_STORE_ROOT": str(folder / "warmup-a")}, "warm-up")
    modes = ("in_process", "local_cluster", "scheduler")
    rows: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats):
        for mode in modes if rep % 2 == 0 else reversed(modes):
            store = folder / f"a-{mode}-{rep}"
            rows[mode].append(timed(command, {**compute_env(env, mode, cluster), "XMODAL_STORE_ROOT": str(store)}, mode))
            shutil.rmtree(store, ignore_errors=True)
            print(f"  round {rep + 1} {mode}: {rows[mode][-1]:.1f} s", flush=True)
    table(f"(A) refresh_features on {clips} clips; {load()}", rows, "in_process", clips)


def tower_template(folder: Path, env: dict) -> Path:
    """A store holding only the clip manifest (and the demo media in the data dir)."""
    template = folder / "store-manifest-only"
    if not template.exists():
        # The job, not `asset materialize --partition demo`: on a fresh instance the job's first
        # step adds the dataset's partition, which `asset materialize` requires to exist.
        timed([dagster(), "job", "execute", "-j", "refresh_features", "--op-selection", "clip_manifest"],
              {**env, "XMODAL_COMPUTE": "in_process", "XMODAL_STORE_ROOT": str(template)}, "clip_manifest")
    return template


def part_b1(folder: Path, env: dict, cluster, clips: int, repeats: int) -> None:
    print(f"\n(B1) tower assets, whole processes, on a store holding the manifest; {load()}")
    template = tower_template(folder, env)
    command = [dagster(), "asset", "materialize", "--select", ",".join(TOWER_ASSETS), "--partition", "demo"]

    def run(mode: str, name: str) -> float:
        store = folder / name
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(template, store)
        try:
            return timed(command, {**compute_env(env, mode, cluster), "XMODAL_STORE_ROOT": str(store)}, mode)
        finally:
            shutil.rmtree(store, ignore_errors=True)

    run("scheduler", "warmup-b1")  # loads the towers in the workers, once
    rows: dict[str, list[float]] = {"in_process": [], "scheduler": []}
    for rep in range(repeats):
        for mode in ("in_process", "scheduler") if rep % 2 == 0 else ("scheduler", "in_process"):
            rows[mode].append(run(mode, f"b1-{mode}-{rep}"))
            print(f"  round {rep + 1} {mode}: {rows[mode][-1]:.1f} s", flush=True)
    table(f"(B1) audio/frame/text tower assets on {clips} clips, whole processes; {load()}", rows, "in_process", clips)


def part_b2(folder: Path, env: dict, cluster, clips: int, repeats: int) -> None:
    """run_feature of the three towers in this process (1 torch thread) vs the warm external cluster."""
    os.environ.update({k: v for k, v in env.items() if k.startswith(("XMODAL_", "HF_"))})
    from stages.core.parallel import DaskExecutor, InProcessExecutor, torch_threads
    from stages.core.store import FeatureStore
    from stages.features import towers as T
    from stages.features.base import run_feature, shard_jobs
    from stages.ingest.manifest import load_manifest

    print(f"\n(B2) tower features through run_feature, both sides warm; {load()}")
    template = tower_template(folder, env)
    manifest = load_manifest(FeatureStore(str(template)), "demo")
    features = [(T.AUDIO_TOWER_FEATURE, T.AudioTowerParams(), T.AUDIO_TOWER_CODE_VERSION, T.compute_audio_tower_shard),
                (T.FRAME_TOWER_FEATURE, T.FrameTowerParams(), T.FRAME_TOWER_CODE_VERSION, T.compute_frame_tower_shard),
                (T.TEXT_TOWER_FEATURE, T.TextTowerParams(), T.TEXT_TOWER_CODE_VERSION, T.compute_text_tower_shard)]
    cluster_executor = DaskExecutor(cluster.address)

    def cpu_seconds() -> float:  # this process + the cluster's workers
        return time.process_time() + sum(cluster_executor.client.run(time.process_time).values())

    def run(executor, name: str) -> float:
        store = FeatureStore(str(folder / name))
        start, cpu = time.perf_counter(), cpu_seconds()
        for feature, params, version, compute in features:
            run_feature(store, manifest, feature, params.key(), params.params(), version, compute, executor, worker_threads=1)
        seconds = time.perf_counter() - start
        cpus.setdefault(name.split("-")[1], []).append(cpu_seconds() - cpu)
        shutil.rmtree(folder / name, ignore_errors=True)
        return seconds

    cpus: dict[str, list[float]] = {}

    with torch_threads(1):
        warm = FeatureStore(str(folder / "warmup-b2"))
        for feature, params, version, compute in features:  # one shard here, two on the cluster: towers loaded
            jobs, _ = shard_jobs(warm, manifest, feature, params.key(), params.params(), version, worker_threads=1)
            compute(jobs[0])
            cluster_executor.map(compute, jobs[1:3])
        rows: dict[str, list[float]] = {"in_process": [], "scheduler": []}
        for rep in range(repeats):
            for mode in ("in_process", "scheduler") if rep % 2 == 0 else ("scheduler", "in_process"):
                rows[mode].append(run(InProcessExecutor() if mode == "in_process" else cluster_executor, f"b2-{mode}-{rep}"))
                print(f"  round {rep + 1} {mode}: {rows[mode][-1]:.1f} s", flush=True)
    cluster_executor.close()
    table(f"(B2) audio/frame/text tower features on {clips} clips, run_feature, warm; {load()}", rows, "in_process", clips)
    # Cores each mode got: CPU seconds / wall seconds. On a shared machine a ratio below 2 cores for
    # the cluster is other processes' time, not ours.
    for mode, walls in rows.items():
        print(f"  {mode}: CPU s per run " + " ".join(f"{c:.1f}" for c in cpus[mode])
              + "; cores used " + " ".join(f"{c / w:.2f}" for c, w in zip(cpus[mode], walls)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="A,B1,B2")
    parser.add_argument("--keep", default="", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    import signal

    from stages.core.cluster import start_cluster

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` / kill: stop the cluster on the way out

    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-compute-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.python_version()}; {load()}")
    env = base_env(folder, args.clips)
    os.environ["XMODAL_DATA_DIR"] = env["XMODAL_DATA_DIR"]
    cluster = start_cluster(n_workers=2, threads=1, folder=str(folder / "dask"))
    print(f"external cluster: {cluster.address}, 2 workers x 1 thread, dashboard {cluster.dashboard_url}")
    try:
        if "A" in parts:
            part_a(folder, env, cluster, args.clips, args.repeats)
        if "B1" in parts:
            part_b1(folder, env, cluster, args.clips, args.repeats)
        if "B2" in parts:
            part_b2(folder, env, cluster, args.clips, args.repeats)
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
