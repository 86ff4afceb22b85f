"""How every asset of this project is declared: one dataset partition, a group, kinds, one-line failures.

    @dataset_asset(group="features", kinds=("numpy",), code_version="mel_spectrograms-1", description="...")
    def mel_spectrograms(context, config: MelConfig, clip_manifest: ManifestRef, ...): ...

``dataset_asset`` wraps ``dagster.asset``: the asset is partitioned by dataset (assets.datasets),
sits in its group (jobs select groups, never hand-kept lists), and an expected failure raised
inside it (``stages.core.errors.expected_errors()``: bad config, unusable source, store problems)
becomes a one-line ``Failure`` naming the fix; any other exception is a bug and keeps its
traceback. It also refuses inputs of another dataset than the run's, so a mis-wired run fails
loudly instead of computing one dataset's features into another. ``feature_asset`` builds a
per-shard feature asset (and its standard check) from a registered ShardFeature.
"""

import base64
import functools
import warnings
from collections import Counter
from typing import Any, Callable

import numpy as np
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetExecutionContext, AssetIn, DataVersion, Failure,
                     MetadataValue, Output, RetryPolicy, asset, asset_check)

from assets.datasets import DATASETS
from assets.run_config import CONFIG_CHECKS, builds_stage_params, config_type_of, register_config_check
from assets.resources import ComputeResource, DeviceResource, FeatureStoreResource
from stages.core import refs
from stages.core.errors import ConfigError, expected_errors
from stages.core.refs import FeatureRef, ManifestRef
from stages.core.store import FeatureStore, feature_key, unreachable_reason
from stages.features import base as feature_base
from stages.features.base import registered_feature
from stages.ingest.manifest import load_manifest

# Output(data_version=...) is marked beta; it is how the UI shows which features are stale.
warnings.filterwarnings("ignore", message=r"Parameter `data_version`")

GROUPS = ("ingest", "features", "towers", "embeddings", "diffgap", "vae", "generation", "study", "transfer", "cmmd", "mmldm")
# Transient storage errors (an S3 hiccup) are worth one more try; everything committed is reused.
SHARD_RETRY = RetryPolicy(max_retries=1, delay=5)
QUARANTINE_ROWS_SHOWN = 50


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_datasets(context, values: dict[str, Any]) -> None:
    """Every input ref must belong to the run's dataset (its partition)."""
    dataset = context.partition_key if context.has_partition_key else None
    if dataset is None:
        return
    for name, value in values.items():
        if type(value).__name__ not in refs.REF_TYPES:  # only refs carry data of a dataset (not resources)
            continue
        other = value.dataset
        if other != dataset:
            raise Failure(f"input {name} belongs to dataset {other!r}, but this run is for {dataset!r}: "
                          "re-materialize it for this dataset")


def _translated(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        context = args[0] if args else kwargs.get("context")
        if context is not None and hasattr(context, "has_partition_key"):
            _check_datasets(context, kwargs)
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise Failure(f"bad {fn.__name__} config: {one_line(exc)}", allow_retries=False) from None
        except expected_errors() as exc:  # the user must fix something: retrying cannot help
            raise Failure(one_line(exc), allow_retries=False) from None
        except Failure as exc:  # a deliberate one-line failure, likewise; transient errors stay retryable
            if exc.allow_retries:
                raise Failure(exc.description, metadata=exc.metadata, allow_retries=False) from None
            raise
        except Exception as exc:
            reason = unreachable_reason(exc)
            if reason is None:
                raise
            # The S3 endpoint went away mid-step: one line (and the step's retry, as it may come back).
            raise Failure(f"cannot reach the S3 endpoint ({reason}): is the server up? check "
                          "XMODAL_S3_ENDPOINT_URL") from None

    return wrapped


def dataset_asset(*, group: str, code_version: str, description: str, kinds: tuple[str, ...] = (), **kwargs):
    """``@asset`` partitioned by dataset, in ``group``, with one-line failures (see the module docstring)."""
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")

    def decorator(fn: Callable):
        config_type = config_type_of(fn)
        name = kwargs.get("name") or fn.__name__
        if config_type is not None and name not in CONFIG_CHECKS:
            register_config_check(name, builds_stage_params(config_type))
        return asset(partitions_def=DATASETS, group_name=group, kinds=set(kinds), code_version=code_version,
                     description=description, **kwargs)(_translated(fn))

    return decorator


def dataset_check(*, asset, description: str, **kwargs):
    """``@asset_check`` with the same one-line failures as the assets."""

    def decorator(fn: Callable[..., AssetCheckResult]):
        return asset_check(asset=asset, description=description, partitions_def=DATASETS, **kwargs)(_translated(fn))

    return decorator


# ---- the per-shard feature machinery every feature asset shares ------------------------------------

def quarantine_markdown(quarantined: list[dict]) -> str:
    if not quarantined:
        return "No clip was quarantined."
    lines = ["| clip | shard / source | reason |", "| --- | --- | --- |"]
    for entry in quarantined[:QUARANTINE_ROWS_SHOWN]:
        reason = str(entry.get("reason", "")).replace("|", "/")
        lines.append(f"| {entry.get('id', '')} | {entry.get('shard', entry.get('source', ''))} | {reason} |")
    if len(quarantined) > QUARANTINE_ROWS_SHOWN:
        lines.append(f"| ... | | {len(quarantined) - QUARANTINE_ROWS_SHOWN} more in the shard manifests |")
    return "\n".join(lines)


def preview_markdown(png: bytes) -> MetadataValue:
    return MetadataValue.md(f"![preview](data:image/png;base64,{base64.b64encode(png).decode()})")


def _run_metadata(store: FeatureStore, run: feature_base.FeatureRun) -> dict:
    return {
        "feature_key": run.key,
        "store_url": MetadataValue.path(store.url(store.key_dir(run.dataset, run.feature, run.key))),
        "shards_total": run.shards_total,
        "shards_new": run.shards_new,
        "shards_reused": run.shards_reused,
        "clips_ok": run.clips_ok,
        "clips_quarantined": run.clips_quarantined,
        "clips_computed": run.clips_computed,
        "throughput_clips_per_s": MetadataValue.float(round(run.clips_per_second, 2)),
        "seconds": MetadataValue.float(round(run.seconds, 3)),
        "quarantine": MetadataValue.md(quarantine_markdown(run.quarantined)),
        "quarantined_by_reason": MetadataValue.json(dict(Counter(q.get("reason", "") for q in run.quarantined))),
        "shards_retired": len(run.retired),
    }


def quarantine_summary(quarantined: list[dict]) -> str:
    """'3 quarantined: 2 audio too short ..., 1 no audio stream' (reasons by count), '' for none."""
    counts = Counter(q.get("reason", "") for q in quarantined)
    if not counts:
        return ""
    return f"{len(quarantined)} quarantined: " + ", ".join(f"{n} {reason}" for reason, n in counts.most_common(5)) + (
        f", and {len(counts) - 5} other reasons" if len(counts) > 5 else "")


def compute_feature(
    context, store: FeatureStore, dataset: str, manifest_digest: str, feature: feature_base.ShardFeature, key: str,
    params: dict, compute: ComputeResource, device: str = "cpu", input_keys: tuple[str, ...] = (),
) -> tuple[feature_base.FeatureRun, refs.FeatureRef, dict, tuple[str, ...]]:
    """What every per-shard feature asset does: compute the key's missing shards of the manifest
    (lazily starting the cluster), log new/reused, and return the run, its ref, the standard
    metadata (to which the asset adds its own) and the shards this run wrote (what previews show:
    reused shards were shown when they were new)."""
    manifest = load_manifest(store, dataset, manifest_digest)
    before = set(store.committed_shards(dataset, feature.name, key))
    run = feature_base.run_feature(store, manifest, feature.name, key, params, feature.code_version, feature.compute_shard,
                                   _LazyExecutor(compute), input_keys=input_keys, device=device,
                                   worker_threads=compute.worker_threads, log=context.log.info)
    for line in run.retired:
        context.log.warning(f"{feature.name} {run.key}: shard {line}; retired and computed again")
    context.log.info(f"{feature.name} {run.key}: {run.shards_new} new / {run.shards_reused} reused shards"
                     + (f"; {quarantine_summary(run.quarantined)}" if run.quarantined else ""))
    ref = refs.FeatureRef(dataset, feature.name, run.key, manifest_digest, tuple(run.shards))
    retired = {line.split(":", 1)[0] for line in run.retired}
    written = tuple(s for s in run.shards if s not in before or s in retired)
    return run, ref, _run_metadata(store, run), written


def data_version(run: feature_base.FeatureRun) -> DataVersion:
    return DataVersion(feature_key(run.feature, {"shards": run.shards}, "", [run.key]))


class _LazyExecutor:
    """Defers starting the compute resource's cluster until there is a shard to compute."""

    def __init__(self, compute: ComputeResource):
        self.compute = compute

    def map(self, fn, items):
        items = list(items)
        return self.compute.executor().map(fn, items) if items else []

    def map_unordered(self, fn, items):  # results as shards complete, for progress lines
        items = list(items)
        return feature_base.results_as_completed(self.compute.executor(), fn, items) if items else iter(())



def new_shards(store: FeatureStore, ref: refs.FeatureRef) -> tuple[list[str], list[str]]:
    """(shards new since they last verified, problems) of a feature ref, verifying the new ones.

    A shard that ``run_feature`` reused was verified there (its ``_verified`` stamp matches its
    files), so a check looks only at what this materialization wrote, or at a shard whose files
    changed since: no-op work does not grow with the dataset. Verifying stamps what it checked.
    """
    checks = store.verify_shards(ref.dataset, ref.feature, ref.key, ref.shards)
    problems = [f"{c.shard}: {'; '.join(c.problems)}" for c in checks if not c.ok]
    problems += [f"{s}: not committed" for s in sorted(set(ref.shards) - {c.shard for c in checks})]
    return [c.shard for c in checks if c.ok and not c.skipped], problems


def check_feature(store: FeatureStore, ref: refs.FeatureRef, name: str, expected_shape,
                  fresh: tuple[list[str], list[str]] | None = None) -> AssetCheckResult:
    """Every shard verifies against its manifest (checksums); the new ones (``new_shards``, or
    ``fresh`` when the caller already has them) also for shapes, finiteness, and rows +
    quarantined == clips of the manifest, shard by shard."""
    manifest = load_manifest(store, ref.dataset, ref.manifest_digest)
    by_shard = manifest.by_shard()
    checked, problems = fresh if fresh is not None else new_shards(store, ref)
    problems, rows, quarantined = list(problems), 0, 0
    for shard in checked:
        committed = store.shard_manifest(ref.dataset, ref.feature, ref.key, shard)
        table = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=[shard], names=[name])
        rows += len(table)
        quarantined += len(committed.get("quarantined", []))
        if len(table) + len(committed.get("quarantined", [])) != len(by_shard[shard]):
            problems.append(f"{shard}: {len(table)} rows + {len(committed['quarantined'])} quarantined != {len(by_shard[shard])} clips")
        if not len(table):
            continue
        values = table.arrays[name]
        if tuple(values.shape[1:]) != tuple(expected_shape):
            problems.append(f"{shard}: shape {values.shape[1:]} != {tuple(expected_shape)}")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            problems.append(f"{shard}: {int((~np.isfinite(values)).sum())} NaN/Inf values")
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        description="; ".join(problems[:10]) or (
            f"{len(checked)} new shards: checksums, shapes, finiteness and row counts match the clip manifest; "
            f"{len(ref.shards) - len(checked)} reused shards verified unchanged"),
        metadata={"rows": rows, "quarantined": quarantined, "clips_in_manifest": len(manifest.clips),
                  "shards_checked": len(checked), "shards_reused": len(ref.shards) - len(checked), "problems": len(problems)},
    )


def feature_asset(feature_name: str, *, config_type: type | None, params: Callable[[Any, dict], Any],
                  report: Callable | None = None, device: bool = False, name: str | None = None,
                  group: str | None = None):
    """The asset of one registered per-shard feature.

    ``params(config, inputs)`` builds the feature's params object (with ``.params()`` and
    ``.key(*input_keys)``) from the run config and the input feature refs; ``report(context,
    store, ref, metadata, inputs, params, written)`` adds the feature's own metadata (previews of
    ``written``, the shards this run wrote). The asset computes the missing shards through
    ``compute_feature`` and returns a FeatureRef. ``name`` / ``group``: a second asset of the same
    feature (other parameters, another key) under its own name, in its own group's jobs.
    """
    feature = registered_feature(feature_name)
    inputs = tuple(feature.inputs)
    if config_type is not None:  # its params are built from the config alone (inputs give only keys)
        register_config_check(name or feature.name, builds_stage_params(config_type, lambda c: params(c, {})))

    def body(context: AssetExecutionContext, config, clip_manifest: ManifestRef, feature_store: FeatureStoreResource,
             compute: ComputeResource, device: DeviceResource, **refs) -> Output[FeatureRef]:
        store = feature_store.writable_store()
        built = params(config, refs)
        input_keys = tuple(refs[name].key for name in inputs)
        run, ref, metadata, written = compute_feature(
            context, store, clip_manifest.dataset, clip_manifest.digest, feature, built.key(*input_keys), built.params(),
            compute, device.device() if device else "cpu", input_keys=input_keys,
        )
        for name in inputs:
            metadata[f"{name}_key"] = refs[name].key
        if report is not None:
            report(context, store, ref, metadata, refs, built, written)
        return Output(ref, data_version=data_version(run), metadata=metadata)

    if config_type is None:
        real_body = body

        def body(context: AssetExecutionContext, clip_manifest: ManifestRef, feature_store: FeatureStoreResource,  # noqa: F811
                 compute: ComputeResource, device: DeviceResource, **refs) -> Output[FeatureRef]:
            return real_body(context, None, clip_manifest, feature_store, compute, device, **refs)
    else:
        body.__annotations__["config"] = config_type
    body.__name__ = body.__qualname__ = name or feature.name
    return dataset_asset(
        name=name or feature.name, group=group or feature.group, kinds=feature.kinds, description=feature.description,
        code_version=f"{feature.name}-{feature.code_version}", ins={**{n: AssetIn(n) for n in inputs}},
        retry_policy=SHARD_RETRY,
    )(body)
