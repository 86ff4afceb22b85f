"""Cached results (evaluation tables, ablations): computed once per key, reused while nothing changed.

A result is keyed like a feature (``stages.core.store.feature_key``: its name, its config, a code
version and the keys of its inputs: checkpoints, embedding features, the clip-manifest version) and
stored as one JSON document in the feature store::

    <root>/<dataset>/evaluations/<name>/<key>.json    {"value": ..., "sha256": ..., "provenance": ...}

``cached_result`` returns the stored value when the document reads and its value matches its
sha256; otherwise (missing, garbled, truncated, edited) it computes the value again and writes it.
A changed input or config is a new key, so it is computed; the old document stays for its key.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from stages.core.ids import check_name
from stages.core.store import FeatureStore, StoreError, canonical_json

RESULTS_FOLDER = "evaluations"
RESULT_FORMAT = 1


@dataclass
class CachedResult:
    value: Any
    key: str
    url: str
    reused: bool
    # Why a stored document was not used ("" when none was stored or it was reused).
    recomputed_because: str = ""


def result_path(store: FeatureStore, dataset: str, name: str, key: str) -> str:
    return posixpath.join(store.path(check_name(dataset, "dataset"), RESULTS_FOLDER, check_name(name, "result name")),
                          f"{check_name(key, 'result key')}.json")


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as a reader parses it back: JSON types, numpy scalars as numbers, key order kept
    (table columns follow it)."""
    return json.loads(json.dumps(value, default=_json_scalar))


def _json_scalar(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars in result rows
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"a result cannot hold {type(value).__name__}")


def load_result(store: FeatureStore, dataset: str, name: str, key: str) -> tuple[Any, str]:
    """(value, "") when the stored result reads and verifies; (None, why not) otherwise."""
    path = result_path(store, dataset, name, key)
    try:
        raw = store.fs.cat_file(path)
    except FileNotFoundError:
        return None, ""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"{store.url(path)} is not valid JSON ({exc})"
    if not isinstance(document, dict) or not {"value", "sha256", "key"} <= set(document):
        return None, f"{store.url(path)} is incomplete"
    if document["key"] != key or _digest(document["value"]) != document["sha256"]:
        return None, f"{store.url(path)} does not match its sha256"
    return document["value"], ""


def save_result(store: FeatureStore, dataset: str, name: str, key: str, value: Any, provenance: Mapping[str, Any]) -> str:
    """Write one result document (atomically: a reader sees the old or the new one); its URL."""
    path = result_path(store, dataset, name, key)
    value = _plain(value)  # the digest covers exactly what a reader will parse
    document = {
        "format": RESULT_FORMAT, "name": name, "key": key, "dataset": dataset, "provenance": _plain(dict(provenance)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "value": value, "sha256": _digest(value),
    }
    store.write_bytes(path, json.dumps(document, indent=1).encode())  # atomic: rename locally, one PUT on S3
    return store.url(path)


def cached_result(
    store: FeatureStore, dataset: str, name: str, key: str, compute: Callable[[], Any],
    provenance: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None,
) -> CachedResult:
    """The stored result ``name/key`` of ``dataset``, or ``compute()`` stored under that key.

    A stored document that does not read or verify is computed again (and said so in ``log``),
    never an error: it only costs the time of the computation.
    """
    try:
        value, problem = load_result(store, dataset, name, key)
    except StoreError as exc:  # an unreadable object (I/O error): recompute rather than fail the run
        value, problem = None, str(exc)
    url = store.url(result_path(store, dataset, name, key))
    if value is not None:
        if log:
            log(f"{name} {key}: reused the stored result ({url}); nothing it depends on changed")
        return CachedResult(value, key, url, True)
    if problem and log:
        log(f"{name} {key}: stored result unusable ({problem}); computing it again")
    value = _plain(compute())  # what a later reuse returns: JSON types (tuples -> lists)
    url = save_result(store, dataset, name, key, value, provenance or {})
    return CachedResult(value, key, url, False, problem)
