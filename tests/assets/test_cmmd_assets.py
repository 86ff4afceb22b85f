"""The CMMD chain through Dagster on the demo media, tiny configs: cmmd_frames (8.613 fps) ->
cmmd_frame_latents -> cmmd -> cmmd_evaluation, with mel_latents; a re-run reuses the checkpoint and
the cached evaluation; WAVs, mp4s and previews land in the store."""

from __future__ import annotations

import av
import numpy as np
import pytest
from dagster import DagsterInstance

from assets.cmmd import CMMD_ASSETS
from assets.features import audio_images, clip_manifest, mel_latents, mel_spectrograms
from assets.resources import ClipSourceResource
from assets.vae import frame_vae, video_frames
from stages.cmmd.data import CMMD_FPS
from stages.core.store import FeatureStore
from tests.fixtures.dagster_results import materialization_metadata
from tests.fixtures.tiny import materialize_dataset, resources

TINY_VAE = {"steps": 20, "batch_size": 8, "learning_rate": 2e-3, "eval_every": 10, "block_out_channels": [16, 32, 32],
            "norm_num_groups": 4, "max_val_images": 32, "frame_stride": 2}
TINY_CMMD = {"steps": 6, "batch_size": 4, "video_levels": [8, 16], "audio_levels": [16, 16], "checkpoint_every": 3}
RUN_CONFIG = {"ops": {
    "video_frames": {"config": {"fps": 2.0, "size": 32}},
    "frame_vae": {"config": TINY_VAE},
    "cmmd_frames": {"config": {"size": 32}},
    "cmmd": {"config": TINY_CMMD},
    "cmmd_evaluation": {"config": {"steps": 3, "max_clips": 3, "guidance": [0.0, 0.05]}},
}}
ASSETS = [clip_manifest, mel_spectrograms, mel_latents, video_frames, frame_vae, *CMMD_ASSETS]


@pytest.fixture
def demo_source(demo_dataset):
    return ClipSourceResource(kind="jsonl", path=str(demo_dataset), dataset="demo", shard_size=16)


def test_cmmd_chain_trains_evaluates_and_reuses(demo_source, tmp_path):
    instance = DagsterInstance.ephemeral()
    found = {"clip_source": demo_source, **resources(tmp_path)}
    first = materialize_dataset(ASSETS, found, instance=instance, run_config=RUN_CONFIG)
    assert first.success
    frames = materialization_metadata(first, "cmmd_frames")
    assert frames["fps"] == pytest.approx(CMMD_FPS) and frames["frames_per_clip"] == round(4.0 * CMMD_FPS)
    model = materialization_metadata(first, "cmmd")
    assert model["status"] == "trained" and model["steps_run"] == 6 and model["variant"] == "CMMD"
    assert model["window_seconds"] == pytest.approx(16 / CMMD_FPS, abs=1e-3)
    # one negative audio and one negative video per step (fallbacks "shift -> swap" are also counted as swaps)
    assert sum(n for kind, n in model["negative_kinds"].items() if "->" not in kind) == 6 * 2
    evaluation = materialization_metadata(first, "cmmd_evaluation")
    assert evaluation["reused"] is False and evaluation["clips"] == 3
    for task in ("V2A", "A2V"):
        table = evaluation[f"table_{task}"]
        assert "ground truth" in table and "control" in table and "| CMMD | 0.05 |" in table
    assert "FAD (aiSFX) per set" in evaluation["table_V2A"] and "event hit 100 ms" in evaluation["table_V2A"]
    assert "FVD (EffNet-lite0)" in evaluation["table_A2V"] and "KVD (EffNet-lite0)" in evaluation["table_A2V"]
    assert any(k.startswith("preview A2V") for k in evaluation) and any(k.startswith("preview V2A") for k in evaluation)

    store = FeatureStore(str(tmp_path))
    folder = evaluation["folder"]
    mp4s = sorted(store.fs.glob(folder.replace("file://", "") + "/*.mp4"))
    wavs = sorted(store.fs.glob(folder.replace("file://", "") + "/*.wav"))
    assert len(wavs) == 3 * 2 and len(mp4s) == 3 * 4  # 3 clips x (V2A, A2V) x 2 lambdas
    with av.open(mp4s[0]) as container:  # a sounding video: both streams, about the window's length
        assert {s.type for s in container.streams} == {"video", "audio"}
        assert float(container.duration / 1e6) == pytest.approx(16 / CMMD_FPS, abs=0.25)

    again = materialize_dataset(ASSETS, found, instance=instance, run_config=RUN_CONFIG)
    assert again.success
    assert materialization_metadata(again, "cmmd")["status"] == "reused"
    assert materialization_metadata(again, "cmmd_evaluation")["reused"] is True
