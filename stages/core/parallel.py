"""Where shard tasks run: in this process (the single-machine default) or on a Dask cluster.

Workers write their shard to the store and return only a small summary: shipping whole mels
back to the client measured slower than one thread.

On an existing cluster (``dask scheduler`` and ``dask worker``s started separately, see the README's
"Scale") workers stay warm between runs: a worker process keeps its imports and the towers it
loaded (``models.towers.get_tower`` caches one per process), so only its first task pays for them.
Each task is logged on its worker (feature, shard, clips, seconds); a task that raises is retried
(``TASK_RETRIES``) and one lost with its worker is run again elsewhere by the scheduler (Dask's
``distributed.scheduler.allowed-failures``). Both are safe because a shard's commit is exclusive:
a second attempt of a shard that did commit discards its own files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Protocol

from stages.core.errors import ConfigError

# Re-runs of a task that raised (e.g. a throttled or failing store). A bug fails the same way each
# time: at most two extra attempts of one shard before the run fails with its traceback.
TASK_RETRIES = 2
SCHEDULER_TIMEOUT_S = 10  # connecting to an existing scheduler, and waiting for its first worker

# A child of Dask's worker logger: on a worker its records go where Dask's own do (the worker's
# stderr and the log the dashboard and Client.get_worker_logs() show), at Dask's configured level.
worker_log = logging.getLogger("distributed.worker.xmodal")


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]: ...


class InProcessExecutor:
    """Runs tasks one after another in the calling process."""

    def map(self, fn, items):
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


def describe_task(item: Any) -> str:
    """What a task works on, for logs: "mel_spectrograms shard s000001-ab12 (64 clips)" for a shard
    job (any record with feature / shard / clips), its type name otherwise."""
    feature, shard, clips = (getattr(item, name, None) for name in ("feature", "shard", "clips"))
    if feature is None and shard is None:
        return type(item).__name__
    return f"{feature} shard {shard}" + (f" ({len(clips)} clips)" if clips is not None else "")


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (distributed.nanny.pre-spawn-environ)
# so freed memory goes back to the OS sooner. Any such setting also turns off glibc's dynamic mmap
# threshold: every temporary over 128 KiB is then mmap'ed, zeroed and unmapped again, which cost the
# tower tasks 28% more CPU per shard (aiSFX on 64 clips: 14.3 against 11.2 CPU-s). Tasks put back
# the thresholds glibc's dynamic rule reaches on 64-bit (mmap 32 MiB, trim twice that).
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_malloc_restored: bool | None = None  # None: not tried in this process yet


def restore_malloc_thresholds() -> bool:
    """Undo a MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ inherited from Dask's nanny, once per
    process (glibc only); True when this process now runs with the restored thresholds."""
    global _malloc_restored
    if _malloc_restored is None:
        _malloc_restored = False
        inherited = any(os.environ.get(name) for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"))
        if inherited and sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                _malloc_restored = bool(libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
                                        and libc.mallopt(_M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX))
            except (OSError, AttributeError):  # not glibc (musl): nothing to undo the same way
                pass
    return _malloc_restored


class LoggedTask:
    """A task function wrapped to log, on the worker that runs it, what it did and how long it took."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, item):
        restore_malloc_thresholds()
        what = describe_task(item)
        worker_log.info("task started: %s (pid %d)", what, os.getpid())
        start, cpu = time.perf_counter(), time.process_time()
        try:
            result = self.fn(item)
        except BaseException as exc:
            worker_log.warning("task failed after %.2f s: %s: %s: %s", time.perf_counter() - start, what,
                               type(exc).__name__, exc)
            raise
        # CPU seconds beside wall seconds: on a shared machine the gap is the time other processes took.
        worker_log.info("task done: %s in %.2f s (%.2f s CPU, pid %d)", what, time.perf_counter() - start,
                        time.process_time() - cpu, os.getpid())
        return result


def _task_key(item: Any) -> str:
    """Dask key of one task: its feature name first, so the dashboard groups tasks by feature."""
    return f"{getattr(item, 'feature', None) or 'task'}-{uuid.uuid4().hex}"


class DaskExecutor:
    """Runs tasks on a Dask cluster: a fresh LocalCluster, or an existing scheduler address."""

    def __init__(self, scheduler_address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1,
                 retries: int = TASK_RETRIES, dashboard_address: str = ":0", timeout: float = SCHEDULER_TIMEOUT_S):
        from distributed import Client, LocalCluster

        self.retries, self.timeout = retries, timeout
        if scheduler_address:
            self.cluster = None
            try:
                self.client = Client(scheduler_address, timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise ConfigError(
                    f"no Dask scheduler answers at {scheduler_address} ({type(exc).__name__}): start one there "
                    f"(`dask scheduler`, then `dask worker {scheduler_address} --nthreads 1`) or fix XMODAL_DASK_SCHEDULER"
                ) from None
        else:
            # Processes, one thread each: decoding and STFT hold the GIL for parts of their work.
            self.cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                dashboard_address=dashboard_address,
            )
            self.client = Client(self.cluster)

    @property
    def dashboard_link(self) -> str:
        return self.client.dashboard_link

    def describe(self) -> str:
        """One line for the run log: where the tasks go, how many workers, the dashboard."""
        workers = self.client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        where = self.client.scheduler.address if self.cluster is None else "a LocalCluster"
        return f"Dask: {where}, {len(workers)} workers / {threads} threads, dashboard {self.dashboard_link}"

    def map(self, fn, items):
        items = list(items)
        if not items:
            return []
        futures = self._submit(fn, items)
        try:
            return self.client.gather(futures)
        except BaseException:
            self.client.cancel(futures)  # a failed run leaves no task queued on a shared cluster
            raise

    def map_unordered(self, fn, items):
        """Each task's result as soon as it completes (any order): progress lines while a run goes on."""
        from distributed import as_completed

        items = list(items)
        if not items:
            return
        futures = self._submit(fn, items)
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:  # including a consumer that stops early (GeneratorExit)
            self.client.cancel(futures)
            raise

    def _submit(self, fn, items: list) -> list:
        self._wait_for_workers()
        return self.client.map(LoggedTask(fn), items, key=[_task_key(item) for item in items],
                               pure=False, retries=self.retries)

    def _wait_for_workers(self) -> None:
        try:
            self.client.wait_for_workers(1, timeout=self.timeout)
        except TimeoutError:
            raise ConfigError(
                f"the Dask scheduler at {self.client.scheduler.address} has no workers after {self.timeout:.0f} s: "
                f"start some (`dask worker {self.client.scheduler.address} --nthreads 1`)"
            ) from None

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# What shard tasks import lazily on first use, beyond the feature modules (librosa alone ~3-6 s:
# numba, scipy): imported by a preloaded worker at start instead of inside its first task.
WORKER_WARM_IMPORTS = ("librosa.filters", "av", "soxr", "zarr", "webdataset")


def dask_setup(worker) -> None:
    """Warm a worker before its first task: ``dask worker ADDRESS --nthreads 1 --preload stages.core.parallel``
    imports every registered feature and the libraries tasks use when the worker starts."""
    import importlib

    from stages.features.base import all_features  # stages.core stays free of feature imports otherwise

    start = time.perf_counter()
    restore_malloc_thresholds()
    all_features()
    for module in WORKER_WARM_IMPORTS:
        importlib.import_module(module)
    worker_log.info("xmodal feature code imported in %.1f s (pid %d)", time.perf_counter() - start, os.getpid())


@contextmanager
def torch_threads(count: int):
    """Run a block with `count` torch intra-op threads, then restore the previous setting.

    Small models (the heads, DiffGAP's 1.4M-parameter MLP) gain nothing from more threads and
    lose badly when another process holds a core: measured 3.6 ms per DiffGAP step on 1 thread
    against 500 ms on 2 threads while the other core was busy.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, e.g. a container's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


THREADS_AUTO = 0  # a training or sampling config's `threads`: tuned while the loop runs (StepThreads)


class StepThreads:
    """Torch intra-op threads for a loop of similar steps: fixed (``threads`` > 0) or, with
    ``threads`` = THREADS_AUTO, chosen by timing the loop's own steps at each candidate count.

    Why measured and not set: on an idle 2-core machine two threads make a VAE step 1.77x faster
    (audio VAE 0.89 -> 0.50 s, frame VAE 0.48 -> 0.29 s), but with another process on the other
    core OpenMP's threads spin at every barrier of many small convolutions and a step goes from
    0.3 s to 4 s. So the loop probes every candidate for ``probe_steps`` steps (the first step
    after a change is not counted), keeps the fastest, and probes again after ``hold_steps`` steps
    (doubled, up to 8x, each time the same count wins) or as soon as the median of its last steps
    is ``slowdown`` x what the probe measured (the machine got busier). Threads change speed only,
    never a checkpoint's key. ``tick()`` once per step; time outside steps (evaluations) lands in
    one step and the medians ignore it.
    """

    def __init__(self, threads: int, *, probe_steps: int = 3, hold_steps: int = 200, slowdown: float = 1.5,
                 cores: int | None = None) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = tuned while running), got {threads}")
        cores = cores or usable_cores()
        self.auto = threads == THREADS_AUTO
        if self.auto:  # 1, 2, 4, ... and all cores
            self.candidates = sorted({*(2 ** i for i in range(cores.bit_length()) if 2 ** i <= cores), cores})
        else:
            self.candidates = [threads]
        self.fixed = len(self.candidates) == 1
        self.probe_steps, self.base_hold, self.slowdown = probe_steps, hold_steps, slowdown
        self.steps_at = {c: 0 for c in self.candidates}
        self.probes = 0
        self._previous: int | None = None
        self._last: float | None = None
        self._current = self.candidates[0]
        self._hold = hold_steps
        self._best: tuple[int, float] | None = None
        self._start_probe()

    # --- context: the loop runs inside it; the previous setting is restored after ---------------
    def __enter__(self) -> "StepThreads":
        import torch

        self._previous = torch.get_num_threads()
        self._set(self._current)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self._previous is not None:
            torch.set_num_threads(self._previous)

    def _set(self, count: int) -> None:
        import torch

        self._current = count
        torch.set_num_threads(count)
        self._last = None  # the first step after a change is not counted (thread pool start-up)

    def _start_probe(self) -> None:
        self._queue = list(self.candidates) if len(self.candidates) > 1 else []
        self._times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self._recent: list[float] = []
        if self._queue:
            self.probes += 1
            if self._previous is not None:
                self._set(self._queue[0])

    @property
    def current(self) -> int:
        return self._current

    def tick(self) -> None:
        """Call once per step (at its start or its end): times the step since the last tick and
        moves on to the next candidate, the chosen count or a new probe."""
        now = time.perf_counter()
        elapsed, self._last = (None if self._last is None else now - self._last), now
        self.steps_at[self._current] += 1
        if self.fixed or elapsed is None:
            return
        if self._queue:  # probing
            times = self._times[self._current]
            times.append(elapsed)
            if len(times) >= self.probe_steps:
                self._queue.pop(0)
                if self._queue:
                    self._set(self._queue[0])
                else:
                    best = min(self.candidates, key=lambda c: _median(self._times[c]))
                    same = self._best is not None and self._best[0] == best
                    self._hold = min(self._hold * 2, 8 * self.base_hold) if same else self.base_hold
                    self._best, self._held = (best, _median(self._times[best])), 0
                    self._set(best)
            return
        self._held += 1
        self._recent = (self._recent + [elapsed])[-9:]
        slower = len(self._recent) == 9 and _median(self._recent) > self.slowdown * self._best[1]
        if self._held >= self._hold or slower:
            self._start_probe()

    def summary(self) -> dict:
        """For a sidecar or a log line: the setting and how many steps ran at each count."""
        return {"threads": "auto" if self.auto else self.candidates[0],
                "steps_at_threads": {str(c): n for c, n in self.steps_at.items() if n}, "probes": self.probes}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("inf")
