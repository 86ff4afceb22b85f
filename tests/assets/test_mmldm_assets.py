"""The MM-LDM chain through Dagster on the demo media, tiny configs: KL-VAEs -> vae_latents ->
mmldm_autoencoder -> mmldm_latents -> mmldm (DiT) -> mmldm_evaluation; a re-run reuses every
checkpoint, shard and the cached evaluation; sounding mp4s and previews land in the store."""

from __future__ import annotations

import av
import numpy as np
import pytest
from dagster import DagsterInstance

from assets.features import audio_images, clip_manifest, mel_spectrograms
from assets.mmldm import MMLDM_ASSETS
from assets.resources import ClipSourceResource
from assets.vae import audio_vae, frame_vae, vae_latents, video_frames
from stages.core.store import FeatureStore
from stages.mmldm.latents import MMLDM_LATENT_FEATURE
from tests.fixtures.dagster_results import materialization_metadata
from tests.fixtures.tiny import materialize_dataset, resources

TINY_VAE = {"steps": 20, "batch_size": 8, "learning_rate": 2e-3, "eval_every": 10, "block_out_channels": [16, 32, 32],
            "norm_num_groups": 4, "max_val_images": 32}
RUN_CONFIG = {"ops": {
    "audio_images": {"config": {"size": 32}},
    "video_frames": {"config": {"fps": 2.0, "size": 32}},
    "audio_vae": {"config": {**TINY_VAE, "crop_width": 0}},
    "frame_vae": {"config": {**TINY_VAE, "frame_stride": 2}},
    "mmldm_autoencoder": {"config": {"steps": 4, "batch_size": 4, "latent_channels": 4, "encoder_channels": 16,
                                     "decoder_channels": [16, 16], "semantic_dim": 16, "checkpoint_every": 2}},
    "mmldm": {"config": {"steps": 5, "batch_size": 4, "hidden": 32, "depth": 1, "heads": 2, "checkpoint_every": 2}},
    "mmldm_evaluation": {"config": {"steps": 2, "decoder_steps": 2, "max_clips": 3, "phi": [1.0, 2.0]}},
}}
ASSETS = [clip_manifest, mel_spectrograms, audio_images, video_frames, audio_vae, frame_vae, vae_latents, *MMLDM_ASSETS]


@pytest.fixture
def demo_source(demo_dataset):
    return ClipSourceResource(kind="jsonl", path=str(demo_dataset), dataset="demo", shard_size=16)


def test_mmldm_chain_trains_evaluates_and_reuses(demo_source, tmp_path):
    instance = DagsterInstance.ephemeral()
    found = {"clip_source": demo_source, **resources(tmp_path)}
    first = materialize_dataset(ASSETS, found, instance=instance, run_config=RUN_CONFIG)
    assert first.success
    autoencoder = materialization_metadata(first, "mmldm_autoencoder")
    assert autoencoder["status"] == "trained" and autoencoder["steps_run"] == 4 and autoencoder["classes"] >= 2
    assert {"audio_mse", "frames_mse", "audio_to_video_r1", "class_accuracy"} <= set(autoencoder["metrics"])
    model = materialization_metadata(first, "mmldm")
    assert model["status"] == "trained" and model["steps_run"] == 5
    store = FeatureStore(str(tmp_path))
    latents = materialization_metadata(first, "mmldm_latents")
    table = store.read_arrays("demo", MMLDM_LATENT_FEATURE, latents["key"] if "key" in latents else store.resolve_key("demo", MMLDM_LATENT_FEATURE, None))
    assert table.arrays["audio_mean"].shape[1:] == (4, 4, 4) and table.arrays["video_mean"].shape[1:] == (4, 4, 4)
    assert (table.arrays["audio_std"] > 0).all()

    evaluation = materialization_metadata(first, "mmldm_evaluation")
    assert evaluation["reused"] is False and evaluation["clips"] == 3
    text = evaluation["table"]
    for row in ("ground truth (KL-VAE reconstruction)", "MM-LDM autoencoder reconstruction", "control", "| MM-LDM | svg |",
                "| MM-LDM | a2v | 2 |", "| MM-LDM | v2a | 1 |"):
        assert row in text
    assert "FAD (aiSFX)" in text and "FVD (EffNet-lite0)" in text and "KVD (EffNet-lite0)" in text
    assert any(k.startswith("preview svg") for k in evaluation)
    mp4s = sorted(store.fs.glob(evaluation["folder"].replace("file://", "") + "/*.mp4"))
    assert len(mp4s) == 3 * (1 + 1 + 1 + 2 + 2)  # 3 clips x (KL-VAE, autoencoder, svg, a2v x 2, v2a x 2); none of the control
    with av.open(mp4s[0]) as container:  # a sounding video
        assert {s.type for s in container.streams} == {"video", "audio"}

    # Table 5's reconstruction-only evaluation (bench/mmldm_tables.py --ablations): the same three rows, no DiT
    from stages.core.results import load_result
    from stages.ingest.manifest import load_manifest
    from stages.mmldm.evaluate import MmldmEvalConfig, evaluate_reconstruction

    latent_key = latents["key"] if "key" in latents else store.resolve_key("demo", MMLDM_LATENT_FEATURE, None)
    recon = evaluate_reconstruction(store, load_manifest(store, "demo"), autoencoder["checkpoint_key"], latent_key,
                                    MmldmEvalConfig(steps=2, decoder_steps=2, max_clips=3, tasks=()))
    assert [r["model"] for r in recon["rows"]] == ["ground truth (KL-VAE reconstruction)", "MM-LDM autoencoder reconstruction",
                                                   "control: other real clips (train)"]
    full = {r["model"]: r for r in load_result(store, "demo", "mmldm_evaluation", evaluation["result_key"])[0]["rows"]}
    for r in recon["rows"]:  # the same decode of the same latents and seed as the full evaluation's rows
        assert r["FAD (aiSFX)"] == pytest.approx(full[r["model"]]["FAD (aiSFX)"], rel=1e-3)
    with pytest.raises(ValueError, match="takes no tasks"):
        evaluate_reconstruction(store, load_manifest(store, "demo"), autoencoder["checkpoint_key"], latent_key, MmldmEvalConfig())

    # Table 1's signal-space baseline (bench/mmldm_tables.py --signal-baseline): the same DiT on the
    # signals the KL latents came from, scored against the same references
    from stages.features.latents import LATENT_FEATURE
    from stages.mmldm import signal_baseline
    from stages.mmldm.evaluate import evaluate_mmldm
    from stages.mmldm.train import DitTrainConfig

    manifest = load_manifest(store, "demo")
    vae_latent_key = store.resolve_key("demo", LATENT_FEATURE, None)
    signals = signal_baseline.load_signals(store, manifest, vae_latent_key)
    assert signals.audio_mean.shape[1] == 1 and signals.video_mean.shape[1] == 3 and not signals.audio_std.any()
    inputs = store.shard_manifest("demo", LATENT_FEATURE, vae_latent_key, sorted(manifest.by_shard())[0])["params"]["inputs"]
    images = store.read_arrays("demo", inputs["audio"]["feature"], inputs["audio"]["key"], names=[inputs["audio"]["array"]])
    first_image = images.arrays[inputs["audio"]["array"]][images.clip_ids.index(signals.clip_ids[0])]
    assert np.array_equal(signal_baseline.to_uint8(signals.audio_mean[0, 0]), first_image[..., 0])  # exact round trip
    tiny = DitTrainConfig(steps=2, batch_size=4, hidden=32, depth=1, heads=2)
    baseline = signal_baseline.train_signal_baseline(store, manifest, vae_latent_key, tiny, audio_patch=(8, 8), video_patch=(2, 8, 8))
    assert baseline.steps == 2 and baseline.dit.config.video_patch == (2, 8, 8)
    result = evaluate_mmldm(store, manifest, None, None, {"mmldm_latent_key": latent_key}, vae_latent_key,
                            MmldmEvalConfig(steps=2, max_clips=3, phi=(1.0,), tasks=()), keep_samples=0, baseline=baseline)
    by_task = {r["task"]: r for r in result.rows if r["model"] == signal_baseline.LABEL}
    assert [r["model"] for r in result.rows[:2]] == ["ground truth (KL-VAE reconstruction)", "control: other real clips (train)"]
    assert set(by_task) == {"svg", "a2v", "v2a"}
    assert {"FAD (aiSFX)", "FVD (EffNet-lite0)"} <= set(by_task["svg"])
    assert "FAD (aiSFX)" not in by_task["a2v"] and "FVD (EffNet-lite0)" not in by_task["v2a"]
    assert all(np.isfinite(v) for r in by_task.values() for k, v in r.items() if k.startswith(("FAD", "FVD", "KVD")))

    again = materialize_dataset(ASSETS, found, instance=instance, run_config=RUN_CONFIG)
    assert again.success
    assert materialization_metadata(again, "mmldm_autoencoder")["status"] == "reused"
    assert materialization_metadata(again, "mmldm")["status"] == "reused"
    assert materialization_metadata(again, "mmldm_evaluation")["reused"] is True
