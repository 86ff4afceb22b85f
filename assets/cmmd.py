"""CMMD assets (issue 16): joint video-audio diffusion on cached features.

    clip_manifest ──> cmmd_frames (video_frames at 8.613 fps) ──┐
    frame_vae ──────────────────────────────────────────────────┼──> cmmd_frame_latents ──┐
    mel_latents ─────────────────────────────────────────────────────────────────────────┼──> cmmd ──> cmmd_evaluation

Each asset reads, calls a stage (stages.cmmd), writes, reports. ``cmmd`` goes through the shared
lineage mechanism: reused while its key exists, warm-started on new shards, resumed after a kill.
"""

import posixpath

from dagster import AssetExecutionContext, Config, DataVersion, Failure, MetadataValue, Output
from pydantic import Field

from assets.factory import SHARD_RETRY, compute_feature, data_version, dataset_asset, feature_asset, preview_markdown
from assets.resources import ComputeResource, DeviceResource, FeatureStoreResource
from assets.vae import PREVIEW_CLIPS, _frames_report
from stages.cmmd import evaluate as cmmd_eval
from stages.cmmd import train as cmmd_train
from stages.cmmd.data import CMMD_FPS, NegativeConfig
from stages.core.refs import CmmdRef, FeatureRef, ManifestRef, VaeRef
from stages.core.results import cached_result
from stages.core.store import feature_key
from stages.features import frames as FR
from stages.features import latents
from stages.features.base import registered_feature
from stages.ingest.manifest import load_manifest


class CmmdFramesConfig(Config):
    size: int = Field(default=64, description="Frames are size x size RGB (the frame VAE's input size).")
    seconds: float = Field(default=4.0, description="Cached clip length in seconds; windows are cut from it.")

    def params(self) -> FR.FrameParams:
        # The rate is not a choice: 22050 / 2560 fps puts exactly 10 vocoder mel frames (hop 256) on each video frame.
        return FR.FrameParams(fps=CMMD_FPS, size=self.size, seconds=self.seconds)


cmmd_frames = feature_asset(FR.VIDEO_FRAMES_FEATURE, config_type=CmmdFramesConfig, name="cmmd_frames", group="cmmd",
                            report=_frames_report, params=lambda config, inputs: config.params())


class CmmdLatentConfig(Config):
    dtype: str = Field(default="float16", description="Stored dtype of the frame latents.")
    batch_size: int = Field(default=16, description="Frames per encoder call (speed only).")


@dataset_asset(
    group="cmmd", kinds=("pytorch", "zarr"), retry_policy=SHARD_RETRY,
    description="Frame VAE posterior (mean, std) of every clip's frames at CMMD's 8.613 fps: frames_mean / frames_std [N, T, C, h, w].",
    code_version=f"vae_latents-{latents.LATENT_CODE_VERSION}",
)
def cmmd_frame_latents(
    context: AssetExecutionContext,
    config: CmmdLatentConfig,
    frame_vae: VaeRef,
    cmmd_frames: FeatureRef,
    feature_store: FeatureStoreResource,
    compute: ComputeResource,
    device: DeviceResource,
) -> Output[FeatureRef]:
    store = feature_store.writable_store()
    params = latents.LatentParams(modalities=("frames",), dtype=config.dtype, batch_size=config.batch_size)
    job_params = params.job_params({"frames": {"name": frame_vae.name, "key": frame_vae.key, "scaling_factor": frame_vae.scaling_factor}},
                                   {"frames": cmmd_frames.key})
    run, ref, metadata, written = compute_feature(
        context, store, cmmd_frames.dataset, cmmd_frames.manifest_digest, registered_feature(latents.LATENT_FEATURE),
        latents.LatentParams.key(job_params), job_params, compute, device.device(), tuple(latents.LatentParams.input_keys(job_params)),
    )
    metadata["frame_vae_key"] = frame_vae.key
    metadata["frames_key"] = cmmd_frames.key
    return Output(ref, data_version=data_version(run), metadata=metadata)


class CmmdConfig(Config):
    steps: int = Field(default=1500, description="Optimizer steps (AdamW, 5% warm-up then cosine).")
    batch_size: int = Field(default=12, description="Positive windows per step.")
    learning_rate: float = Field(default=1e-3, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, description="AdamW weight decay.")
    window_frames: int = Field(default=16, description="Video frames per training window (x10 mel frames; 16 = 1.858 s). A multiple of 2^(levels-1).")
    eta: float = Field(default=0.05, description="Weight of each negative term of Eq. (6); 0 = nCMMD (the joint loss alone).")
    negative_cap: float = Field(default=2.0, description="A negative's loss counts up to this many times its positive's (the maximised term is otherwise unbounded); 0 = uncapped.")
    negatives: dict = Field(default={"kinds": ["shift", "segment", "swap"], "fraction": 0.25, "min_shift": 0.2, "max_shift": 0.6,
                                     "min_split": 0.25, "max_split": 0.75},
                            description="Negative kinds (shift, segment, swap), the share of a batch that gets one per modality, shift range (s), split range (share of the window).")
    audio_weight: float = Field(default=1.0, description="Weight of the audio velocity error beside the video one.")
    fusion: bool = Field(default=True, description="Easy-fusion blocks between the streams; False = the no-fusion ablation.")
    video_levels: list[int] = Field(default=[32, 64, 64], description="Video U-Net channels per level.")
    audio_levels: list[int] = Field(default=[64, 96, 128], description="Audio U-Net channels per level.")
    video_patch: int = Field(default=2, description="Space-to-depth factor of the frame latents before the first conv.")
    seed: int = Field(default=0, description="Seed of initialisation, windows, negatives and noise.")
    threads: int = Field(default=0, description="Torch threads (speed only, not in the key); 0 = tuned while it trains by timing its own steps (2 on an idle 2-core machine, 1 beside another job); N = fixed.")
    checkpoint_every: int = Field(default=250, description="Progress save every this many steps (resume after a kill).")
    update_steps: int = Field(default=500, description="Warm start on new shards: steps on new + replayed clips.")
    replay_fraction: float = Field(default=0.5, description="Share of each warm-start batch drawn from clips seen before.")

    def train_config(self) -> cmmd_train.CmmdTrainConfig:
        fields = self.model_dump()
        fields["negatives"] = NegativeConfig(**fields["negatives"])
        return cmmd_train.CmmdTrainConfig(**fields)


@dataset_asset(group="cmmd", kinds=("pytorch",), code_version=f"cmmd-{cmmd_train.CMMD_CODE_VERSION}",
               description="CMMD: joint video-audio diffusion (v-prediction, easy fusion, joint contrastive loss Eq. 6) on "
                           "frame VAE latents and mel latents; train split.")
def cmmd(
    context: AssetExecutionContext,
    config: CmmdConfig,
    clip_manifest: ManifestRef,
    mel_latents: FeatureRef,
    cmmd_frame_latents: FeatureRef,
    cmmd_frames: FeatureRef,
    frame_vae: VaeRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[CmmdRef]:
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    try:
        train_config = config.train_config()
    except ValueError as exc:
        raise Failure(f"bad cmmd config: {exc}") from None
    mel_key = store.shard_manifest(mel_latents.dataset, mel_latents.feature, mel_latents.key, mel_latents.shards[0])["input_keys"][0]
    try:
        fit = cmmd_train.fit_cmmd(store, manifest, mel_latents.key, cmmd_frame_latents.key, train_config, mel_key=mel_key,
                                  log=context.log.info, device=device.device())
    except (ValueError, FloatingPointError) as exc:
        raise Failure(f"cmmd training failed: {exc}") from None
    sidecar = fit.sidecar
    history = sidecar["history"]
    metadata = {
        "checkpoint_key": fit.key, "checkpoint_url": MetadataValue.path(sidecar["url"]), "status": fit.status,
        "variant": sidecar["variant"], "parameters": sidecar["parameters"], "clips_train": sidecar["clips_train"],
        "clips_new": sidecar["clips_new"], "steps_run": sidecar["steps_run"], "resumed_from_step": sidecar["resumed_from_step"],
        "train_seconds": MetadataValue.float(sidecar["train_seconds"]), "window_seconds": MetadataValue.float(sidecar["window_seconds"]),
        "fps": MetadataValue.float(round(sidecar["fps"], 4)), "negative_kinds": MetadataValue.json(sidecar["negative_kinds"]),
        "warm_start_from": sidecar["warm_start_from"] or "",
        "final_loss": MetadataValue.float(history[-1]["loss"]) if history else MetadataValue.text("n/a"),
    }
    if history:
        lines = ["| step | joint loss | negative audio | negative video |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {h['step']} | {h['loss']} | {h.get('negative_audio', '')} | {h.get('negative_video', '')} |" for h in history[:: max(1, len(history) // 30)]]
        metadata["loss_curve"] = MetadataValue.md("\n".join(lines))
    ref = CmmdRef(manifest.dataset, fit.key, mel_latents.key, cmmd_frame_latents.key, cmmd_frames.key, frame_vae.key,
                  frame_vae.scaling_factor, sidecar["variant"])
    return Output(ref, data_version=DataVersion(fit.key), metadata=metadata)


class CmmdEvalConfig(Config):
    split: str = Field(default="test", description="Held-out split evaluated (never tune on it: lambda was chosen on val).")
    max_clips: int = Field(default=64, description="At most this many clips of the split.")
    steps: int = Field(default=50, description="DDIM steps.")
    guidance: list[float] = Field(default=[0.0, cmmd_eval.DEFAULT_GUIDANCE], description="Reconstruction-guidance weights lambda (Eq. 3); 0 = replacement.")
    seed: int = Field(default=0, description="Seed of the sampling noise.")
    length_factor: int = Field(default=1, description="2: sample twice the training window, as the paper's test setting (clips long enough only).")
    tasks: list[str] = Field(default=["V2A", "A2V"], description="V2A (video -> audio) and/or A2V (audio -> video).")
    batch_size: int = Field(default=16, description="Clips per sampling batch (speed only).")
    threads: int = Field(default=0, description="Torch threads (speed only); 0 = tuned on its own DDIM steps (2 on an idle 2-core machine, 1 beside another job); N = fixed.")

    def params(self) -> cmmd_eval.CmmdEvalConfig:
        return cmmd_eval.CmmdEvalConfig(**self.model_dump())


@dataset_asset(group="cmmd", kinds=("pytorch",), code_version="cmmd_evaluation-2",
               description="CMMD V2A and A2V on the test split: beat / onset / event hit rates, FAD (aiSFX) per set and per sample, "
                           "FVD / KVD (EffNet-lite0), against ground truth and a control; WAVs, mp4s and previews in the store.")
def cmmd_evaluation(
    context: AssetExecutionContext,
    config: CmmdEvalConfig,
    clip_manifest: ManifestRef,
    cmmd: CmmdRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[dict]:
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    try:
        eval_config = config.params()
    except ValueError as exc:
        raise Failure(f"bad cmmd_evaluation config: {exc}") from None
    key = feature_key("cmmd_evaluation", eval_config.params(), "2",  # 2: precision columns
                      [cmmd.key, cmmd.frames_key, clip_manifest.digest])
    folder = store.path(manifest.dataset, "generated", "cmmd", key)

    def compute():
        try:
            return cmmd_eval.evaluate_checkpoint(store, manifest, cmmd.key, cmmd.frames_key, cmmd.frame_vae_key, cmmd.scaling_factor,
                                                 eval_config, device.device(), context.log.info, folder, PREVIEW_CLIPS)
        except ValueError as exc:
            raise Failure(f"cmmd evaluation: {exc}") from None

    result = cached_result(store, manifest.dataset, "cmmd_evaluation", key, compute,
                           provenance={"cmmd": cmmd.key, "config": eval_config.params()}, log=context.log.info)
    value = result.value
    metadata = {"result_key": key, "reused": result.reused, "url": MetadataValue.path(result.url),
                "folder": MetadataValue.path(store.url(folder)), "outputs": len(value["outputs"]), "clips": len(value["clip_ids"])}
    for task, table in value["tables"].items():
        metadata[f"table_{task}"] = MetadataValue.md(table)
        context.log.info(f"CMMD {task} ({config.split} split, {config.steps} DDIM steps):\n{table}")
    for name, path in value["previews"].items():
        with store.fs.open(path, "rb") as handle:
            metadata[f"preview {name}"] = preview_markdown(handle.read())
    return Output(value, data_version=DataVersion(key), metadata=metadata)


CMMD_ASSETS = [cmmd_frames, cmmd_frame_latents, cmmd, cmmd_evaluation]
