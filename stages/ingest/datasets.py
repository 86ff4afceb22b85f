"""Which source each dataset of a store comes from, recorded in the store itself.

    <root>/<dataset>/source.json     {"kind", "path", "media_dir", "default_split", "demo_clips", ...}

A run of any dataset, on any machine, reads its source from here, so a dataset is usable by name
once registered (``xmodal dataset add``, or the first run of the environment's default dataset).
Storage options are not recorded (they may hold credentials): the machine that reads the source
supplies its own.
"""

from __future__ import annotations

import dataclasses
import posixpath

from stages.core.errors import DatasetError
from stages.core.ids import check_name
from stages.core.store import FeatureStore
from stages.ingest.sources import SOURCE_KINDS, SourceConfig

SOURCE_FILE = "source.json"
_RECORDED = ("kind", "path", "media_dir", "default_split", "demo_clips", "demo_seed", "confine_to_root")


def source_path(store: FeatureStore, dataset: str) -> str:
    return store.path(check_name(dataset, "dataset"), SOURCE_FILE)


def register_source(store: FeatureStore, dataset: str, config: SourceConfig) -> dict:
    """Record (or update) a dataset's source; returns what was written."""
    if config.kind not in SOURCE_KINDS:
        raise DatasetError(f"source kind {config.kind!r} is unknown: choose one of {', '.join(SOURCE_KINDS)}")
    document = {name: getattr(config, name) for name in _RECORDED}
    path = source_path(store, dataset)
    if not store.exists(path) or store.read_json(path) != document:
        store.write_json(path, document)
    return document


def registered_source(store: FeatureStore, dataset: str, storage_options: dict | None = None) -> SourceConfig | None:
    """The recorded source of a dataset, with this machine's storage options; None if unregistered."""
    path = source_path(store, dataset)
    if not store.exists(path):
        return None
    document = store.read_json(path)
    known = {f.name for f in dataclasses.fields(SourceConfig)}
    return SourceConfig(**{k: v for k, v in document.items() if k in known}, storage_options=dict(storage_options or {}))


def registered_datasets(store: FeatureStore) -> list[str]:
    """Names of every dataset with a recorded source, sorted."""
    found = store.fs.glob(posixpath.join(store.root, "*", SOURCE_FILE))
    return sorted(posixpath.basename(posixpath.dirname(p)) for p in found)
