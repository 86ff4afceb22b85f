"""Content-addressed feature store: WebDataset tar + Zarr v3 + JSON manifest per shard.

Layout under one root (a local path or ``s3://bucket/prefix``, through fsspec)::

    <root>/<dataset>/clip_manifest/<hash>.jsonl + latest.json   the clip ledger (see stages.ingest.manifest)
    <root>/<dataset>/<feature>/<feature_key>/<shard>.<attempt>.tar    one WebDataset sample per clip
    <root>/<dataset>/<feature>/<feature_key>/<shard>.<attempt>.zarr   arrays, first axis = clip
    <root>/<dataset>/<feature>/<feature_key>/<shard>.json        manifest = the commit; names the attempt
    <root>/<dataset>/<feature>/<feature_key>/_retired/           manifests of shards found damaged
    <root>/<dataset>/<feature>/<feature_key>/_verified/          when each shard's files were last verified
    <root>/catalog/<dataset>/<feature>/<feature_key>.json       what exists, for other teams

FORMAT.md describes the layout for readers outside Python. The promises:

- A commit is atomic and exclusive. A writer puts its tar and zarr under names of its own
  (``<attempt>`` is random), then creates ``<shard>.json`` exclusively: a hard link on local disks,
  a conditional PUT (``If-None-Match: *``) on S3. A writer that loses discards its own files and
  returns the winner's manifest. Nothing committed is deleted or rewritten; leftovers of dead
  attempts are collected after a grace period (``collect_garbage``).
- Reads verify. Every array read is checked against the manifest's shape, dtype and sha256, every
  tar against its size and sha256; a mismatch or an unreadable file raises ``ShardCorruptError``
  naming the shard. ``verify_shards`` retires a damaged shard (its manifest moves to ``_retired``),
  so the next refresh recomputes it.
- Reads are snapshots. Without ``shards``, a read covers the shards of one clip-manifest version
  (the current one by default) under one feature key, named or the only one complete for that
  version; the version and key are part of what is returned.

Version 1 stores (data at ``<shard>.tar`` / ``<shard>.zarr``, no ``path`` in the manifest) stay
readable and verifiable as they are.

Usable without Dagster::

    from stages.core.store import FeatureStore
    store = FeatureStore("/data/features")
    table = store.read_arrays("demo", "mel_spectrograms")      # current clip manifest, its only key
    table.clip_ids, table.arrays["mel"], table.manifest, table.feature_key

For training, stages.core.clip_dataset.ClipDataset (``from stages.store import ClipDataset``) builds
on these reads: several features joined by clip id, with captions, labels and splits, per sample.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import numpy as np

from stages.core.errors import XmodalError
from stages.core.ids import check_name, is_safe_name

# 2: shard data under per-attempt names that the manifest records (files.tar.path, files.zarr.path);
# 1: data at <shard>.tar / <shard>.zarr. Readers take both.
MANIFEST_FORMAT = 2
STORE_FORMAT = 2
ZARR_CHUNK_CLIPS = 32
RETIRED_FOLDER = "_retired"
VERIFIED_FOLDER = "_verified"
# Uncommitted attempt files younger than this may belong to a writer that is still running.
GARBAGE_GRACE_SECONDS = 3600.0
WRITE_ATTEMPTS = 3  # an attempt that does not read back as written (S3 only) is written again


class StoreError(XmodalError, RuntimeError):
    """The store cannot be used as configured (unreachable, unwritable, missing feature)."""


class ShardCorruptError(StoreError):
    """A committed shard's files are missing, unreadable or do not match its manifest."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"shard {where}: {problem}")
        self.where, self.problem = where, problem


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def feature_key(name: str, params: Mapping[str, Any], code_version: str, input_keys: Sequence[str] = ()) -> str:
    """hash(feature name, its parameters, its code version, the keys of its inputs): 16 hex chars."""
    payload = canonical_json(
        {"feature": name, "params": dict(params), "code_version": code_version, "inputs": list(input_keys)}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _library_versions() -> tuple:
    from importlib.metadata import PackageNotFoundError, version

    found = [("python", platform.python_version())]
    for dist in ("numpy", "torch", "librosa", "soxr", "av", "decord", "zarr", "webdataset", "pillow"):
        try:
            found.append((dist, version(dist)))
        except PackageNotFoundError:
            pass
    return tuple(found)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape stored numbers, for the shard manifest (read once
    per process: package metadata costs ~2.5 ms a shard otherwise)."""
    return dict(_library_versions())


@dataclass
class FeatureTable:
    """Arrays of one feature with the clip id of every row, and what was read: the feature key,
    the shards and the clip-manifest version (None when the read named its shards)."""

    clip_ids: list[str]
    arrays: dict[str, np.ndarray]
    feature_key: str
    shards: list[str] = field(default_factory=list)
    manifest: str | None = None

    def __len__(self) -> int:
        return len(self.clip_ids)


@dataclass
class ShardCheck:
    """What verifying one shard found; ``problems`` is empty when it verified."""

    dataset: str
    feature: str
    key: str
    shard: str
    problems: list[str] = field(default_factory=list)
    skipped: bool = False  # its files are unchanged since they last verified
    retired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        where = f"{self.dataset}/{self.feature}/{self.key}/{self.shard}"
        if self.ok:
            return f"ok       {where}"
        return f"{'retired' if self.retired else 'damaged':<8} {where}: {'; '.join(self.problems)}"


_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                      "ServerDisconnectedError", "ConnectionClosedError", "ClientOSError", "ReadTimeoutError"}


def unreachable_reason(exc: BaseException) -> str | None:
    """The name of the botocore / aiohttp error, anywhere in ``exc``'s chain, saying the server
    could not be reached (not a missing key or a refused request); None otherwise."""
    seen: BaseException | None = exc
    while seen is not None:
        if {cls.__name__ for cls in type(seen).__mro__} & _CONNECTION_ERRORS:
            return type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


class FeatureStore:
    """Reads and writes feature shards under one root through fsspec."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        self.url_root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        if fsspec.core.split_protocol(self.url_root)[0] not in (None, "file", "local") and "::" not in self.url_root:
            # Shards are committed by other processes (Dask workers) and by zarr's own instance: a
            # cached listing would hide them from committed_shards / exists / feature_keys.
            self.storage_options.setdefault("use_listings_cache", False)
        self._fs = None
        self._fs_pid = None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url_root, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open feature store {self.url_root!r}: {exc}") from exc
        self.is_local = "file" in _protocols(self.fs)

    @property
    def fs(self):
        """The filesystem, opened anew in a forked process (s3fs instances are not fork-safe:
        DataLoader workers fork after the store was opened)."""
        if self._fs_pid != os.getpid():
            self._fs = fsspec.core.url_to_fs(self.url_root, **self.storage_options)[0]
            self._fs_pid = os.getpid()
        return self._fs

    @fs.setter
    def fs(self, value) -> None:
        self._fs, self._fs_pid = value, os.getpid()

    def __getstate__(self) -> dict:  # pickled into spawned workers: they open their own filesystem
        return {"url_root": self.url_root, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url_root"], state["storage_options"])

    def __repr__(self) -> str:
        return f"FeatureStore({self.url_root!r})"

    def unreachable(self, exc: BaseException) -> StoreError | None:
        """A one-line StoreError when ``exc`` means the store's server cannot be reached."""
        reason = unreachable_reason(exc)
        if reason is None:
            return None
        endpoint = (self.storage_options.get("client_kwargs") or {}).get("endpoint_url") or \
            self.storage_options.get("endpoint_url") or "the default S3 endpoint"
        return StoreError(f"cannot reach the feature store {self.url_root!r} at {endpoint}: {reason} "
                          "(is the server up? check XMODAL_S3_ENDPOINT_URL)")

    # ---- paths -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (without protocol) under the root; every part must be a safe name."""
        return posixpath.join(self.root, *parts)

    def url(self, path: str) -> str:
        """Full URL (with protocol) of a filesystem path, for libraries that open URLs themselves."""
        return self.fs.unstrip_protocol(path) if not self.is_local else path

    def key_dir(self, dataset: str, feature: str, key: str) -> str:
        check_name(dataset, "dataset")
        check_name(feature, "feature")
        check_name(key, "feature key")
        return self.path(dataset, feature, key)

    def check_writable(self) -> None:
        """Fail fast, with one line, when the root cannot be written, or when the server would not
        refuse a second exclusive create (commits would not be exclusive there)."""
        probe = self.path("_tmp", f"probe-{uuid.uuid4().hex}")
        try:
            self._makedirs(self.path("_tmp"))
            created = self.create_exclusive(probe, b"ok")
            again = self.create_exclusive(probe, b"again")
            self.fs.rm_file(probe)
        except Exception as exc:  # any backend error means the same thing to the user
            unreachable = self.unreachable(exc)
            if unreachable is not None:
                raise unreachable from None
            raise StoreError(f"feature store {self.url_root!r} is not writable: {type(exc).__name__}: {exc}") from exc
        if not created or again:
            raise StoreError(f"feature store {self.url_root!r} does not refuse a second create of one object "
                             "(If-None-Match: *): use a server that supports conditional writes")

    # ---- small JSON documents ----------------------------------------------------------------
    def write_json(self, path: str, value: Any) -> None:
        """Write JSON so that a reader sees the old or the new document, never half of one."""
        data = json.dumps(value, indent=1, sort_keys=True, default=_json_default).encode()
        self.write_bytes(path, data)

    def _makedirs(self, path: str) -> None:
        """Create a local folder. Object stores have no folders, and s3fs's makedirs would
        create a missing bucket instead of failing, so it is not called there."""
        if self.is_local:
            self.fs.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._makedirs(posixpath.dirname(path))
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)  # rename: atomic on one filesystem
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` unless it exists; False when it existed with other bytes
        (so a retried create of our own document is still ours). Readers see the
        whole document or none. Local: write a private file, hard-link it into place (the link
        fails when the name exists). S3: one conditional PUT (``If-None-Match: *``), which AWS S3,
        MinIO, Ceph RGW, R2 and moto honour; check_writable tests that the server does."""
        self._makedirs(posixpath.dirname(path))
        if self.is_local:
            private = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(private, "wb") as handle:
                handle.write(data)
            try:
                os.link(private, path)
                return True
            except FileExistsError:
                return self._holds(path, data)
            finally:
                os.unlink(private)
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            pass
        except OSError as exc:  # s3fs maps 412 Precondition Failed to an OSError subclass on some versions
            if "PreconditionFailed" not in str(exc) and "412" not in str(exc):
                raise
        # A PUT that succeeded but lost its response is retried by botocore and then fails with 412
        # on our own object: the bytes say whose it is (every caller's document carries a unique
        # attempt or run id, so equal bytes are ours).
        return self._holds(path, data)

    def _holds(self, path: str, data: bytes) -> bool:
        try:
            return self.fs.cat_file(path) == data
        except FileNotFoundError:
            return False

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as handle:
            return json.loads(handle.read())

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    # ---- shards ------------------------------------------------------------------------------
    def shard_manifest_path(self, dataset: str, feature: str, key: str, shard: str) -> str:
        return posixpath.join(self.key_dir(dataset, feature, key), f"{check_name(shard, 'shard')}.json")

    def has_shard(self, dataset: str, feature: str, key: str, shard: str) -> bool:
        return self.fs.exists(self.shard_manifest_path(dataset, feature, key, shard))

    def committed_shards(self, dataset: str, feature: str, key: str) -> list[str]:
        """Names of the complete shards of one feature key (those whose manifest exists)."""
        directory = self.key_dir(dataset, feature, key)
        try:
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            base = posixpath.basename(name.rstrip("/"))
            if base.endswith(".json") and ".tmp-" not in base:
                found.append(base[: -len(".json")])
        return sorted(found)

    def shard_manifest(self, dataset: str, feature: str, key: str, shard: str) -> dict:
        """The committed manifest of one shard; a garbled one raises ShardCorruptError naming it."""
        path = self.shard_manifest_path(dataset, feature, key, shard)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(f"shard {dataset}/{feature}/{key}/{shard} is not committed ({self.url(path)} is missing)") from None
        return self._parse_manifest(dataset, feature, key, shard, raw)

    def shard_manifests(self, dataset: str, feature: str, key: str, shards: Sequence[str]) -> dict[str, dict]:
        """Shard -> committed manifest for many shards of one key, fetched in one batch (concurrent
        requests on S3: a reader over thousands of shards does not wait for each in turn)."""
        paths = {shard: self.shard_manifest_path(dataset, feature, key, shard) for shard in shards}
        if not paths:
            return {}
        try:
            raw = self.fs.cat(list(paths.values()))
        except FileNotFoundError:
            missing = next(s for s, p in paths.items() if not self.fs.exists(p))
            raise StoreError(f"shard {dataset}/{feature}/{key}/{missing} is not committed "
                             f"({self.url(paths[missing])} is missing)") from None
        if len(paths) == 1:  # fsspec returns the bytes themselves for a single path
            raw = {next(iter(paths.values())): raw} if isinstance(raw, bytes) else raw
        by_path = {self.fs._strip_protocol(p): data for p, data in raw.items()}
        return {shard: self._parse_manifest(dataset, feature, key, shard, by_path[self.fs._strip_protocol(path)])
                for shard, path in paths.items()}

    def _parse_manifest(self, dataset: str, feature: str, key: str, shard: str, raw: bytes) -> dict:
        path = self.shard_manifest_path(dataset, feature, key, shard)
        try:
            manifest = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ShardCorruptError(f"{dataset}/{feature}/{key}/{shard}",
                                    f"manifest {self.url(path)} is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or not {"rows", "clip_ids", "arrays", "files"} <= set(manifest):
            raise ShardCorruptError(f"{dataset}/{feature}/{key}/{shard}", f"manifest {self.url(path)} is incomplete")
        return manifest

    def shard_files(self, dataset: str, feature: str, key: str, shard: str, manifest: Mapping[str, Any]) -> tuple[str, str]:
        """(tar path, zarr path) of a committed shard: the attempt its manifest names (format 2)
        or the fixed names of format 1."""
        directory = self.key_dir(dataset, feature, key)
        files = manifest.get("files", {})
        tar = files.get("tar", {}).get("path") or f"{shard}.tar"
        zarr_ = files.get("zarr", {}).get("path") or f"{shard}.zarr"
        return posixpath.join(directory, posixpath.basename(tar)), posixpath.join(directory, posixpath.basename(zarr_))

    def write_shard(
        self,
        dataset: str,
        feature: str,
        key: str,
        shard: str,
        *,
        clip_ids: Sequence[str],
        arrays: Mapping[str, np.ndarray],
        manifest: Mapping[str, Any],
        tar_encodings: Mapping[str, str] | None = None,
        sample_meta: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict:
        """Write one shard (tar and zarr under this attempt's names, then the manifest that commits
        it, exclusively); return the committed manifest, this attempt's or the one that won.

        ``arrays`` hold one row per clip in ``clip_ids`` order. ``tar_encodings`` maps an array
        name to the WebDataset extension it is stored under (default ``<name>.npy``; uint8
        images can use ``png``). ``sample_meta`` adds a per-clip ``json`` member to the tar.
        """
        import webdataset as wds

        for clip_id in clip_ids:
            check_name(clip_id, "clip id")
        rows = len(clip_ids)
        for name, array in arrays.items():
            check_name(name, "array name")
            if array.shape[0] != rows:
                raise ValueError(f"array {name!r} has {array.shape[0]} rows for {rows} clips")
        directory = self.key_dir(dataset, feature, key)
        check_name(shard, "shard")
        manifest_path = posixpath.join(directory, f"{shard}.json")
        if self.fs.exists(manifest_path):
            # Committed shards are never rewritten: readers may be using them.
            return self.shard_manifest(dataset, feature, key, shard)
        self._makedirs(directory)

        # WebDataset tar, built in memory (shards are tens of MB) and written in one piece. A fixed
        # member mtime makes the same rows give the same tar bytes in every run.
        encodings = dict(tar_encodings or {})
        buffer = io.BytesIO()
        with wds.TarWriter(buffer, mtime=0) as writer:
            for row, clip_id in enumerate(clip_ids):
                sample: dict[str, Any] = {"__key__": clip_id}
                for name, array in arrays.items():
                    ext = encodings.get(name, "npy")
                    sample[f"{name}.{ext}"] = array[row]
                if sample_meta is not None:
                    sample["json"] = dict(sample_meta[row])
                writer.write(sample)
        tar_bytes = buffer.getvalue()
        for attempt_number in range(WRITE_ATTEMPTS):
            try:
                return self._commit_attempt(dataset, feature, key, shard, manifest, clip_ids, arrays, tar_bytes)
            except ShardCorruptError:
                if attempt_number == WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _commit_attempt(self, dataset, feature, key, shard, manifest, clip_ids, arrays, tar_bytes) -> dict:
        """Write the data under a fresh attempt name, then commit it exclusively (see write_shard)."""
        directory = self.key_dir(dataset, feature, key)
        manifest_path = posixpath.join(directory, f"{shard}.json")
        attempt = uuid.uuid4().hex[:12]
        tar_name, zarr_name = f"{shard}.{attempt}.tar", f"{shard}.{attempt}.zarr"
        tar_path, zarr_path = posixpath.join(directory, tar_name), posixpath.join(directory, zarr_name)
        try:
            self.fs.pipe_file(tar_path, tar_bytes)
            array_info = self._write_zarr(zarr_path, clip_ids, arrays)
        except BaseException:
            self._discard(tar_path, zarr_path)
            raise

        committed = dict(manifest)
        committed.update(
            format=MANIFEST_FORMAT,
            dataset=dataset,
            feature=feature,
            feature_key=key,
            shard=shard,
            attempt=attempt,
            rows=len(clip_ids),
            clip_ids=list(clip_ids),
            arrays=array_info,
            files={
                "tar": {"path": tar_name, "bytes": len(tar_bytes), "sha256": hashlib.sha256(tar_bytes).hexdigest()},
                "zarr": {"path": zarr_name, "bytes": int(sum(info["nbytes_stored"] for info in array_info.values()))},
            },
            versions=library_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        document = json.dumps(committed, indent=1, sort_keys=True, default=_json_default).encode()
        try:
            if not self.is_local:
                # Read the attempt back before committing it: an upload cut mid-body can be stored
                # short by a server that does not check lengths (seen with moto behind a faulty
                # link); that attempt is discarded and written again.
                self.read_shard_arrays(dataset, feature, key, shard, manifest=committed)
                self.read_shard_tar(dataset, feature, key, shard, manifest=committed)
            won = self.create_exclusive(manifest_path, document)
        except BaseException:
            self._discard(tar_path, zarr_path)
            raise
        if won:
            return json.loads(document)
        # Another writer committed this shard first: ours is discarded, theirs is the shard.
        self._discard(tar_path, zarr_path)
        return self.shard_manifest(dataset, feature, key, shard)

    def _discard(self, *paths: str) -> None:
        """Remove an uncommitted attempt's files (best effort: collect_garbage finds the rest)."""
        for path in paths:
            try:
                if self.fs.exists(path):
                    self.fs.rm(path, recursive=True)
            except OSError:
                pass

    def _zarr_store(self, path: str, read_only: bool = False):
        import zarr

        if self.is_local:
            return zarr.storage.LocalStore(path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url(path), storage_options=self.storage_options,
                                                 read_only=read_only)

    def _write_zarr(self, path: str, clip_ids: Sequence[str], arrays: Mapping[str, np.ndarray]) -> dict:
        import zarr

        group = zarr.open_group(store=self._zarr_store(path), mode="w-")
        group.attrs["clip_ids"] = list(clip_ids)
        info = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            chunks = (max(1, min(ZARR_CHUNK_CLIPS, array.shape[0])),) + array.shape[1:]
            target = group.create_array(name=name, shape=array.shape, dtype=array.dtype, chunks=chunks)
            if array.shape[0]:
                target[...] = array
            info[name] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
                "nbytes_stored": int(target.nbytes_stored()),
            }
        return info

    # ---- verified reading of one shard -------------------------------------------------------
    def read_shard_arrays(self, dataset: str, feature: str, key: str, shard: str,
                          names: Iterable[str] | None = None, manifest: Mapping[str, Any] | None = None,
                          verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
        """(manifest, arrays) of one committed shard, each array checked against the manifest's
        shape, dtype and sha256. Any damage raises ShardCorruptError naming the shard and file."""
        import zarr

        manifest = dict(manifest) if manifest is not None else self.shard_manifest(dataset, feature, key, shard)
        where = f"{dataset}/{feature}/{key}/{shard}"
        wanted = list(names) if names is not None else list(manifest["arrays"])
        unknown = [n for n in wanted if n not in manifest["arrays"]]
        if unknown:
            raise StoreError(f"shard {where} has no array {unknown[0]!r} (it has {', '.join(manifest['arrays'])})")
        if not manifest["rows"]:
            return manifest, {}
        _, zarr_path = self.shard_files(dataset, feature, key, shard, manifest)
        try:
            group = zarr.open_group(store=self._zarr_store(zarr_path, read_only=True), mode="r")
            stored_ids = group.attrs.get("clip_ids")
        except Exception as exc:  # noqa: BLE001 - zarr, fsspec and codecs raise many kinds
            raise self._read_failure(where, self.url(zarr_path), exc) from None
        if verify and stored_ids is not None and list(stored_ids) != list(manifest["clip_ids"]):
            raise ShardCorruptError(where, f"{self.url(zarr_path)}: clip ids differ from the manifest's")
        arrays = {}
        for name in wanted:
            info = manifest["arrays"][name]
            try:
                data = group[name][...]
            except Exception as exc:  # noqa: BLE001
                raise self._read_failure(where, f"{self.url(zarr_path)}/{name}", exc) from None
            if verify:
                problem = _array_problem(data, info)
                if problem:
                    raise ShardCorruptError(where, f"array {name!r} in {self.url(zarr_path)} {problem}")
            arrays[name] = data
        return manifest, arrays

    def _read_failure(self, where: str, url: str, exc: BaseException) -> StoreError:
        unreachable = self.unreachable(exc)
        if unreachable is not None:
            return unreachable
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            # An I/O failure (a throttled or failing server, a full disk) says nothing about the
            # shard: a StoreError, so verification does not retire a shard that may be fine.
            return StoreError(f"shard {where}: cannot read {url}: {type(exc).__name__}: {text}")
        return ShardCorruptError(where, f"cannot read {url}: {type(exc).__name__}: {text}")

    def read_shard_tar(self, dataset: str, feature: str, key: str, shard: str,
                       manifest: Mapping[str, Any] | None = None, verify: bool = True) -> bytes:
        """The tar bytes of one committed shard, checked against the manifest's size and sha256."""
        manifest = manifest if manifest is not None else self.shard_manifest(dataset, feature, key, shard)
        tar_path, _ = self.shard_files(dataset, feature, key, shard, manifest)
        where = f"{dataset}/{feature}/{key}/{shard}"
        try:
            data = self.fs.cat_file(tar_path)
        except Exception as exc:  # noqa: BLE001
            raise self._read_failure(where, self.url(tar_path), exc) from None
        if verify:
            expected = manifest["files"]["tar"]
            if len(data) != expected["bytes"]:
                raise ShardCorruptError(where, f"{self.url(tar_path)} has {len(data)} bytes, the manifest says {expected['bytes']}")
            if hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise ShardCorruptError(where, f"{self.url(tar_path)} does not match its sha256")
        return data

    # ---- verifying, retiring, collecting -----------------------------------------------------
    def verify_shards(self, dataset: str, feature: str, key: str, shards: Iterable[str] | None = None, *,
                      full: bool = False, repair: bool = False) -> list[ShardCheck]:
        """Verify committed shards (all of the key by default) against their manifests.

        A shard whose files are unchanged (size, mtime or ETag) since they last verified is
        skipped unless ``full``; the others are read whole and hashed. With ``repair``, a damaged
        shard is retired (its manifest moves to ``_retired``), so the next refresh recomputes it.
        A server that cannot be reached raises StoreError: that is not damage.
        """
        committed = set(self.committed_shards(dataset, feature, key))
        names = sorted(committed if shards is None else set(shards) & committed)
        listing = self._listing(self.key_dir(dataset, feature, key)) if names else {}
        checks = []
        for shard in names:
            check = ShardCheck(dataset, feature, key, shard)
            raw = None
            try:
                raw = self.fs.cat_file(self.shard_manifest_path(dataset, feature, key, shard))
                manifest = self._parse_manifest(dataset, feature, key, shard, raw)
                stamp = self._stamp(dataset, feature, key, shard, manifest, listing)
                if not full and stamp and stamp == self._verified_stamp(dataset, feature, key, shard):
                    check.skipped = True
                    checks.append(check)
                    continue
                self.read_shard_arrays(dataset, feature, key, shard, manifest=manifest)
                self.read_shard_tar(dataset, feature, key, shard, manifest=manifest)
                if stamp:
                    self.write_json(self._verified_path(dataset, feature, key, shard), {"stamp": stamp})
            except FileNotFoundError:  # retired meanwhile by another verifier
                continue
            except ShardCorruptError as exc:
                check.problems.append(exc.problem)
                if repair:
                    check.retired = self.retire_shard(dataset, feature, key, shard, exc.problem, raw)
            checks.append(check)
        return checks

    def retire_shard(self, dataset: str, feature: str, key: str, shard: str, reason: str,
                     expected: bytes | None = None) -> bool:
        """Move a damaged shard's manifest to ``_retired`` (kept, with the reason), so the shard is
        no longer committed and the next refresh recomputes it. ``expected``: the manifest bytes
        that were found damaged; a manifest committed since (by a repair elsewhere) is left alone."""
        path = self.shard_manifest_path(dataset, feature, key, shard)
        try:
            current = self.fs.cat_file(path)
        except FileNotFoundError:
            return False
        if expected is not None and current != expected:
            return False
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        retired = posixpath.join(self.key_dir(dataset, feature, key), RETIRED_FOLDER, f"{shard}.{stamp}.json")
        self.write_json(retired, {"reason": reason, "retired": stamp, "manifest": current.decode("utf-8", "replace")})
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        try:
            self.fs.rm_file(self._verified_path(dataset, feature, key, shard))
        except FileNotFoundError:
            pass
        return True

    def collect_garbage(self, dataset: str, feature: str, key: str,
                        grace_seconds: float = GARBAGE_GRACE_SECONDS) -> list[str]:
        """Remove the files of attempts that never committed (a writer died or lost) and are older
        than ``grace_seconds``; return what was removed. Committed shards' files are never touched."""
        directory = self.key_dir(dataset, feature, key)
        listing = self._listing(directory)
        referenced = set()
        for shard in self.committed_shards(dataset, feature, key):
            try:
                manifest = self.shard_manifest(dataset, feature, key, shard)
            except ShardCorruptError:
                # An unreadable manifest may still name files: keep this shard's files until it is
                # retired (verify --repair), when they become garbage like any other attempt.
                referenced.update({f"{shard}.tar", f"{shard}.zarr", f"{shard}."})
                continue
            referenced.update(posixpath.basename(p) for p in self.shard_files(dataset, feature, key, shard, manifest))
        newest: dict[str, float] = {}
        for path, info in listing.items():
            relative = posixpath.relpath(path, directory)
            top = relative.split("/")[0]
            if top in (RETIRED_FOLDER, VERIFIED_FOLDER) or top.endswith(".json"):
                continue
            if not (top.endswith(".tar") or top.endswith(".zarr") or ".tmp-" in top):
                continue
            if top in referenced or any(top.startswith(r) for r in referenced if r.endswith(".")):
                continue
            newest[top] = max(newest.get(top, 0.0), modified_time(info))
        removed = []
        cutoff = time.time() - grace_seconds
        for top, modified in sorted(newest.items()):
            if modified <= cutoff:
                self._discard(posixpath.join(directory, top))
                removed.append(posixpath.join(directory, top))
        return removed

    def _listing(self, directory: str) -> dict[str, dict]:
        try:
            return self.fs.find(directory, detail=True)
        except FileNotFoundError:
            return {}

    def _stamp(self, dataset, feature, key, shard, manifest, listing) -> str:
        """Size and mtime/ETag of every file of a shard: what 'unchanged since verified' compares."""
        tar_path, zarr_path = self.shard_files(dataset, feature, key, shard, manifest)
        parts = []
        for path, info in sorted(listing.items()):
            if path == tar_path or path.startswith(zarr_path + "/"):
                marker = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
                parts.append([posixpath.relpath(path, posixpath.dirname(tar_path)), info.get("size"), str(marker)])
        return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:32] if parts else ""

    def _verified_path(self, dataset, feature, key, shard) -> str:
        return posixpath.join(self.key_dir(dataset, feature, key), VERIFIED_FOLDER, f"{check_name(shard, 'shard')}.json")

    def _verified_stamp(self, dataset, feature, key, shard) -> str:
        try:
            return str(self.read_json(self._verified_path(dataset, feature, key, shard)).get("stamp", ""))
        except (FileNotFoundError, ValueError, AttributeError):
            return ""

    # ---- snapshots ---------------------------------------------------------------------------
    def snapshot(self, dataset: str, manifest: str | None = None) -> tuple[str | None, list[str] | None]:
        """(clip-manifest version, its shard names) that a read covers: the given version or the
        current one; (None, None) when the dataset has no clip manifest (shards written directly)."""
        # The ledger's format belongs to stages.ingest.manifest; imported here, where it is used,
        # because that module builds on this one.
        from stages.ingest.manifest import load_manifest

        check_name(dataset, "dataset")
        clips = load_manifest(self, dataset, manifest)
        if clips is None:
            if manifest is not None:
                raise StoreError(f"dataset {dataset!r} has no clip manifest {manifest!r} in {self.url_root!r}")
            return None, None
        return clips.digest(), sorted(clips.by_shard())

    def feature_keys(self, dataset: str, feature: str) -> list[str]:
        """Feature keys that hold at least one committed shard, most recently catalogued first."""
        directory = self.path(check_name(dataset, "dataset"), check_name(feature, "feature"))
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []
        keys = []
        for entry in entries:
            key = posixpath.basename(entry["name"].rstrip("/"))
            if entry.get("type") == "directory" and self.committed_shards(dataset, feature, key):
                keys.append(key)
        catalog = {c["feature_key"]: c.get("updated", "") for c in self.catalog(dataset, feature)}
        return sorted(keys, key=lambda k: catalog.get(k, ""), reverse=True)

    def resolve_key(self, dataset: str, feature: str, key: str | None, shards: Sequence[str] | None = None) -> str:
        """The named key, else the only key that holds every shard of ``shards`` (every key when
        None). Several complete keys are an error naming them: a read never switches keys silently."""
        if key is not None:
            return check_name(key, "feature key")
        keys = self.feature_keys(dataset, feature)
        if not keys:
            raise StoreError(f"no {feature!r} features for dataset {dataset!r} in {self.url_root!r}")
        if shards is not None:
            keys = [k for k in keys if set(shards) <= set(self.committed_shards(dataset, feature, k))]
            if not keys:
                raise StoreError(f"no {feature!r} key of dataset {dataset!r} holds every shard of its current clip "
                                 "manifest: run refresh_features, or pass manifest= an older version")
        if len(keys) > 1:
            catalog = {c["feature_key"]: c.get("params", {}) for c in self.catalog(dataset, feature)}
            named = "; ".join(f"{k} {canonical_json(catalog.get(k, {}))[:80]}" for k in keys[:4])
            raise StoreError(f"dataset {dataset!r} has {len(keys)} {feature!r} keys: pass key= one of {named}")
        return keys[0]

    def _read_plan(self, dataset: str, feature: str, key: str | None, shards: Iterable[str] | None,
                   manifest: str | None) -> tuple[str, list[str], str | None]:
        """(key, shards, clip-manifest version) of a read (see read_arrays)."""
        if shards is not None:
            shard_list = sorted(shards)
            return self.resolve_key(dataset, feature, key, shard_list), shard_list, manifest
        version, shard_list = self.snapshot(dataset, manifest)
        key = self.resolve_key(dataset, feature, key, shard_list)
        if shard_list is None:
            return key, self.committed_shards(dataset, feature, key), None
        missing = sorted(set(shard_list) - set(self.committed_shards(dataset, feature, key)))
        if missing:
            raise StoreError(f"{feature!r} key {key} lacks {len(missing)} of the {len(shard_list)} shards of clip "
                             f"manifest {version} of {dataset!r} (e.g. {missing[0]}): run refresh_features")
        return key, shard_list, version

    def read_arrays(
        self,
        dataset: str,
        feature: str,
        key: str | None = None,
        *,
        shards: Iterable[str] | None = None,
        names: Iterable[str] | None = None,
        manifest: str | None = None,
        verify: bool = True,
    ) -> FeatureTable:
        """Rows of one feature key as numpy arrays (from the zarr shards), with clip ids.

        Without ``shards`` the read is a snapshot: the shards of clip-manifest version
        ``manifest`` (default: the current one), so a changed or removed clip's old shard is not
        read beside its new one. ``key=None`` takes the only key complete for that version and
        fails naming the keys when there are several. Every array is verified (``verify``).
        """
        key, shard_list, version = self._read_plan(dataset, feature, key, shards, manifest)
        wanted = list(names) if names is not None else None
        clip_ids: list[str] = []
        parts: dict[str, list[np.ndarray]] = {}
        for shard in shard_list:
            committed, arrays = self.read_shard_arrays(dataset, feature, key, shard, names=wanted, verify=verify)
            if not committed["rows"]:
                continue
            clip_ids.extend(committed["clip_ids"])
            for name, data in arrays.items():
                parts.setdefault(name, []).append(data)
        arrays = {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}
        return FeatureTable(clip_ids=clip_ids, arrays=arrays, feature_key=key, shards=list(shard_list), manifest=version)

    def shard_urls(self, dataset: str, feature: str, key: str | None = None, *, manifest: str | None = None) -> list[str]:
        """URLs of the tar files of a snapshot (see read_arrays), in shard order."""
        key, shard_list, _ = self._read_plan(dataset, feature, key, None, manifest)
        return [self.url(self.shard_files(dataset, feature, key, s, self.shard_manifest(dataset, feature, key, s))[0])
                for s in shard_list]

    def webdataset(
        self,
        dataset: str,
        feature: str,
        key: str | None = None,
        *,
        shuffle: int = 0,
        seed: int = 0,
        manifest: str | None = None,
        verify: bool = True,
    ):
        """A WebDataset pipeline over a snapshot's tar shards (see read_arrays), decoded to numpy.

        Shards are split by node (torch.distributed rank) and by DataLoader worker, so each sample
        comes once per epoch however many workers and nodes read. Each tar is read whole and
        checked against its manifest before a sample is yielded. The pipeline's ``feature_key``,
        ``manifest`` and ``shards`` say what it reads. Works in forked and spawned workers, local
        and on S3 (each worker opens its own filesystem). Samples carry the tar's members only;
        ClipDataset yields captions, labels, splits and several features per clip.
        """
        import webdataset as wds
        from webdataset import tariterators

        key, shard_list, version = self._read_plan(dataset, feature, key, None, manifest)
        sources = [f"{dataset}/{feature}/{key}/{s}" for s in shard_list]
        stages_: list[Any] = [wds.SimpleShardList(sources)]
        if shuffle:
            stages_.append(wds.shuffle(len(sources), seed=seed))  # same order in every worker: split below
        stages_ += [
            wds.split_by_node,
            wds.split_by_worker,
            VerifiedTarOpener(self, verify),
            tariterators.tar_file_expander,
            tariterators.group_by_keys,
        ]
        if shuffle:
            stages_.append(wds.shuffle(shuffle, seed=seed))
        stages_.append(wds.decode("rgb8"))
        pipeline = wds.DataPipeline(*stages_)
        pipeline.feature_key, pipeline.manifest, pipeline.shards = key, version, list(shard_list)
        return pipeline

    def quarantined(self, dataset: str, feature: str, key: str | None = None, *,
                    manifest: str | None = None) -> list[dict]:
        """The clips of a snapshot (see read_arrays) that this feature quarantined, each
        ``{"id", "reason", "shard"}``; the clip manifest's own rejections are in its header."""
        key, shard_list, _ = self._read_plan(dataset, feature, key, None, manifest)
        manifests = self.shard_manifests(dataset, feature, key, shard_list)
        return [dict(q, shard=shard) for shard in shard_list for q in manifests[shard].get("quarantined", [])]

    def stored_keys(self, dataset: str | None = None, feature: str | None = None) -> list[tuple[str, str, str]]:
        """(dataset, feature, key) of every key folder in the store, catalogued or not."""
        def folders(path: str) -> list[str]:
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
            names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
            return sorted(n for n in names if is_safe_name(n) and not n.startswith("_"))

        found = []
        for ds in [check_name(dataset, "dataset")] if dataset else folders(self.root):
            if ds == "catalog":
                continue
            for feat in [check_name(feature, "feature")] if feature else folders(self.path(ds)):
                if feat == "clip_manifest":
                    continue
                found += [(ds, feat, key) for key in folders(self.path(ds, feat))]
        return found

    # ---- catalog -----------------------------------------------------------------------------
    def update_catalog(
        self,
        dataset: str,
        feature: str,
        key: str,
        *,
        params: Mapping[str, Any],
        code_version: str,
        input_keys: Sequence[str] = (),
        shards: Sequence[str] | None = None,
    ) -> dict:
        """Summarise one feature key (shards, rows, bytes) into the catalog and return the entry.

        ``shards`` names the shards of the current clip manifest; the entry also counts every
        committed shard of the key (older manifests' shards stay readable).
        """
        committed = self.committed_shards(dataset, feature, key)
        manifests = []
        for shard in committed:
            try:
                manifests.append(self.shard_manifest(dataset, feature, key, shard))
            except ShardCorruptError:  # counted once repaired; verify_shards names it
                pass
        entry = {
            "format": STORE_FORMAT,
            "dataset": dataset,
            "feature": feature,
            "feature_key": key,
            "params": dict(params),
            "code_version": code_version,
            "input_keys": list(input_keys),
            "shards_committed": len(committed),
            "current_shards": list(shards) if shards is not None else committed,
            "rows": int(sum(m["rows"] for m in manifests)),
            "quarantined": int(sum(len(m.get("quarantined", [])) for m in manifests)),
            "bytes": int(sum(m["files"]["tar"]["bytes"] + m["files"]["zarr"]["bytes"] for m in manifests)),
            "url": self.url(self.key_dir(dataset, feature, key)),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
        }
        self.write_json(self.path("catalog", dataset, feature, f"{key}.json"), entry)
        return entry

    def catalog(self, dataset: str | None = None, feature: str | None = None) -> list[dict]:
        """Every catalog entry (optionally of one dataset / feature), newest first."""
        pattern = self.path("catalog", dataset or "*", feature or "*", "*.json")
        entries = [self.read_json(p) for p in self.fs.glob(pattern) if ".tmp-" not in p]
        return sorted(entries, key=lambda e: e.get("updated", ""), reverse=True)


def _array_problem(data: np.ndarray, info: Mapping[str, Any]) -> str:
    """Why a read array is not the one the manifest committed ('' when it is)."""
    if list(data.shape) != list(info["shape"]):
        return f"has shape {list(data.shape)}, the manifest says {info['shape']}"
    if str(data.dtype) != info["dtype"]:
        return f"has dtype {data.dtype}, the manifest says {info['dtype']}"
    if hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() != info["sha256"]:
        return "does not match its sha256"
    return ""


def modified_time(info: Mapping[str, Any]) -> float:
    """Modification time (epoch seconds) of a listed file, local or S3."""
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return float(value)


class VerifiedTarOpener:
    """WebDataset stage: ``{"url": "<dataset>/<feature>/<key>/<shard>"}`` -> that shard's tar,
    read whole and verified. Picklable (spawned DataLoader workers); the store opens its own
    filesystem in each process."""

    def __init__(self, store: "FeatureStore", verify: bool = True):
        self.store, self.verify = store, verify

    def __call__(self, sources):
        for source in sources:
            dataset, feature, key, shard = source["url"].split("/")
            manifest = self.store.shard_manifest(dataset, feature, key, shard)
            data = self.store.read_shard_tar(dataset, feature, key, shard, manifest=manifest, verify=self.verify)
            tar_path, _ = self.store.shard_files(dataset, feature, key, shard, manifest)
            yield dict(url=self.store.url(tar_path), stream=io.BytesIO(data))


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def catalog_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """The catalog as a text table (``xmodal store ls`` and ``python -m stages.store`` print it)."""
    lines = [f"{'dataset':<16} {'feature':<20} {'key':<18} {'shards':>6} {'rows':>8} {'MB':>8}  params"]
    for e in entries:
        lines.append(
            f"{e['dataset']:<16} {e['feature']:<20} {e['feature_key']:<18} {e['shards_committed']:>6} "
            f"{e['rows']:>8} {e['bytes'] / 1e6:>8.1f}  {canonical_json(e['params'])}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stages.store [ROOT] [--dataset D] [--feature F]`: the catalog as a table (the same
    as `xmodal store ls`, for readers without the console script). The root and S3 options come from
    the environment as for the jobs (stages.core.settings.open_store); an unreachable endpoint, a
    missing bucket or missing credentials print one line and exit 2."""
    import argparse
    import sys

    from stages.core.settings import check_bucket, open_store, s3_problem

    parser = argparse.ArgumentParser(description="List what a feature store holds.")
    parser.add_argument("root", nargs="?", help="local path or s3://bucket/prefix (default: $XMODAL_STORE_ROOT)")
    parser.add_argument("--dataset")
    parser.add_argument("--feature")
    args = parser.parse_args(argv)
    try:
        store = open_store(args.root)
        check_bucket(store)
        print(catalog_table(store.catalog(dataset=args.dataset, feature=args.feature)))
    except Exception as exc:
        message = str(exc) if isinstance(exc, StoreError) else s3_problem(exc)
        if message is None:
            raise
        print(f"stages.store: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
