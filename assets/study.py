"""Where DiffGAP helps: the study over training-set size, space tightness, sample count and the
space's source dataset (stages.diffgap.study), and DiffGAP models evaluated on another dataset."""

import base64
import posixpath

from dagster import AssetExecutionContext, Config, DataVersion, Failure, MetadataValue, Output
from pydantic import Field

from assets.factory import dataset_asset
from assets.io import latest_output
from assets.resources import ComputeResource, FeatureStoreResource
from stages.core.progress import Progress
from stages.core.refs import FeatureRef, ManifestRef
from stages.core.results import cached_result
from stages.core.store import feature_key
from stages.core.tables import rows_to_csv, rows_to_markdown
from stages.diffgap import study
from stages.embeddings.spaces import get_space
from stages.ingest.manifest import load_manifest


class DiffgapStudyConfig(Config):
    space: str = Field(default="clap", description="The space studied: clap (T<->A) or cavp (V<->A).")
    seeds: list[int] = Field(default=[0, 1, 2], description="Trainings: each seed fits the heads and DiffGAP again.")
    fractions: list[float] = Field(default=[0.25, 0.5, 1.0], description="Shares of this dataset's train split DiffGAP and the ridge control see; the last is the base point.")
    head_steps: list[int] = Field(default=[25, 100, 600], description="Head training steps (few = a loose space); the last is the base point.")
    samples: list[int] = Field(default=[1, 4, 16], description="Generated embeddings averaged per query (k); the last is the base point.")
    space_sources: list[str] = Field(default=[], description="Other datasets of the store whose heads (fitted on their train split, frozen) are tried at the base point: the paper's pretrained space.")
    diffgap_steps: int = Field(default=3000, description="DiffGAP training steps per training.")
    sampling_steps: int = Field(default=50, description="DDIM steps when generating.")
    sampler: str = Field(default="ddim", description="ddim or ddpm.")

    def params(self) -> study.StudyConfig:
        return study.StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.model_dump().items()})


def _towers(store, dataset: str, space: str, refs: dict) -> study.DatasetTowers:
    """A dataset's towers for the space: this run's inputs, or another dataset's latest outputs."""
    features = get_space(space).towers
    if refs is None:
        manifest_ref = latest_output(store, dataset, "clip_manifest")
        refs = {feature: latest_output(store, dataset, feature) for feature in features}
    else:
        manifest_ref = refs.pop("clip_manifest")
    manifest = load_manifest(store, dataset, manifest_ref.digest)
    return study.DatasetTowers(dataset, manifest, {feature: refs[feature].key for feature in features})


@dataset_asset(group="study", kinds=("pytorch",), code_version=f"diffgap_study-{study.STUDY_CODE_VERSION}.rows{study.ROWS_VERSION}",
               description="Where DiffGAP helps: R@1 of base encoder, ridge control and DiffGAP over several trainings against train-set size, head steps (space tightness), sample count k and the space's source dataset, with paired tests. Each training is a cached result.")
def diffgap_study(context: AssetExecutionContext, config: DiffgapStudyConfig, clip_manifest: ManifestRef,
                  audio_tower: FeatureRef, text_tower: FeatureRef, frame_tower: FeatureRef,
                  feature_store: FeatureStoreResource) -> Output[list]:
    store = feature_store.writable_store()
    params = config.params()
    dataset = clip_manifest.dataset
    inputs = {"clip_manifest": clip_manifest, "audio_tower": audio_tower, "text_tower": text_tower, "frame_tower": frame_tower}
    target = _towers(store, dataset, params.space, inputs)
    sources = {dataset: target, **{s: _towers(store, s, params.space, None) for s in params.space_sources if s != dataset}}
    for name, towers in sources.items():
        if not towers.features(store, get_space(params.space).head).clip_ids:
            raise Failure(f"diffgap_study: dataset {name!r} has no clip with both inputs of the {params.space} space")
    key = feature_key("diffgap_study", params.params(), f"{study.STUDY_CODE_VERSION}.rows{study.ROWS_VERSION}",
                      sorted({item for towers in sources.values() for item in towers.identity()}))

    def compute() -> dict:
        progress = Progress("diffgap_study", study.cells_needed(params, dataset), "trainings", context.log.info).start()
        return study.run_study(store, params, target, sources, log=context.log.info, progress=progress)

    result = cached_result(store, dataset, "diffgap_study", key, compute, {"config": params.params()}, context.log.info)
    rows = result.value["rows"]
    table = study.markdown(rows)
    csv_path = posixpath.join(store.path(dataset, "evaluations", "diffgap_study"), f"{key}.csv")
    store.write_bytes(csv_path, rows_to_csv(rows).encode())
    metadata = {"table": MetadataValue.md(table), "csv": MetadataValue.path(store.url(csv_path)), "reused": result.reused,
                "result_key": key, "trainings_per_row": len(params.seeds)}
    png = study.plot_png(rows)
    if png is not None:
        png_path = posixpath.join(store.path(dataset, "evaluations", "diffgap_study"), f"{key}.png")
        store.write_bytes(png_path, png)
        metadata["plot"] = MetadataValue.md(f"![DiffGAP gain]({'data:image/png;base64,' + base64.b64encode(png).decode()})")
        metadata["plot_png"] = MetadataValue.path(store.url(png_path))
    else:  # no matplotlib: the same plot as SVG
        svg = study.plot_svg(rows).encode()
        svg_path = posixpath.join(store.path(dataset, "evaluations", "diffgap_study"), f"{key}.svg")
        store.write_bytes(svg_path, svg)
        metadata["plot"] = MetadataValue.md(f"![DiffGAP gain]({'data:image/svg+xml;base64,' + base64.b64encode(svg).decode()})")
        metadata["plot_svg"] = MetadataValue.path(store.url(svg_path))
    context.log.info(f"DiffGAP study on {dataset!r} ({'reused' if result.reused else 'computed'}, key {key}):\n{table}")
    return Output(rows, data_version=DataVersion(key), metadata=metadata)


class DiffgapTransferConfig(Config):
    model_dataset: str = Field(description="The dataset of the store whose trained heads and DiffGAP models are evaluated here, without retraining.")
    split: str = Field(default="test", description="This dataset's split the models are evaluated on.")
    steps: int = Field(default=50, description="Sampling steps.")
    sampler: str = Field(default="ddim", description="ddim or ddpm.")
    samples: int = Field(default=16, description="Generated embeddings averaged per query.")
    seeds: list[int] = Field(default=[0, 1, 2], description="Sampling seeds (the models are not retrained).")


TRANSFER_COLUMNS = ["direction", "method", "model_dataset", "eval_dataset", "blend_weight", "R@1", "R@5", "R@10", "mean_rank",
                    "n", "seed"]


@dataset_asset(group="transfer", kinds=("pytorch",), code_version=f"diffgap_transfer-{study.STUDY_CODE_VERSION}",
               description="Another dataset's trained heads and DiffGAP models evaluated on this dataset without retraining: this dataset's clips embedded with those heads, base encoder / ridge control (fitted on the model's dataset) / DiffGAP on its test split. Cached; the key names both datasets.")
def diffgap_transfer(context: AssetExecutionContext, config: DiffgapTransferConfig, clip_manifest: ManifestRef,
                     audio_tower: FeatureRef, text_tower: FeatureRef, frame_tower: FeatureRef,
                     feature_store: FeatureStoreResource, compute: ComputeResource) -> Output[list]:
    from assets.contrastive import _embed
    from stages.core.refs import HeadRef
    from stages.diffgap import evaluate as diffgap_eval
    from stages.diffgap import train as diffgap_train
    from stages.embeddings import heads
    from stages.embeddings.spaces import SPACES, SkippedSpace

    store = feature_store.writable_store()
    source, dataset = config.model_dataset, clip_manifest.dataset
    if source == dataset:
        raise Failure(f"diffgap_transfer: model_dataset is this dataset ({dataset!r}); its own evaluation is diffgap_evaluation")
    manifest = load_manifest(store, dataset, clip_manifest.digest)
    towers = {ref.feature: ref.key for ref in (audio_tower, text_tower, frame_tower)}
    models, embeddings = [], {}
    for space in SPACES.values():
        model = latest_output(store, source, diffgap_train.model_name(space.name))
        head = latest_output(store, source, space.head)
        if isinstance(model, SkippedSpace) or isinstance(head, SkippedSpace) or head.pretrained_dir:
            reason = model.reason if isinstance(model, SkippedSpace) else "a pretrained ClapModel space (embed with it here)"
            models.append(SkippedSpace(dataset, space.name, f"{source}: {reason}"))
            continue
        missing = heads.missing_input_reason(store, manifest, space.head, {f: towers[f] for f in space.towers})
        if missing:  # e.g. a dataset without video evaluated with a model dataset's CAVP space
            models.append(SkippedSpace(dataset, space.name, f"{dataset}: {missing}"))
            continue
        frozen = HeadRef(dataset, space.head, head.key, {f: towers[f] for f in space.towers}, head_dataset=head.source_dataset)
        embeddings[space.name] = _embed(context, space.head, frozen, clip_manifest, feature_store, compute).value
        models.append(model)
    settings = config.model_dump()
    key, provenance = diffgap_eval.transfer_result_key(settings, source, models, manifest,
                                                       {s: ref.key for s, ref in embeddings.items()})

    def compute_rows() -> list[dict]:
        source_manifest = load_manifest(store, source, latest_output(store, source, "clip_manifest").digest)
        rows = []
        for ref in models:
            if isinstance(ref, SkippedSpace):
                rows.append(ref.row(TRANSFER_COLUMNS))
                continue
            try:
                data = diffgap_eval.cross_dataset_split(
                    diffgap_train.load_pairs(store, source_manifest, ref.space, ref.embedding_key),
                    diffgap_train.load_pairs(store, manifest, ref.space, embeddings[ref.space].key), config.split)
            except ValueError as exc:
                raise Failure(f"diffgap_transfer ({ref.space}): {exc}") from None
            model, _ = diffgap_train.load_model(store, source, ref.space, ref.key)
            for seed in config.seeds:
                evaluation = diffgap_eval.EvalConfig(config.steps, config.sampler, config.samples, seed)
                for row in diffgap_eval.evaluate_space(ref.space, data, model, evaluation):
                    rows.append({**row, "model_dataset": source, "eval_dataset": dataset})
        return rows

    result = cached_result(store, dataset, "diffgap_transfer", key, compute_rows, provenance, context.log.info)
    rows = result.value
    table = rows_to_markdown(rows, TRANSFER_COLUMNS)
    csv_path = posixpath.join(store.path(dataset, "evaluations", "diffgap_transfer"), f"{key}.csv")
    store.write_bytes(csv_path, rows_to_csv(rows).encode())
    context.log.info(f"models of {source!r} on {dataset!r} ({'reused' if result.reused else 'computed'}, key {key}):\n{table}")
    return Output(rows, data_version=DataVersion(key), metadata={
        "table": MetadataValue.md(table), "csv": MetadataValue.path(store.url(csv_path)), "reused": result.reused,
        "result_key": key, "model_dataset": source, "eval_dataset": dataset,
        "embedding_keys": MetadataValue.json({s: r.key for s, r in embeddings.items()})})
