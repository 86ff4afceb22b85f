"""Audio generation end to end on the 40-clip demo with tiny settings, through Dagster:
features -> towers -> heads -> embeddings -> DiffGAP -> VAE latents -> audio_generator ->
generated_audio (WAVs + previews) -> generation_evaluation (Tables I / II); then the stage pieces."""

import numpy as np
import pytest
import soundfile as sf
from dagster import DagsterInstance

from assets import contrastive, diffgap, generation, towers, vae
from assets.features import audio_images, clip_manifest, mel_spectrograms
from assets.resources import (ClipSourceResource)
from stages.core.store import FeatureStore
from tests.fixtures import tiny
from tests.fixtures.tiny import materialize_dataset
from tests.fixtures.dagster_results import materialization_metadata
from stages.core import tables
from stages.generation import evaluate as generation_eval
from stages.generation import sample as generation_sample
from stages.generation import train as generation_train

CHAIN = [clip_manifest, mel_spectrograms, audio_images, vae.video_frames, vae.audio_vae, vae.frame_vae, vae.vae_latents,
         towers.audio_tower, towers.frame_tower, towers.text_tower,
         contrastive.clap_head, contrastive.cavp_head, contrastive.clap_embeddings, contrastive.cavp_embeddings,
         diffgap.diffgap_clap, diffgap.diffgap_cavp,
         generation.audio_generator, generation.generated_audio, generation.generation_evaluation]
TINY_VAE = {"steps": 40, "batch_size": 8, "learning_rate": 2e-3, "eval_every": 40, "block_out_channels": [16, 32, 32],
            "norm_num_groups": 4, "max_val_images": 16}
HEAD = {"steps": 40, "batch_size": 16, "eval_every": 40, "embed_dim": 32, "hidden_dim": 64}
CDM = {"steps": 60, "bst_interval": 20, "width": 64, "depth": 1, "checkpoint_every": 0, "learning_rate": 1e-3}
GEN = {"steps": 30, "batch_size": 8, "block_out_channels": [16, 32], "threads": 1}
SAMPLE = {"steps": 5, "diffgap_steps": 5, "diffgap_samples": 2, "vocoder": "griffinlim", "griffinlim_iters": 2, "threads": 1}
RUN_CONFIG = {"ops": {
    "audio_images": {"config": {"size": 32}},
    "video_frames": {"config": {"fps": 2.0, "size": 32}},
    "audio_vae": {"config": TINY_VAE},
    "frame_vae": {"config": {**TINY_VAE, "frame_stride": 4}},
    "vae_latents": {"config": {"modalities": ["audio", "frames"]}},
    "frame_tower": {"config": {"size": 64}},
    "clap_head": {"config": HEAD}, "cavp_head": {"config": HEAD},
    "diffgap_clap": {"config": CDM}, "diffgap_cavp": {"config": CDM},
    "audio_generator": {"config": GEN},
    "generated_audio": {"config": {**SAMPLE, "count": 2, "prompts": ["a dog barks"]}},
    "generation_evaluation": {"config": {**SAMPLE, "max_clips": 3, "alignment_steps": 30}},
}}


def test_generation_chain_through_dagster(demo_dataset, tmp_path):
    resources = tiny.resources(tmp_path / "store", ClipSourceResource(kind="jsonl", path=str(demo_dataset), dataset="demo", shard_size=20))
    result = materialize_dataset(CHAIN, resources, instance=DagsterInstance.ephemeral(), run_config=RUN_CONFIG)
    assert result.success

    trained = materialization_metadata(result, "audio_generator")
    assert trained["clap_status"] == "trained" and trained["cavp_status"] == "trained"
    assert trained["clap_condition_sensitivity"] > 0 and trained["cavp_condition_sensitivity"] > 0
    ref = result.output_for_node("audio_generator")
    assert set(ref.keys) == {"clap", "cavp"}

    generated = result.output_for_node("generated_audio")
    # 2 test clips x 2 spaces x 2 methods + 1 prompt x 2 methods
    assert len(generated["wavs"]) == 10
    wave, rate = sf.read(generated["wavs"][0])
    assert rate == 22050 and wave.ndim == 1 and len(wave) > 22050 and np.isfinite(wave).all()
    meta = materialization_metadata(result, "generated_audio")
    assert meta["T2A_prompts_preview"].startswith("![preview](data:image/png;base64,")

    rows = result.output_for_node("generation_evaluation")
    methods = {(r["task"], r["method"]) for r in rows}
    assert ("T2A", "DiffGAP") in methods and ("V2A", "baseline (no DiffGAP)") in methods
    assert ("V2A", "real audio (the reference itself)") in methods
    assert ("T2A", "condition: the real audio embedding (a perfect bridge)") in methods
    bridged = next(r for r in rows if r["task"] == "T2A" and r["method"].startswith("condition:"))
    assert bridged["cos(condition, real audio emb)"] > 0.999
    for row in rows:
        for name in ("IS (aiSFX)", "KL (aiSFX)", "FAD (aiSFX)", "FD (aiSFX)"):
            assert np.isfinite(row[name]) and row[name] >= 0
        assert row["IS (aiSFX)"] >= 1.0 - 1e-9
        if row["task"] == "V2A":
            assert 0 <= row["Acc"] <= 100 and 0 <= row["Acc (real pairs vs misaligned)"] <= 100
    evaluation = materialization_metadata(result, "generation_evaluation")
    assert "| method | IS (aiSFX) | KL (aiSFX) | FD (aiSFX) | Acc | n |" in evaluation["table_I_V2A"]
    assert "FAD (aiSFX)" in evaluation["table_II_T2A"]
    store = FeatureStore(str(tmp_path / "store"))
    assert store.fs.exists(evaluation["csv"])

    # The CLI on the same store: a clip id (T2A + V2A) and a prompt, with and without DiffGAP.
    from pipelines.cli import main

    test_clip = generated["wavs"][0].split("/")[-1].split("__")[0]
    out = tmp_path / "cli"
    assert main(["generate", "--root", str(tmp_path / "store"), "--clip-id", test_clip, "--text", "rain on a window", "--steps", "2",
                 "--vocoder", "griffinlim", "--out", str(out), "--threads", "1"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert f"{test_clip}__V2A__diffgap.wav" in names and "text00__T2A__baseline.wav" in names
    assert sum(n.endswith(".wav") for n in names) == 6 and sum(n.endswith(".png") for n in names) == 3

    # Same config again: the generators are reused, not retrained.
    again = materialize_dataset([*CHAIN[:-2]], resources, instance=DagsterInstance.ephemeral(), run_config={
        "ops": {k: v for k, v in RUN_CONFIG["ops"].items() if k not in ("generated_audio", "generation_evaluation")}})
    assert materialization_metadata(again, "audio_generator")["clap_status"] == "reused"


def test_hifigan_decoder_and_tables():
    """The real decode path (VAE -> audio image -> mel -> HiFi-GAN) on one short latent, and the table helpers."""
    from models.vae import VaeConfig, build_vae
    from models.vocoder import get_vocoder

    vae = build_vae(VaeConfig(block_out_channels=(16, 32), norm_num_groups=4, mid_block_attention=False), seed=0)
    decoder = generation_sample.Decoder(vae, 1.0, "hifigan22k", 0.5, get_vocoder())
    out = decoder(np.zeros((1, 4, 16, 16), np.float32))
    assert out["images"].shape == (1, 32, 32, 3) and out["mels"].shape == (1, 80, 44)
    assert out["audio"].shape == (1, 44 * 256) and np.isfinite(out["audio"]).all()

    rows = [{"task": "V2A", "method": "DiffGAP", "IS (aiSFX)": 2.0, "KL (aiSFX)": 0.5, "FD (aiSFX)": 3.0, "Acc": 75.0, "n": 4},
            {"task": "T2A", "method": "DiffGAP", "IS (aiSFX)": 2.0, "KL (aiSFX)": 0.5, "FAD (aiSFX)": 1.0, "FD (aiSFX)": 3.0, "n": 4}]
    assert "| DiffGAP | 2.000 | 0.500 | 3.000 | 75.000 | 4 |" in generation_eval.table_markdown(rows, "V2A")
    csv = tables.rows_to_csv(rows).splitlines()
    assert csv[0] == "task,method,IS (aiSFX),KL (aiSFX),FD (aiSFX),Acc,n,FAD (aiSFX)" and csv[2].endswith(",,4,1.0")


def _class_latents(n: int, rng: np.random.Generator, classes: int = 4, size: int = 8):
    """Scaled latents whose channel c is bright for class c (the rest noise), with unit-norm class
    embeddings (plus jitter) as conditions: the condition fully decides which channel lights up."""


    labels = rng.integers(0, classes, n)
    latents = 0.3 * rng.normal(size=(n, 4, size, size))
    latents[np.arange(n), labels] += 1.5
    centres = np.random.default_rng(1234).normal(size=(classes, 16))  # the same classes in every call
    cond = centres[labels] + 0.1 * rng.normal(size=(n, 16))
    cond /= np.linalg.norm(cond, axis=1, keepdims=True)
    f32 = lambda x: x.astype(np.float32)
    return generation_train.LatentPairs([f"c{i}" for i in range(n)], f32(latents), f32(cond), f32(cond), ["train"] * n), labels


@pytest.mark.parametrize("prediction_type, steps, min_ratio", [("v_prediction", 300, 1.5), ("epsilon", 800, 1.1)])
def test_trained_generator_follows_its_condition(prediction_type, steps, min_ratio):
    """The condition-sensitivity diagnostic and the samples agree: after training, another clip's
    condition costs more eps-MSE than the clip's own, and samples light up the conditioned channel."""


    rng = np.random.default_rng(0)
    train, _ = _class_latents(128, rng)
    held_out, labels = _class_latents(32, rng)
    config = generation_train.GeneratorTrainConfig(steps=steps, batch_size=32, learning_rate=2e-3, block_out_channels=(16, 32), norm_num_groups=4,
                                    threads=1, prediction_type=prediction_type)
    untrained = generation_train.LatentGenerator(config.generator_config(16, 4, 8))
    assert abs(generation_train.condition_sensitivity(untrained, held_out)["shuffled_over_matched"] - 1.0) < 0.05

    model = generation_train.train_generator(train, config).model
    sensitivity = generation_train.condition_sensitivity(model, held_out)
    assert sensitivity["shuffled_over_matched"] > min_ratio, sensitivity
    assert sensitivity["loss_matched"] < sensitivity["loss_null"]
    z = generation_sample.generate_latents(model, held_out.audio, generation_sample.SampleConfig(steps=10, guidance_scale=2.0, threads=1))
    predicted = z.mean(axis=(2, 3)).argmax(axis=1)
    assert np.mean(predicted == labels) >= 0.8
