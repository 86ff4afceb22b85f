"""CMMD on tiny configs: shapes, the loss (Eq. 6), each negative kind, guidance (lambda = 0 is the
replacement method, checked against diffusers' DDIM step), windows cut from cached features, and
fitting through the lineage against a real store: reuse, warm start on new shards, resume after a kill."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from models.cmmd import (CmmdConfig, build_model, contrastive_loss, make_scheduler, per_sample_joint_loss,
                         sample_conditional)
from stages.cmmd import data as cmmd_data
from stages.cmmd import train as cmmd_train
from stages.core.checkpoints import list_checkpoints
from stages.core.store import FeatureStore
from stages.ingest.manifest import Clip, ClipManifest

TINY = CmmdConfig(video_levels=(8, 16), audio_levels=(16, 16), time_dim=16, video_patch=2)
TINY_TRAIN = dict(steps=6, batch_size=4, window_frames=4, video_levels=(8, 16), audio_levels=(16, 16), checkpoint_every=3,
                  update_steps=3, threads=1)


def _model(config: CmmdConfig = TINY, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config, (8, 8))
    for p in model.parameters():  # zero-initialised outputs would hide the fusion and the guidance
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_shapes_and_twice_the_training_length():
    model = _model()
    for frames in (4, 8):
        v, a = model(torch.randn(2, 4, frames, 8, 8), torch.randn(2, 80, 10 * frames), torch.tensor([5, 700]))
        assert v.shape == (2, 4, frames, 8, 8) and a.shape == (2, 80, 10 * frames)
    with pytest.raises(ValueError, match="mel frames per frame"):
        model(torch.randn(1, 4, 4, 8, 8), torch.randn(1, 80, 39), torch.tensor([1]))


def test_fusion_carries_information_between_the_streams_and_the_switch_turns_it_off():
    video, audio, t = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 80, 40), torch.tensor([300])
    other_video = torch.randn_like(video)
    for fusion, changes in ((True, True), (False, False)):
        model = _model(CmmdConfig(**{**TINY.params(), "fusion": fusion}))
        with torch.no_grad():
            _, a1 = model(video, audio, t)
            _, a2 = model(other_video, audio, t)
        assert (not torch.allclose(a1, a2)) == changes


def test_eta_zero_is_the_joint_loss_and_negatives_enter_capped():
    model, scheduler = _model(), make_scheduler(TINY)
    g = torch.Generator().manual_seed(0)
    v0, a0 = torch.randn(4, 4, 4, 8, 8, generator=g), torch.randn(4, 80, 40, generator=g)
    t = torch.tensor([10, 200, 500, 900])
    eps_v, eps_a = torch.randn(v0.shape, generator=g), torch.randn(a0.shape, generator=g)
    rows = torch.tensor([0, 2])
    neg_a, neg_v = (rows, a0[rows].roll(7, dims=2)), (rows, v0[rows].roll(1, dims=2))
    with torch.no_grad():
        joint = per_sample_joint_loss(model, scheduler, v0, a0, t, eps_v, eps_a).mean()
        plain = contrastive_loss(model, scheduler, v0, a0, t, eps_v, eps_a, eta=0.0, negative_audio=neg_a, negative_video=neg_v)
        assert torch.allclose(plain.loss, joint) and plain.negative_audio is None
        full = contrastive_loss(model, scheduler, v0, a0, t, eps_v, eps_a, eta=0.5, negative_audio=neg_a, negative_video=neg_v, cap=0)
        pos = per_sample_joint_loss(model, scheduler, v0, a0, t, eps_v, eps_a)
        na = per_sample_joint_loss(model, scheduler, v0[rows], neg_a[1], t[rows], eps_v[rows], eps_a[rows])
        nv = per_sample_joint_loss(model, scheduler, neg_v[1], a0[rows], t[rows], eps_v[rows], eps_a[rows])
        assert torch.allclose(full.loss, pos.mean() - 0.5 * na.mean() - 0.5 * nv.mean(), atol=1e-6)
        capped = contrastive_loss(model, scheduler, v0, a0, t, eps_v, eps_a, eta=0.5, negative_audio=neg_a, negative_video=neg_v, cap=0.5)
        expected = pos.mean() - 0.5 * torch.minimum(na, 0.5 * pos[rows]).mean() - 0.5 * torch.minimum(nv, 0.5 * pos[rows]).mean()
        assert torch.allclose(capped.loss, expected, atol=1e-6)


def _windows(n: int = 6, frames: int = 12, short: int | None = None) -> cmmd_data.ClipWindows:
    rng = np.random.default_rng(0)
    video = rng.normal(size=(n, frames, 4, 8, 8)).astype(np.float32)
    # mark every clip's frames and mel frames with (clip, frame) so windows can be traced back
    for i in range(n):
        video[i, :, 0, 0, 0] = i
        video[i, :, 1, 0, 0] = np.arange(frames)
    mels = np.zeros((n, 80, frames * 10), np.float32)
    mels[:, 0] = np.arange(n)[:, None]
    mels[:, 1] = np.arange(frames * 10)[None]
    valid = np.full(n, frames)
    if short is not None:
        valid[0] = short
    return cmmd_data.ClipWindows([f"c{i}" for i in range(n)], video, mels, valid, ["train"] * n)


def test_windows_agree_exactly_between_frames_and_mel_frames():
    data = _windows()
    batch = cmmd_data.draw_batch(data, np.arange(6), 4, np.random.default_rng(1))
    for i, (row, offset) in enumerate(zip(batch.rows, batch.offsets)):
        assert (batch.video[i, 0, :, 0, 0] == row).all() and list(batch.video[i, 1, :, 0, 0]) == list(range(offset, offset + 4))
        assert (batch.audio[i, 0] == row).all() and list(batch.audio[i, 1]) == list(range(10 * offset, 10 * offset + 40))
    assert cmmd_data.CMMD_FPS * cmmd_data.FRAME_RATIO == pytest.approx(22050 / 256)


def test_valid_frames_count_the_repeated_tail_out():
    frames = np.random.default_rng(0).normal(size=(2, 10, 4, 2, 2)).astype(np.float16)
    frames[0, 6:] = frames[0, 6]  # a clip of 7 real frames, padded by repeating the last
    assert list(cmmd_data.valid_frame_counts(frames)) == [7, 10]


@pytest.mark.parametrize("kind", cmmd_data.NEGATIVE_KINDS)
def test_each_negative_kind(kind):
    data = _windows()
    config = cmmd_data.NegativeConfig(kinds=(kind,), fraction=1.0)
    batch = cmmd_data.draw_batch(data, np.arange(6), 4, np.random.default_rng(3), config)
    for modality, (rows, negatives) in (("audio", batch.negative_audio), ("video", batch.negative_video)):
        for j, pick in enumerate(rows):
            clip, start = batch.rows[pick], batch.offsets[pick]
            if modality == "audio":
                clips, frames, scale, length = negatives[j, 0], negatives[j, 1], 10, 40
            else:
                clips, frames, scale, length = negatives[j, 0, :, 0, 0], negatives[j, 1, :, 0, 0], 1, 4
            if kind == "shift":
                assert (clips == clip).all()
                shift = (frames[0] - scale * start) / scale / cmmd_data.CMMD_FPS  # seconds
                assert 0.2 - 0.12 <= abs(shift) <= 0.6 + 1e-6
                assert list(np.diff(frames)) == [1] * (length - 1)  # a contiguous window, moved
            elif kind == "swap":
                assert len(set(clips)) == 1 and clips[0] != clip
            else:  # segment: two parts, one of them the clip's own window, the other another clip's
                assert len(set(clips)) == 2 and clip in set(clips)
    assert sum(batch.kinds.values()) == 12


def test_a_clip_too_short_to_shift_falls_back_to_a_swap():
    data = _windows(short=4)  # clip 0 holds exactly one window: no shift fits
    config = cmmd_data.NegativeConfig(kinds=("shift",), fraction=1.0)
    batch = cmmd_data.draw_batch(data, np.array([0, 1]), 4, np.random.default_rng(0), config)
    assert batch.kinds.get("audio shift -> swap", 0) >= 1 and batch.offsets[0] == 0


def test_lambda_zero_is_the_replacement_method_as_diffusers_ddim_steps_it():
    from diffusers import DDIMScheduler

    model, scheduler = _model(), make_scheduler(TINY)
    video = torch.randn(2, 4, 4, 8, 8)
    ours = sample_conditional(model, scheduler, video, "video", steps=5, guidance=0.0, generator=torch.Generator().manual_seed(4))

    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule=TINY.beta_schedule, prediction_type="v_prediction",
                         clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(5)
    g = torch.Generator().manual_seed(4)
    eps_known, x = torch.randn(video.shape, generator=g), torch.randn((2, 80, 40), generator=g)
    with torch.no_grad():
        for t in ddim.timesteps:
            abar = ddim.alphas_cumprod[t]
            known = abar.sqrt() * video + (1 - abar).sqrt() * eps_known  # replaced by q(v_n | v_0) at every step
            _, v_audio = model(known, x, torch.full((2,), int(t)))
            x = ddim.step(v_audio, t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)

    guided = sample_conditional(model, scheduler, video, "video", steps=5, guidance=0.05, generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(guided).all() and not torch.allclose(guided, ours, atol=1e-4)
    a2v = sample_conditional(model, scheduler, torch.randn(2, 80, 80), "audio", steps=2, guidance=0.05)
    assert a2v.shape == (2, 4, 8, 8, 8)  # twice the training window


# ---- fitting against a real store ---------------------------------------------------------------

def _clips(n: int, start: int = 0, shard_size: int = 8) -> list[Clip]:
    splits = ["train"] * 6 + ["val", "test"]
    return [Clip(id=f"c{i:04d}", uri=f"/nowhere/{i}.mp4", content_hash=f"h{i}", shard_id=f"s{i // shard_size:06d}",
                 split=splits[i % 8]) for i in range(start, start + n)]


def _write_features(store: FeatureStore, manifest: ClipManifest, frames: int = 12) -> tuple[str, str]:
    mel_key, frame_key = "mellatent0000000", "framelatent00000"
    for shard, clips in manifest.by_shard().items():
        ids = [c.id for c in clips]
        rng = np.random.default_rng(zlib.crc32(shard.encode()))
        if not store.has_shard(manifest.dataset, "mel_latents", mel_key, shard):
            store.write_shard(manifest.dataset, "mel_latents", mel_key, shard, clip_ids=ids,
                              arrays={"mel_latent": rng.normal(size=(len(ids), 80, frames * 10)).astype(np.float32)},
                              manifest={"params": {}, "quarantined": [], "input_keys": ["melkey0000000000"]})
        if not store.has_shard(manifest.dataset, "vae_latents", frame_key, shard):
            video = rng.normal(size=(len(ids), frames, 4, 8, 8)).astype(np.float16)
            store.write_shard(manifest.dataset, "vae_latents", frame_key, shard, clip_ids=ids,
                              arrays={"frames_mean": video, "frames_std": np.ones_like(video)},
                              manifest={"params": {"modalities": ["frames"], "vaes": {"frames": {"name": "frame_vae", "key": "v", "scaling_factor": 1.0}}},
                                        "quarantined": []})
    return mel_key, frame_key


def test_fit_reuses_then_warm_starts_on_new_shards(tmp_path):
    store = FeatureStore(str(tmp_path))
    manifest = ClipManifest("toy", 8, _clips(16))
    mel_key, frame_key = _write_features(store, manifest)
    config = cmmd_train.CmmdTrainConfig(**TINY_TRAIN)
    first = cmmd_train.fit_cmmd(store, manifest, mel_key, frame_key, config, mel_key="melkey0000000000")
    assert first.status == "trained" and first.sidecar["steps_run"] == 6 and first.sidecar["clips_train"] == 12
    assert np.isfinite([h["loss"] for h in first.sidecar["history"]]).all() or not first.sidecar["history"]
    assert cmmd_train.fit_cmmd(store, manifest, mel_key, frame_key, config, mel_key="melkey0000000000").status == "reused"

    grown = ClipManifest("toy", 8, _clips(24))
    _write_features(store, grown)
    second = cmmd_train.fit_cmmd(store, grown, mel_key, frame_key, config, mel_key="melkey0000000000")
    assert second.status == "warm-started" and second.sidecar["warm_start_from"] == first.key
    assert second.sidecar["steps_run"] == 3 and second.sidecar["clips_new"] == 6
    assert [s["checkpoint_key"] for s in list_checkpoints(store, "toy", "cmmd")] == [second.key, first.key]
    # eta 0 (nCMMD) is another lineage: trained afresh, not warm-started from CMMD
    plain = cmmd_train.fit_cmmd(store, grown, mel_key, frame_key, cmmd_train.CmmdTrainConfig(**{**TINY_TRAIN, "eta": 0.0}),
                                mel_key="melkey0000000000")
    assert plain.status == "trained" and plain.sidecar["variant"] == "nCMMD" and plain.sidecar["negative_kinds"] == {}


def test_a_killed_run_resumes_where_it_was_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    import stages.core.checkpoints as checkpoints

    store = FeatureStore(str(tmp_path / "a"))
    manifest = ClipManifest("toy", 8, _clips(16))
    keys = _write_features(store, manifest)
    config = cmmd_train.CmmdTrainConfig(**TINY_TRAIN)
    whole = cmmd_train.fit_cmmd(store, manifest, *keys, config)

    store = FeatureStore(str(tmp_path / "b"))
    _write_features(store, manifest)
    real_save = checkpoints.save_progress

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoints, "save_progress", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cmmd_train.fit_cmmd(store, manifest, *keys, config)
    monkeypatch.setattr(checkpoints, "save_progress", real_save)
    assert list_checkpoints(store, "toy", "cmmd") == []  # nothing half-finished is committed
    resumed = cmmd_train.fit_cmmd(store, manifest, *keys, config)
    assert resumed.status == "resumed" and resumed.sidecar["resumed_from_step"] == 3 and resumed.sidecar["steps_run"] == 3
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed.sidecar["negative_kinds"] == whole.sidecar["negative_kinds"]
