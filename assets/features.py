"""Feature assets: clip_manifest -> mel_spectrograms -> audio_images, with their checks.

Each asset reads, calls a stage, writes, reports. Assets cover the whole dataset and compute
only the shards whose feature key is missing (see stages.features.run_feature).
"""

from collections import Counter

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    Config,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
)
from pydantic import Field

from assets.factory import (check_feature, dataset_asset, dataset_check, feature_asset, preview_markdown,
                            quarantine_markdown, quarantine_summary)
from assets.resources import ClipSourceResource, FeatureStoreResource
from stages.core import refs
from stages.core.preview import preview_png
from stages.core.store import FeatureStore
from stages.features import mel
from stages.features.spectral import DEFAULT_PRESET, PRESETS, get_preset
from stages.ingest.decode import ClipLength
from stages.ingest.manifest import build_manifest, load_manifest, save_manifest

PREVIEW_CLIPS = 4


class ClipLengthConfig(Config):
    """The clip-length fields of every asset that decodes audio (stages.ingest.decode.ClipLength), written once."""

    seconds: float = Field(default=ClipLength.seconds, description="Clip length in seconds; audio is padded/tiled or cropped to it.")
    min_seconds: float = Field(default=ClipLength.min_seconds,
                               description="Clips with less audio than this are quarantined; shorter-than-`seconds` ones are fitted.")
    fit: str = Field(default=ClipLength.fit, description="How a short clip reaches `seconds`: 'pad' (zeros) or 'tile' (repeat).")
    crop: str = Field(default=ClipLength.crop, description="Which `seconds` of a longer clip: 'start' (the first) or 'centre'.")


class MelConfig(ClipLengthConfig):
    preset: str = Field(default=DEFAULT_PRESET, description=f"Mel preset: {', '.join(sorted(PRESETS))}.")
    silence_dbfs: float = Field(default=-60.0, description="Clips whose peak is below this level are quarantined as silent.")
    dtype: str = Field(default="float16", description="Stored dtype: float16 (error <= 0.004 in log-mel) or float32.")


class AudioImageConfig(Config):
    size: int = Field(default=64, description="Audio images are size x size RGB (MM-LDM uses the video frame size).")


@dataset_asset(
    group="ingest", kinds=("json",),
    description="Every clip: id, media URI, content hash, caption/label, split and its shard (append-only).",
    code_version="clip_manifest-1",
)
def clip_manifest(
    context: AssetExecutionContext, clip_source: ClipSourceResource, feature_store: FeatureStoreResource
) -> Output[refs.ManifestRef]:
    store = feature_store.writable_store()
    dataset = context.partition_key
    config = clip_source.source_for(dataset, store)
    listing = clip_source.listing(config)
    if not listing.clips:
        reasons = "; ".join(f"{r.id or r.source}: {r.reason}" for r in listing.rejected[:3])
        message = f"source {config.path!r} ({config.kind}) holds no usable clips" + (f" ({reasons})" if reasons else "")
        raise Failure(message)
    previous = load_manifest(store, dataset)
    manifest, delta = build_manifest(dataset, listing, previous, clip_source.shard_size, config.storage_options)
    digest = save_manifest(store, manifest)
    shards = tuple(manifest.by_shard())
    splits = manifest.metadata.get("splits") or dict(Counter(clip.split for clip in manifest.clips))
    listed = quarantine_summary(manifest.quarantined) or "0 rejected"
    context.log.info(
        f"{len(manifest.clips)} clips in {len(shards)} shards ({', '.join(f'{n} {s}' for s, n in sorted(splits.items()))}); "
        f"+{len(delta.added)} new, {len(delta.changed)} changed, {len(delta.removed)} removed"
        + (f", {len(delta.moved)} moved from the short last shard into the new ones" if delta.moved else "") + "; at listing "
        f"{listed.replace('quarantined', 'rejected')} (clips that fail to decode are counted by each feature)"
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
            "clips_moved": len(delta.moved),
            "clips_quarantined": len(manifest.quarantined),
            "splits": MetadataValue.json(splits),
            "quarantine": MetadataValue.md(quarantine_markdown(manifest.quarantined)),
        },
    )


def _mel_params(config: MelConfig, inputs: dict) -> mel.MelParams:
    return mel.MelParams(**config.model_dump())


def _mel_report(context, store: FeatureStore, ref: refs.FeatureRef, metadata: dict, inputs: dict, params,
                written: tuple[str, ...]) -> None:
    metadata["preset"] = params.preset
    if not written:  # nothing new: the preview is in the materialization that wrote the shards
        return
    preview = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=written[:1])
    if len(preview):
        metadata["preview"] = preview_markdown(preview_png(mels=preview.arrays["mel"][:PREVIEW_CLIPS]))


mel_spectrograms = feature_asset(mel.MEL_FEATURE, config_type=MelConfig, params=_mel_params, report=_mel_report, device=True)


def _image_params(config: AudioImageConfig, inputs: dict) -> mel.AudioImageParams:
    return mel.AudioImageParams(size=config.size)


def _image_report(context, store: FeatureStore, ref: refs.FeatureRef, metadata: dict, inputs: dict, params,
                  written: tuple[str, ...]) -> None:
    context.log.info(f"Features of {ref.dataset!r} are in {store.url_root} (catalog: xmodal store ls --root {store.url_root})")
    mel_key = inputs[mel.MEL_FEATURE].key
    metadata["mel_feature_key"] = mel_key
    if not written:
        return
    mels = store.read_arrays(ref.dataset, mel.MEL_FEATURE, mel_key, shards=written[:1])
    images = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=written[:1])
    if len(images):
        metadata["preview"] = preview_markdown(
            preview_png(mels=mels.arrays["mel"][:PREVIEW_CLIPS], images=images.arrays["image"][:PREVIEW_CLIPS])
        )


audio_images = feature_asset(mel.AUDIO_IMAGE_FEATURE, config_type=AudioImageConfig, params=_image_params, report=_image_report)


@dataset_check(asset=mel_spectrograms, description="Mel shape per preset, no NaN/Inf, rows + quarantined == manifest clips.")
def mel_spectrograms_valid(mel_spectrograms: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(mel_spectrograms.dataset, mel_spectrograms.feature, mel_spectrograms.key, mel_spectrograms.shards[0])
    params = first["params"]
    preset = get_preset(params["preset"])
    return check_feature(store, mel_spectrograms, "mel", (preset.n_mels, preset.n_frames(params["seconds"])))


@dataset_check(asset=audio_images, description="Image shape size x size x 3 (uint8), rows + quarantined == manifest clips.")
def audio_images_valid(audio_images: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(audio_images.dataset, audio_images.feature, audio_images.key, audio_images.shards[0])
    size = int(first["params"]["size"])
    return check_feature(store, audio_images, "image", (size, size, 3))
