"""Dagster wiring: assets, checks, jobs, schedule, sensor, resources. No logic lives here.

Assets sit in groups (ingest, features, towers, embeddings, diffgap, vae, generation, cmmd) and every
job is a group selection with its upstream, so a new asset joins the jobs of its group. Every
asset is partitioned by dataset; a job run without a partition works on the default dataset.
"""

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    job,
    load_asset_checks_from_modules,
    load_assets_from_modules,
    op,
    schedule,
    sensor,
)

from assets import cmmd, contrastive, diffgap, features, generation, mmldm, study, towers, vae
from assets.datasets import DATASETS, PARTITION_TAG, DatasetLeaseResource
from assets.io import StoreIOManager
from assets.resources import ClipSourceResource, default_dataset, resources_from_env
from stages.core.errors import ConfigError

ASSET_MODULES = [features, towers, contrastive, diffgap, vae, generation, study, cmmd, mmldm]
ALL_ASSETS = load_assets_from_modules(ASSET_MODULES)
ALL_CHECKS = load_asset_checks_from_modules(ASSET_MODULES)

# Shard work is parallel inside each asset (Dask), so steps run in one process: no per-step
# interpreter start and torch import, and the run's dataset lease is held by that one process.
# The console shows INFO and up (dagster.yaml: python_logs.python_log_level); DEBUG engine events
# stay in the run's event log in the UI. (Not job config: a partitioned job's config applies only
# to runs launched per partition, never to `dagster job execute`.)
try:
    DEFAULT_DATASET = default_dataset()
except ConfigError as exc:  # a bad XMODAL_* variable: one line naming it, not a load traceback
    raise SystemExit(f"xmodal: {exc}") from None


def _job(name: str, groups: tuple[str, ...], description: str):
    return define_asset_job(
        name,
        selection=AssetSelection.groups(*groups).upstream(),
        partitions_def=DATASETS,
        executor_def=in_process_executor,
        tags={PARTITION_TAG: DEFAULT_DATASET},  # a run without a partition: the default dataset
        description=description,
    )


refresh_features = _job("refresh_features", ("features",),
                        "Update the clip manifest and compute the missing shards of every feature.")
train_diffgap = _job("train_diffgap", ("features", "embeddings", "diffgap"),
                     "From nothing: manifest -> features -> tower features -> CLAP/CAVP heads and embeddings -> "
                     "DiffGAP in both spaces -> retrieval evaluation and ablations.")
study_diffgap = _job("study_diffgap", ("study",),
                     "Where DiffGAP helps: manifest -> tower features -> diffgap_study (heads and DiffGAP fitted per "
                     "training in memory, each training a cached result; see README 'DiffGAP: where it helps').")
evaluate_transfer = _job("evaluate_transfer", ("transfer",),
                         "Another dataset's heads and DiffGAP models on this dataset without retraining "
                         "(config: ops.diffgap_transfer.config.model_dataset).")
train_vae = _job("train_vae", ("vae",), "KL-VAEs on audio images and video frames, and the latents of every clip.")
generate_audio = _job("generate_audio", ("vae", "generation"),  # "vae": latent_statistics, beside the generator's inputs
                      "Everything text/video-to-audio generation needs, the generator, WAVs and Tables I/II.")
train_cmmd = _job("train_cmmd", ("cmmd",),
                  "From nothing: manifest -> mels -> mel latents; frames -> frame VAE -> frames at 8.613 fps -> their latents -> "
                  "CMMD (joint video-audio diffusion) -> V2A / A2V evaluation, WAVs and mp4s.")
train_mmldm = _job("train_mmldm", ("mmldm",),
                   "From nothing: manifest -> mels -> audio images; frames -> KL-VAEs -> their latents -> MM-LDM autoencoder -> "
                   "its latents -> DiT -> svg / a2v / v2a evaluation and sounding mp4s.")


@op(description="Nothing: no resource, no input, no output.")
def do_nothing() -> None:
    pass


@job(executor_def=in_process_executor,
     description="Does nothing: what every `dagster job execute` costs before any work (loading these "
                 "definitions, the instance, the run's records). bench/bench_rerun.py measures runs against it.")
def no_op():
    do_nothing()


@schedule(
    job=refresh_features,
    cron_schedule="0 3 * * *",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Refresh the features of every dataset at 03:00 (turn on in the UI or with `dagster schedule start`).",
)
def daily_feature_refresh(context: ScheduleEvaluationContext):
    datasets = context.instance.get_dynamic_partitions(DATASETS.name) or [DEFAULT_DATASET]
    stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    return [RunRequest(partition_key=d, run_key=f"{d}-{stamp}") for d in datasets]


@sensor(
    job=refresh_features,
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.STOPPED,
    description="Starts refresh_features on the default dataset when its source's media listing changes.",
)
def new_media_sensor(context: SensorEvaluationContext, clip_source: ClipSourceResource):
    fingerprint = clip_source.fingerprint()
    if fingerprint == context.cursor:
        return SkipReason(f"no new media in the {clip_source.kind} source")
    context.update_cursor(fingerprint)
    return SensorResult(
        run_requests=[RunRequest(run_key=f"media-{fingerprint}", partition_key=clip_source.dataset)],
        dynamic_partitions_requests=[DATASETS.build_add_request([clip_source.dataset])],
    )


def _resources() -> dict:
    """Every resource from the environment (assets.resources holds each default once), the
    store-backed IO manager and the per-dataset lease it holds for the run."""
    resources = resources_from_env()
    lease = DatasetLeaseResource(feature_store=resources["feature_store"], clip_source=resources["clip_source"])
    resources["io_manager"] = StoreIOManager(feature_store=resources["feature_store"], dataset_lease=lease)
    return resources


try:
    RESOURCES = _resources()
except ConfigError as exc:
    raise SystemExit(f"xmodal: {exc}") from None

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[refresh_features, train_diffgap, study_diffgap, evaluate_transfer, train_vae, generate_audio, train_cmmd, train_mmldm, no_op],
    schedules=[daily_feature_refresh],
    sensors=[new_media_sensor],
    resources=RESOURCES,
    executor=in_process_executor,
)
