"""Where shard tasks run: in this process (tests, debugging) or on a Dask cluster.

Workers write their shard to the store and return only a small summary: shipping whole mels
back to the client measured slower than one thread.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Protocol


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]: ...


class InProcessExecutor:
    """Runs tasks one after another in the calling process."""

    def map(self, fn, items):
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


class DaskExecutor:
    """Runs tasks on a Dask cluster: a fresh LocalCluster, or an existing scheduler address."""

    def __init__(self, scheduler_address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1):
        from distributed import Client, LocalCluster

        if scheduler_address:
            self.cluster = None
            self.client = Client(scheduler_address)
        else:
            # Processes, one thread each: decoding and STFT hold the GIL for parts of their work.
            self.cluster = LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address=":0"
            )
            self.client = Client(self.cluster)

    def map(self, fn, items):
        items = list(items)
        if not items:
            return []
        futures = self.client.map(fn, items, pure=False)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


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
