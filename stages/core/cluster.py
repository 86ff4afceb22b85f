"""A Dask cluster of separate processes (one scheduler, N single-threaded workers) that outlives runs.

The same processes a user starts by hand on several machines (``dask scheduler``, then
``dask worker ADDRESS --nthreads 1 --preload stages.core.parallel`` on each), started here on one
machine. Runs join it with ``XMODAL_COMPUTE=scheduler XMODAL_DASK_SCHEDULER=<address>``; its
workers keep their imports and loaded towers from one run to the next::

    .venv/bin/python -m stages.core.cluster --workers 2      # prints the address; Ctrl-C stops it

Tests and bench/bench_compute.py start their clusters with ``start_cluster``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 60  # each process imports distributed, workers also the feature code (--preload)


def dask_command() -> str:
    """The ``dask`` CLI of this interpreter's environment (the venv's), so workers import the same code."""
    candidate = Path(sys.executable).with_name("dask")
    return str(candidate) if candidate.exists() else "dask"


@dataclass
class ClusterProcesses:
    """A running scheduler and its workers; ``stop()`` ends them (workers first)."""

    address: str
    dashboard_url: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    folder: str = ""  # scheduler file and one log per process

    def log(self, name: str) -> str:
        """The output of one process so far: "scheduler" or "worker-<i>"."""
        path = Path(self.folder) / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the workers, then the scheduler (a worker whose scheduler is gone retries for a
        while); whatever has not exited within ``timeout`` is killed."""
        for group in (self.workers, [self.scheduler]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in group:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def start_cluster(n_workers: int = 2, host: str = "127.0.0.1", port: int = 0, dashboard_port: int = 0,
                  threads: int = 1, nanny: bool = True, folder: str | None = None,
                  timeout: float = START_TIMEOUT_S, env: dict | None = None) -> ClusterProcesses:
    """Start ``dask scheduler`` and ``n_workers`` ``dask worker`` processes; return once all workers joined.

    Port 0 lets the scheduler pick free ports (read back from its scheduler file). Workers get one
    thread each (our tasks set one torch thread; more threads fight over the GIL in decoding), the
    feature code preloaded, and a nanny that restarts a worker that dies. ``env``: the processes'
    environment (default: this one's).
    """
    folder = folder or tempfile.mkdtemp(prefix="xmodal-dask-")
    os.makedirs(folder, exist_ok=True)
    scheduler_file = os.path.join(folder, "scheduler.json")
    if os.path.exists(scheduler_file):
        os.remove(scheduler_file)
    dask = dask_command()

    def spawn(name: str, args: list[str]) -> subprocess.Popen:
        with open(os.path.join(folder, f"{name}.log"), "wb") as out:
            return subprocess.Popen([dask, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env)

    scheduler = spawn("scheduler", ["scheduler", "--host", host, "--port", str(port),
                                    "--dashboard-address", f"{host}:{dashboard_port}", "--scheduler-file", scheduler_file])
    cluster = ClusterProcesses(address="", dashboard_url="", scheduler=scheduler, folder=folder)
    try:
        info = _wait_for_scheduler_file(scheduler, scheduler_file, timeout, cluster)
        cluster.address = info["address"]
        cluster.dashboard_url = f"http://{host}:{info['services']['dashboard']}/status"
        for index in range(n_workers):
            cluster.workers.append(spawn(f"worker-{index}", [
                "worker", cluster.address, "--nthreads", str(threads), "--name", f"worker-{index}",
                "--host", host, "--local-directory", os.path.join(folder, f"worker-{index}"),
                "--preload", "stages.core.parallel", "--nanny" if nanny else "--no-nanny",
            ]))
        _wait_for_workers(cluster, n_workers, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_scheduler_file(scheduler: subprocess.Popen, path: str, timeout: float, cluster: ClusterProcesses) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scheduler.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {scheduler.returncode}: {cluster.log('scheduler')[-2000:]}")
        try:
            with open(path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.1)
    raise TimeoutError(f"dask scheduler wrote no {path} within {timeout:.0f} s")


def _wait_for_workers(cluster: ClusterProcesses, n_workers: int, timeout: float) -> None:
    from distributed import Client

    with Client(cluster.address, timeout=timeout) as client:
        deadline = time.monotonic() + timeout
        while len(client.scheduler_info()["workers"]) < n_workers:
            dead = [i for i, w in enumerate(cluster.workers) if w.poll() is not None]
            if dead:
                raise RuntimeError(f"dask worker-{dead[0]} exited: {cluster.log(f'worker-{dead[0]}')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(client.scheduler_info()['workers'])} of {n_workers} Dask workers joined within {timeout:.0f} s")
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.core.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one per core), one thread each")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for other machines)")
    parser.add_argument("--port", type=int, default=8786)
    parser.add_argument("--dashboard-port", type=int, default=8787)
    args = parser.parse_args(argv)
    cluster = start_cluster(args.workers, args.host, args.port, args.dashboard_port)
    print(f"XMODAL_COMPUTE=scheduler XMODAL_DASK_SCHEDULER={cluster.address}\ndashboard: {cluster.dashboard_url}\n"
          f"logs: {cluster.folder}; Ctrl-C stops the cluster", flush=True)
    try:
        while cluster.scheduler.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
