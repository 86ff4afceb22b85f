"""The dataset lease: exclusive, re-entrant for its owner, waits, breaks a dead holder's lease;
on local disks and on an S3-compatible server (conditional PUT, If-None-Match: *)."""

import json
import subprocess
import sys
import threading
import time

import pytest

from stages.core.errors import DatasetError
from stages.core.lease import DatasetLease
from stages.core.store import FeatureStore


def _store(kind, tmp_path, request) -> FeatureStore:
    if kind == "local":
        return FeatureStore(str(tmp_path))
    bucket = request.getfixturevalue("s3_bucket")
    return FeatureStore(bucket["root"], bucket["storage_options"])


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_one_holder_at_a_time_and_the_next_waits(kind, tmp_path, request):
    store = _store(kind, tmp_path, request)
    first = DatasetLease(store, "demo", owner="run-a", ttl=30).acquire()
    assert first.holder()["owner"] == "run-a"
    assert DatasetLease(store, "demo", owner="run-a").acquire().holder()["owner"] == "run-a"  # re-entrant
    with pytest.raises(DatasetError, match="stayed busy"):
        DatasetLease(store, "demo", owner="run-b", poll=0.1, wait=0.5).acquire()
    other = DatasetLease(store, "other", owner="run-b", poll=0.1, wait=0.5).acquire()  # another dataset: no wait
    other.release()

    got = []
    waiter = threading.Thread(target=lambda: got.append(DatasetLease(store, "demo", owner="run-b", poll=0.1).acquire()))
    waiter.start()
    time.sleep(0.5)
    assert not got  # still waiting
    first.release()
    waiter.join(timeout=20)
    assert got and got[0].holder()["owner"] == "run-b" and got[0].waited_seconds > 0.3
    got[0].release()
    assert got[0].holder() is None


def test_exclusive_create_lets_exactly_one_of_many_racers_win(tmp_path):
    store = FeatureStore(str(tmp_path))
    winners, barrier = [], threading.Barrier(8)

    def race(i):
        barrier.wait()
        lease = DatasetLease(store, "demo", owner=f"run-{i}", poll=0.05, wait=0.3)
        try:
            lease.acquire()
            winners.append(i)
        except DatasetError:
            pass

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(winners) == 1


def test_a_killed_holders_lease_is_broken_by_the_next_run(tmp_path):
    store = FeatureStore(str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from stages.core.store import FeatureStore; from stages.core.lease import DatasetLease; "
        f"DatasetLease(FeatureStore({str(tmp_path)!r}), 'demo', owner='doomed', ttl=600).acquire(); "
        "print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    messages = []
    lease = DatasetLease(store, "demo", owner="next", poll=0.1, wait=30, log=messages.append).acquire()
    assert lease.holder()["owner"] == "next"
    assert any("breaking the lease of run doomed" in m for m in messages)
    lease.release()


def test_an_expired_lease_of_another_host_is_broken(tmp_path):
    store = FeatureStore(str(tmp_path))
    path = store.path("demo", "_lease.json")
    store.write_bytes(path, json.dumps({"owner": "far", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}).encode())
    lease = DatasetLease(store, "demo", owner="here", poll=0.1, wait=10).acquire()
    assert lease.holder()["owner"] == "here"
    lease.release()
