"""DiffGAP's denoiser, samplers and bidirectional split training on a toy embedding space."""

import numpy as np
import pytest
import torch

from models.diffgap import FROM_AUDIO, TO_AUDIO, Denoiser, DenoiserConfig, make_train_scheduler, sample
from stages.diffgap.train import DiffgapTrainConfig, EmbeddingPairs, Progress, train_diffgap
from stages.diffgap.evaluate import generate
from stages.evaluation.retrieval import normalize


def test_default_size_is_the_papers_5_4_mb():
    model = Denoiser(DenoiserConfig())
    assert abs(model.parameter_bytes() / 1e6 - 5.4) < 0.1


def test_bst_swaps_condition_and_target_every_interval():
    config = DiffgapTrainConfig(bst=True, bst_interval=3)
    assert [config.direction_at(s) for s in range(1, 10)] == [TO_AUDIO] * 3 + [FROM_AUDIO] * 3 + [TO_AUDIO] * 3
    assert {DiffgapTrainConfig(bst=False, single_direction=FROM_AUDIO).direction_at(s) for s in range(1, 50)} == {FROM_AUDIO}


def _toy(n: int, seed: int, dim: int = 16) -> EmbeddingPairs:
    """Audio and 'other' are two rotations of shared latents plus noise: a gap to bridge."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, dim))
    rotation_a = np.linalg.qr(np.random.default_rng(7).normal(size=(dim, dim)))[0]
    rotation_o = np.linalg.qr(np.random.default_rng(8).normal(size=(dim, dim)))[0]
    audio = normalize(latent @ rotation_a + 0.2 * rng.normal(size=(n, dim)))
    other = normalize(latent @ rotation_o + 0.2 * rng.normal(size=(n, dim)))
    return EmbeddingPairs([f"c{i}" for i in range(n)], audio, other, ["train"] * n)


SMALL = dict(width=64, depth=2, batch_size=64, learning_rate=2e-3, checkpoint_every=0)


def test_training_bridges_the_gap_in_both_directions():
    train = _toy(512, 0)
    result = train_diffgap(train, DiffgapTrainConfig(steps=600, bst_interval=50, **SMALL))
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    test = _toy(64, 1)
    for direction in (TO_AUDIO, FROM_AUDIO):
        condition, target = test.condition_target(direction)
        generated = generate(result.model, condition, direction, steps=20, samples=4)
        assert np.allclose(np.linalg.norm(generated, axis=1), 1, atol=1e-5)
        matched = np.mean(np.sum(generated * target, axis=1))
        # the raw condition is a rotated copy: its cosine to the target is ~0; generation crosses the gap
        assert matched > 0.5 and matched > np.mean(np.sum(condition * target, axis=1)) + 0.4


def test_sampling_is_seeded_and_steps_50_20_5_all_run():
    model = Denoiser(DenoiserConfig(embed_dim=16, width=32, depth=1))
    condition = torch.from_numpy(normalize(np.random.default_rng(0).normal(size=(3, 16))))
    for steps in (50, 20, 5):
        for sampler in ("ddim", "ddpm"):
            a = sample(model, condition, TO_AUDIO, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(1))
            b = sample(model, condition, TO_AUDIO, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(1))
            assert a.shape == (3, 1, 16) and torch.equal(a, b)


def test_x0_projection_keeps_an_untrained_model_on_the_sphere():
    """Without projection, an imperfect model's first DDIM step (divided by sqrt(alpha_bar_T))
    throws the sample far off; with it every intermediate x0 lies on the sphere."""
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(embed_dim=16, width=32, depth=1))
    torch.nn.init.normal_(model.output.weight, std=0.5)  # a deliberately wrong noise estimate
    condition = torch.from_numpy(normalize(np.random.default_rng(0).normal(size=(64, 16))))
    scheduler = make_train_scheduler(model.config)
    assert float(scheduler.alphas_cumprod[-1].sqrt()) < 1e-2
    out_projected = sample(model, condition, TO_AUDIO, steps=5, project=True, generator=torch.Generator().manual_seed(0))
    out_free = sample(model, condition, TO_AUDIO, steps=5, project=False, generator=torch.Generator().manual_seed(0))
    # both are normalised at the end; the unprojected run collapses onto a few directions
    spread = lambda x: float(torch.linalg.matrix_rank(x[:, 0], atol=1e-3))
    assert spread(out_projected) >= spread(out_free)


def test_progress_hooks_resume_where_training_stopped():
    train = _toy(128, 0)
    saved = {}

    def save(step, model, optimizer, history):
        from stages.core.checkpoints import optimizer_tensors

        tensors, groups = optimizer_tensors(optimizer)
        saved.update(step=step, model={k: v.clone() for k, v in model.state_dict().items()}, opt=tensors,
                     groups={**groups, "history": list(history)})

    config = DiffgapTrainConfig(steps=200, bst_interval=20, **{**SMALL, "checkpoint_every": 100})
    full = train_diffgap(train, config, progress=Progress(save=save))
    assert saved["step"] == 100
    resumed = train_diffgap(train, config, progress=Progress(load=lambda: (saved["step"], saved["model"], saved["opt"], saved["groups"])))
    assert resumed.resumed_from == 100 and resumed.steps_run == 100
    assert resumed.history[-1]["step"] == 200 and len(resumed.history) == len(full.history)


def test_warm_start_trains_on_new_plus_replayed_clips():
    train = _toy(200, 0)
    first = train_diffgap(train, DiffgapTrainConfig(steps=100, bst_interval=20, **SMALL))
    new_ids = set(train.clip_ids[150:])
    warm = train_diffgap(train, DiffgapTrainConfig(steps=100, update_steps=40, bst_interval=20, **SMALL),
                         init_state=first.model.state_dict(), new_clip_ids=new_ids)
    assert warm.steps_run == 40
    with pytest.raises(ValueError, match="none of the new clips"):
        train_diffgap(train, DiffgapTrainConfig(steps=10, **SMALL), init_state=first.model.state_dict(), new_clip_ids={"absent"})
