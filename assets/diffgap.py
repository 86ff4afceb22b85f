"""DiffGAP assets: one contrastive diffusion module per space, its retrieval evaluation, ablations."""

import posixpath

import numpy as np
from dagster import AssetExecutionContext, Config, DataVersion, Failure, MetadataValue, Output
from pydantic import Field

from assets.contrastive import EMBEDDINGS_OR_SKIPPED, or_skipped, skipped_output
from assets.factory import dataset_asset
from assets.resources import DeviceResource, FeatureStoreResource
from stages.diffgap import evaluate as diffgap_eval
from stages.diffgap import train as diffgap_train
from stages.core.progress import Progress
from stages.core.results import cached_result
from stages.core.tables import rows_to_csv, rows_to_markdown
from stages.core.refs import DiffgapRef, FeatureRef, ManifestRef
from stages.ingest.manifest import load_manifest
from stages.core.store import FeatureStore
from stages.embeddings.spaces import SkippedSpace

DIFFGAP_OR_SKIPPED = or_skipped(DiffgapRef)


class DiffgapConfig(Config):
    steps: int = Field(default=3000, description="Training steps from scratch (scale up with the data: the paper ran ~30 epochs).")
    batch_size: int = Field(default=64, description="Embedding pairs per step (the paper's 64).")
    learning_rate: float = Field(default=2e-4, description="AdamW learning rate (the paper's 2e-4).")
    bst: bool = Field(default=True, description="Bidirectional split training: swap condition and target every bst_interval steps.")
    bst_interval: int = Field(default=250, description="Steps per BST phase: the paper's 5000 scaled to a 3000-step run.")
    condition_dropout: float = Field(default=0.0, description="Classifier-free dropout of the condition (0 = off, as in the paper).")
    seed: int = Field(default=0, description="Seed of initialisation, batches and noise.")
    checkpoint_every: int = Field(default=500, description="Save resumable progress every this many steps.")
    update_steps: int = Field(default=1000, description="Warm start on new shards: steps on new + replayed clips.")
    replay_fraction: float = Field(default=0.5, description="Share of each warm-start batch drawn from clips seen before.")
    width: int = Field(default=280, description="Denoiser width (280 with depth 2 = 5.4 MB of weights).")
    depth: int = Field(default=2, description="Residual blocks of the denoiser.")
    direction_embedding: bool = Field(default=True, description="Give the shared model a learned token for its direction.")

    def train_config(self) -> diffgap_train.DiffgapTrainConfig:
        return diffgap_train.DiffgapTrainConfig(**self.model_dump())


def _fit(context, space: str, config: DiffgapConfig, manifest_ref: ManifestRef, embeddings: FeatureRef,
         feature_store: FeatureStoreResource, device: DeviceResource) -> Output:
    if isinstance(embeddings, SkippedSpace):
        return skipped_output(embeddings)
    store = feature_store.writable_store()
    manifest = load_manifest(store, manifest_ref.dataset, manifest_ref.digest)
    try:
        fitted = diffgap_train.fit_space(store, manifest, space, embeddings.key, config.train_config(), log=context.log.info,
                                         device=device.device())
    except (ValueError, FloatingPointError) as exc:
        raise Failure(f"DiffGAP ({space}) training failed: {exc}") from None
    sidecar = fitted.sidecar
    context.log.info(f"diffgap_{space} {fitted.key}: {fitted.status}; checkpoint at {sidecar['url']}")
    history = sidecar["history"]
    return Output(
        DiffgapRef(manifest.dataset, space, fitted.key, embeddings.key, sidecar["lineage"]),
        data_version=DataVersion(fitted.key),
        metadata={
            "checkpoint_key": fitted.key,
            "checkpoint_url": MetadataValue.path(sidecar["url"]),
            "status": fitted.status,
            "parameters": sidecar["parameters"],
            "weights_mb": MetadataValue.float(round(sidecar["weights_bytes"] / 1e6, 3)),
            "clips_train": sidecar["clips_train"],
            "clips_new": sidecar["clips_new"],
            "steps_run": sidecar["steps_run"],
            "warm_start_from": str(sidecar["warm_start_from"]),
            "final_loss": MetadataValue.float(round(history[-1]["loss"], 4)) if history else MetadataValue.text("n/a"),
            "train_seconds": MetadataValue.float(sidecar["train_seconds"]),
            "modality_gap": MetadataValue.json(sidecar["gap"]),
            "loss_curve": MetadataValue.md(rows_to_markdown(history[:: max(1, len(history) // 15)], ["step", "loss", "direction"])
                                           if history else "reused"),
        },
    )


@dataset_asset(group="diffgap", kinds=("pytorch",), description="DiffGAP in CLAP space: one denoiser learning text->audio and audio->text (BST).",
       code_version=f"diffgap-{diffgap_train.DIFFGAP_CODE_VERSION}", dagster_type=DIFFGAP_OR_SKIPPED)
def diffgap_clap(context: AssetExecutionContext, config: DiffgapConfig, clip_manifest: ManifestRef,
                 clap_embeddings: EMBEDDINGS_OR_SKIPPED, feature_store: FeatureStoreResource, device: DeviceResource) -> Output:
    return _fit(context, "clap", config, clip_manifest, clap_embeddings, feature_store, device)


@dataset_asset(group="diffgap", kinds=("pytorch",), description="DiffGAP in CAVP space: one denoiser learning video->audio and audio->video (BST).",
       code_version=f"diffgap-{diffgap_train.DIFFGAP_CODE_VERSION}", dagster_type=DIFFGAP_OR_SKIPPED)
def diffgap_cavp(context: AssetExecutionContext, config: DiffgapConfig, clip_manifest: ManifestRef,
                 cavp_embeddings: EMBEDDINGS_OR_SKIPPED, feature_store: FeatureStoreResource, device: DeviceResource) -> Output:
    return _fit(context, "cavp", config, clip_manifest, cavp_embeddings, feature_store, device)


class DiffgapEvalConfig(Config):
    steps: int = Field(default=50, description="Sampling steps for retrieval (50, 20 or 5 in the paper).")
    sampler: str = Field(default="ddim", description="ddim (deterministic) or ddpm.")
    samples: int = Field(default=16, description="Generated embeddings averaged per query (more = closer to the conditional mean).")
    seeds: list[int] = Field(default=[0, 1, 2], description="Training + sampling seeds; extra seeds train extra models (cached).")


def _splits_or_failure(store: FeatureStore, manifest, ref: DiffgapRef) -> diffgap_eval.SplitData:
    try:
        return diffgap_eval.split_pairs(diffgap_train.load_pairs(store, manifest, ref.space, ref.embedding_key))
    except ValueError as exc:
        raise Failure(f"DiffGAP evaluation ({ref.space}): {exc}. Fix: more clips in that split of the source.") from None


TABLE_COLUMNS = ["direction", "method", "blend_weight", "R@1", "R@5", "R@10", "mean_rank", "n", "seed"]
SUMMARY_COLUMNS = ["direction", "method", "R@1 mean", "R@1 std", "seeds"]


def _write_csv(store: FeatureStore, dataset: str, name: str, key: str, rows: list[dict], reused: bool) -> str:
    """The rows as CSV under the result's key (a reused result's CSV is rewritten only when missing)."""
    path = posixpath.join(store.path(dataset, "evaluations", name), f"{key}.csv")
    if not (reused and store.exists(path)):
        store.write_bytes(path, rows_to_csv(rows).encode())
    return store.url(path)


def _present(refs) -> tuple[list[DiffgapRef], list[SkippedSpace]]:
    """The spaces this dataset has, and those it skipped (tabled as one row each)."""
    return [r for r in refs if not isinstance(r, SkippedSpace)], [r for r in refs if isinstance(r, SkippedSpace)]


def _seed_summary(rows: list[dict]) -> list[dict]:
    """Mean and spread (std over seeds) of R@1 per direction and method."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row["method"].startswith("skipped"):
            continue
        method = row["method"].split(" (alpha")[0]
        groups.setdefault((row["direction"], method), []).append(row["R@1"])
    return [
        {"direction": d, "method": m, "R@1 mean": float(np.mean(v)), "R@1 std": float(np.std(v)), "seeds": len(v)}
        for (d, m), v in sorted(groups.items())
    ]


def _result_metadata(result) -> dict:
    """What every cached result's materialization says: reused or computed, under which key."""
    return {"reused": result.reused, "result_key": result.key, "result_url": MetadataValue.path(result.url),
            **({"recomputed_because": result.recomputed_because} if result.recomputed_because else {})}


@dataset_asset(group="diffgap", kinds=("pytorch",), description="Retrieval with DiffGAP (Tables III/IV): base encoder, ridge control and DiffGAP on the test split, over seeds. Cached by its inputs' keys and config.",
       code_version=f"diffgap_evaluation-{diffgap_eval.EVALUATION_CODE_VERSION}")
def diffgap_evaluation(
    context: AssetExecutionContext,
    config: DiffgapEvalConfig,
    clip_manifest: ManifestRef,
    diffgap_clap: DIFFGAP_OR_SKIPPED,
    diffgap_cavp: DIFFGAP_OR_SKIPPED,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[list]:
    store = feature_store.writable_store()
    spaces = (diffgap_clap, diffgap_cavp)
    present, skipped = _present(spaces)
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    key, provenance = diffgap_eval.result_key("diffgap_evaluation", config.model_dump(), manifest, spaces)

    def compute() -> list[dict]:
        evaluation = diffgap_eval.EvalConfig(config.steps, config.sampler, config.samples)
        progress = Progress("diffgap_evaluation", len(present) * len(config.seeds), "seeds", context.log.info).start()
        rows = []
        for ref in present:
            rows += diffgap_eval.seed_rows(store, manifest, ref, _splits_or_failure(store, manifest, ref), evaluation,
                                           config.seeds, log=context.log.info, progress=progress, device=device.device())
        return rows + [space.row(TABLE_COLUMNS) for space in skipped]

    result = cached_result(store, clip_manifest.dataset, "diffgap_evaluation", key, compute, provenance, context.log.info)
    rows = result.value
    csv_url = _write_csv(store, clip_manifest.dataset, "diffgap_retrieval", key, rows, result.reused)
    summary = _seed_summary(rows) + [space.row(SUMMARY_COLUMNS) for space in skipped]
    summary_md = rows_to_markdown(summary, SUMMARY_COLUMNS)
    models = store.url(store.path(clip_manifest.dataset, "models"))
    context.log.info(
        f"DiffGAP retrieval (test split, R@1 mean/std over seeds {config.seeds}; {'reused' if result.reused else 'computed'}, "
        f"key {key}):\n{summary_md}\nResults: {csv_url}\nCheckpoints: {models}"
    )
    return Output(rows, data_version=DataVersion(key), metadata={
        "summary": MetadataValue.md(summary_md),
        "table": MetadataValue.md(rows_to_markdown(rows, TABLE_COLUMNS)),
        "csv": MetadataValue.path(csv_url),
        "checkpoints": MetadataValue.path(models),
        **_result_metadata(result),
    })


ABLATION_COLUMNS = {
    "V": ["direction", "CDM", "BST", "R@1", "R@5", "R@10", "blend_weight"],
    "VI": ["direction", "steps", "R@1", "R@5", "R@10", "blend_weight"],
    "VII": ["direction", "bst_interval", "R@1", "R@5", "R@10", "final_loss", "blend_weight"],
}


@dataset_asset(group="diffgap", kinds=("pytorch",), description="Ablations in the shape of Tables V (CDM/BST), VI (50/20/5 steps) and VII (BST interval), per space. Cached by its inputs' keys and config.",
       code_version=f"diffgap_ablations-{diffgap_eval.EVALUATION_CODE_VERSION}")
def diffgap_ablations(
    context: AssetExecutionContext,
    config: DiffgapEvalConfig,
    clip_manifest: ManifestRef,
    diffgap_clap: DIFFGAP_OR_SKIPPED,
    diffgap_cavp: DIFFGAP_OR_SKIPPED,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[dict]:
    store = feature_store.writable_store()
    seed = config.seeds[0] if config.seeds else 0
    spaces = (diffgap_clap, diffgap_cavp)
    present, skipped = _present(spaces)
    # Only the first seed is used: the other seeds are not part of the key.
    settings = {**config.model_dump(), "seeds": [seed]}
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    key, provenance = diffgap_eval.result_key("diffgap_ablations", settings, manifest, spaces,
                                              diffgap_eval.ablation_settings())

    def compute() -> dict:
        evaluation = diffgap_eval.EvalConfig(config.steps, config.sampler, config.samples, seed)
        progress = Progress("diffgap_ablations", diffgap_eval.ABLATIONS_PER_SPACE * len(present), "ablations",
                            context.log.info).start(spaces=", ".join(r.space for r in present), seed=seed)
        tables: dict[str, list] = {name: [] for name in ABLATION_COLUMNS}
        for ref in present:
            _splits_or_failure(store, manifest, ref)
            _, sidecar = diffgap_train.load_model(store, manifest.dataset, ref.space, ref.key)
            found = diffgap_eval.ablation_rows(store, manifest, ref.space, ref.embedding_key,
                                               diffgap_train.DiffgapTrainConfig(**sidecar["train_config"]), evaluation,
                                               log=context.log.info, progress=progress, device=device.device())
            for name in tables:
                tables[name] += found[name]
        for name in tables:
            tables[name] += [space.row(ABLATION_COLUMNS[name]) for space in skipped]
        return tables

    result = cached_result(store, clip_manifest.dataset, "diffgap_ablations", key, compute, provenance, context.log.info)
    tables = result.value
    metadata = {}
    for name, rows in tables.items():
        metadata[f"table_{name}"] = MetadataValue.md(rows_to_markdown(rows, ABLATION_COLUMNS[name]))
        metadata[f"table_{name}_csv"] = MetadataValue.path(_write_csv(store, clip_manifest.dataset, f"diffgap_table_{name}", key, rows,
                                                                        result.reused))
    context.log.info(f"DiffGAP ablations ({'reused' if result.reused else 'computed'}, key {key}) written beside "
                     f"{metadata['table_V_csv'].value}")
    return Output(tables, data_version=DataVersion(key), metadata={**metadata, **_result_metadata(result)})
