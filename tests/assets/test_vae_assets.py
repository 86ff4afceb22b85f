"""The VAE assets materialized through Dagster on the demo media: video_frames, audio_vae, frame_vae,
vae_latents, latent_statistics and their checks; a re-run reuses the checkpoints and the shards; a pretrained folder."""

from __future__ import annotations

import pytest
from dagster import DagsterInstance

from assets.features import audio_images, clip_manifest, mel_spectrograms
from assets.resources import ClipSourceResource
from assets.vae import VAE_ASSETS, VAE_CHECKS
from models.vae import VaeConfig, build_vae
from stages.core.store import FeatureStore
from stages.features.latents import LATENT_FEATURE, latent_vaes, load_latent_statistics
from tests.fixtures.tiny import materialize_dataset, resources
from tests.fixtures.dagster_results import check_passed, materialization_metadata

ASSETS = [clip_manifest, mel_spectrograms, audio_images, *VAE_ASSETS, *VAE_CHECKS]
TINY_VAE = {"steps": 30, "batch_size": 8, "learning_rate": 2e-3, "eval_every": 15, "block_out_channels": [16, 32, 32],
            "norm_num_groups": 4, "max_val_images": 64}
RUN_CONFIG = {"ops": {
    "audio_images": {"config": {"size": 32}},
    "video_frames": {"config": {"fps": 2.0, "size": 32}},
    "audio_vae": {"config": TINY_VAE},
    "frame_vae": {"config": {**TINY_VAE, "frame_stride": 2}},
}}


def _resources(root) -> dict:
    return resources(root)


@pytest.fixture
def demo_source(demo_dataset):
    return ClipSourceResource(kind="jsonl", path=str(demo_dataset), dataset="demo", shard_size=16)


def test_materialize_train_store_latents_and_reuse(demo_source, tmp_path, monkeypatch):
    instance = DagsterInstance.ephemeral()
    resources = {"clip_source": demo_source, **_resources(tmp_path)}
    first = materialize_dataset(ASSETS, resources, instance=instance, run_config=RUN_CONFIG)
    assert first.success
    frames = materialization_metadata(first, "video_frames")
    assert (frames["shards_new"], frames["clips_ok"], frames["frames_per_clip"]) == (3, 40, 8)
    assert frames["preview"].startswith("![preview](data:image/png;base64,")

    audio = materialization_metadata(first, "audio_vae")
    assert audio["reused"] is False and audio["source"] == "trained" and audio["steps"] == 30
    # 2 evaluations cannot reach the default patience of 3: the budget ran out, and the metadata says so
    assert audio["stopped_by"] == "max_steps" and audio["stop_reason"] == "the budget of 30 steps ran out"
    assert audio["stopping_rule"] == {"metric": "val L1", "eval_every": 15, "patience": 3, "min_delta": 0.01, "lr_drops": 2,
                                      "lr_drop": 0.2, "max_steps": 30}
    assert audio["psnr_db"] > audio["psnr_db_untrained"] + 3 and audio["psnr_db"] > audio["psnr_db_mean_image"]
    assert audio["mel_l1"] < audio["metrics"]["untrained"]["mel_l1"] and audio["latent_shape"] == [4, 8, 8]
    assert "data:image/png;base64," in audio["preview"] and "| step |" in audio["loss_curve"]
    frame = materialization_metadata(first, "frame_vae")
    assert frame["psnr_db"] > frame["psnr_db_untrained"] + 3 and frame["images_train"] == frame["clips_train"] * 4

    latents = materialization_metadata(first, "vae_latents")
    assert (latents["shards_new"], latents["clips_ok"], latents["dtype"]) == (3, 40, "float16")
    assert latents["audio_shape"] == [4, 8, 8] and latents["frames_shape"] == [8, 4, 8, 8]
    assert 0.75 < latents["audio_latent_std"] < 1.33 and 0.75 < latents["frames_latent_std"] < 1.33
    # (measured 0.61 audio, 3.2 frames: a 30-step VAE's posterior is still wide next to its means)
    assert 0 < latents["audio_posterior_std"] < 10 and 0 < latents["frames_posterior_std"] < 10
    assert latents["vae_keys"] == {"audio": audio["checkpoint_key"], "frames": frame["checkpoint_key"]}
    assert "data:image/png;base64," in latents["preview"]
    checks = check_passed(first)
    # 30 steps are enough for the audio VAE to beat the mean image, not reliably for the frame VAE
    # (a WARN check telling to train longer): only its evaluation is asserted.
    assert checks.pop("frame_vae_beats_baselines") in (True, False)
    assert checks == {"video_frames_valid": True, "audio_vae_beats_baselines": True, "vae_latents_valid": True,
                      "vae_latents_unit_std": True}

    store = FeatureStore(str(tmp_path))
    table = store.read_arrays("demo", LATENT_FEATURE)  # readable without Dagster, newest key
    assert table.feature_key == latents["feature_key"] and table.arrays["frames_mean"].shape == (40, 8, 4, 8, 8)
    assert table.arrays["frames_std"].shape == (40, 8, 4, 8, 8)
    statistics = materialization_metadata(first, "latent_statistics")
    assert statistics["reused"] is False and statistics["latent_key"] == latents["feature_key"]
    assert len(statistics["audio_channel_mean"]) == 4 and len(statistics["frames_channel_std"]) == 4
    assert statistics["audio_scale"] == pytest.approx(1.0, abs=0.01)  # the sidecar's factor saw the same train images
    stored = load_latent_statistics(store, "demo", statistics["statistics_key"])
    assert stored["audio"]["vae"]["key"] == audio["checkpoint_key"] and stored["frames"]["vae"]["key"] == frame["checkpoint_key"]
    vaes = latent_vaes(store, "demo")
    assert vaes["audio"]["key"] == audio["checkpoint_key"] and vaes["audio"]["scaling_factor"] == pytest.approx(audio["scaling_factor"], rel=1e-5)

    # A re-run trains nothing and computes no shard.
    import stages.vae.train as stage

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(stage, "train_vae", no_training)
    again = materialize_dataset(ASSETS, resources, instance=instance, run_config=RUN_CONFIG)
    assert again.success
    assert materialization_metadata(again, "audio_vae")["reused"] is True and materialization_metadata(again, "frame_vae")["reused"] is True
    assert materialization_metadata(again, "audio_vae")["checkpoint_key"] == audio["checkpoint_key"]
    latents_again = materialization_metadata(again, "vae_latents")
    assert (latents_again["shards_new"], latents_again["shards_reused"], latents_again["clips_computed"]) == (0, 3, 0)
    assert latents_again["feature_key"] == latents["feature_key"]
    statistics_again = materialization_metadata(again, "latent_statistics")
    assert statistics_again["reused"] is True and statistics_again["statistics_key"] == statistics["statistics_key"]
    versions = [
        [e.materialization.tags.get("dagster/data_version") for e in r.get_asset_materialization_events()
         if e.asset_key.path[-1] == "vae_latents"][0]
        for r in (first, again)
    ]
    assert versions[0] == versions[1] is not None


def test_pretrained_folder_instead_of_training(demo_source, tmp_path):
    folder = tmp_path / "pretrained_vae"
    build_vae(VaeConfig(block_out_channels=(16, 32, 32), norm_num_groups=4), seed=5).save_pretrained(folder)
    config = {"ops": {"audio_images": RUN_CONFIG["ops"]["audio_images"],
                      "audio_vae": {"config": {"pretrained_dir": str(folder), "max_val_images": 16}}}}
    selection = [clip_manifest, mel_spectrograms, audio_images, VAE_ASSETS[1]]  # up to audio_vae
    resources = {"clip_source": demo_source, **_resources(tmp_path / "store")}
    result = materialize_dataset(selection, resources, instance=DagsterInstance.ephemeral(), run_config=config)
    meta = materialization_metadata(result, "audio_vae")
    assert meta["source"] == f"pretrained: {folder}" and meta["steps"] == 0 and meta["latent_shape"] == [4, 8, 8]
    # The folder holds an untrained VAE: loaded as is (no training), it is no better than the mean image.
    assert meta["psnr_db"] < meta["psnr_db_mean_image"]

    config["ops"]["audio_vae"]["config"]["pretrained_dir"] = str(tmp_path / "missing")
    broken = materialize_dataset(selection, resources, instance=DagsterInstance.ephemeral(), run_config=config,
                         raise_on_error=False)
    assert not broken.success
    (failure,) = [e for e in broken.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message.strip()
    assert "does not exist" in message and str(tmp_path / "missing") in message and "\n" not in message


def test_latent_statistics_runs_in_the_vae_and_generation_jobs():
    from pipelines.definitions import defs

    for job in ("train_vae", "generate_audio"):
        keys = {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.executable_asset_keys}
        assert {"vae_latents", "latent_statistics"} <= keys, job
