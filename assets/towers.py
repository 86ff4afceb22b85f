"""Tower feature assets: clip_manifest -> audio / frame / text embeddings of the frozen towers.

Thin wrappers like mel_spectrograms: read the config, call stages.features.towers through run_feature
(only the shards whose key is missing are computed), report. The feature key carries each
tower's settings (package, version, weight sha256, input settings).
"""


import numpy as np
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    Config,
    MetadataValue,
)
from pydantic import Field

from assets.factory import dataset_check, feature_asset
from assets.features import ClipLengthConfig
from assets.factory import check_feature, new_shards
from assets.resources import FeatureStoreResource
from stages.core import refs
from stages.features import towers as T
from stages.ingest.decode import ClipLength
from stages.ingest.manifest import load_manifest
from stages.core.store import FeatureStore

UNIT_NORM_TOLERANCE = 1e-3
PROBLEMS_SHOWN = 10


class AudioTowerConfig(ClipLengthConfig):  # seconds >= 1: one 512-d embedding per whole second
    silence_dbfs: float = Field(default=-60.0, description="Clips whose peak is below this level are quarantined as silent.")
    per_second_dtype: str = Field(default="float16", description="Stored dtype of per_second: float16 (rel. error <= 4e-4) or float32.")


class FrameTowerConfig(Config):
    seconds: float = Field(default=4.0, description="Clip length in seconds (>= 1); one 1280-d embedding per whole second.")
    fps: float = Field(default=4.0, description="Frames decoded per second (1..60); averaged within each second.")
    size: int = Field(default=T.DEFAULT_FRAME_SIZE, description="EfficientNet-lite0 input side in pixels; frames are resized to it.")
    per_second_dtype: str = Field(default="float16", description="Stored dtype of per_second: float16 or float32.")
    crop: str = Field(default=ClipLength.crop, description="Which `seconds` of a longer clip: 'start' or 'centre' (as the audio's).")


def _tower_report(context, store, ref: refs.FeatureRef, metadata: dict, inputs: dict, params, written) -> None:
    tower = params.params()["tower"]
    metadata["tower"] = f"{tower['package']} {tower['package_version']}"
    metadata["tower_settings"] = MetadataValue.json(tower)


audio_tower = feature_asset(T.AUDIO_TOWER_FEATURE, config_type=AudioTowerConfig, device=True, report=_tower_report,
                            params=lambda config, inputs: T.AudioTowerParams(**config.model_dump()))
frame_tower = feature_asset(T.FRAME_TOWER_FEATURE, config_type=FrameTowerConfig, device=True, report=_tower_report,
                            params=lambda config, inputs: T.FrameTowerParams(**config.model_dump()))
# No config: texts are fixed (caption, else label) and the tower has no input settings to choose.
text_tower = feature_asset(T.TEXT_TOWER_FEATURE, config_type=None, device=True, report=_tower_report,
                           params=lambda config, inputs: T.TextTowerParams())


# ---- asset checks -------------------------------------------------------------------------------

def _check_tower(
    store: FeatureStore,
    ref: refs.FeatureRef,
    shapes: dict[str, tuple],
    norm_array: str,
    unit_norm: bool,
    manifest_texts: dict[str, str] | None = None,
) -> AssetCheckResult:
    """check_feature on the first array (row counts, shape, finite), then the other arrays' shapes
    and finiteness, per-row norms of ``norm_array`` (unit, or at least non-zero) and, for text,
    that every stored row was embedded from the clip's current caption; of the new shards only
    (see assets.factory.new_shards)."""
    names = list(shapes)
    fresh = new_shards(store, ref)
    base = check_feature(store, ref, names[0], shapes[names[0]], fresh)
    problems = [] if base.passed else [base.description]
    norm_min, norm_max = np.inf, 0.0
    for shard in fresh[0]:
        table = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=[shard], names=names[1:] + [norm_array])
        if not len(table):
            continue
        for name in names[1:]:
            values = table.arrays[name]
            if tuple(values.shape[1:]) != tuple(shapes[name]):
                problems.append(f"{shard}: {name} shape {values.shape[1:]} != {tuple(shapes[name])}")
            if not np.isfinite(values).all():
                problems.append(f"{shard}: {name} has {int((~np.isfinite(values)).sum())} NaN/Inf values")
        norms = np.linalg.norm(table.arrays[norm_array].astype(np.float64), axis=1)
        norm_min, norm_max = min(norm_min, float(norms.min())), max(norm_max, float(norms.max()))
        if unit_norm and np.abs(norms - 1).max() > UNIT_NORM_TOLERANCE:
            problems.append(f"{shard}: {norm_array} rows are not unit norm (norms {norms.min():.4f}..{norms.max():.4f})")
        if not unit_norm and not (norms > 1e-6).all():
            problems.append(f"{shard}: {int((norms <= 1e-6).sum())} all-zero {norm_array} rows")
        if manifest_texts is not None:
            stored = store.shard_manifest(ref.dataset, ref.feature, ref.key, shard).get("text_digests", {})
            stale = [c for c in table.clip_ids if stored.get(c) != T.text_digest(T.clean_text(manifest_texts.get(c)))]
            if stale:
                problems.append(f"{shard}: {len(stale)} rows embed an older caption (e.g. {stale[0]}); the shard name "
                                "does not follow captions, delete the shard to recompute it")
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        description="; ".join(problems[:PROBLEMS_SHOWN])
        or f"shapes, finiteness, {norm_array} norms and row counts match the clip manifest",
        metadata={
            **base.metadata,
            "problems": len(problems),
            f"{norm_array}_norm_min": float(norm_min) if np.isfinite(norm_min) else 0.0,
            f"{norm_array}_norm_max": float(norm_max),
        },
    )


def _params_of(store: FeatureStore, ref: refs.FeatureRef) -> dict:
    return store.shard_manifest(ref.dataset, ref.feature, ref.key, ref.shards[0])["params"]


@dataset_check(
    asset=audio_tower,
    description="pooled [512], per_second [S, 512], logits [69]; finite; non-zero rows; rows + quarantined == manifest clips.",
)
def audio_tower_valid(audio_tower: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    params = T.AudioTowerParams.from_params(_params_of(store, audio_tower))
    shapes = {"pooled": (T.AudioTower.dim,), "per_second": (params.n_seconds, T.AudioTower.dim), "logits": (T.AudioTower.n_classes,)}
    return _check_tower(store, audio_tower, shapes, "pooled", unit_norm=False)


@dataset_check(
    asset=frame_tower,
    description="pooled [1280], per_second [S, 1280]; finite; non-zero rows; rows + quarantined == manifest clips.",
)
def frame_tower_valid(frame_tower: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    params = T.FrameTowerParams.from_params(_params_of(store, frame_tower))
    shapes = {"pooled": (T.FrameTower.dim,), "per_second": (params.n_seconds, T.FrameTower.dim)}
    return _check_tower(store, frame_tower, shapes, "pooled", unit_norm=False)


@dataset_check(
    asset=text_tower,
    description="text [384], finite, unit norm, embedded from the current caption; rows + quarantined == manifest clips.",
)
def text_tower_valid(text_tower: refs.FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    manifest = load_manifest(store, text_tower.dataset, text_tower.manifest_digest)
    texts = {c.id: c.caption or c.label for c in manifest.clips}
    return _check_tower(store, text_tower, {"text": (T.TextTower.dim,)}, "text", unit_norm=True, manifest_texts=texts)


TOWER_ASSETS = [audio_tower, frame_tower, text_tower]
TOWER_CHECKS = [audio_tower_valid, frame_tower_valid, text_tower_valid]
