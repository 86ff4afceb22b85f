"""KL-VAE assets (MM-LDM 3.1): video_frames -> audio_vae / frame_vae -> vae_latents, with their checks.

    clip_manifest ──> video_frames ─────────────> frame_vae ──┐
    audio_images (+ clip_manifest) ─────────────> audio_vae ──┼──> vae_latents ──> latent_statistics
    audio_images, video_frames ───────────────────────────────┘

Each asset reads, calls a stage (stages.features.frames, stages.vae.train), writes, reports. The VAEs are
checkpoints in the feature store (safetensors + lineage sidecar); a re-run with the same inputs
and config reuses them, and vae_latents computes only the shards whose key is missing.
"""

import warnings

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Config,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
)
from pydantic import Field

from assets.factory import SHARD_RETRY, dataset_asset, dataset_check, feature_asset
from assets.factory import check_feature, compute_feature, data_version, new_shards, preview_markdown
from assets.resources import ComputeResource, DeviceResource, FeatureStoreResource
from stages.features import frames as FR
from stages.features import latents
from stages.vae import train as vae_train
from stages.core.refs import FeatureRef, ManifestRef, VaeRef
from stages.features.base import registered_feature
from stages.ingest.manifest import load_manifest

warnings.filterwarnings("ignore", message=r"Parameter `data_version`")

PREVIEW_CLIPS = 4
# vae_latents_unit_std passes when each modality's latent std over all rows lies in this band. The
# scaling factor makes it 1 on the training split's posterior means; val/test and new clips drift
# a little (measured 1.003 for audio and for frames over all 300 demo clips), a VAE used on data
# unlike its training data drifts more. Latent means are not centred (-0.69 audio, -0.31 frames).
LATENT_STD_BAND = (0.75, 1.33)


class VideoFramesConfig(Config):
    fps: float = Field(default=4.0, description="Frames per second sampled from each clip (nearest source frame).")
    size: int = Field(default=64, description="Frames are size x size RGB: shorter side resized, then centre-cropped.")
    seconds: float = Field(default=4.0, description="Clip length in seconds; a shorter clip repeats its last frame.")


class VaeTrainingConfig(Config):
    pretrained_dir: str = Field(default="", description="Local folder of a diffusers AutoencoderKL to use instead of training (never downloaded); empty = train.")
    steps: int = Field(default=1000, description="Most optimizer steps (AdamW); the stopping rule (patience, min_delta, lr_drops) may end earlier; the best validation weights are kept. With patience 0: a one-cycle schedule over every step.")
    batch_size: int = Field(default=16, description="Images per step.")
    learning_rate: float = Field(default=1e-3, description="Peak learning rate.")
    kl_weight: float = Field(default=1e-5, description="Weight of the KL term per latent element, next to a per-pixel L1 in [-1, 1] units.")
    spectral_weight: float = Field(default=0.0, description="Weight of an L1 on log(1+|FFT2|) of the images (perceptual-free sharpness term).")
    gradient_weight: float = Field(default=0.0, description="Weight of a multi-scale L1 on the images' height and width differences (onsets, harmonics); 0 = off.")
    gradient_scales: int = Field(default=3, description="Resolutions of the gradient loss (each a 2x average pool of the last).")
    adversarial_weight: float = Field(default=0.0, description="Weight of an adversarial PatchGAN hinge loss (LDM's AutoencoderKL training); 0 = off.")
    adversarial_start: int = Field(default=0, description="Step from which the discriminator and the adversarial term run (the stopping rule and the kept weights start afresh there); -1 = steps // 2.")
    adaptive_weight: bool = Field(default=True, description="Scale the adversarial term by LDM's adaptive weight (reconstruction / adversarial gradient norms at the decoder's last layer).")
    discriminator_channels: int = Field(default=32, description="Channels of the discriminator's first layer.")
    discriminator_layers: int = Field(default=2, description="Strided levels of the discriminator (2: 34 px patches).")
    eval_every: int = Field(default=50, description="Validation L1 every this many steps.")
    patience: int = Field(default=3, description="Stop after this many evaluations (eval_every steps apart) in a row without a relative min_delta improvement of the best validation L1; 0 = run all steps (the checkpoint key of a config from before the rule).")
    min_delta: float = Field(default=0.01, description="Relative improvement of the best validation L1 that counts (0.01 = 1%).")
    lr_drops: int = Field(default=2, description="With the rule on: plateaus that multiply the learning rate by lr_drop (constant after warm-up otherwise) before the next one stops the fit.")
    lr_drop: float = Field(default=0.2, description="Factor of each learning-rate drop on a plateau.")
    seed: int = Field(default=0, description="Seed of initialisation, batches and the scored validation subset.")
    max_val_images: int = Field(default=256, description="Validation images scored during training and in the metrics (fixed seeded subset).")
    frame_stride: int = Field(default=1, description="Video frames only: train on every k-th frame of each clip.")
    crop_width: int = Field(default=96, description="Train on random windows of at most this many columns (0 = whole images; images no wider train whole); validation and encoding use whole images.")
    block_out_channels: list[int] = Field(default=[16, 32, 64], description="Channels per resolution level; n levels downsample by 2^(n-1) (64x64 -> 16x16 with 3).")
    layers_per_block: int = Field(default=1, description="ResNet layers per level in the encoder (decoder: one more).")
    latent_channels: int = Field(default=4, description="Channels of the latent.")
    norm_num_groups: int = Field(default=4, description="GroupNorm groups; must divide every block_out_channels entry (keep >= 4 channels per group).")
    mid_block_attention: bool = Field(default=True, description="Self-attention in the middle block (at the latent resolution).")
    threads: int = Field(default=0, description="Torch threads (speed only, not in the key); 0 = tuned while it trains by timing its own steps (2 on an idle 2-core machine, 1 beside another job); N = fixed.")

    def train_config(self) -> vae_train.VaeTrainConfig:
        fields = self.model_dump()
        fields.pop("pretrained_dir")
        return vae_train.VaeTrainConfig(**fields)


class AudioVaeTrainingConfig(VaeTrainingConfig):
    block_out_channels: list[int] = Field(default=list(vae_train.AudioVaeTrainConfig.block_out_channels),
                                          description="Channels per resolution level; 3 levels: an 80 x 352 audio image -> 20 x 88 latents (4 levels: 10 x 44).")
    max_val_images: int = Field(default=vae_train.AudioVaeTrainConfig.max_val_images,
                                description="Validation images scored during training and in the metrics (fixed seeded subset).")
    gradient_weight: float = Field(default=vae_train.AudioVaeTrainConfig.gradient_weight,
                                   description="Weight of the multi-scale gradient L1 (harmonics and onsets a pixel L1 lets the VAE smooth away); 0 = off.")
    steps: int = Field(default=vae_train.AudioVaeTrainConfig.steps,
                       description="Most optimizer steps (AdamW); the stopping rule may end earlier; the best validation weights of the last phase are kept.")
    adversarial_weight: float = Field(default=vae_train.AudioVaeTrainConfig.adversarial_weight,
                                      description="Weight of the adversarial PatchGAN hinge loss (LDM's AutoencoderKL training; sharpens the texture aiSFX hears); 0 = off.")
    adversarial_start: int = Field(default=vae_train.AudioVaeTrainConfig.adversarial_start,
                                   description="Step from which the discriminator and the adversarial term run; -1 = halfway through steps (steps // 2).")

    def train_config(self) -> vae_train.VaeTrainConfig:
        fields = self.model_dump()
        fields.pop("pretrained_dir")
        return vae_train.AudioVaeTrainConfig(**fields)


class LatentConfig(Config):
    modalities: list[str] = Field(default=["audio", "frames"], description="Which latents to store: 'audio', 'frames' or both (clips lacking one are quarantined).")
    dtype: str = Field(default="float16", description="Stored dtype: float16 (decode error far below the VAE's own) or float32.")
    batch_size: int = Field(default=16, description="Images per encoder call (speed only; 16 measured fastest on CPU).")


# ---- video_frames ---------------------------------------------------------------------------------

def _frames_report(context, store, ref: FeatureRef, metadata: dict, inputs: dict, params, written) -> None:
    metadata.update(fps=params.fps, frames_per_clip=params.n_frames, size=params.size)
    for shard in written:
        preview = store.read_arrays(ref.dataset, ref.feature, ref.key, shards=[shard])
        if len(preview):
            metadata["preview"] = preview_markdown(FR.frames_preview_png(preview.arrays["frames"][:PREVIEW_CLIPS]))
            break


video_frames = feature_asset(FR.VIDEO_FRAMES_FEATURE, config_type=VideoFramesConfig, report=_frames_report,
                             params=lambda config, inputs: FR.FrameParams(**config.model_dump()))


# ---- the VAEs -------------------------------------------------------------------------------------

def _stopping_metadata(stopping: dict | None) -> dict:
    """The stopping rule and its outcome (absent for a pretrained VAE and for checkpoints from before the rule)."""
    if not stopping:
        return {}
    return {"stopped_by": stopping["stopped_by"], "stop_reason": stopping["reason"],
            "best_val_l1": MetadataValue.float(stopping["best_val_l1"]), "stopping_rule": MetadataValue.json(stopping["rule"])}


def _fit(context, name: str, modality: str, config: VaeTrainingConfig, source: FeatureRef, digest: str,
         feature_store: FeatureStoreResource, device: DeviceResource) -> Output:
    from models.vae import PretrainedVaeError  # torch: imported when a step runs

    store = feature_store.writable_store()
    manifest = load_manifest(store, source.dataset, digest)
    try:
        train_config = config.train_config()
    except ValueError as exc:
        raise Failure(f"bad {name} config: {exc}") from None
    try:
        fit = vae_train.fit_vae(store, manifest, name, modality, source.key, train_config, config.pretrained_dir,
                        device=device.device(), log=context.log.info)
    except PretrainedVaeError as exc:
        raise Failure(f"{name}: {exc}. Fix: the {name} config's pretrained_dir.") from None
    except (ValueError, FloatingPointError) as exc:
        raise Failure(f"{name} failed: {exc}") from None
    sidecar = fit.sidecar
    context.log.info(f"{name} {fit.key}: {'reused' if fit.reused else 'trained' if not config.pretrained_dir else 'loaded'}; "
                     f"{vae_train.metrics_line(sidecar)}")
    metrics, baselines = sidecar["metrics"], sidecar["baselines"]
    metadata = {
        "checkpoint_key": fit.key,
        "checkpoint_url": MetadataValue.path(sidecar["url"]),
        "reused": fit.reused,
        "source": f"pretrained: {sidecar['pretrained']['pretrained_dir']}" if sidecar.get("pretrained") else "trained",
        "parameters": sidecar["parameters"],
        "weights_mb": MetadataValue.float(round(sidecar["weights_bytes"] / 1e6, 3)),
        "scaling_factor": MetadataValue.float(round(fit.scaling_factor, 6)),
        "latent_shape": MetadataValue.json(sidecar["latent_shape"]),
        "input_keys": MetadataValue.json(sidecar["input_keys"]),
        "clips_train": sidecar["clips_train"],
        "clips_val": sidecar["clips_val"],
        "images_train": sidecar["images_train"],
        "metrics_split": sidecar["metrics_split"],
        "steps": sidecar["steps"],
        "best_step": sidecar["best_step"],
        **_stopping_metadata(sidecar.get("stopping")),
        "train_seconds": MetadataValue.float(sidecar["train_seconds"]),
        "psnr_db": MetadataValue.float(round(metrics["psnr"], 3)),
        "psnr_db_mean_image": MetadataValue.float(round(baselines["mean_image"]["psnr"], 3)),
        "psnr_db_untrained": MetadataValue.float(round(baselines["untrained"]["psnr"], 3)),
        "metrics": MetadataValue.json({"trained": metrics, **baselines}),
        "preview": preview_markdown(vae_train.fit_preview_png(store, manifest, fit, PREVIEW_CLIPS, device.device())),
    }
    if "mel_l1" in metrics:
        metadata["mel_l1"] = MetadataValue.float(round(metrics["mel_l1"], 4))
        metadata["spectral_convergence"] = MetadataValue.float(round(metrics["spectral_convergence"], 4))
    if sidecar["history"]:
        lines = ["| step | train L1 | train KL | val L1 |", "| ---: | ---: | ---: | ---: |"]
        lines += [" | ".join(["", *("" if h[k] is None else str(h[k]) for k in ("step", "train_l1", "train_kl", "val_l1")), ""]).strip()
                  for h in sidecar["history"]]
        metadata["loss_curve"] = MetadataValue.md("\n".join(lines))
    ref = VaeRef(source.dataset, name, fit.key, modality, fit.scaling_factor, source.key, digest)
    return Output(ref, data_version=DataVersion(fit.key), metadata=metadata)


@dataset_asset(
    group="vae", kinds=("pytorch", "safetensors"),
    description="KL-VAE (diffusers AutoencoderKL) of the audio images: trained on the train split, or a local pretrained one; scaling factor from data.",
    code_version=f"audio_vae-{vae_train.VAE_CODE_VERSION}",
)
def audio_vae(
    context: AssetExecutionContext,
    config: AudioVaeTrainingConfig,
    audio_images: FeatureRef,
    clip_manifest: ManifestRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[VaeRef]:
    return _fit(context, vae_train.AUDIO_VAE, "audio", config, audio_images, clip_manifest.digest, feature_store, device)


@dataset_asset(
    group="vae", kinds=("pytorch", "safetensors"),
    description="KL-VAE (diffusers AutoencoderKL) of the video frames: trained on the train split, or a local pretrained one; scaling factor from data.",
    code_version=f"frame_vae-{vae_train.VAE_CODE_VERSION}",
)
def frame_vae(
    context: AssetExecutionContext,
    config: VaeTrainingConfig,
    video_frames: FeatureRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[VaeRef]:
    return _fit(context, vae_train.FRAME_VAE, "frames", config, video_frames, video_frames.manifest_digest, feature_store, device)


# ---- latents --------------------------------------------------------------------------------------

@dataset_asset(
    group="vae", kinds=("pytorch", "zarr"), retry_policy=SHARD_RETRY,
    description="Scaled KL-VAE posterior per clip, mean and std: audio_mean / audio_std [N, C, h, w] of the audio image and "
                "frames_mean / frames_std [N, T, C, h, w] of the video frames.",
    code_version=f"vae_latents-{latents.LATENT_CODE_VERSION}",
)
def vae_latents(
    context: AssetExecutionContext,
    config: LatentConfig,
    audio_vae: VaeRef,
    frame_vae: VaeRef,
    audio_images: FeatureRef,
    video_frames: FeatureRef,
    feature_store: FeatureStoreResource,
    compute: ComputeResource,
    device: DeviceResource,
) -> Output[FeatureRef]:
    store = feature_store.writable_store()
    if audio_images.manifest_digest != video_frames.manifest_digest:
        raise Failure("audio_images and video_frames were built from different clip manifests: materialize both again")
    vaes = {"audio": audio_vae, "frames": frame_vae}
    inputs = {"audio": audio_images, "frames": video_frames}
    for modality in config.modalities:
        if modality in vaes and vaes[modality].input_key != inputs[modality].key:
            raise Failure(f"{vaes[modality].name} was fitted on {inputs[modality].feature} key {vaes[modality].input_key}, "
                          f"not the current {inputs[modality].key}: materialize {vaes[modality].name} again")
    try:
        params = latents.LatentParams(modalities=tuple(config.modalities), dtype=config.dtype, batch_size=config.batch_size)
    except ValueError as exc:
        raise Failure(f"bad vae_latents config: {exc}") from None
    job_params = params.job_params(
        {m: {"name": v.name, "key": v.key, "scaling_factor": v.scaling_factor} for m, v in vaes.items()},
        {m: ref.key for m, ref in inputs.items()},
    )
    run, ref, metadata, written = compute_feature(
        context, store, audio_images.dataset, audio_images.manifest_digest, registered_feature(latents.LATENT_FEATURE),
        latents.LatentParams.key(job_params), job_params, compute, device.device(), tuple(latents.LatentParams.input_keys(job_params)),
    )
    metadata["dtype"] = params.dtype
    metadata["vae_keys"] = MetadataValue.json({m: job_params["vaes"][m]["key"] for m in params.modalities})
    if run.clips_ok and written:  # summaries and previews of what this run wrote
        for modality, summary in latents.latent_summary(store, ref.dataset, ref.key, written).items():
            metadata[f"{modality}_shape"] = MetadataValue.json(summary["shape"])
            # the spread of the stored posterior means over clips (1 on the train split by construction),
            # and the mean posterior std (how far a sample strays from its mean)
            metadata[f"{modality}_latent_std"] = MetadataValue.float(round(summary["std"], 4))
            metadata[f"{modality}_latent_mean"] = MetadataValue.float(round(summary["mean"], 4))
            metadata[f"{modality}_posterior_std"] = MetadataValue.float(round(summary["posterior_std"], 5))
            metadata[f"{modality}_scaling_factor"] = MetadataValue.float(round(summary["scaling_factor"], 6))
        png = latents.latent_preview_png(store, ref.dataset, ref.key, written, PREVIEW_CLIPS, device.device())
        if png:
            metadata["preview"] = preview_markdown(png)
    return Output(ref, data_version=data_version(run), metadata=metadata)


@dataset_asset(
    group="vae", kinds=("json",),
    description="Per-channel mean / std and the global scale of the train split's stored posterior means, per modality "
                "(keyed by the VAE checkpoints, the vae_latents key and the train split; a small JSON in the store).",
    code_version=f"latent_statistics-{latents.LATENT_STATISTICS_CODE_VERSION}",
)
def latent_statistics(
    context: AssetExecutionContext,
    vae_latents: FeatureRef,
    clip_manifest: ManifestRef,
    feature_store: FeatureStoreResource,
) -> Output[dict]:
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    result = latents.latent_statistics(store, manifest, vae_latents.key, log=context.log.info)
    metadata: dict = {"statistics_key": result.key, "url": MetadataValue.path(result.url), "reused": result.reused,
                      "latent_key": vae_latents.key}
    for modality, stats in result.value.items():
        metadata[f"{modality}_scale"] = MetadataValue.float(round(stats["scale"], 6))
        metadata[f"{modality}_mean"] = MetadataValue.float(round(stats["mean"], 5))
        metadata[f"{modality}_channel_mean"] = MetadataValue.json([round(v, 5) for v in stats["channel_mean"]])
        metadata[f"{modality}_channel_std"] = MetadataValue.json([round(v, 5) for v in stats["channel_std"]])
    value = {"dataset": manifest.dataset, "key": result.key, "latent_key": vae_latents.key, "statistics": result.value}
    return Output(value, data_version=DataVersion(result.key), metadata=metadata)


# ---- asset checks ---------------------------------------------------------------------------------

@dataset_check(asset=video_frames, description="Frames uint8 [T, size, size, 3], rows + quarantined == manifest clips.")
def video_frames_valid(video_frames: FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(video_frames.dataset, video_frames.feature, video_frames.key, video_frames.shards[0])
    params = FR.FrameParams(**first["params"])
    return check_feature(store, video_frames, "frames", (params.n_frames, params.size, params.size, 3))


def _check_vae(ref: VaeRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    from stages.core.checkpoints import load_checkpoint

    _, sidecar = load_checkpoint(feature_store.store(), ref.dataset, ref.name, ref.key)
    trained, baselines = sidecar["metrics"]["psnr"], sidecar["baselines"]
    margins = {b: round(trained - m["psnr"], 3) for b, m in baselines.items()}
    passed = all(margin > 0 for margin in margins.values())
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        description=(f"{sidecar['metrics_split']} PSNR {trained:.2f} dB: {margins['mean_image']:+.2f} dB over the mean image, "
                     f"{margins['untrained']:+.2f} dB over the untrained VAE" + ("" if passed else "; train longer")),
        metadata={"psnr_db": float(trained), **{f"margin_db_{b}": float(m) for b, m in margins.items()}},
    )


@dataset_check(asset=audio_vae, description="The audio VAE reconstructs validation images better (PSNR) than the mean image and than itself untrained.")
def audio_vae_beats_baselines(audio_vae: VaeRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    return _check_vae(audio_vae, feature_store)


@dataset_check(asset=frame_vae, description="The frame VAE reconstructs validation frames better (PSNR) than the mean image and than itself untrained.")
def frame_vae_beats_baselines(frame_vae: VaeRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    return _check_vae(frame_vae, feature_store)


@dataset_check(asset=vae_latents, description="Posterior mean and std shapes per modality, no NaN/Inf, rows + quarantined == manifest clips.")
def vae_latents_valid(vae_latents: FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(vae_latents.dataset, vae_latents.feature, vae_latents.key, vae_latents.shards[0])
    results, fresh = [], new_shards(store, vae_latents)
    for modality in first["params"]["modalities"]:
        for name in (latents.mean_array(modality), latents.std_array(modality)):
            results.append(check_feature(store, vae_latents, name, _row_shape(store, vae_latents, name), fresh))
    failed = [r for r in results if not r.passed]
    return failed[0] if failed else results[0]


@dataset_check(
    asset=vae_latents,
    description=f"Scaled latents have std within {LATENT_STD_BAND[0]}..{LATENT_STD_BAND[1]} per modality over all clips (1 on the training split by construction).",
)
def vae_latents_unit_std(vae_latents: FeatureRef, feature_store: FeatureStoreResource) -> AssetCheckResult:
    store = feature_store.store()
    first = store.shard_manifest(vae_latents.dataset, vae_latents.feature, vae_latents.key, vae_latents.shards[0])
    modalities = first["params"]["modalities"]
    table = latents.read_latent_means(store, vae_latents.dataset, vae_latents.key, modalities, shards=vae_latents.shards)
    stats = {m: latents.array_statistics(table.arrays[m]) for m in modalities} if len(table) else {}
    low, high = LATENT_STD_BAND
    problems = [f"{m}: {s['non_finite']} NaN/Inf" for m, s in stats.items() if s["non_finite"]]
    problems += [f"{m}: std {s['std']:.3f} outside {low}..{high}" for m, s in stats.items() if not low <= s["std"] <= high]
    if not stats:
        problems.append("no latents to check")
    summary = ", ".join(f"{m} std {s['std']:.3f} mean {s['mean']:+.3f}" for m, s in stats.items())
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.WARN,
        description="; ".join(problems) or f"{summary} over {len(table)} clips",
        metadata={f"{m}_{k}": float(v) for m, s in stats.items() for k, v in s.items()},
    )


def _row_shape(store, ref: FeatureRef, name: str) -> tuple:
    for shard in ref.shards:
        info = store.shard_manifest(ref.dataset, ref.feature, ref.key, shard)["arrays"].get(name)
        if info:
            return tuple(info["shape"][1:])
    return ()


VAE_ASSETS = [video_frames, audio_vae, frame_vae, vae_latents, latent_statistics]
VAE_CHECKS = [video_frames_valid, audio_vae_beats_baselines, frame_vae_beats_baselines, vae_latents_valid, vae_latents_unit_std]
