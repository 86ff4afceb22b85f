"""One writer per dataset at a time: a lease in the feature store, shared by every machine.

    <root>/<dataset>/_lease.json     {"owner", "host", "pid", "acquired", "expires"}

A run takes the lease of its dataset before any step and gives it back at the end, so two runs on
one dataset (from the UI, `dagster job execute`, or another machine on the same store) never
interleave their writes: the second waits, then finds the first run's work committed and reuses
it. Runs on different datasets hold different leases and run side by side.

The lease is created exclusively (``open(..., "x")`` on local disks; a conditional PUT,
``If-None-Match: *``, on S3 and servers that implement it). The holder refreshes ``expires``
every ``ttl / 3`` seconds from a thread; a lease whose holder died (expired, or a dead process on
this host) is broken by the next waiter. Nothing in here knows about Dagster.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
from typing import Callable

from stages.core.errors import DatasetError
from stages.core.ids import check_name
from stages.core.store import FeatureStore

LEASE_FILE = "_lease.json"
DEFAULT_TTL_SECONDS = 60.0


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DatasetLease:
    """Exclusive, expiring, heart-beaten ownership of one dataset in one store."""

    def __init__(self, store: FeatureStore, dataset: str, owner: str, ttl: float = DEFAULT_TTL_SECONDS,
                 poll: float = 1.0, wait: float | None = None, log: Callable[[str], None] | None = None):
        self.store, self.dataset, self.owner = store, check_name(dataset, "dataset"), owner
        self.ttl, self.poll, self.wait, self.log = float(ttl), float(poll), wait, log
        self.path = store.path(self.dataset, LEASE_FILE)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.waited_seconds = 0.0
        self._acquired: str | None = None

    # ---- the document ----------------------------------------------------------------------------
    def _document(self) -> bytes:
        now = _now()
        self._acquired = self._acquired or _iso(now)
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired": self._acquired, "expires": now + self.ttl}).encode()

    def _create(self) -> bool:
        """Create the lease exclusively; False when someone else holds it."""
        return self.store.create_exclusive(self.path, self._document())

    def holder(self) -> dict | None:
        try:
            with self.store.fs.open(self.path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None
        except ValueError:  # half-written or garbage: treat as expired so it can be broken
            return {"owner": "?", "expires": 0}

    def _stale(self, holder: dict) -> bool:
        if float(holder.get("expires", 0)) < _now():
            return True
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0) or 0))

    def _break(self, holder: dict) -> None:
        """Remove a dead holder's lease, unless it changed meanwhile (someone else broke it first)."""
        if self.holder() == holder:
            try:
                self.store.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    # ---- acquire / release -----------------------------------------------------------------------
    def acquire(self) -> "DatasetLease":
        start, announced = _now(), False
        while True:
            holder = self.holder()
            if holder is not None and holder.get("owner") == self.owner:
                break  # re-entrant: this run already holds it (e.g. a step in another process)
            if holder is None and self._create():
                break
            if holder is not None and self._stale(holder):
                if self.log:
                    self.log(f"dataset {self.dataset!r}: breaking the lease of run {holder.get('owner')} (its holder is gone)")
                self._break(holder)
                continue
            if holder is not None and not announced and self.log:
                self.log(f"dataset {self.dataset!r} is busy: waiting for run {holder.get('owner')} "
                         f"on {holder.get('host')} to finish")
                announced = True
            if self.wait is not None and _now() - start > self.wait:
                raise DatasetError(f"dataset {self.dataset!r} stayed busy (run {holder and holder.get('owner')}) for "
                                   f"{self.wait:.0f} s: wait for that run or raise the dataset_lease wait_seconds")
            time.sleep(self.poll)
        self.waited_seconds = _now() - start
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.dataset}", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            holder = self.holder()
            if holder is None or holder.get("owner") != self.owner:
                return  # broken by someone who thought we were dead: nothing to refresh
            self.store.write_bytes(self.path, self._document())

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        holder = self.holder()
        if holder is not None and holder.get("owner") == self.owner:
            try:
                self.store.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DatasetLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
