"""Shard work on an existing Dask cluster: a scheduler and two workers started as separate processes
(the venv's `dask` CLI, on 127.0.0.1), as a user starts them on several machines.

One cluster for the module (starting it is most of the cost). The test that SIGKILLs a worker runs
last: the workers have no nanny, so the killed one stays gone.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stages.core.cluster import start_cluster
from stages.core.errors import ConfigError
from stages.core.parallel import DaskExecutor, InProcessExecutor
from stages.core.store import FeatureStore
from stages.features import towers as T
from stages.features.base import run_feature
from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, MelParams, compute_mel_shard
from tests.stages.features.test_features import demo_manifest

PROJECT = str(Path(__file__).resolve().parents[3])
CLIPS, SHARD_SIZE = 16, 2  # 8 shards: enough for both single-threaded workers to get several


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # PYTHONPATH: the scheduler and workers unpickle the fault-injecting task below, from tests/.
    started = start_cluster(n_workers=2, nanny=False, folder=str(tmp_path_factory.mktemp("dask")),
                            env={**os.environ, "PYTHONPATH": PROJECT})
    executor = DaskExecutor(started.address)
    try:
        yield started, executor
    finally:
        executor.close()
        started.stop(timeout=3)


@pytest.fixture(scope="module")
def manifest(demo_dataset):
    return demo_manifest(demo_dataset, limit=CLIPS, shard_size=SHARD_SIZE)[0]


@pytest.fixture(scope="module")
def in_process_mels(manifest, tmp_path_factory):
    store = FeatureStore(str(tmp_path_factory.mktemp("in_process")))
    run_mels(store, manifest, compute_mel_shard, InProcessExecutor())
    return store


def run_mels(store, manifest, compute, executor):
    params = MelParams()
    return run_feature(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION, compute, executor)


def assert_same_mels(store: FeatureStore, reference: FeatureStore, manifest) -> None:
    key = MelParams().key()
    shards = sorted(manifest.by_shard())
    assert store.committed_shards("demo", MEL_FEATURE, key) == reference.committed_shards("demo", MEL_FEATURE, key) == shards
    for shard in shards:
        committed, arrays = store.read_shard_arrays("demo", MEL_FEATURE, key, shard, names=["mel"])
        ref_committed, ref_arrays = reference.read_shard_arrays("demo", MEL_FEATURE, key, shard, names=["mel"])
        assert committed["clip_ids"] == ref_committed["clip_ids"] and committed["arrays"] == ref_committed["arrays"]
        assert arrays["mel"].tobytes() == ref_arrays["mel"].tobytes()


def shards_done_by_worker(executor: DaskExecutor, feature: str) -> dict[str, Counter]:
    """From the workers' own logs: worker -> Counter of the shards whose `feature` task it finished."""
    done = re.compile(rf"task done: {feature} shard (\S+) \((\d+) clips\) in [0-9.]+ s")
    found = {}
    for worker, lines in executor.client.get_worker_logs().items():
        found[worker] = Counter(m.group(1) for _, line in lines for m in [done.search(line)] if m)
    return found


def test_shards_spread_over_two_worker_processes_and_equal_in_process(cluster, manifest, in_process_mels, tmp_path):
    processes, executor = cluster
    worker_pids = set(executor.client.run(os.getpid).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert worker_pids == {w.pid for w in processes.workers}  # the processes we started, not threads of ours

    store = FeatureStore(str(tmp_path / "cluster"))
    run = run_mels(store, manifest, compute_mel_shard, executor)
    assert (run.shards_new, run.clips_ok) == (CLIPS // SHARD_SIZE, CLIPS)
    assert_same_mels(store, in_process_mels, manifest)

    by_worker = shards_done_by_worker(executor, MEL_FEATURE)
    assert len(by_worker) == 2 and all(by_worker.values()), by_worker  # both workers did some
    assert sum(by_worker.values(), Counter()) == Counter(run.shards)  # each shard once, on a worker


def test_dashboard_serves_its_status_page(cluster):
    processes, executor = cluster
    assert executor.dashboard_link == processes.dashboard_url
    with urllib.request.urlopen(processes.dashboard_url, timeout=10) as response:
        page = response.read().decode()
    assert response.status == 200
    assert "needs bokeh" not in page and "bokeh" in page.lower()  # the real dashboard, not the notice


def test_warm_workers_load_a_tower_once_across_runs(cluster, manifest, tmp_path):
    """Two whole runs of frame_tower (every shard computed twice): each worker builds the tower once."""
    _, executor = cluster
    executor.client.run(count_frame_tower_loads)
    params = T.FrameTowerParams(fps=1.0)  # 4 frames a clip: the test is about loads, not frames
    for attempt in ("first", "second"):
        run = run_feature(FeatureStore(str(tmp_path / attempt)), manifest, T.FRAME_TOWER_FEATURE, params.key(),
                          params.params(), T.FRAME_TOWER_CODE_VERSION, T.compute_frame_tower_shard, executor,
                          worker_threads=1)
        assert run.shards_new == CLIPS // SHARD_SIZE
    by_worker = shards_done_by_worker(executor, T.FRAME_TOWER_FEATURE)
    assert all(by_worker.values()) and sum(map(len, by_worker.values())) >= CLIPS // SHARD_SIZE
    assert sum(sum(c.values()) for c in by_worker.values()) == 2 * CLIPS // SHARD_SIZE
    loads = executor.client.run(frame_tower_loads)
    assert sorted(loads.values()) == [1, 1], loads  # one load per worker, for 16 shard tasks


def test_unreachable_scheduler_is_one_line_naming_the_fix():
    with pytest.raises(ConfigError, match=r"no Dask scheduler answers at tcp://127.0.0.1:9 .*dask scheduler.*XMODAL_DASK_SCHEDULER"):
        DaskExecutor("tcp://127.0.0.1:9", timeout=1)


def test_run_completes_when_a_worker_is_killed_mid_task_and_a_task_raises(cluster, manifest, in_process_mels, tmp_path):
    """SIGKILL the worker running one shard's task (the scheduler reruns it on the other worker) while
    another shard's first attempt raises (Dask's retries rerun it): every shard still commits, once,
    with the in-process numbers."""
    processes, executor = cluster
    shards = sorted(manifest.by_shard())
    task = FaultyFirstAttempt(compute_mel_shard, str(tmp_path / "markers"), stall_shard=shards[1], raise_shard=shards[4])
    store = FeatureStore(str(tmp_path / "cluster"))
    outcome = {}

    def run():
        try:
            outcome["run"] = run_mels(store, manifest, task, executor)
        except BaseException as exc:  # re-raised below, on the test's thread
            outcome["error"] = exc

    client_thread = threading.Thread(target=run, daemon=True)
    client_thread.start()
    victim = task.wait_for_stall(timeout=30, unless=lambda: outcome.get("error"))
    assert victim in {w.pid for w in processes.workers}
    os.kill(victim, signal.SIGKILL)
    client_thread.join(timeout=60)
    assert not client_thread.is_alive(), "the run did not finish after its worker was killed"
    if "error" in outcome:
        raise outcome["error"]
    run = outcome["run"]
    assert (run.shards_new, run.clips_ok) == (len(shards), CLIPS)
    assert_same_mels(store, in_process_mels, manifest)
    assert task.attempts(shards[4]) == 2  # raised once, retried once


# ---- helpers that run on the workers ----------------------------------------------------------------

def count_frame_tower_loads() -> None:
    """Count FrameTower constructions in this worker process (the real tower is still built)."""
    from models.towers import FrameTower

    if getattr(FrameTower, "_loads_counted", False):
        return
    original = FrameTower.__init__

    def counted(self, *args, **kwargs):
        FrameTower._loads += 1
        original(self, *args, **kwargs)

    FrameTower._loads, FrameTower._loads_counted, FrameTower.__init__ = 0, True, counted


def frame_tower_loads() -> int:
    from models.towers import FrameTower

    return FrameTower._loads


class FaultyFirstAttempt:
    """A shard task whose first attempt of ``stall_shard`` hangs (its worker is killed meanwhile) and
    whose first attempt of ``raise_shard`` raises OSError; every other attempt runs ``fn``.
    Attempts are counted in marker files (the tasks run in other processes)."""

    def __init__(self, fn, folder: str, stall_shard: str, raise_shard: str):
        self.fn, self.folder, self.stall_shard, self.raise_shard = fn, folder, stall_shard, raise_shard
        os.makedirs(folder, exist_ok=True)

    def __call__(self, job):
        attempt = self._record(job.shard)
        if attempt == 1 and job.shard == self.stall_shard:
            with open(os.path.join(self.folder, "stalled.pid"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
        if attempt == 1 and job.shard == self.raise_shard:
            raise OSError(f"injected failure of {job.shard}'s first attempt")
        return self.fn(job)

    def _record(self, shard: str) -> int:
        with open(os.path.join(self.folder, f"{shard}.attempts"), "a") as f:
            f.write("x")
        return self.attempts(shard)

    def attempts(self, shard: str) -> int:
        path = os.path.join(self.folder, f"{shard}.attempts")
        return os.path.getsize(path) if os.path.exists(path) else 0

    def wait_for_stall(self, timeout: float, unless) -> int:
        """The pid of the worker stalled in ``stall_shard``'s first attempt (``unless()``: an error ends the wait)."""
        path, deadline = os.path.join(self.folder, "stalled.pid"), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if unless():
                raise unless()
            if os.path.exists(path) and open(path).read():
                return int(open(path).read())
            time.sleep(0.05)
        raise TimeoutError(f"no worker started {self.stall_shard} within {timeout} s")


PAGE_FAULT_PROBE = """
import resource, sys
import numpy as np
from stages.core.parallel import LoggedTask

def faults_per_temporary(_):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        np.ones(1 << 18, dtype=np.float32).sum()  # a 1 MiB temporary, as in tower and mel code
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200

restore = sys.argv[1] == "task"
print(LoggedTask(faults_per_temporary)(None) if restore else faults_per_temporary(None))
"""


def test_tasks_undo_the_malloc_trim_threshold_dask_workers_inherit():
    # Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536: glibc then mmaps (and page-faults in) every
    # temporary over 128 KiB afresh. Page faults count what that costs, without timing anything.
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": PROJECT, "MALLOC_TRIM_THRESHOLD_": "65536"}

    def faults(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", PAGE_FAULT_PROBE, mode], env=env, capture_output=True,
                              text=True, check=True)
        return float(done.stdout.split()[-1])

    inherited, in_a_task = faults("plain"), faults("task")
    assert inherited > 200, f"{inherited} page faults per 1 MiB temporary under Dask's setting: the probe measures nothing"
    assert in_a_task < inherited / 20, (inherited, in_a_task)
