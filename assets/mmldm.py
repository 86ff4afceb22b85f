"""MM-LDM assets (issue 17): sounding-video generation in a hierarchical multi-modal latent space.

    vae_latents (KL-VAE: audio images, frames) ──> mmldm_autoencoder ──┐
    vae_latents ───────────────────────────────────────────────────────┴──> mmldm_latents ──> mmldm (DiT) ──> mmldm_evaluation

Each asset reads, calls a stage (stages.mmldm), writes, reports. The autoencoder defines a latent
space (reused on new shards, like the heads); mmldm_latents is a per-shard feature; the DiT goes
through the shared lineage mechanism (reused, warm-started on new shards, resumed after a kill).
"""

from dagster import AssetExecutionContext, Config, DataVersion, Failure, MetadataValue, Output
from pydantic import Field

from assets.factory import SHARD_RETRY, compute_feature, data_version, dataset_asset, preview_markdown
from assets.resources import ComputeResource, DeviceResource, FeatureStoreResource
from stages.core.refs import FeatureRef, ManifestRef, MmldmAutoencoderRef, MmldmRef
from stages.core.results import cached_result
from stages.core.store import feature_key
from stages.features.base import registered_feature
from stages.ingest.manifest import load_manifest
from stages.mmldm import evaluate as mmldm_eval
from stages.mmldm import latents as mmldm_latent
from stages.mmldm import train as mmldm_train

PREVIEW_CLIPS = 4


class MmldmAutoencoderConfig(Config):
    steps: int = Field(default=600, description="Optimizer steps (AdamW, 5% warm-up then cosine).")
    batch_size: int = Field(default=12, description="Clips per step.")
    frames_per_step: int = Field(default=2, description="Frames per clip the signal decoder reconstructs each step (the adversarial loss needs 2).")
    learning_rate: float = Field(default=1e-3, description="Peak learning rate.")
    cl_weight: float = Field(default=0.1, description="lambda_cl: the classification loss on the demo's labels (the paper's 0.1).")
    co_weight: float = Field(default=0.1, description="lambda_co: the contrastive loss of Eq. (1) (the paper's 0.1).")
    kl_weight: float = Field(default=1e-6, description="lambda_kl on the KL of z_a and z_v, summed per clip.")
    adversarial_weight: float = Field(default=0.0, description="lambda_gan of Eq. (3) (the paper's 0.1); 0 = off, the CPU default.")
    adversarial_start: int = Field(default=0, description="Step from which the discriminator trains.")
    discriminator_lr: float = Field(default=2e-4, description="The discriminator's learning rate.")
    decoder_weighting: str = Field(default="x0", description="The signal decoder's noise MSE over timesteps: eps (the paper's), min_snr, or x0 (eps + the x0 MSE truncated at snr_gamma: steps spent where the content must come from z).")
    snr_gamma: float = Field(default=200.0, description="gamma of the x0 weighting (200, chosen on val) or of min_snr (Hang et al. use 5).")
    latent_channels: int = Field(default=8, description="C of z_a [C, 5, 22] and z_v [C, 8, 8].")
    audio_factor: int = Field(default=0, description="f_a; 0 = auto: 4 (the paper's) on 20 x 88 audio KL latents, 2 on 10 x 44, so z_a is [C, 5, 22] on either.")
    encoder_channels: int = Field(default=48, description="Width of the modal-specific encoders.")
    decoder_channels: list[int] = Field(default=[48, 96], description="The shared signal decoder's U-Net levels.")
    semantic_dim: int = Field(default=64, description="D of the semantic tokens s_a, s_v.")
    class_embedding: str = Field(default="predicted", description="predicted: the class head's softmax x a learnable table; none: no class token.")
    semantic: bool = Field(default=True, description="The shared semantic space (False: Table 5's base autoencoder).")
    shared_decoder: bool = Field(default=True, description="One signal decoder for both modalities (False: two).")
    seed: int = Field(default=0, description="Seed of initialisation, batches and noise.")
    threads: int = Field(default=0, description="Torch threads (speed only, not in the key); 0 = tuned while it trains by timing its own steps (2 on an idle 2-core machine, 1 beside another job); N = fixed.")
    checkpoint_every: int = Field(default=200, description="Progress save every this many steps (resume after a kill).")

    def train_config(self) -> mmldm_train.AutoencoderTrainConfig:
        return mmldm_train.AutoencoderTrainConfig(**self.model_dump())


@dataset_asset(group="mmldm", kinds=("pytorch",), code_version=f"mmldm_autoencoder-{mmldm_train.AUTOENCODER_CODE_VERSION}",
               description="MM-LDM's hierarchical multi-modal autoencoder on the KL-VAE latents: modal-specific encoders, "
                           "projectors to a shared semantic space (classification + contrastive loss), one shared diffusion signal decoder.")
def mmldm_autoencoder(
    context: AssetExecutionContext,
    config: MmldmAutoencoderConfig,
    clip_manifest: ManifestRef,
    vae_latents: FeatureRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[MmldmAutoencoderRef]:
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    try:
        train_config = config.train_config()
    except ValueError as exc:
        raise Failure(f"bad mmldm_autoencoder config: {exc}") from None
    try:
        fit = mmldm_train.fit_autoencoder(store, manifest, vae_latents.key, train_config, log=context.log.info, device=device.device())
    except (ValueError, FloatingPointError) as exc:
        raise Failure(f"mmldm_autoencoder training failed: {exc}") from None
    sidecar = fit.sidecar
    metrics = sidecar["metrics"]
    metadata = {
        "checkpoint_key": fit.key, "checkpoint_url": MetadataValue.path(sidecar["url"]), "status": fit.status,
        "variant": sidecar["variant"], "parameters": sidecar["parameters"], "clips_train": sidecar["clips_train"],
        "classes": len(sidecar["classes"]), "steps_run": sidecar["steps_run"], "train_seconds": MetadataValue.float(sidecar["train_seconds"]),
        "metrics_split": sidecar["metrics_split"], "metrics": MetadataValue.json(metrics),
    }
    history = sidecar["history"]
    if history:
        lines = ["| step | decoder MSE | contrastive | classification | accuracy | KL |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {h['step']} | {h['mse']} | {h['contrastive']} | {h.get('classification', '')} | {h.get('accuracy', '')} | {h['kl']} |"
                  for h in history[:: max(1, len(history) // 30)]]
        metadata["loss_curve"] = MetadataValue.md("\n".join(lines))
    context.log.info(f"mmldm_autoencoder {fit.key} ({fit.status}): {metrics}")
    ref = MmldmAutoencoderRef(manifest.dataset, fit.key, vae_latents.key, sidecar["variant"])
    return Output(ref, data_version=DataVersion(fit.key), metadata=metadata)


class MmldmLatentConfig(Config):
    dtype: str = Field(default="float32", description="Stored dtype of the MM-LDM latents.")
    batch_size: int = Field(default=16, description="Clips per encoder call (speed only).")


@dataset_asset(group="mmldm", kinds=("pytorch", "zarr"), retry_policy=SHARD_RETRY,
               code_version=f"mmldm_latents-{mmldm_latent.MMLDM_LATENT_CODE_VERSION}",
               description="MM-LDM posterior (mean, std) of every clip: audio_mean / audio_std [C, 5, 22], video_mean / video_std [C, 8, 8].")
def mmldm_latents(
    context: AssetExecutionContext,
    config: MmldmLatentConfig,
    mmldm_autoencoder: MmldmAutoencoderRef,
    vae_latents: FeatureRef,
    feature_store: FeatureStoreResource,
    compute: ComputeResource,
    device: DeviceResource,
) -> Output[FeatureRef]:
    if mmldm_autoencoder.vae_latent_key != vae_latents.key:
        raise Failure(f"mmldm_autoencoder was fitted on vae_latents {mmldm_autoencoder.vae_latent_key}, not the current "
                      f"{vae_latents.key}: materialize mmldm_autoencoder again")
    store = feature_store.writable_store()
    params = mmldm_latent.MmldmLatentParams(mmldm_autoencoder.key, config.dtype, config.batch_size)
    run, ref, metadata, _ = compute_feature(
        context, store, vae_latents.dataset, vae_latents.manifest_digest, registered_feature(mmldm_latent.MMLDM_LATENT_FEATURE),
        params.key(vae_latents.key), params.params(), compute, device.device(), (mmldm_autoencoder.key, vae_latents.key),
    )
    metadata["autoencoder_key"] = mmldm_autoencoder.key
    metadata["vae_latents_key"] = vae_latents.key
    return Output(ref, data_version=data_version(run), metadata=metadata)


class MmldmDitConfig(Config):
    steps: int = Field(default=1500, description="Optimizer steps (AdamW, 5% warm-up then cosine).")
    batch_size: int = Field(default=32, description="Clips per step.")
    learning_rate: float = Field(default=1e-3, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, description="AdamW weight decay.")
    hidden: int = Field(default=128, description="DiT width.")
    depth: int = Field(default=4, description="DiT blocks.")
    heads: int = Field(default=4, description="Attention heads.")
    conditional_share: float = Field(default=0.05, description="Share of training samples for each conditional task, a2v and v2a (the paper's 5%).")
    sample_posterior: bool = Field(default=True, description="Train on posterior samples (mean + std eps), not the means.")
    seed: int = Field(default=0, description="Seed of initialisation, batches, tasks and noise.")
    threads: int = Field(default=0, description="Torch threads (speed only, not in the key); 0 = tuned while it trains by timing its own steps (2 on an idle 2-core machine, 1 beside another job); N = fixed.")
    checkpoint_every: int = Field(default=250, description="Progress save every this many steps.")
    update_steps: int = Field(default=500, description="Warm start on new shards: steps on new + replayed clips.")
    replay_fraction: float = Field(default=0.5, description="Share of each warm-start batch drawn from clips seen before.")

    def train_config(self) -> mmldm_train.DitTrainConfig:
        return mmldm_train.DitTrainConfig(**self.model_dump())


@dataset_asset(group="mmldm", kinds=("pytorch",), code_version=f"mmldm-{mmldm_train.DIT_CODE_VERSION}",
               description="MM-LDM's DiT over [EOS_a, z_a, EOS_v, z_v] (epsilon, Eq. 8): joint generation, a2v and v2a in one model "
                           "(null latents, 5% per conditional task); train split.")
def mmldm(
    context: AssetExecutionContext,
    config: MmldmDitConfig,
    clip_manifest: ManifestRef,
    mmldm_autoencoder: MmldmAutoencoderRef,
    mmldm_latents: FeatureRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[MmldmRef]:
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    try:
        train_config = config.train_config()
    except ValueError as exc:
        raise Failure(f"bad mmldm config: {exc}") from None
    try:
        fit = mmldm_train.fit_dit(store, manifest, mmldm_latents.key, mmldm_autoencoder.key, train_config,
                                  log=context.log.info, device=device.device())
    except (ValueError, FloatingPointError) as exc:
        raise Failure(f"mmldm training failed: {exc}") from None
    sidecar = fit.sidecar
    history = sidecar["history"]
    metadata = {
        "checkpoint_key": fit.key, "checkpoint_url": MetadataValue.path(sidecar["url"]), "status": fit.status,
        "parameters": sidecar["parameters"], "clips_train": sidecar["clips_train"], "clips_new": sidecar["clips_new"],
        "steps_run": sidecar["steps_run"], "resumed_from_step": sidecar["resumed_from_step"],
        "train_seconds": MetadataValue.float(sidecar["train_seconds"]), "latent_scales": MetadataValue.json(sidecar["latent_scales"]),
        "warm_start_from": sidecar["warm_start_from"] or "",
        "final_loss": MetadataValue.float(history[-1]["loss"]) if history else MetadataValue.text("n/a"),
    }
    if history:
        lines = ["| step | loss (Eq. 8) |", "| ---: | ---: |"] + [f"| {h['step']} | {h['loss']} |" for h in history[:: max(1, len(history) // 30)]]
        metadata["loss_curve"] = MetadataValue.md("\n".join(lines))
    ref = MmldmRef(manifest.dataset, fit.key, mmldm_autoencoder.key, mmldm_latents.key, mmldm_autoencoder.vae_latent_key)
    return Output(ref, data_version=DataVersion(fit.key), metadata=metadata)


class MmldmEvalConfig(Config):
    split: str = Field(default="test", description="Held-out split evaluated (never tune on it).")
    max_clips: int = Field(default=64, description="At most this many clips of the split.")
    steps: int = Field(default=50, description="DiT DDIM steps.")
    decoder_steps: int = Field(default=25, description="Signal decoder DDIM steps per frame / audio image.")
    phi: list[float] = Field(default=[1.0, 3.0], description="Cross-modal guidance phi of Eq. (9) for a2v / v2a (1 = conditional alone).")
    tasks: list[str] = Field(default=["svg", "a2v", "v2a"], description="svg (joint), a2v, v2a.")
    seed: int = Field(default=0, description="Seed of the sampling noise.")
    batch_size: int = Field(default=16, description="Clips per sampling batch (speed only).")
    threads: int = Field(default=0, description="Torch threads (speed only); 0 = tuned on its own DDIM steps (2 on an idle 2-core machine, 1 beside another job); N = fixed.")

    def params(self) -> mmldm_eval.MmldmEvalConfig:
        return mmldm_eval.MmldmEvalConfig(**self.model_dump())


@dataset_asset(group="mmldm", kinds=("pytorch",), code_version="mmldm_evaluation-1",
               description="MM-LDM svg / a2v / v2a on the test split: FAD (aiSFX), FVD / KVD (EffNet-lite0) against ground truth "
                           "(KL-VAE reconstruction), the autoencoder's reconstruction and a control; sounding mp4s and previews in the store.")
def mmldm_evaluation(
    context: AssetExecutionContext,
    config: MmldmEvalConfig,
    clip_manifest: ManifestRef,
    mmldm: MmldmRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[dict]:
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    try:
        eval_config = config.params()
    except ValueError as exc:
        raise Failure(f"bad mmldm_evaluation config: {exc}") from None
    key = feature_key("mmldm_evaluation", eval_config.params(), "1", [mmldm.key, clip_manifest.digest])
    folder = store.path(manifest.dataset, "generated", "mmldm", key)

    def compute():
        try:
            return mmldm_eval.evaluate_checkpoint(store, manifest, mmldm.key, eval_config, device.device(), context.log.info, folder, PREVIEW_CLIPS)
        except ValueError as exc:
            raise Failure(f"mmldm evaluation: {exc}") from None

    result = cached_result(store, manifest.dataset, "mmldm_evaluation", key, compute,
                           provenance={"mmldm": mmldm.key, "config": eval_config.params()}, log=context.log.info)
    value = result.value
    metadata = {"result_key": key, "reused": result.reused, "url": MetadataValue.path(result.url),
                "folder": MetadataValue.path(store.url(folder)), "outputs": len(value["outputs"]), "clips": len(value["clip_ids"]),
                "table": MetadataValue.md(value["table"])}
    context.log.info(f"MM-LDM ({config.split} split, {config.steps} DDIM steps):\n{value['table']}")
    for name, path in value["previews"].items():
        with store.fs.open(path, "rb") as handle:
            metadata[f"preview {name}"] = preview_markdown(handle.read())
    return Output(value, data_version=DataVersion(key), metadata=metadata)


MMLDM_ASSETS = [mmldm_autoencoder, mmldm_latents, mmldm, mmldm_evaluation]
