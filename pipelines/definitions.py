"""Dagster wiring: assets, checks, jobs, schedule, sensor, resources. No logic lives here."""


import os

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    in_process_executor,
    sensor,
)

from assets import contrastive, diffgap, generation, towers, vae
from assets.features import audio_images, audio_images_valid, clip_manifest, mel_spectrograms, mel_spectrograms_valid
from assets.resources import (ClipSourceResource, ComputeResource, DeviceResource, FeatureStoreResource,
                              PretrainedClapResource)
from stages.core.settings import default_store_root

FEATURE_ASSETS = [clip_manifest, mel_spectrograms, audio_images]
TOWER_ASSETS = [towers.audio_tower_features, towers.frame_tower_features, towers.text_tower_features]
EMBEDDING_ASSETS = [contrastive.clap_head, contrastive.cavp_head, contrastive.clap_embeddings, contrastive.cavp_embeddings,
                    contrastive.retrieval_evaluation]
DIFFGAP_ASSETS = [diffgap.diffgap_clap, diffgap.diffgap_cavp, diffgap.diffgap_evaluation, diffgap.diffgap_ablations]
VAE_ASSETS = list(vae.VAE_ASSETS)
GENERATION_ASSETS = [generation.audio_generator, generation.generated_audio, generation.generation_evaluation]
ALL_ASSETS = FEATURE_ASSETS + TOWER_ASSETS + EMBEDDING_ASSETS + DIFFGAP_ASSETS + VAE_ASSETS + GENERATION_ASSETS
ALL_CHECKS = [
    mel_spectrograms_valid, audio_images_valid,
    towers.audio_tower_features_valid, towers.frame_tower_features_valid, towers.text_tower_features_valid,
    contrastive.clap_embeddings_valid, contrastive.cavp_embeddings_valid,
    *vae.VAE_CHECKS,
]

# Shard work is parallel inside each asset (Dask), so steps run in one process: no per-step
# interpreter start and torch import.
# The console shows INFO and up; DEBUG engine events stay in the run's event log in the UI.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

refresh_features = define_asset_job(
    "refresh_features",
    selection=AssetSelection.assets(*FEATURE_ASSETS),
    executor_def=in_process_executor,
    config=QUIET_CONSOLE,
    description="Update the clip manifest and compute the missing shards of every feature.",
)

train_diffgap = define_asset_job(
    "train_diffgap",
    selection=AssetSelection.assets(*FEATURE_ASSETS, *TOWER_ASSETS, *EMBEDDING_ASSETS, *DIFFGAP_ASSETS),
    executor_def=in_process_executor,
    config=QUIET_CONSOLE,
    description="From nothing: manifest -> features -> tower features -> CLAP/CAVP heads and embeddings -> "
    "DiffGAP in both spaces -> retrieval evaluation and ablations.",
)

train_vae = define_asset_job(
    "train_vae",
    selection=AssetSelection.assets(*FEATURE_ASSETS, *VAE_ASSETS),
    executor_def=in_process_executor,
    config=QUIET_CONSOLE,
    description="KL-VAEs on audio images and video frames, and the latents of every clip.",
)

generate_audio = define_asset_job(
    "generate_audio",
    selection=AssetSelection.assets(*GENERATION_ASSETS).upstream(),
    executor_def=in_process_executor,
    config=QUIET_CONSOLE,
    description="Everything text/video-to-audio generation needs, the generator, WAVs and Tables I/II.",
)

daily_refresh = ScheduleDefinition(
    name="daily_feature_refresh",
    job=refresh_features,
    cron_schedule="0 3 * * *",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Refresh the features every day at 03:00 (turn on in the UI or with `dagster schedule start`).",
)


@sensor(
    job=refresh_features,
    minimum_interval_seconds=300,
    default_status=DefaultSensorStatus.STOPPED,
    description="Starts refresh_features when the source's media listing changes (new, changed or removed files).",
)
def new_media_sensor(context: SensorEvaluationContext, clip_source: ClipSourceResource):
    fingerprint = clip_source.fingerprint()
    if fingerprint == context.cursor:
        return SkipReason(f"no new media in the {clip_source.kind} source")
    context.update_cursor(fingerprint)
    return RunRequest(run_key=f"media-{fingerprint}")


def _resources() -> dict:
    """Defaults: demo source, project-local store, a Dask LocalCluster; each overridable by env."""
    return {
        "clip_source": ClipSourceResource(
            kind=os.environ.get("XMODAL_SOURCE_KIND", "demo"),
            path=os.environ.get("XMODAL_SOURCE_PATH", ""),
            media_dir=os.environ.get("XMODAL_MEDIA_DIR", ""),
            dataset=os.environ.get("XMODAL_DATASET", "demo"),
            shard_size=int(os.environ.get("XMODAL_SHARD_SIZE", "64")),
            demo_clips=int(os.environ.get("XMODAL_DEMO_CLIPS", "300")),
            s3_endpoint_url=os.environ.get("XMODAL_S3_ENDPOINT_URL", ""),
        ),
        "feature_store": FeatureStoreResource(
            root=default_store_root(), s3_endpoint_url=os.environ.get("XMODAL_S3_ENDPOINT_URL", "")
        ),
        "compute": ComputeResource(
            mode=os.environ.get("XMODAL_COMPUTE", "local_cluster"),
            n_workers=int(os.environ.get("XMODAL_WORKERS", "2")),
            scheduler_address=os.environ.get("XMODAL_DASK_SCHEDULER", ""),
        ),
        "device": DeviceResource(name=os.environ.get("XMODAL_DEVICE", "cpu")),
        "pretrained_clap": PretrainedClapResource(model_dir=os.environ.get("XMODAL_CLAP_MODEL_DIR", "")),
    }


defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[refresh_features, train_diffgap, train_vae, generate_audio],
    schedules=[daily_refresh],
    sensors=[new_media_sensor],
    resources=_resources(),
)
