"""Soak test of the feature store's promises with real processes (``make soak``).

Every phase computes mel_spectrograms of a small demo dataset through the real shard driver
(stages.features.base.run_feature) and compares every committed shard with a clean reference
run (array sha256s and tar sha256 from the shard manifests, plus a full verification read):

  kill    a writer process is SIGKILLed at a random moment, again and again, while a reader
          process loops over the committed shards with verified reads; then re-run to the end.
  race    two writer processes compute the same key at the same moment on a fresh store, with no
          dataset lease (the store alone must keep commits exclusive), local and on S3 (a moto
          server process on loopback).
  dagster two `dagster job execute -j refresh_features` at once on one store, from one
          DAGSTER_HOME and from two.
  faults  writes to S3 through a loopback TCP proxy that drops, delays and cuts connections and
          refuses all of them for a while ("server restart"): each run completes, or fails with
          one line; no partial shard, and a re-run completes.

Prints a table per phase. No asserts: it reports (exit 1 when a promise broke).

    .venv/bin/python bench/soak_store.py [--phases kill,race,dagster,faults] [--rounds 20] [--kills 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.store import FeatureStore, StoreError  # noqa: E402

MEL_SECONDS = 1.0
SHARD_SIZE = 6


# ---- the work --------------------------------------------------------------------------------------


def _manifest(store: FeatureStore, jsonl: str):
    from stages.ingest.manifest import build_manifest, load_manifest, save_manifest
    from stages.ingest.sources import SourceConfig, read_source

    previous = load_manifest(store, "demo")
    manifest, _ = build_manifest("demo", read_source(SourceConfig(kind="jsonl", path=jsonl)), previous, SHARD_SIZE)
    save_manifest(store, manifest)
    return manifest


def refresh(root: str, options: dict, jsonl: str) -> dict:
    """What refresh_features does for the mels, without Dagster (and without the dataset lease)."""
    from stages.core.parallel import InProcessExecutor
    from stages.features.base import run_feature
    from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, MelParams, compute_mel_shard

    store = FeatureStore(root, options)
    manifest = _manifest(store, jsonl)
    params = MelParams(seconds=MEL_SECONDS)
    run = run_feature(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION,
                      compute_mel_shard, InProcessExecutor())
    return {"new": run.shards_new, "reused": run.shards_reused, "retired": len(run.retired)}


def fingerprint(store: FeatureStore) -> dict[str, str]:
    """shard -> sha256s of its arrays and tar as committed (what 'identical to a clean run' compares)."""
    from stages.features.mel import MelParams

    key = MelParams(seconds=MEL_SECONDS).key()
    found = {}
    for shard in store.committed_shards("demo", "mel_spectrograms", key):
        m = store.shard_manifest("demo", "mel_spectrograms", key, shard)
        found[shard] = json.dumps([m["clip_ids"], {n: a["sha256"] for n, a in m["arrays"].items()},
                                   m["files"]["tar"]["sha256"]])
    return found


def damaged(store: FeatureStore) -> list[str]:
    from stages.features.mel import MelParams

    key = MelParams(seconds=MEL_SECONDS).key()
    return [c.line() for c in store.verify_shards("demo", "mel_spectrograms", key, full=True) if not c.ok]


def _refresh_process(root, options, jsonl, out=None, ready=None):
    import stages.features.mel  # noqa: F401 - imports first: the kill should land in the work

    if ready is not None:
        ready.set()
    result = refresh(root, options, jsonl)
    if out is not None:
        out.put(result)


def _reader_loop(base, options, stop, counts, generation):
    """Verified reads of every committed shard of the current store (``<base>-<generation>``), over
    and over; counts reads and damage seen."""
    from stages.features.mel import MelParams

    key = MelParams(seconds=MEL_SECONDS).key()
    while not stop.is_set():
        store = FeatureStore(f"{base}-{generation.value}", options)
        for shard in store.committed_shards("demo", "mel_spectrograms", key):
            try:
                store.read_shard_arrays("demo", "mel_spectrograms", key, shard)
                with counts.get_lock():
                    counts[0] += 1
            except StoreError:
                with counts.get_lock():
                    counts[1] += 1


# ---- phases ------------------------------------------------------------------------------------


def phase_kill(work: Path, jsonl: str, reference: dict, kills: int, clean_seconds: float) -> list[str]:
    """A writer is SIGKILLed at a random point; the next writer continues from what was committed.
    When a writer finishes before its kill, the result is compared with the clean run and the
    store starts empty again, so kills keep landing in real work. A reader verifies throughout."""
    context = multiprocessing.get_context("spawn")
    base = str(work / "kill")
    stop, counts, generation = context.Event(), context.Array("i", [0, 0]), context.Value("i", 0)
    root = f"{base}-0"
    reader = context.Process(target=_reader_loop, args=(base, {}, stop, counts, generation))
    reader.start()
    rng = random.Random(0)
    # How long a writer process works once started (the same kind of process, on this loaded machine).
    ready = context.Event()
    calibration = context.Process(target=_refresh_process, args=(str(work / "kill-calibration"), {}, jsonl, None, ready))
    calibration.start()
    ready.wait(timeout=300)
    started = time.time()
    calibration.join()
    clean_seconds = time.time() - started
    done_kills = reruns = completions = differing = damaged_total = 0
    while done_kills < kills and reruns < 4 * kills:
        ready = context.Event()
        writer = context.Process(target=_refresh_process, args=(root, {}, jsonl, None, ready))
        writer.start()
        ready.wait(timeout=300)
        # Anywhere in the work: manifest, decode, STFT, tar/zarr writes, commits, catalog.
        time.sleep(rng.uniform(0.0, clean_seconds))
        if writer.is_alive():
            os.kill(writer.pid, signal.SIGKILL)
            done_kills += 1
        writer.join()
        reruns += 1
        if writer.exitcode == 0:  # it finished: check it, then start from nothing again
            store = FeatureStore(root)
            completions += 1
            differing += fingerprint(store) != reference
            damaged_total += len(damaged(store))
            generation.value += 1  # a fresh store; the old one stays (the reader may be in it)
            root = f"{base}-{generation.value}"
    final = refresh(root, {}, jsonl)
    stop.set()
    reader.join(timeout=30)
    store = FeatureStore(root)
    completions += 1
    differing += fingerprint(store) != reference
    damaged_total += len(damaged(store))
    leftovers = sum(len(store.collect_garbage("demo", f, k, grace_seconds=0)) for _, f, k in store.stored_keys("demo"))
    return [f"SIGKILLs {done_kills} at random points of a {clean_seconds:.1f} s refresh (a writer process's work, "
            f"measured first), {reruns + 1} runs, "
            f"{completions} completed stores (the last run: {final['new']} new / {final['reused']} reused shards)",
            f"completed stores differing from a clean run: {differing}; damaged shards: {damaged_total}",
            f"reader during the writes: {counts[0]} verified shard reads, {counts[1]} errors",
            f"dead attempts' files collected afterwards: {leftovers}"], not differing and not damaged_total and counts[1] == 0


def phase_race(work: Path, jsonl: str, reference: dict, rounds: int, label: str, root_of, options: dict):
    context = multiprocessing.get_context("spawn")
    corrupted = mismatched = failed = 0
    for round_ in range(rounds):
        root = root_of(round_)
        out = context.Queue()
        writers = [context.Process(target=_refresh_process, args=(root, options, jsonl, out)) for _ in range(2)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=600)
            failed += writer.exitcode != 0
        store = FeatureStore(root, options)
        corrupted += len(damaged(store))
        mismatched += fingerprint(store) != reference
    ok = not (corrupted or mismatched or failed)
    return [f"{label}: {rounds} rounds of two writers at once: {failed} failed writers, "
            f"{corrupted} corrupted shards, {mismatched} rounds differing from one refresh"], ok


def phase_dagster(work: Path, reference_dagster: dict | None, rounds: int) -> tuple[list[str], bool]:
    project = Path(__file__).resolve().parents[1]
    dagster = Path(sys.executable).parent / "dagster"
    lines, ok = [], True
    for same_home in (True, False):
        failed = corrupted = mismatched = 0
        seen = None
        for round_ in range(rounds // 2):
            base = work / f"dagster-{'same' if same_home else 'two'}-{round_}"
            homes = [base / "home"] * 2 if same_home else [base / "home0", base / "home1"]
            procs = []
            for home in homes:
                home.mkdir(parents=True, exist_ok=True)
                shutil.copy(project / "dagster.yaml", home / "dagster.yaml")
            if same_home:
                from dagster import DagsterInstance

                DagsterInstance.from_config(str(homes[0])).dispose()
            for home in homes:
                env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "XMODAL_"))},
                       "DAGSTER_HOME": str(home), "DAGSTER_CLI_JOB_EXECUTE_MODULE_NAME": "pipelines.definitions",
                       "XMODAL_DATA_DIR": str(base / "data"), "XMODAL_STORE_ROOT": str(base / "store"),
                       "XMODAL_DEMO_CLIPS": "12", "XMODAL_SHARD_SIZE": "4", "XMODAL_COMPUTE": "in_process"}
                procs.append(subprocess.Popen([str(dagster), "job", "execute", "-j", "refresh_features"], cwd=project,
                                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for proc in procs:
                _, err = proc.communicate(timeout=900)
                failed += proc.returncode != 0
            store = FeatureStore(str(base / "store"))
            for _, feature, key in store.stored_keys("demo"):
                if feature in ("mel_spectrograms", "audio_images", "video_frames"):
                    corrupted += sum(not c.ok for c in store.verify_shards("demo", feature, key, full=True))
            prints = {f: fingerprint_of(store, f) for f in ("mel_spectrograms", "audio_images")}
            mismatched += seen is not None and prints != seen
            seen = seen or prints
            shutil.rmtree(base, ignore_errors=True)
        lines.append(f"{'one DAGSTER_HOME' if same_home else 'two DAGSTER_HOMEs'}: {rounds // 2} rounds of two "
                     f"refresh_features at once: {failed} failed runs, {corrupted} corrupted shards, "
                     f"{mismatched} rounds differing from the first")
        ok = ok and not (failed or corrupted or mismatched)
    return lines, ok


def fingerprint_of(store: FeatureStore, feature: str) -> dict:
    found = {}
    for _, feat, key in store.stored_keys("demo", feature):
        for shard in store.committed_shards("demo", feat, key):
            m = store.shard_manifest("demo", feat, key, shard)
            found[f"{key}/{shard}"] = [m["clip_ids"], {n: a["sha256"] for n, a in m["arrays"].items()}]
    return found


# ---- S3 on loopback, and a proxy that misbehaves -----------------------------------------------------


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """TCP proxy on loopback: per connection, with probabilities, drop it at once, delay it, or cut
    it after some bytes; ``down(seconds)`` refuses every connection for a while."""

    def __init__(self, target_port: int, drop=0.05, delay=0.1, cut=0.05, seed=0):
        self.target_port, self.drop, self.delay, self.cut = target_port, drop, delay, cut
        self.rng = random.Random(seed)
        self.port = free_port()
        self.down_until = 0.0
        self.faults = {"dropped": 0, "delayed": 0, "cut": 0, "refused": 0, "connections": 0}
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        time.sleep(0.3)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.loop.run_forever()

    def down(self, seconds: float) -> None:
        self.down_until = time.time() + seconds

    async def _handle(self, reader, writer):
        self.faults["connections"] += 1
        if time.time() < self.down_until:
            self.faults["refused"] += 1
            writer.close()
            return
        roll = self.rng.random()
        if roll < self.drop:
            self.faults["dropped"] += 1
            writer.close()
            return
        if roll < self.drop + self.delay:
            self.faults["delayed"] += 1
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
        cut_after = self.rng.randint(200, 20000) if self.rng.random() < self.cut else None
        if cut_after is not None:
            self.faults["cut"] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src, dst, limit):
            sent = 0
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if limit is not None and sent + len(data) > limit:
                        dst.write(data[: max(0, limit - sent)])
                        break
                    dst.write(data)
                    sent += len(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()
                src_writer = writer if src is reader else up_writer
                src_writer.close()

        await asyncio.gather(pipe(reader, up_writer, None), pipe(up_reader, writer, cut_after))


def s3_options(port: int, retries: int = 10) -> dict:
    return {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "use_listings_cache": False,
            "config_kwargs": {"retries": {"max_attempts": retries, "mode": "standard"}, "connect_timeout": 3,
                              "read_timeout": 10}}


def make_bucket(port: int, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket=name)


def phase_faults(work: Path, jsonl: str, reference: dict, moto_port: int, rounds: int) -> tuple[list[str], bool]:
    proxy = FaultProxy(moto_port)
    completed = one_line_failures = other_failures = corrupted = mismatched = 0
    messages = set()
    for round_ in range(rounds):
        bucket = f"faults-{round_}"
        make_bucket(moto_port, bucket)
        root, options = f"s3://{bucket}/features", s3_options(proxy.port)
        if round_ % 3 == 2:  # a "server restart": nothing answers for 3 s in the middle of the run
            threading.Timer(2.0, proxy.down, args=(3.0,)).start()
        result = subprocess.run([sys.executable, __file__, "--one-refresh", root, json.dumps(options), jsonl],
                                capture_output=True, text=True, timeout=900)
        if result.returncode == 0:
            completed += 1
        else:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            if result.stderr.count("\n") <= 1 or "Traceback" not in result.stderr:
                one_line_failures += 1
                messages.add(last[:160])
            else:
                other_failures += 1
                messages.add("TRACEBACK " + last[:160])
        # Whatever happened, what is committed verifies, and a clean re-run completes it.
        direct = FeatureStore(root, s3_options(moto_port))
        bad = damaged(direct)
        corrupted += len(bad)
        messages.update(f"DAMAGED {line[:200]}" for line in bad)
        refresh(root, s3_options(moto_port), jsonl)
        mismatched += fingerprint(direct) != reference
    faults = ", ".join(f"{n} {k}" for k, n in proxy.faults.items())
    lines = [f"{rounds} runs through the fault proxy ({faults}): {completed} completed, {one_line_failures} failed "
             f"with one line, {other_failures} with a traceback; {corrupted} corrupted shards; after a clean re-run "
             f"{mismatched} differ from one refresh"]
    lines += [f"  printed: {m}" for m in sorted(messages)]
    return lines, not (other_failures or corrupted or mismatched)


def one_refresh_main(root: str, options: str, jsonl: str) -> int:
    """A refresh as a user runs it: an expected failure is one line on stderr, exit 2."""
    from stages.core.errors import XmodalError

    store = FeatureStore(root, json.loads(options))
    try:
        refresh(root, json.loads(options), jsonl)
    except XmodalError as exc:
        print(f"refresh failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        unreachable = store.unreachable(exc)
        if unreachable is None:
            raise
        print(f"refresh failed: {unreachable}", file=sys.stderr)
        return 2
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="kill,race,dagster,faults")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--dagster-rounds", type=int, default=20)
    parser.add_argument("--clips", type=int, default=30)
    parser.add_argument("--one-refresh", nargs=3, metavar=("ROOT", "OPTIONS", "JSONL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_refresh:
        return one_refresh_main(*args.one_refresh)

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    from stages.ingest.demo import DemoSpec, generate_demo

    phases = args.phases.split(",")
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.time()
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    print(f"work in {work}; {os.cpu_count()} cores")
    jsonl = str(generate_demo(work / "media", DemoSpec(n_clips=args.clips, seed=0)))
    clean_start = time.time()
    refresh(str(work / "reference"), {}, jsonl)
    clean_seconds = time.time() - clean_start
    reference = fingerprint(FeatureStore(str(work / "reference")))
    print(f"reference: {len(reference)} mel shards of {args.clips} clips")
    all_ok = True
    moto = None
    try:
        if "kill" in phases:
            lines, ok = phase_kill(work, jsonl, reference, args.kills, clean_seconds)
            all_ok &= ok
            print("\n[kill]\n  " + "\n  ".join(lines))
        if "race" in phases:
            lines, ok = phase_race(work, jsonl, reference, args.rounds, "local",
                                   lambda r: str(work / f"race-{r}"), {})
            all_ok &= ok
            moto_port = free_port()
            moto = start_moto(moto_port)
            for r in range(args.rounds):
                make_bucket(moto_port, f"race-{r}")
            s3_lines, s3_ok = phase_race(work, jsonl, reference, args.rounds, "S3 (moto)",
                                         lambda r: f"s3://race-{r}/features", s3_options(moto_port))
            all_ok &= s3_ok
            print("\n[race]\n  " + "\n  ".join(lines + s3_lines))
        if "faults" in phases:
            if moto is None:
                moto_port = free_port()
                moto = start_moto(moto_port)
            lines, ok = phase_faults(work, jsonl, reference, moto_port, max(6, args.rounds // 2))
            all_ok &= ok
            print("\n[faults]\n  " + "\n  ".join(lines))
        if "dagster" in phases:
            lines, ok = phase_dagster(work, None, args.dagster_rounds)
            all_ok &= ok
            print("\n[dagster]\n  " + "\n  ".join(lines))
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'every promise held' if all_ok else 'A PROMISE BROKE'} ({time.time() - started:.0f} s)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
