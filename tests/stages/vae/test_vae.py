"""video_frames, VAE fitting (train / reuse / checkpoint), vae_latents shards and the way back to a mel.

One tiny VAE is trained once for the module on the demo's 32x32 audio images (a few seconds) and
reused by the tests below.
"""

from __future__ import annotations

import os
import shutil

import dataclasses

import numpy as np
import pytest
import torch

from models.vae import encode
from stages.core.checkpoints import load_checkpoint, save_checkpoint
from stages.core.errors import ConfigError
from stages.features.mel import AUDIO_IMAGE_CODE_VERSION, AUDIO_IMAGE_FEATURE, MEL_CODE_VERSION, MEL_FEATURE, AudioImageParams, MelParams, compute_audio_image_shard, compute_mel_shard
from stages.features.base import run_feature
from stages.features.frames import FRAMES_CODE_VERSION, VIDEO_FRAMES_FEATURE, FrameParams, compute_frames_shard
from stages.ingest.manifest import build_manifest
from stages.core.parallel import InProcessExecutor
from stages.ingest.sources import SourceConfig, read_source
from stages.features.spectral import get_preset
from stages.core.store import FeatureStore
from stages.vae.train import (AUDIO_VAE, FRAME_VAE, AudioVaeTrainConfig, PlateauRule, VaeTrainConfig, decode_latents, encode_scaled, fit_vae, load_vae,
                              psnr, read_image_set, reconstruction_l1, reconstruction_metrics, spectral_convergence, train_vae,
                              vae_fit_key)
from stages.features.latents import (LATENT_CODE_VERSION, LATENT_FEATURE, LatentParams, array_statistics, compute_latent_shard,
                                     latent_statistics, latent_statistics_key, latent_vaes, load_latent_statistics,
                                     read_latent_means, train_split_digest)
from stages.generation.vocode import VocodeError, check_vocoder_preset, images_to_mels, log_mel_error

IMAGE_SIZE = 32
TINY = VaeTrainConfig(steps=60, batch_size=8, learning_rate=2e-3, eval_every=30, block_out_channels=(16, 32, 32),
                      norm_num_groups=4, max_val_images=64)
# Round trip image -> latent (float16) -> image -> mel with the 60-step tiny VAE on 32x32 images:
# measured mean |delta log-mel| 0.9-1.0 against the image's own mel (the mean image scores ~1.8,
# the untrained VAE ~3).
ROUND_TRIP_MEL_L1 = 1.3


def must_not_compute(job):
    raise AssertionError(f"shard {job.shard} was computed again")


@pytest.fixture(scope="module")
def prepared(demo_dataset, tmp_path_factory):
    """Store with mels, 32x32 audio images and 2 fps 32x32 frames of the 40 demo clips (3 shards)."""
    torch.set_num_threads(1)
    store = FeatureStore(str(tmp_path_factory.mktemp("vae_store")))
    listing = read_source(SourceConfig(kind="jsonl", path=str(demo_dataset)))
    manifest, _ = build_manifest("demo", listing, None, 16)
    mel = MelParams()
    run_feature(store, manifest, MEL_FEATURE, mel.key(), mel.params(), MEL_CODE_VERSION, compute_mel_shard, InProcessExecutor())
    images = AudioImageParams(size=IMAGE_SIZE)
    image_key = images.key(mel.key())
    run_feature(store, manifest, AUDIO_IMAGE_FEATURE, image_key, images.params(), AUDIO_IMAGE_CODE_VERSION,
                compute_audio_image_shard, InProcessExecutor(), input_keys=(mel.key(),))
    frames = FrameParams(fps=2.0, size=IMAGE_SIZE)
    run_feature(store, manifest, VIDEO_FRAMES_FEATURE, frames.key(), frames.params(), FRAMES_CODE_VERSION,
                compute_frames_shard, InProcessExecutor())
    fit = fit_vae(store, manifest, AUDIO_VAE, "audio", image_key, TINY)
    return {"store": store, "manifest": manifest, "mel_key": mel.key(), "image_key": image_key,
            "frames_key": frames.key(), "fit": fit}


def test_video_frames_feature_and_no_video_quarantine(demo_dataset, bad_media, tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    for path in sorted((demo_dataset.parent / "media").glob("*.mp4"))[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(bad_media["audio_only_m4a"], folder / "audio_only.m4a")
    shutil.copy(bad_media["corrupt_mp4"], folder / "corrupt.mp4")
    shutil.copy(bad_media["wide_video_mp4"], folder / "wide.mp4")
    listing = read_source(SourceConfig(kind="folder", path=str(folder)))
    manifest, _ = build_manifest("mixed", listing, None, 4)
    store = FeatureStore(str(tmp_path / "store"))
    params = FrameParams()  # 4 fps, 64x64, 4 s
    run = run_feature(store, manifest, VIDEO_FRAMES_FEATURE, params.key(), params.params(), FRAMES_CODE_VERSION,
                      compute_frames_shard, InProcessExecutor())
    assert (run.clips_ok, run.clips_quarantined) == (4, 2)
    reasons = {q["id"]: q["reason"] for q in run.quarantined}
    assert reasons["audio_only"] == "no video stream"
    assert reasons["corrupt"].startswith("cannot decode video") and "\n" not in reasons["corrupt"]
    table = store.read_arrays("mixed", VIDEO_FRAMES_FEATURE, params.key())
    assert table.arrays["frames"].shape == (4, 16, 64, 64, 3) and table.arrays["frames"].dtype == np.uint8
    wide = table.arrays["frames"][table.clip_ids.index("wide")]
    assert wide[..., 1].mean() > 180 and wide[..., 0].mean() < 30  # the centre crop keeps the green middle
    again = run_feature(store, manifest, VIDEO_FRAMES_FEATURE, params.key(), params.params(), FRAMES_CODE_VERSION,
                        must_not_compute, InProcessExecutor())
    assert again.shards_new == 0 and again.clips_ok == 4
    assert FrameParams(fps=8).key() != params.key()
    with pytest.raises(ValueError, match="fps"):
        FrameParams(fps=0)


def test_trained_vae_beats_untrained_and_mean_image(prepared):
    sidecar = prepared["fit"].sidecar
    trained, base = sidecar["metrics"], sidecar["baselines"]
    print(f"\ntiny audio VAE ({TINY.steps} steps, {IMAGE_SIZE}x{IMAGE_SIZE}) on the {sidecar['metrics_split']} split: "
          f"trained {trained}; mean image {base['mean_image']}; untrained {base['untrained']}")
    assert sidecar["metrics_split"] == "val" and sidecar["clips_val"] >= 2
    # measured: PSNR 18.3 dB vs 16.0 (mean image) and 10.5 (untrained); mel L1 1.03 vs 1.71 and 2.67
    assert trained["psnr"] > base["untrained"]["psnr"] + 5.0
    assert trained["psnr"] > base["mean_image"]["psnr"] + 1.0
    assert trained["mel_l1"] < 0.8 * base["mean_image"]["mel_l1"] and trained["mel_l1"] < 0.5 * base["untrained"]["mel_l1"]
    assert trained["spectral_convergence"] < base["untrained"]["spectral_convergence"]
    # The 32x32 image itself already loses most of the mel's detail; the VAE adds a little on top.
    assert trained["mel_l1_source_image"] <= trained["mel_l1_source_recon"]
    assert sidecar["latent_shape"] == [4, 8, 8] and sidecar["mel_preset"] == "hifigan22k"


def test_scaling_factor_gives_unit_std_on_the_training_split(prepared):
    store, manifest, fit = prepared["store"], prepared["manifest"], prepared["fit"]
    vae, sidecar = load_vae(store, "demo", AUDIO_VAE, fit.key)
    train = read_image_set(store, manifest, "audio", prepared["image_key"]).subset("train")
    scaled = encode_scaled(vae, train.images, sidecar["scaling_factor"])
    assert abs(float(scaled.std()) - 1.0) < 1e-3
    assert abs(float(encode(vae, train.images).std()) - 1.0 / sidecar["scaling_factor"]) < 1e-3


def test_checkpoint_round_trip_and_reuse(prepared):
    store, manifest, fit = prepared["store"], prepared["manifest"], prepared["fit"]
    state, sidecar = load_checkpoint(store, "demo", AUDIO_VAE, fit.key)
    assert sidecar["input_keys"]["audio_images"] == prepared["image_key"]
    assert sidecar["input_keys"]["mel_spectrograms"] == prepared["mel_key"]
    assert sidecar["shards"] == sorted(manifest.by_shard()) and sidecar["steps"] == TINY.steps
    assert [h["step"] for h in sidecar["history"]] == [0, 30, 60] and 0 < sidecar["best_step"] <= 60
    vae, _ = load_vae(store, "demo", AUDIO_VAE, fit.key)
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    # The rebuilt model reproduces the metrics stored with it.
    val = read_image_set(store, manifest, "audio", prepared["image_key"]).subset("val")
    metrics, _ = reconstruction_metrics(vae, val.images)
    assert abs(metrics["psnr"] - sidecar["metrics"]["psnr"]) < 1e-3
    # Same inputs and config: the checkpoint is reused, nothing is trained.
    again = fit_vae(store, manifest, AUDIO_VAE, "audio", prepared["image_key"], TINY)
    assert again.reused and again.key == fit.key
    changed = VaeTrainConfig(**{**TINY.params(), "steps": 0})
    fresh = fit_vae(store, manifest, AUDIO_VAE, "audio", prepared["image_key"], changed)
    assert not fresh.reused and fresh.key != fit.key and fresh.sidecar["best_step"] == 0


def test_latent_shards_round_trip_to_mels(prepared):
    store, manifest, fit = prepared["store"], prepared["manifest"], prepared["fit"]
    params = LatentParams()  # audio + frames, float16
    # The frames go through the same tiny VAE here (the asset test trains a frame VAE of its own).
    vaes = {m: {"name": AUDIO_VAE, "key": fit.key, "scaling_factor": fit.scaling_factor} for m in ("audio", "frames")}
    job_params = params.job_params(vaes, {"audio": prepared["image_key"], "frames": prepared["frames_key"]})
    key = LatentParams.key(job_params)
    run = run_feature(store, manifest, LATENT_FEATURE, key, job_params, LATENT_CODE_VERSION, compute_latent_shard,
                      InProcessExecutor(), input_keys=LatentParams.input_keys(job_params))
    assert (run.clips_ok, run.clips_quarantined, run.shards_new) == (40, 0, 3)
    table = store.read_arrays("demo", LATENT_FEATURE, key)
    assert set(table.arrays) == {"audio_mean", "audio_std", "frames_mean", "frames_std"}
    audio, frames = table.arrays["audio_mean"], table.arrays["frames_mean"]
    assert audio.shape == (40, 4, 8, 8) and frames.shape == (40, 8, 4, 8, 8) and audio.dtype == np.float16
    assert table.arrays["audio_std"].shape == audio.shape and table.arrays["frames_std"].shape == frames.shape
    stats = array_statistics(audio)
    assert stats["non_finite"] == 0 and 0.8 < stats["std"] < 1.25
    # mean: the scaled posterior mean (encode_scaled); std: the posterior's std times the same factor
    vae, _ = load_vae(store, "demo", AUDIO_VAE, fit.key)
    images = store.read_arrays("demo", AUDIO_IMAGE_FEATURE, prepared["image_key"]).arrays["image"]
    assert table.clip_ids == store.read_arrays("demo", AUDIO_IMAGE_FEATURE, prepared["image_key"]).clip_ids
    np.testing.assert_allclose(audio, encode_scaled(vae, images, fit.scaling_factor), atol=2e-3, rtol=2e-3)
    with torch.no_grad():
        from models.vae import images_to_tensor

        posterior = vae.encode(images_to_tensor(images[:4])).latent_dist
    np.testing.assert_allclose(table.arrays["audio_std"][:4], posterior.std.numpy() * fit.scaling_factor, rtol=2e-3, atol=1e-6)
    assert float(table.arrays["audio_std"].min()) > 0
    means = read_latent_means(store, "demo", key)
    assert set(means.arrays) == {"audio", "frames"} and np.array_equal(means.arrays["audio"], audio)
    assert latent_vaes(store, "demo", key)["audio"]["key"] == fit.key
    # Keyed by the checkpoint: another VAE gives another key; a re-run computes nothing.
    other = params.job_params({m: dict(v, key="0" * 16) for m, v in vaes.items()},
                              {"audio": prepared["image_key"], "frames": prepared["frames_key"]})
    assert LatentParams.key(other) != key
    again = run_feature(store, manifest, LATENT_FEATURE, key, job_params, LATENT_CODE_VERSION, must_not_compute,
                        InProcessExecutor(), input_keys=LatentParams.input_keys(job_params))
    assert again.shards_reused == 3

    # image -> latent (float16, scaled) -> image -> mel, against the image's own mel
    decoded = decode_latents(vae, audio, fit.scaling_factor)
    preset = get_preset("hifigan22k")
    reference, round_trip = images_to_mels(images, preset), images_to_mels(decoded, preset)
    error = float(np.abs(reference - round_trip).mean())
    exact = decode_latents(vae, encode_scaled(vae, images, fit.scaling_factor, "float32"), fit.scaling_factor)
    print(f"\nround trip image -> latent -> image -> mel: mean |delta log-mel| {error:.3f}, audible bins "
          f"{log_mel_error(reference, round_trip):.3f}, spectral convergence {spectral_convergence(reference, round_trip):.3f}; "
          f"PSNR float16 {psnr(images, decoded):.2f} dB vs float32 latents {psnr(images, exact):.2f} dB")
    assert error < ROUND_TRIP_MEL_L1
    assert abs(psnr(images, decoded) - psnr(images, exact)) < 0.05  # float16 storage costs nothing visible
    frame_images = decode_latents(vae, frames[:2], fit.scaling_factor)
    assert frame_images.shape == (2, 8, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_latents_quarantine_clips_missing_an_input(prepared, demo_dataset, bad_media):
    """A clip without video has an audio image but no frames: with both modalities it is quarantined
    with the reason of the input that lacks it; with audio only it gets its latent."""
    store, fit = prepared["store"], prepared["fit"]
    folder = store.fs._strip_protocol(store.path("_media_mixed"))
    os.makedirs(folder)
    for path in sorted((demo_dataset.parent / "media").glob("*.mp4"))[:2]:
        shutil.copy(path, os.path.join(folder, path.name))
    shutil.copy(bad_media["audio_only_m4a"], os.path.join(folder, "audio_only.m4a"))
    manifest, _ = build_manifest("mixed", read_source(SourceConfig(kind="folder", path=folder)), None, 8)
    mel, images, frames = MelParams(), AudioImageParams(size=IMAGE_SIZE), FrameParams(fps=2.0, size=IMAGE_SIZE)
    run_feature(store, manifest, MEL_FEATURE, mel.key(), mel.params(), MEL_CODE_VERSION, compute_mel_shard, InProcessExecutor())
    run_feature(store, manifest, AUDIO_IMAGE_FEATURE, images.key(mel.key()), images.params(), AUDIO_IMAGE_CODE_VERSION,
                compute_audio_image_shard, InProcessExecutor(), input_keys=(mel.key(),))
    run_feature(store, manifest, VIDEO_FRAMES_FEATURE, frames.key(), frames.params(), FRAMES_CODE_VERSION,
                compute_frames_shard, InProcessExecutor())
    state, sidecar = load_checkpoint(store, "demo", AUDIO_VAE, fit.key)
    save_checkpoint(store, "mixed", AUDIO_VAE, fit.key, state, sidecar)
    vae = {"name": AUDIO_VAE, "key": fit.key, "scaling_factor": fit.scaling_factor}
    inputs = {"audio": images.key(mel.key()), "frames": frames.key()}

    both = LatentParams().job_params({"audio": vae, "frames": vae}, inputs)
    run = run_feature(store, manifest, LATENT_FEATURE, LatentParams.key(both), both, LATENT_CODE_VERSION,
                      compute_latent_shard, InProcessExecutor(), input_keys=LatentParams.input_keys(both))
    assert (run.clips_ok, run.quarantined) == (2, [{"id": "audio_only", "reason": "video_frames: no video stream",
                                                     "shard": run.shards[0]}])
    audio_only = LatentParams(modalities=("audio",), dtype="float32").job_params({"audio": vae}, inputs)
    run = run_feature(store, manifest, LATENT_FEATURE, LatentParams.key(audio_only), audio_only, LATENT_CODE_VERSION,
                      compute_latent_shard, InProcessExecutor(), input_keys=LatentParams.input_keys(audio_only))
    table = store.read_arrays("mixed", LATENT_FEATURE, run.key)
    assert run.clips_ok == 3 and set(table.arrays) == {"audio_mean", "audio_std"} and table.arrays["audio_mean"].dtype == np.float32
    with pytest.raises(ValueError, match="modalities"):
        LatentParams(modalities=("smell",))
    with pytest.raises(VocodeError, match="audioldm16k"):
        check_vocoder_preset("audioldm16k")


@pytest.mark.parametrize("steps", [1, 2, 3, 20])
def test_short_training_runs_have_a_valid_learning_rate_schedule(steps):
    # steps=20 once gave a one-step warm-up, and OneCycleLR divided by zero.
    from stages.vae.train import train_vae

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    config = VaeTrainConfig(steps=steps, batch_size=2, eval_every=steps, block_out_channels=(8, 16), norm_num_groups=4,
                            max_val_images=2)
    result = train_vae(images[:4], images[4:], config)
    assert result.history[-1]["step"] == steps


# ---- the stopping rule ----------------------------------------------------------------------------

def test_plateau_rule_counts_evaluations_without_a_relative_gain():
    rule = PlateauRule(patience=3, min_delta=0.01)
    # 0.995 and 0.99 are less than 1% below the best (1.0): stale; 0.985 is 1.5% below: the new best
    assert [rule.update(v) for v in (1.0, 0.995, 0.99, 0.985)] == [False, False, False, False]
    assert (rule.best, rule.stale) == (0.985, 0)
    assert [rule.update(v) for v in (0.98, 0.99, 0.979)] == [False, False, True]  # stops at the 3rd stale one
    never = PlateauRule(patience=0, min_delta=0.01)
    assert not any(never.update(1.0) for _ in range(20))


def test_old_config_keeps_its_checkpoint_key():
    # Computed by the code before the stopping rule and windows existed (VaeTrainConfig() was 300
    # steps of whole images then): a config with both off keeps its key, so its checkpoints are reused.
    old = VaeTrainConfig(steps=300, patience=0, min_delta=0.0, crop_width=0)
    assert vae_fit_key(AUDIO_VAE, "audio", "img0000000000000", ["000000", "000001"], old) == "5ad9da9ceaf5d6b8"
    assert vae_fit_key(FRAME_VAE, "frames", "frm0000000000000", ["000000"], old) == "d4605630a36c3f85"
    # min_delta means nothing without patience; with the rule on, the key changes
    assert vae_fit_key(AUDIO_VAE, "audio", "img0000000000000", ["000000", "000001"],
                       VaeTrainConfig(steps=300, patience=0, min_delta=0.05, crop_width=0)) == "5ad9da9ceaf5d6b8"
    assert vae_fit_key(AUDIO_VAE, "audio", "img0000000000000", ["000000", "000001"],
                       VaeTrainConfig(steps=300, patience=3, min_delta=0.01)) != "5ad9da9ceaf5d6b8"
    assert VaeTrainConfig().patience > 0 and VaeTrainConfig().steps > 300  # the rule is the default
    with pytest.raises(ValueError, match="patience"):
        VaeTrainConfig(patience=-1)
    with pytest.raises(ValueError, match="min_delta"):
        VaeTrainConfig(min_delta=1.0)


def test_the_new_losses_off_keep_every_checkpoint_key():
    # The gradient and adversarial losses are off by default: their fields (and any value they
    # take while off) leave the key as it was; turning one on is another model.
    old = VaeTrainConfig(steps=300, patience=0, min_delta=0.0, crop_width=0)
    key = lambda config: vae_fit_key(AUDIO_VAE, "audio", "img0000000000000", ["000000", "000001"], config)  # noqa: E731
    assert key(dataclasses.replace(old, gradient_scales=5, adversarial_start=100, adaptive_weight=False,
                                   discriminator_channels=64, discriminator_layers=3)) == "5ad9da9ceaf5d6b8"
    assert len({key(old), key(dataclasses.replace(old, gradient_weight=1.0)),
                key(dataclasses.replace(old, adversarial_weight=0.5, adversarial_start=100))}) == 3
    assert key(dataclasses.replace(old, adversarial_weight=0.5, adversarial_start=100)) != key(
        dataclasses.replace(old, adversarial_weight=0.5, adversarial_start=200))
    with pytest.raises(ValueError, match="adversarial_start"):
        VaeTrainConfig(steps=100, adversarial_weight=0.5, adversarial_start=100)  # would never start


def test_adversarial_start_minus_one_is_halfway_and_keys_as_the_step_it_names():
    # The audio default starts the adversarial phase at steps // 2, derived, so a config copied
    # with another budget moves its start with it; the key names the step the fit runs from.
    audio = AudioVaeTrainConfig()
    assert (audio.steps, audio.adversarial_start, audio.adversarial_step) == (2000, -1, 1000)
    assert dataclasses.replace(audio, steps=40).adversarial_step == 20
    assert audio.key_params() == dataclasses.replace(audio, adversarial_start=1000).key_params()
    assert audio.key_params() != dataclasses.replace(audio, adversarial_start=999).key_params()
    assert AudioVaeTrainConfig(**audio.params()) == audio  # params() keeps -1, the copy is the same config
    with pytest.raises(ValueError, match="adversarial_start"):
        VaeTrainConfig(steps=100, adversarial_weight=0.5, adversarial_start=-2)


def test_adversarial_fit_trains_a_discriminator_and_keeps_weights_from_its_phase():
    images = np.random.default_rng(0).integers(0, 256, size=(8, 16, 32, 3), dtype=np.uint8)
    base = dict(steps=8, batch_size=4, eval_every=2, block_out_channels=(8, 16), norm_num_groups=4, max_val_images=4,
                crop_width=16, mid_block_attention=False)
    plain = train_vae(images[:6], images[6:], VaeTrainConfig(**base))
    adversarial = train_vae(images[:6], images[6:], VaeTrainConfig(**base, adversarial_weight=0.5, adversarial_start=4,
                                                                   gradient_weight=1.0))
    rows = {h["step"]: h for h in adversarial.history}
    # before the start: the same steps as the plain fit (the discriminator is built after the VAE's
    # weights, from the same seed) but for the gradient term; after it, both adversarial parts
    assert "train_discriminator" not in rows[4] and "train_gradient" in rows[4]
    assert {"train_discriminator", "train_generator", "train_adaptive_weight"} <= set(rows[6]) and rows[6]["train_adaptive_weight"] > 0
    assert adversarial.best_step > 4  # the best weights are from the adversarial phase, even if L1 was lower before
    assert adversarial.history[-1]["val_l1"] != plain.history[-1]["val_l1"]
    again = train_vae(images[:6], images[6:], VaeTrainConfig(**base, adversarial_weight=0.5, adversarial_start=4,
                                                             gradient_weight=1.0))
    assert again.history == adversarial.history  # seeded: the discriminator too


def _stalled(patience: int, steps: int = 20) -> VaeTrainConfig:
    # A learning rate so small that validation L1 cannot improve by 1%: every evaluation is stale.
    return VaeTrainConfig(steps=steps, batch_size=4, learning_rate=1e-12, eval_every=2, patience=patience, min_delta=0.01,
                          block_out_channels=(8, 16), norm_num_groups=4, max_val_images=4)


def test_training_stops_on_a_plateau_after_patience_evaluations():
    images = np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    lines = []
    no_drops = dataclasses.replace(_stalled(patience=3), lr_drops=0)
    result = train_vae(images[:6], images[6:], no_drops, log=lines.append)
    # evaluations at steps 0, 2, 4, 6: the 3rd stale one (step 6 = patience x eval_every) stops it
    assert (result.steps_run, result.stopped_by, result.lr_drop_steps) == (6, "plateau", ())
    assert [h["step"] for h in result.history] == [0, 2, 4, 6]
    stopping = result.stopping(no_drops)
    assert stopping["steps_run"] == 6 and stopping["rule"]["max_steps"] == 20
    assert "did not improve by 1.0%" in stopping["reason"] and "3 evaluations" in stopping["reason"]
    assert any("stopped at step 6 of 20" in line for line in lines)

    # the default: each of the first two plateaus lowers the learning rate, the third stops the fit
    lines.clear()
    dropped = train_vae(images[:6], images[6:], _stalled(patience=3, steps=40), log=lines.append)
    assert (dropped.steps_run, dropped.stopped_by, dropped.lr_drop_steps) == (18, "plateau", (6, 12))
    assert sum("learning rate x0.2" in line for line in lines) == 2 and any("stopped at step 18 of 40" in line for line in lines)
    assert "after 2 learning-rate drops" in dropped.stopping(_stalled(patience=3, steps=40))["reason"]

    everything = train_vae(images[:6], images[6:], _stalled(patience=0))
    assert (everything.steps_run, everything.stopped_by) == (20, "max_steps")
    assert everything.history[-1]["step"] == 20
    assert "budget of 20 steps ran out (no stopping rule)" in everything.stopping(_stalled(patience=0))["reason"]


def test_a_stopped_fit_keeps_its_best_weights_not_its_last(prepared):
    """Start from the trained tiny VAE and wreck it with a huge learning rate: validation L1 only
    gets worse, the rule stops, and the weights returned are the best evaluation's (step 0)."""
    store, manifest, fit = prepared["store"], prepared["manifest"], prepared["fit"]
    state, _ = load_checkpoint(store, "demo", AUDIO_VAE, fit.key)
    images = read_image_set(store, manifest, "audio", prepared["image_key"])
    train, val = images.subset("train"), images.subset("val")
    config = VaeTrainConfig(**{**TINY.params(), "steps": 30, "learning_rate": 0.05, "eval_every": 3, "patience": 2})
    result = train_vae(train.images, val.images, config, init_state=state)
    val_l1 = [h["val_l1"] for h in result.history]
    assert result.stopped_by == "plateau" and result.steps_run < config.steps
    assert min(val_l1) < val_l1[-1]  # the last evaluation is not the best: what the test is about
    assert result.best_step == result.history[int(np.argmin(val_l1))]["step"]
    assert len(val) <= config.max_val_images  # all of the val split is scored
    assert reconstruction_l1(result.model, val.images) == pytest.approx(min(val_l1), abs=2e-5)


def test_fit_records_the_steps_run_and_why_it_stopped(prepared):
    store, manifest = prepared["store"], prepared["manifest"]
    config = VaeTrainConfig(**{**TINY.params(), "steps": 40, "learning_rate": 1e-12, "eval_every": 4, "patience": 2, "lr_drops": 1})
    fit = fit_vae(store, manifest, AUDIO_VAE, "audio", prepared["image_key"], config)
    sidecar = fit.sidecar
    # a drop after 2 x 4 steps, stopped after 2 x 4 more: 16 steps, not the budget of 40
    assert sidecar["steps"] == 16 and sidecar["steps_run"] == 16
    stopping = sidecar["stopping"]
    assert stopping["stopped_by"] == "plateau" and stopping["steps_run"] == 16 and "did not improve" in stopping["reason"]
    assert stopping["lr_drop_steps"] == [8]
    assert stopping["rule"] == {"metric": "val L1", "eval_every": 4, "patience": 2, "min_delta": 0.01, "lr_drops": 1,
                                "lr_drop": 0.2, "max_steps": 40}
    assert sidecar["train_config"]["patience"] == 2


# ---- latent statistics ----------------------------------------------------------------------------

def test_latent_statistics_of_the_train_split_are_stored_and_reused(prepared):
    store, manifest, fit = prepared["store"], prepared["manifest"], prepared["fit"]
    vaes = {"audio": {"name": AUDIO_VAE, "key": fit.key, "scaling_factor": fit.scaling_factor}}
    job_params = LatentParams(modalities=("audio",), dtype="float32").job_params(vaes, {"audio": prepared["image_key"]})
    key = LatentParams.key(job_params)
    run_feature(store, manifest, LATENT_FEATURE, key, job_params, LATENT_CODE_VERSION, compute_latent_shard,
                InProcessExecutor(), input_keys=LatentParams.input_keys(job_params))
    lines = []
    first = latent_statistics(store, manifest, key, log=lines.append)
    assert not first.reused
    stats = first.value["audio"]
    means = read_latent_means(store, "demo", key)
    train = [i for i, c in enumerate(means.clip_ids) if manifest.index()[c].split == "train"]
    z = means.arrays["audio"][train].astype(np.float64)
    assert stats["clips"] == len(train) and stats["shape"] == [4, 8, 8] and stats["vae"]["key"] == fit.key
    np.testing.assert_allclose(stats["channel_mean"], z.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["channel_std"], z.std(axis=(0, 2, 3)), rtol=1e-6)
    assert stats["std"] == pytest.approx(z.std(), rel=1e-6) and stats["scale"] == pytest.approx(1 / z.std(), rel=1e-6)
    # the sidecar's factor came from the same train images: the stored means already have unit std
    assert stats["scale"] == pytest.approx(1.0, abs=1e-3) and stats["scaling_factor"] == pytest.approx(fit.scaling_factor, rel=1e-3)

    again = latent_statistics(store, manifest, key, log=lines.append)
    assert again.reused and again.key == first.key and again.value == first.value and "reused" in lines[-1]
    assert load_latent_statistics(store, "demo", first.key) == first.value
    # keyed by the VAE checkpoint, the latent key and the train split
    digest = train_split_digest(manifest)
    assert first.key == latent_statistics_key(vaes, key, digest)
    assert latent_statistics_key({"audio": {**vaes["audio"], "key": "0" * 16}}, key, digest) != first.key
    assert latent_statistics_key(vaes, "1" * 16, digest) != first.key
    assert latent_statistics_key(vaes, key, "2" * 16) != first.key
    with pytest.raises(ConfigError, match="materialize latent_statistics first"):
        load_latent_statistics(store, "demo", "3" * 16)


def test_latents_of_code_version_1_stay_readable(prepared, tmp_path):
    """Keys written before the std was stored hold the means alone, as ``audio``: read_latent_means
    (the generator, the vocoder, the statistics) reads them as before."""
    store, manifest = FeatureStore(str(tmp_path)), prepared["manifest"]
    ((shard, clips),) = list(manifest.by_shard().items())[:1]
    old = np.random.default_rng(0).normal(size=(len(clips), 4, 8, 8)).astype(np.float16)
    store.write_shard("demo", LATENT_FEATURE, "oldlatents000000", shard, clip_ids=[c.id for c in clips], arrays={"audio": old},
                      manifest={"params": {"vaes": {"audio": {"name": AUDIO_VAE, "key": "vae0", "scaling_factor": 1.0}}},
                                "quarantined": []})
    table = read_latent_means(store, "demo", "oldlatents000000")
    assert set(table.arrays) == {"audio"} and np.array_equal(table.arrays["audio"], old)
    with pytest.raises(ConfigError, match="no \\['frames'\\] latents"):
        read_latent_means(store, "demo", "oldlatents000000", ["frames"])


def test_windowed_training_sees_every_column_and_leaves_whole_image_training_as_it_was():
    from stages.vae.train import train_vae

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(6, 8, 40, 3), dtype=np.uint8)
    base = dict(steps=6, batch_size=2, eval_every=3, block_out_channels=(8, 16), norm_num_groups=4, max_val_images=2,
                patience=0, mid_block_attention=False)
    seen = []
    from models import vae as vae_module

    real_loss = vae_module.vae_loss

    def recording_loss(vae, x, *args):  # records the widths the VAE trains on, then trains as usual
        seen.append(tuple(x.shape[2:]))
        return real_loss(vae, x, *args)

    vae_module.vae_loss = recording_loss
    try:
        windowed = train_vae(wide[:4], wide[4:], VaeTrainConfig(**base, crop_width=16))
        whole = train_vae(wide[:4], wide[4:], VaeTrainConfig(**base, crop_width=0))
        narrow = train_vae(wide[:4], wide[4:], VaeTrainConfig(**base, crop_width=64))  # wider than the images
    finally:
        vae_module.vae_loss = real_loss
    assert seen[:6] == [(8, 16)] * 6 and seen[6:] == [(8, 40)] * 12
    # validation scores whole images; a window wider than the images is whole-image training
    assert windowed.history[-1]["val_l1"] != whole.history[-1]["val_l1"]
    assert narrow.history == whole.history
    with pytest.raises(ValueError, match="crop_width"):
        VaeTrainConfig(crop_width=10)  # not a multiple of the downsampling factor (4)
