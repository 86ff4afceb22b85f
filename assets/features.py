"""Feature assets: clip_manifest -> mel_spectrograms -> audio_images and mel_latents, with their checks.

Each asset reads, calls a stage, writes, reports. Assets cover the whole dataset and compute
only the shards whose feature key is missing (see stages.features.run_feature).
"""

from collections import Counter
from typing import Optional

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

from assets.factory import (SHARD_RETRY, check_feature, compute_feature, data_version, dataset_asset, dataset_check,
                            feature_asset, preview_markdown, quarantine_markdown, quarantine_summary)
from assets.resources import ClipSourceResource, ComputeResource, FeatureStoreResource
from stages.core import refs
from stages.core.preview import preview_png
from stages.core.store import FeatureStore
from stages.features import mel, mel_latent
from stages.features.base import registered_feature
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
    shape: str = Field(default=mel.DEFAULT_AUDIO_IMAGE_SHAPE,
                       description="Audio image height x width by name: " + ", ".join(
                           f"{name} ({h} x {w})" for name, (h, w) in mel.AUDIO_IMAGE_SHAPES.items()) + ".")
    size: Optional[int] = Field(default=None, description="A square size x size audio image (MM-LDM uses the video frame "
                                                          "size: 64 on the demo) in place of `shape`.")
    height: Optional[int] = Field(default=None, description="With `width`: an audio image of any height x width in place of `shape`.")
    width: Optional[int] = Field(default=None, description="With `height`.")


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
    return mel.AudioImageParams(**config.model_dump())


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


_MEL_LATENTS = registered_feature(mel_latent.MEL_LATENT_FEATURE)


@dataset_asset(
    group=_MEL_LATENTS.group, kinds=_MEL_LATENTS.kinds, description=_MEL_LATENTS.description, retry_policy=SHARD_RETRY,
    code_version=f"{_MEL_LATENTS.name}-{_MEL_LATENTS.code_version}+statistics-{mel_latent.MEL_STATISTICS_CODE_VERSION}",
)
def mel_latents(context: AssetExecutionContext, clip_manifest: refs.ManifestRef, mel_spectrograms: refs.FeatureRef,
                feature_store: FeatureStoreResource, compute: ComputeResource) -> Output[refs.FeatureRef]:
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    # The train split's statistics first (once per mel key and train split), then the shards.
    statistics_key, statistics, computed = mel_latent.ensure_statistics(store, manifest, mel_spectrograms.key)
    context.log.info(f"mel statistics {statistics_key}: {'computed from' if computed else 'reused, of'} "
                     f"{statistics.clips} train clips ({statistics.frames} frames)")
    params = mel_latent.MelLatentParams(statistics_key)
    run, ref, metadata, _ = compute_feature(
        context, store, clip_manifest.dataset, clip_manifest.digest, _MEL_LATENTS, params.key(mel_spectrograms.key),
        params.params(), compute, input_keys=(mel_spectrograms.key,),
    )
    metadata.update({
        "mel_spectrograms_key": mel_spectrograms.key,
        "statistics_key": statistics_key,
        "statistics_computed": computed,
        "statistics_train_clips": statistics.clips,
        "statistics_std_range": MetadataValue.json([round(float(statistics.std.min()), 4), round(float(statistics.std.max()), 4)]),
    })
    return Output(ref, data_version=data_version(run), metadata=metadata)


@dataset_check(asset=mel_spectrograms, description="Mel shape per preset, no NaN/Inf, rows + quarantined == manifest clips.")
def mel_spectrograms_valid(mel_spectrograms: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(mel_spectrograms.dataset, mel_spectrograms.feature, mel_spectrograms.key, mel_spectrograms.shards[0])
    params = first["params"]
    preset = get_preset(params["preset"])
    return check_feature(store, mel_spectrograms, "mel", (preset.n_mels, preset.n_frames(params["seconds"])))


@dataset_check(asset=audio_images, description="Image shape height x width x 3 (uint8), rows + quarantined == manifest clips.")
def audio_images_valid(audio_images: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(audio_images.dataset, audio_images.feature, audio_images.key, audio_images.shards[0])
    image = mel.AudioImageParams.from_params(first["params"])
    return check_feature(store, audio_images, "image", (image.height, image.width, 3))


@dataset_check(asset=mel_latents, description="Latents [n_mels, frames] float32 as their mels, no NaN/Inf, rows + quarantined == manifest clips.")
def mel_latents_valid(mel_latents: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(mel_latents.dataset, mel_latents.feature, mel_latents.key, mel_latents.shards[0])
    (mel_key,) = first["input_keys"]
    mel_first = store.shard_manifest(mel_latents.dataset, mel.MEL_FEATURE, mel_key, mel_latents.shards[0])
    preset = get_preset(mel_first["params"]["preset"])
    return check_feature(store, mel_latents, "mel_latent", (preset.n_mels, preset.n_frames(mel_first["params"]["seconds"])))
