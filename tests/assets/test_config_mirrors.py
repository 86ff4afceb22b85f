"""Each Dagster run config mirrors a stage dataclass (the stage is usable without Dagster): the
fields they share must have the same defaults, and a Config field the stage does not know must be
listed here with the reason, so the two cannot drift apart silently."""

import dataclasses

import pytest

from assets import cmmd, contrastive, diffgap, features, generation, mmldm, towers, vae
from stages.cmmd import evaluate as cmmd_eval
from stages.cmmd import train as cmmd_train
from stages.diffgap import evaluate as diffgap_eval
from stages.diffgap import train as diffgap_train
from stages.embeddings import heads
from stages.features import frames, latents, mel
from stages.features import towers as tower_stage
from stages.generation import sample
from stages.generation import train as generation_train
from stages.mmldm import evaluate as mmldm_eval
from stages.mmldm import latents as mmldm_latents
from stages.mmldm import train as mmldm_train
from stages.vae import train as vae_train

PAIRS = [
    # (Dagster Config, stage dataclass, Config fields only the asset uses)
    (features.MelConfig, mel.MelParams, set()),
    (features.AudioImageConfig, mel.AudioImageParams, set()),
    (towers.AudioTowerConfig, tower_stage.AudioTowerParams, set()),
    (towers.FrameTowerConfig, tower_stage.FrameTowerParams, set()),
    (vae.VideoFramesConfig, frames.FrameParams, set()),
    # revision only re-keys the checkpoint; source_dataset says which dataset it is fitted on
    (contrastive.HeadTrainingConfig, heads.HeadTrainConfig, {"revision", "source_dataset"}),
    (diffgap.DiffgapConfig, diffgap_train.DiffgapTrainConfig, set()),
    (diffgap.DiffgapEvalConfig, diffgap_eval.EvalConfig, {"seeds"}),  # one EvalConfig per seed
    (vae.VaeTrainingConfig, vae_train.VaeTrainConfig, {"pretrained_dir"}),  # chooses loading over training
    (vae.AudioVaeTrainingConfig, vae_train.AudioVaeTrainConfig, {"pretrained_dir"}),
    (vae.LatentConfig, latents.LatentParams, set()),
    (generation.AudioGeneratorConfig, generation_train.GeneratorTrainConfig, {"spaces"}),  # one fit per space
    (generation.SamplingConfig, sample.SampleConfig, set()),
    (cmmd.CmmdConfig, cmmd_train.CmmdTrainConfig, set()),
    (cmmd.CmmdEvalConfig, cmmd_eval.CmmdEvalConfig, set()),
    (mmldm.MmldmAutoencoderConfig, mmldm_train.AutoencoderTrainConfig, set()),
    (mmldm.MmldmLatentConfig, mmldm_latents.MmldmLatentParams, set()),
    (mmldm.MmldmDitConfig, mmldm_train.DitTrainConfig, set()),
    (mmldm.MmldmEvalConfig, mmldm_eval.MmldmEvalConfig, set()),
]


def _plain(value):
    if dataclasses.is_dataclass(value):  # a nested stage config is a dict in the run config
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("config, stage, asset_only", PAIRS, ids=[c.__name__ for c, _, _ in PAIRS])
def test_config_and_stage_defaults_agree(config, stage, asset_only):
    stage_fields = {f.name: f for f in dataclasses.fields(stage)}
    for name, field in config.model_fields.items():
        if name in asset_only:
            assert name not in stage_fields, f"{name} is in {stage.__name__} now: drop it from the asset-only list"
            continue
        assert name in stage_fields, f"{config.__name__}.{name} has no counterpart in {stage.__name__}"
        stage_field = stage_fields[name]
        stage_default = stage_field.default if stage_field.default is not dataclasses.MISSING else stage_field.default_factory()
        assert _plain(field.get_default(call_default_factory=True)) == _plain(stage_default), name
