"""CLAP / CAVP heads trained on cached tower features, the embedding assets, and retrieval evaluation."""

import posixpath

from dagster import (AssetCheckResult, AssetExecutionContext, Config, DagsterType, DataVersion, Failure, MetadataValue, Output,
                     PythonObjectDagsterType)
from pydantic import Field

from assets.factory import SHARD_RETRY, dataset_asset, dataset_check
from assets.factory import check_feature, compute_feature, data_version, new_shards
from assets.resources import ComputeResource, DeviceResource, FeatureStoreResource, PretrainedClapResource
from stages.core import tables
from stages.embeddings import heads
from stages.embeddings.spaces import SkippedSpace, space_of_head
from stages.core.refs import FeatureRef, HeadRef, ManifestRef
from stages.features.base import registered_feature
from stages.ingest.manifest import load_manifest
from stages.core.store import feature_key


def or_skipped(ref: type) -> DagsterType:
    """The Dagster type of a space's output: its ref, or the SkippedSpace the dataset left it as."""
    return PythonObjectDagsterType((ref, SkippedSpace), name=f"{ref.__name__}OrSkipped",
                                   description=f"{ref.__name__}, or SkippedSpace when the dataset cannot fill the space")


HEAD_OR_SKIPPED, EMBEDDINGS_OR_SKIPPED = or_skipped(HeadRef), or_skipped(FeatureRef)


def skipped_output(skipped: SkippedSpace) -> Output:
    """Pass a skipped space on: downstream assets run on the other space and table the reason."""
    return Output(skipped, data_version=DataVersion(f"skipped:{skipped.reason}"), metadata={"skipped": skipped.reason})


class HeadTrainingConfig(Config):
    steps: int = Field(default=600, description="Optimizer steps (AdamW, cosine schedule).")
    batch_size: int = Field(default=64, description="Clips per batch; the other clips of a batch are the negatives.")
    learning_rate: float = Field(default=1e-3, description="Peak learning rate.")
    weight_decay: float = Field(default=0.01, description="AdamW weight decay.")
    eval_every: int = Field(default=50, description="Validation loss every this many steps; the best weights are kept.")
    seed: int = Field(default=0, description="Seed of initialisation and batch sampling.")
    embed_dim: int = Field(default=256, description="Dimension of the shared embedding space.")
    hidden_dim: int = Field(default=512, description="Hidden width of each projection MLP.")
    dropout: float = Field(default=0.1, description="Dropout inside the projection MLPs.")
    temporal_negatives: bool = Field(default=True, description="CAVP: other seconds of the same clip are negatives too (Diff-Foley).")
    revision: str = Field(default="", description="Change to retrain on the current data; otherwise new shards reuse the trained head.")
    source_dataset: str = Field(default="", description="A pretrained space: fit (or reuse) the heads on this other dataset of the store (its train/val splits, its towers, which a run on it must have made) and freeze them; this dataset's clips are embedded in that space. Empty: this dataset.")


def _train(context, kind: str, config: HeadTrainingConfig, manifest_ref: ManifestRef, towers: dict, feature_store,
           device: DeviceResource) -> Output:
    store = feature_store.writable_store()
    manifest = load_manifest(store, manifest_ref.dataset, manifest_ref.digest)
    settings = config.model_dump()
    revision, source = settings.pop("revision"), settings.pop("source_dataset")
    train_config = heads.HeadTrainConfig(**settings)
    tower_keys = {ref.feature: ref.key for ref in towers.values()}
    reason = heads.missing_input_reason(store, manifest, kind, tower_keys)
    if source and source != manifest.dataset and not reason:
        return _pretrained_space(context, kind, source, manifest, tower_keys, train_config, revision, store, device)
    if reason:
        space = space_of_head(kind)
        # The one place this is said: downstream assets pass the SkippedSpace on quietly.
        context.log.warning(f"{space.name} space ({', '.join(space.directions)}) skipped: {reason}")
        return skipped_output(SkippedSpace(manifest.dataset, space.name, reason))
    try:
        fitted = heads.fit_head(store, manifest, kind, tower_keys, train_config, revision, log=context.log.info,
                                device=device.device())
    except (ValueError, FloatingPointError) as exc:
        raise Failure(f"{kind} training failed: {exc}") from None
    key, sidecar, reused = fitted.key, fitted.sidecar, fitted.reused
    history = sidecar["history"]
    context.log.info(
        f"{kind} {key}: {'reused' if reused else 'trained'}; best val loss {sidecar['best_val_loss']:.4f} at step {sidecar['best_step']}"
    )
    curve = tables.rows_to_markdown(history, ["step", "train_loss", "val_loss", "temperature"]) if history else ""
    return Output(
        HeadRef(manifest.dataset, kind, key, tower_keys),
        data_version=DataVersion(key),
        metadata={
            "checkpoint_key": key,
            "checkpoint_url": MetadataValue.path(sidecar["url"]),
            "reused": reused,
            "parameters": sidecar["parameters"],
            "weights_mb": MetadataValue.float(round(sidecar["weights_bytes"] / 1e6, 3)),
            "clips_train": sidecar["clips_train"],
            "clips_val": sidecar["clips_val"],
            "best_step": sidecar["best_step"],
            "best_val_loss": MetadataValue.float(round(sidecar["best_val_loss"], 4)),
            "train_seconds": MetadataValue.float(sidecar["train_seconds"]),
            "tower_keys": MetadataValue.json(tower_keys),
            "loss_curve": MetadataValue.md(curve),
        },
    )


@dataset_asset(group="embeddings", kinds=("pytorch",), description="CLAP-style audio<->text projection heads (symmetric InfoNCE) on the frozen audio and text towers.",
       code_version=f"clap_head-{heads.HEAD_CODE_VERSION}", dagster_type=HEAD_OR_SKIPPED)
def clap_head(
    context: AssetExecutionContext,
    config: HeadTrainingConfig,
    clip_manifest: ManifestRef,
    audio_tower: FeatureRef,
    text_tower: FeatureRef,
    feature_store: FeatureStoreResource,
    pretrained_clap: PretrainedClapResource,
    device: DeviceResource,
) -> Output:
    if pretrained_clap.enabled:
        context.log.info(f"using the pretrained ClapModel at {pretrained_clap.model_dir}; no head is trained")
        return Output(
            HeadRef(clip_manifest.dataset, heads.CLAP_HEAD, "", {}, pretrained_clap.model_dir),
            data_version=DataVersion(f"pretrained:{pretrained_clap.model_dir}"),
            metadata={"pretrained_model_dir": pretrained_clap.model_dir},
        )
    return _train(context, heads.CLAP_HEAD, config, clip_manifest,
                  {"audio": audio_tower, "text": text_tower}, feature_store, device)


@dataset_asset(group="embeddings", kinds=("pytorch",), description="CAVP-style audio<->video per-second projection heads (Eq. 1 of DiffGAP, temporal negatives).",
       code_version=f"cavp_head-{heads.HEAD_CODE_VERSION}", dagster_type=HEAD_OR_SKIPPED)
def cavp_head(
    context: AssetExecutionContext,
    config: HeadTrainingConfig,
    clip_manifest: ManifestRef,
    audio_tower: FeatureRef,
    frame_tower: FeatureRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output:
    return _train(context, heads.CAVP_HEAD, config, clip_manifest,
                  {"audio": audio_tower, "video": frame_tower}, feature_store, device)


def _pretrained_space(context, kind: str, source: str, manifest, tower_keys: dict, train_config, revision: str, store,
                      device: DeviceResource) -> Output:
    """The heads of ``source`` (fitted there on its own train split, or reused: the key leaves the
    dataset out, so the heads a run on ``source`` trained with this config are the ones used),
    frozen for this dataset: its clips are embedded in that space by the embedding asset."""
    from assets.io import latest_output

    source_manifest_ref = latest_output(store, source, "clip_manifest")
    source_manifest = load_manifest(store, source, source_manifest_ref.digest)
    source_towers = {feature: latest_output(store, source, feature).key for feature in tower_keys}
    reason = heads.missing_input_reason(store, source_manifest, kind, source_towers)
    if reason:
        raise Failure(f"{kind}: source dataset {source!r} cannot fill this space: {reason}")
    try:
        fitted = heads.fit_head(store, source_manifest, kind, source_towers, train_config, revision, log=context.log.info,
                                device=device.device())
    except (ValueError, FloatingPointError) as exc:
        raise Failure(f"{kind} training on {source!r} failed: {exc}") from None
    context.log.info(f"{kind}: the space of dataset {source!r} ({fitted.key}, {'reused' if fitted.reused else 'trained'} "
                     f"on its {fitted.sidecar['clips_train']} train clips), frozen for {manifest.dataset!r}")
    return Output(
        HeadRef(manifest.dataset, kind, fitted.key, tower_keys, head_dataset=source),
        data_version=DataVersion(f"{source}:{fitted.key}"),
        metadata={"checkpoint_key": fitted.key, "source_dataset": source, "reused": fitted.reused,
                  "checkpoint_url": MetadataValue.path(fitted.sidecar["url"]),
                  "clips_train": fitted.sidecar["clips_train"], "source_tower_keys": MetadataValue.json(source_towers)},
    )


def _embed(context, kind: str, head: HeadRef, manifest_ref: ManifestRef, feature_store, compute) -> Output:
    if isinstance(head, SkippedSpace):
        return skipped_output(head)
    from stages.embeddings import retrieval as head_retrieval  # torch: imported when a step runs

    store = feature_store.writable_store()
    feature = head_retrieval.EMBEDDING_FEATURE[kind]
    if head.pretrained_dir:
        from stages.embeddings.pretrained_clap import PretrainedClapParams

        params_obj = PretrainedClapParams(model_dir=head.pretrained_dir)
        extractor = registered_feature(f"{feature}:pretrained")
        params, key, inputs = params_obj.params(), params_obj.key(), ()
    else:
        extractor = registered_feature(feature)
        params = heads.embedding_params(kind, head.key, head.tower_keys, head.head_dataset)
        inputs = (head.key, *sorted(head.tower_keys.values()))
        key = feature_key(feature, params, extractor.code_version, inputs)
    run, ref, metadata, _ = compute_feature(context, store, manifest_ref.dataset, manifest_ref.digest, extractor, key, params,
                                         compute, input_keys=tuple(inputs))
    metadata["head_key"] = head.key or f"pretrained:{head.pretrained_dir}"
    if head.head_dataset:
        metadata["space_source_dataset"] = head.head_dataset
    return Output(ref, data_version=data_version(run), metadata=metadata)


@dataset_asset(group="embeddings", kinds=("numpy",), retry_policy=SHARD_RETRY, description="CLAP embeddings of every clip's audio and caption (L2-normalised), from the trained head or a pretrained ClapModel.",
       code_version=f"clap_embeddings-{heads.EMBEDDING_CODE_VERSION}", dagster_type=EMBEDDINGS_OR_SKIPPED)
def clap_embeddings(context: AssetExecutionContext, clap_head: HEAD_OR_SKIPPED, clip_manifest: ManifestRef,
                    feature_store: FeatureStoreResource, compute: ComputeResource) -> Output:
    return _embed(context, heads.CLAP_HEAD, clap_head, clip_manifest, feature_store, compute)


@dataset_asset(group="embeddings", kinds=("numpy",), retry_policy=SHARD_RETRY, description="CAVP embeddings of every clip's audio and video: pooled and per second (L2-normalised).",
       code_version=f"cavp_embeddings-{heads.EMBEDDING_CODE_VERSION}", dagster_type=EMBEDDINGS_OR_SKIPPED)
def cavp_embeddings(context: AssetExecutionContext, cavp_head: HEAD_OR_SKIPPED, clip_manifest: ManifestRef,
                    feature_store: FeatureStoreResource, compute: ComputeResource) -> Output:
    return _embed(context, heads.CAVP_HEAD, cavp_head, clip_manifest, feature_store, compute)


class RetrievalConfig(Config):
    split: str = Field(default="test", description="Held-out split to evaluate on.")
    seed: int = Field(default=0, description="Seed of the random-embedding and untrained-head baselines.")


RETRIEVAL_COLUMNS = ["direction", "method", "R@1", "R@5", "R@10", "dup-aware R@1", "dup-aware R@5", "dup-aware R@10",
                     "mean_rank", "median_rank", "n", "gallery"]


@dataset_asset(group="embeddings", kinds=("csv",), description="Retrieval R@1/5/10 (and duplicate-aware R@k), mean/median rank for T->A, A->T, V->A, A->V on a held-out split, next to baselines; duplicate media and shared captions reported.",
       code_version="retrieval_evaluation-2")
def retrieval_evaluation(
    context: AssetExecutionContext,
    config: RetrievalConfig,
    clip_manifest: ManifestRef,
    clap_head: HEAD_OR_SKIPPED,
    cavp_head: HEAD_OR_SKIPPED,
    clap_embeddings: EMBEDDINGS_OR_SKIPPED,
    cavp_embeddings: EMBEDDINGS_OR_SKIPPED,
    feature_store: FeatureStoreResource,
) -> Output[list]:
    from stages.embeddings import retrieval as head_retrieval
    from stages.evaluation.duplicates import find_duplicates

    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    spaces, skipped = {}, []
    for kind, head, embeddings in ((heads.CLAP_HEAD, clap_head, clap_embeddings), (heads.CAVP_HEAD, cavp_head, cavp_embeddings)):
        if isinstance(embeddings, SkippedSpace):
            skipped.append(embeddings)
        else:
            spaces[kind] = {"embedding_key": embeddings.key, "head_key": head.key, "tower_keys": head.tower_keys,
                            "head_dataset": head.head_dataset}
    try:
        rows = head_retrieval.evaluate_retrieval(store, manifest, spaces, split=config.split, seed=config.seed)
    except ValueError as exc:
        raise Failure(f"retrieval evaluation: {exc}") from None
    rows += [space.row(RETRIEVAL_COLUMNS) for space in skipped]
    inputs = [getattr(ref, "key", "") or f"skipped:{ref.reason}" for ref in (clap_embeddings, cavp_embeddings)]
    key = feature_key("retrieval_evaluation", config.model_dump(), "2", inputs)
    everywhere = find_duplicates(manifest.clips, getattr(manifest, "metadata", None))
    in_split = find_duplicates([c for c in manifest.clips if c.split == config.split])
    csv_path = posixpath.join(store.path(manifest.dataset, "evaluations", "retrieval"), f"{key}.csv")
    store.write_bytes(csv_path, tables.rows_to_csv(rows).encode())
    table = tables.rows_to_markdown(rows, RETRIEVAL_COLUMNS)
    context.log.info(f"retrieval on split {config.split!r}:\n{table}\nCSV: {store.url(csv_path)}\n"
                     f"duplicates: {everywhere.summary()} (split {config.split!r}: {in_split.summary()})")
    metadata = {"table": MetadataValue.md(table), "csv": MetadataValue.path(store.url(csv_path)), "split": config.split,
                "duplicates": everywhere.summary(), "duplicates_in_split": in_split.summary(),
                "duplicate_media": len(everywhere.media), "shared_captions": len(everywhere.texts),
                "duplicates_table": MetadataValue.md(everywhere.markdown())}
    for row in rows:
        if row["method"] == "trained":
            metadata[f"{row['direction']} R@1"] = MetadataValue.float(round(row["R@1"], 2))
    for space in skipped:
        metadata[f"{space.space} skipped"] = space.reason
    return Output(rows, data_version=DataVersion(key), metadata=metadata)


@dataset_check(asset=clap_embeddings, description="audio/text [N, d], unit norm, finite; rows + quarantined == manifest clips.")
def clap_embeddings_valid(clap_embeddings: EMBEDDINGS_OR_SKIPPED, feature_store: FeatureStoreResource) -> AssetCheckResult:
    return _check_embeddings(feature_store.store(), clap_embeddings, ("audio", "text"))


@dataset_check(asset=cavp_embeddings, description="audio/video [N, d] unit norm, finite; rows + quarantined == manifest clips.")
def cavp_embeddings_valid(cavp_embeddings: EMBEDDINGS_OR_SKIPPED, feature_store: FeatureStoreResource) -> AssetCheckResult:
    return _check_embeddings(feature_store.store(), cavp_embeddings, ("audio", "video"))


def _check_embeddings(store, ref: FeatureRef, names) -> AssetCheckResult:
    import numpy as np

    if isinstance(ref, SkippedSpace):
        return AssetCheckResult(passed=True, description=f"skipped: {ref.reason}", metadata={"skipped": ref.reason})

    fresh = new_shards(store, ref)  # reused shards were verified by run_feature
    first = check_feature(store, ref, names[0], _row_shape(store, ref, names[0]), fresh)
    if not first.passed:
        return first
    table = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=fresh[0], names=list(names)) if fresh[0] else None
    norms = {name: np.linalg.norm(table.arrays[name], axis=-1) for name in names} if table is not None else {}
    worst = max((float(np.abs(n - 1).max()) if len(n) else 0.0 for n in norms.values()), default=0.0)
    rows = len(table) if table is not None else 0
    return AssetCheckResult(
        passed=worst < 1e-3,
        description=f"max | |x| - 1 | = {worst:.2e} over the {rows} rows of {len(fresh[0])} new shards",
        metadata={"rows": rows, "shards_checked": len(fresh[0]), "max_norm_error": float(worst)},
    )


def _row_shape(store, ref: FeatureRef, name: str):
    for shard in ref.shards:
        info = store.shard_manifest(ref.dataset, ref.feature, ref.key, shard)["arrays"].get(name)
        if info:
            return tuple(info["shape"][1:])
    return ()
