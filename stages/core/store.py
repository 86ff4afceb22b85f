"""Content-addressed feature store: WebDataset tar + Zarr v3 + JSON manifest per shard.

Layout under one root (a local path or ``s3://bucket/prefix``, through fsspec)::

    <root>/<dataset>/clip_manifest/<hash>.jsonl + latest.json   the clip ledger (see stages.ingest.manifest)
    <root>/<dataset>/<feature>/<feature_key>/<shard>.tar        one WebDataset sample per clip
    <root>/<dataset>/<feature>/<feature_key>/<shard>.zarr       arrays, first axis = clip
    <root>/<dataset>/<feature>/<feature_key>/<shard>.json       manifest, written last = the commit
    <root>/catalog/<dataset>/<feature>/<feature_key>.json       what exists, for other teams

A shard is visible only once its ``.json`` manifest exists; it is written after the tar and the
zarr are complete, so a crash leaves nothing a reader will pick up. Committed shards are never
rewritten: a changed input gives a new shard name or a new feature key beside the old one.

Usable without Dagster::

    from stages.core.store import FeatureStore
    store = FeatureStore("/data/features")
    table = store.read_arrays("demo", "mel_spectrograms")      # newest key
    table.clip_ids, table.arrays["mel"]
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import platform
import posixpath
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import numpy as np

from stages.core.errors import XmodalError
from stages.core.ids import check_name

MANIFEST_FORMAT = 1
ZARR_CHUNK_CLIPS = 32


class StoreError(XmodalError, RuntimeError):
    """The store cannot be used as configured (unreachable, unwritable, missing feature)."""


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
    """Arrays of one feature with the clip id of every row."""

    clip_ids: list[str]
    arrays: dict[str, np.ndarray]
    feature_key: str
    shards: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clip_ids)


class FeatureStore:
    """Reads and writes feature shards under one root through fsspec."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        self.url_root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        if fsspec.core.split_protocol(self.url_root)[0] not in (None, "file", "local") and "::" not in self.url_root:
            # Shards are committed by other processes (Dask workers) and by zarr's own instance: a
            # cached listing would hide them from committed_shards / exists / feature_keys.
            self.storage_options.setdefault("use_listings_cache", False)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url_root, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open feature store {self.url_root!r}: {exc}") from exc
        self.is_local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"FeatureStore({self.url_root!r})"

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
        """Fail fast, with one line, when the root cannot be written."""
        probe = self.path("_tmp", f"probe-{uuid.uuid4().hex}")
        try:
            self._makedirs(self.path("_tmp"))
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:  # any backend error means the same thing to the user
            raise StoreError(f"feature store {self.url_root!r} is not writable: {type(exc).__name__}: {exc}") from exc

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
        return self.read_json(self.shard_manifest_path(dataset, feature, key, shard))

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
        """Write one shard (tar, zarr, then the manifest that commits it); return the manifest.

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
        tar_path = posixpath.join(directory, f"{shard}.tar")
        zarr_path = posixpath.join(directory, f"{shard}.zarr")
        manifest_path = posixpath.join(directory, f"{shard}.json")
        if self.fs.exists(manifest_path):
            # Committed shards are never rewritten: readers may be using them, and a crash while
            # rewriting would leave the old manifest over new, half-written data.
            return self.read_json(manifest_path)
        self._makedirs(directory)

        # WebDataset tar, built in memory (shards are tens of MB) and written in one piece.
        encodings = dict(tar_encodings or {})
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as writer:
            for row, clip_id in enumerate(clip_ids):
                sample: dict[str, Any] = {"__key__": clip_id}
                for name, array in arrays.items():
                    ext = encodings.get(name, "npy")
                    sample[f"{name}.{ext}"] = array[row]
                if sample_meta is not None:
                    sample["json"] = dict(sample_meta[row])
                writer.write(sample)
        tar_bytes = buffer.getvalue()
        self.fs.pipe_file(tar_path, tar_bytes)

        array_info = self._write_zarr(zarr_path, clip_ids, arrays)

        committed = dict(manifest)
        committed.update(
            format=MANIFEST_FORMAT,
            dataset=dataset,
            feature=feature,
            feature_key=key,
            shard=shard,
            rows=rows,
            clip_ids=list(clip_ids),
            arrays=array_info,
            files={
                "tar": {"bytes": len(tar_bytes), "sha256": hashlib.sha256(tar_bytes).hexdigest()},
                "zarr": {"bytes": int(sum(info["nbytes_stored"] for info in array_info.values()))},
            },
            versions=library_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        self.write_json(manifest_path, committed)
        return committed

    def _zarr_store(self, path: str):
        import zarr

        if self.is_local:
            return zarr.storage.LocalStore(path)
        return zarr.storage.FsspecStore.from_url(self.url(path), storage_options=self.storage_options)

    def _write_zarr(self, path: str, clip_ids: Sequence[str], arrays: Mapping[str, np.ndarray]) -> dict:
        import zarr

        if self.fs.exists(path):  # leftovers of a crashed, uncommitted attempt
            self.fs.rm(path, recursive=True)
        group = zarr.open_group(store=self._zarr_store(path), mode="w")
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

    # ---- reading -----------------------------------------------------------------------------
    def feature_keys(self, dataset: str, feature: str) -> list[str]:
        """Feature keys that hold at least one committed shard, newest first."""
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

    def resolve_key(self, dataset: str, feature: str, key: str | None) -> str:
        if key is not None:
            return check_name(key, "feature key")
        keys = self.feature_keys(dataset, feature)
        if not keys:
            raise StoreError(f"no {feature!r} features for dataset {dataset!r} in {self.url_root!r}")
        return keys[0]

    def read_arrays(
        self,
        dataset: str,
        feature: str,
        key: str | None = None,
        *,
        shards: Iterable[str] | None = None,
        names: Iterable[str] | None = None,
    ) -> FeatureTable:
        """All rows of one feature key as numpy arrays (from the zarr shards), with clip ids.

        ``key=None`` takes the most recently updated key. ``shards`` limits the read (the
        default is every committed shard).
        """
        import zarr

        key = self.resolve_key(dataset, feature, key)
        shard_list = sorted(shards) if shards is not None else self.committed_shards(dataset, feature, key)
        wanted = list(names) if names is not None else None
        clip_ids: list[str] = []
        parts: dict[str, list[np.ndarray]] = {}
        directory = self.key_dir(dataset, feature, key)
        for shard in shard_list:
            manifest = self.shard_manifest(dataset, feature, key, shard)
            if not manifest["rows"]:
                continue
            group = zarr.open_group(store=self._zarr_store(posixpath.join(directory, f"{shard}.zarr")), mode="r")
            clip_ids.extend(manifest["clip_ids"])
            for name in wanted or list(manifest["arrays"]):
                parts.setdefault(name, []).append(group[name][...])
        arrays = {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}
        return FeatureTable(clip_ids=clip_ids, arrays=arrays, feature_key=key, shards=list(shard_list))

    def shard_urls(self, dataset: str, feature: str, key: str | None = None) -> list[str]:
        key = self.resolve_key(dataset, feature, key)
        directory = self.key_dir(dataset, feature, key)
        return [self.url(posixpath.join(directory, f"{s}.tar")) for s in self.committed_shards(dataset, feature, key)]

    def webdataset(
        self,
        dataset: str,
        feature: str,
        key: str | None = None,
        *,
        shuffle: int = 0,
        seed: int = 0,
    ):
        """A WebDataset pipeline over the committed tar shards, samples decoded to numpy.

        Tars are opened through fsspec (webdataset 1.0.2 has no s3 handler), so the same call
        works for local and s3:// roots.
        """
        import webdataset as wds
        from webdataset import tariterators

        urls = self.shard_urls(dataset, feature, key)
        fs = self.fs
        is_local = self.is_local

        def open_with_fsspec(source):
            for sample in source:
                path = sample["url"] if is_local else fs._strip_protocol(sample["url"])
                with fs.open(path, "rb") as stream:
                    yield dict(url=sample["url"], stream=stream)

        stages_: list[Any] = [wds.SimpleShardList(urls)]
        if shuffle:
            stages_.append(wds.shuffle(len(urls), seed=seed))
        stages_ += [
            open_with_fsspec,
            tariterators.tar_file_expander,
            tariterators.group_by_keys,
        ]
        if shuffle:
            stages_.append(wds.shuffle(shuffle, seed=seed))
        stages_.append(wds.decode("rgb8"))
        return wds.DataPipeline(*stages_)

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
        manifests = [self.shard_manifest(dataset, feature, key, s) for s in committed]
        entry = {
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
    """`python -m stages.store ROOT [--dataset D] [--feature F]`: the catalog as a table (the same
    as `xmodal store ls`, for readers without the console script)."""
    import argparse

    from stages.core.settings import storage_options_for

    parser = argparse.ArgumentParser(description="List what a feature store holds.")
    parser.add_argument("root", help="local path or s3://bucket/prefix")
    parser.add_argument("--dataset")
    parser.add_argument("--feature")
    args = parser.parse_args(argv)
    store = FeatureStore(args.root, storage_options_for(args.root))
    print(catalog_table(store.catalog(dataset=args.dataset, feature=args.feature)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
