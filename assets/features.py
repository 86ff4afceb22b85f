"""Feature assets: clip_manifest -> mel_spectrograms -> audio_images, with their checks.

Each asset reads, calls a stage, writes, reports. Assets cover the whole dataset and compute
only the shards whose feature key is missing (see stages.features.run_feature).
"""


import base64
import warnings

import numpy as np
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Config,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    asset,
    asset_check,
)
from pydantic import Field

from assets.resources import ClipSourceResource, ComputeResource, DeviceResource, FeatureStoreResource
from stages.core import refs
from stages.features import base as feature_base
from stages.features import mel
from stages.ingest.manifest import build_manifest, load_manifest, save_manifest
from stages.core.preview import preview_png
from stages.features.spectral import DEFAULT_PRESET, PRESETS, get_preset
from stages.core.store import FeatureStore, feature_key

# Output(data_version=...) is marked beta; it is how the UI shows which features are stale.
warnings.filterwarnings("ignore", message=r"Parameter `data_version`")

PREVIEW_CLIPS = 4
QUARANTINE_ROWS_SHOWN = 50


class MelConfig(Config):
    preset: str = Field(default=DEFAULT_PRESET, description=f"Mel preset: {', '.join(sorted(PRESETS))}.")
    seconds: float = Field(default=4.0, description="Clip length in seconds; audio is padded/tiled or cropped to it.")
    min_seconds: float = Field(default=1.0, description="Clips with less audio than this are quarantined.")
    fit: str = Field(default="pad", description="How a short clip reaches `seconds`: 'pad' (zeros) or 'tile' (repeat).")
    silence_dbfs: float = Field(default=-60.0, description="Clips whose peak is below this level are quarantined as silent.")
    dtype: str = Field(default="float16", description="Stored dtype: float16 (error <= 0.004 in log-mel) or float32.")


class AudioImageConfig(Config):
    size: int = Field(default=64, description="Audio images are size x size RGB (MM-LDM uses the video frame size).")


def _quarantine_markdown(quarantined: list[dict]) -> str:
    if not quarantined:
        return "No clip was quarantined."
    lines = ["| clip | shard / source | reason |", "| --- | --- | --- |"]
    for entry in quarantined[:QUARANTINE_ROWS_SHOWN]:
        reason = str(entry.get("reason", "")).replace("|", "/")
        lines.append(f"| {entry.get('id', '')} | {entry.get('shard', entry.get('source', ''))} | {reason} |")
    if len(quarantined) > QUARANTINE_ROWS_SHOWN:
        lines.append(f"| ... | | {len(quarantined) - QUARANTINE_ROWS_SHOWN} more in the shard manifests |")
    return "\n".join(lines)


def _preview_markdown(png: bytes) -> MetadataValue:
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
        "quarantine": MetadataValue.md(_quarantine_markdown(run.quarantined)),
    }


def compute_feature(
    context, store: FeatureStore, dataset: str, manifest_digest: str, feature: str, key: str, params: dict, code_version: str,
    compute_fn, compute: ComputeResource, device: str = "cpu", input_keys: tuple[str, ...] = (),
) -> tuple[feature_base.FeatureRun, refs.FeatureRef, dict]:
    """What every per-shard feature asset does: compute the key's missing shards of the manifest
    (lazily starting the cluster), log new/reused, and return the run, its ref and the standard
    metadata, to which the asset adds its own."""
    manifest = load_manifest(store, dataset, manifest_digest)
    run = feature_base.run_feature(store, manifest, feature, key, params, code_version, compute_fn, _LazyExecutor(compute),
                        input_keys=input_keys, device=device, worker_threads=compute.worker_threads)
    context.log.info(f"{feature} {run.key}: {run.shards_new} new / {run.shards_reused} reused shards")
    ref = refs.FeatureRef(dataset, feature, run.key, manifest_digest, tuple(run.shards))
    return run, ref, _run_metadata(store, run)


def _data_version(run: feature_base.FeatureRun) -> DataVersion:
    return DataVersion(feature_key(run.feature, {"shards": run.shards}, "", [run.key]))


@asset(
    description="Every clip: id, media URI, content hash, caption/label, split and its shard (append-only).",
    code_version="clip_manifest-1",
)
def clip_manifest(
    context: AssetExecutionContext, clip_source: ClipSourceResource, feature_store: FeatureStoreResource
) -> Output[refs.ManifestRef]:
    store = feature_store.writable_store()
    config = clip_source.config()
    listing = clip_source.listing()
    if not listing.clips:
        reasons = "; ".join(f"{r.id or r.source}: {r.reason}" for r in listing.rejected[:3])
        message = f"source {config.path!r} ({config.kind}) holds no usable clips" + (f" ({reasons})" if reasons else "")
        raise Failure(message)
    previous = load_manifest(store, clip_source.dataset)
    manifest, delta = build_manifest(clip_source.dataset, listing, previous, clip_source.shard_size, config.storage_options)
    digest = save_manifest(store, manifest)
    shards = tuple(manifest.by_shard())
    splits: dict[str, int] = {}
    for clip in manifest.clips:
        splits[clip.split] = splits.get(clip.split, 0) + 1
    context.log.info(
        f"{len(manifest.clips)} clips in {len(shards)} shards; +{len(delta.added)} new, "
        f"{len(delta.changed)} changed, {len(delta.removed)} removed, {len(manifest.quarantined)} quarantined"
    )
    return Output(
        refs.ManifestRef(manifest.dataset, digest, len(manifest.clips), shards),
        data_version=DataVersion(digest),
        metadata={
            "dataset": manifest.dataset,
            "manifest_digest": digest,
            "source": f"{config.kind}: {config.path}",
            "clips": len(manifest.clips),
            "shards": len(shards),
            "shard_size": manifest.shard_size,
            "clips_added": len(delta.added),
            "clips_changed": len(delta.changed),
            "clips_removed": len(delta.removed),
            "clips_quarantined": len(manifest.quarantined),
            "splits": MetadataValue.json(splits),
            "quarantine": MetadataValue.md(_quarantine_markdown(manifest.quarantined)),
        },
    )


@asset(
    description="Log-mel spectrograms of every clip, per shard, from a named preset (hifigan22k by default).",
    code_version=f"mel_spectrograms-{mel.MEL_CODE_VERSION}",
)
def mel_spectrograms(
    context: AssetExecutionContext,
    config: MelConfig,
    clip_manifest: refs.ManifestRef,
    feature_store: FeatureStoreResource,
    compute: ComputeResource,
    device: DeviceResource,
) -> Output[refs.FeatureRef]:
    store = feature_store.writable_store()
    try:
        params = mel.MelParams(**config.model_dump())
    except ValueError as exc:
        raise Failure(f"bad mel_spectrograms config: {exc}") from None
    run, ref, metadata = compute_feature(
        context, store, clip_manifest.dataset, clip_manifest.digest, mel.MEL_FEATURE, params.key(), params.params(), mel.MEL_CODE_VERSION,
        mel.compute_mel_shard, compute, device.device(),
    )
    preview = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=ref.shards[:1])
    metadata["preset"] = params.preset
    if len(preview):
        metadata["preview"] = _preview_markdown(preview_png(mels=preview.arrays["mel"][:PREVIEW_CLIPS]))
    return Output(ref, data_version=_data_version(run), metadata=metadata)


@asset(
    description="MM-LDM audio images: normalised mel -> grayscale -> RGB -> resize, from the cached mels.",
    code_version=f"audio_images-{mel.AUDIO_IMAGE_CODE_VERSION}",
)
def audio_images(
    context: AssetExecutionContext,
    config: AudioImageConfig,
    mel_spectrograms: refs.FeatureRef,
    clip_manifest: refs.ManifestRef,
    feature_store: FeatureStoreResource,
    compute: ComputeResource,
) -> Output[refs.FeatureRef]:
    store = feature_store.writable_store()
    try:
        params = mel.AudioImageParams(size=config.size)
    except ValueError as exc:
        raise Failure(f"bad audio_images config: {exc}") from None
    run, ref, metadata = compute_feature(
        context, store, clip_manifest.dataset, clip_manifest.digest, mel.AUDIO_IMAGE_FEATURE, params.key(mel_spectrograms.key), params.params(),
        mel.AUDIO_IMAGE_CODE_VERSION, mel.compute_audio_image_shard, compute, input_keys=(mel_spectrograms.key,),
    )
    context.log.info(
        f"Features of {ref.dataset!r} are in {store.url_root} (catalog: python -m stages.store {store.url_root})"
    )
    metadata["mel_feature_key"] = mel_spectrograms.key
    mels = store.read_arrays(ref.dataset, mel.MEL_FEATURE, mel_spectrograms.key, shards=ref.shards[:1])
    images = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=ref.shards[:1])
    if len(images):
        metadata["preview"] = _preview_markdown(
            preview_png(mels=mels.arrays["mel"][:PREVIEW_CLIPS], images=images.arrays["image"][:PREVIEW_CLIPS])
        )
    return Output(ref, data_version=_data_version(run), metadata=metadata)


class _LazyExecutor:
    """Defers starting the compute resource's cluster until there is a shard to compute."""

    def __init__(self, compute: ComputeResource):
        self.compute = compute

    def map(self, fn, items):
        items = list(items)
        return self.compute.executor().map(fn, items) if items else []


# ---- asset checks -------------------------------------------------------------------------------

def _check_feature(store: FeatureStore, ref: refs.FeatureRef, name: str, expected_shape) -> AssetCheckResult:
    """Shapes, finiteness, and rows + quarantined == clips of the manifest, shard by shard."""
    manifest = load_manifest(store, ref.dataset, ref.manifest_digest)
    by_shard = manifest.by_shard()
    problems, rows, quarantined = [], 0, 0
    for shard in ref.shards:
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
        description="; ".join(problems[:10]) or "shapes, finiteness and row counts match the clip manifest",
        metadata={"rows": rows, "quarantined": quarantined, "clips_in_manifest": len(manifest.clips), "problems": len(problems)},
    )


@asset_check(asset=mel_spectrograms, description="Mel shape per preset, no NaN/Inf, rows + quarantined == manifest clips.")
def mel_spectrograms_valid(mel_spectrograms: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(mel_spectrograms.dataset, mel_spectrograms.feature, mel_spectrograms.key, mel_spectrograms.shards[0])
    params = first["params"]
    preset = get_preset(params["preset"])
    return _check_feature(store, mel_spectrograms, "mel", (preset.n_mels, preset.n_frames(params["seconds"])))


@asset_check(asset=audio_images, description="Image shape size x size x 3 (uint8), rows + quarantined == manifest clips.")
def audio_images_valid(audio_images: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(audio_images.dataset, audio_images.feature, audio_images.key, audio_images.shards[0])
    size = int(first["params"]["size"])
    return _check_feature(store, audio_images, "image", (size, size, 3))
