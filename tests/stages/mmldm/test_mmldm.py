"""MM-LDM's pieces on tiny configs: each loss term, the guidance rule, null-latent conditioning,
the DiT's token layout, the ablation switches, decoding and a resumed training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.mmldm import (AutoencoderConfig, DitConfig, Discriminator, adversarial_terms, autoencoder_loss, build_autoencoder,
                          build_dit, contrastive_loss, decode_clips, decoder_loss_weights, dit_loss, guided_noise, kl_divergence, make_scheduler,
                          patchify, sample_dit, task_draw, unpatchify)

TINY_AE = dict(audio_hw=(8, 8), frame_hw=(8, 8), frames=4, latent_channels=4, encoder_channels=16, decoder_channels=(16, 16),
               semantic_dim=16, context_dim=16, classes=3, heads=2, time_dim=32, norm_groups=4)
TINY_DIT = dict(audio_shape=(4, 4, 4), video_shape=(4, 4, 4), audio_patch=(1, 1), video_patch=(2, 2), hidden=32, depth=1, heads=2)


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 4, 8, 8, generator=g), torch.tensor([0, 1, 2, -1][:b])


def test_patchify_round_trips_2d_and_3d_grids():
    for shape, patch in (((3, 4, 6), (2, 3)), ((2, 4, 6, 8), (2, 3, 4)), ((5, 5, 22), (1, 1))):
        x = torch.randn(2, *shape)
        tokens = patchify(x, patch)
        assert tokens.shape == (2, int(np.prod([s // p for s, p in zip(shape[1:], patch)])), shape[0] * int(np.prod(patch)))
        assert torch.equal(unpatchify(tokens, shape, patch), x)


def test_dit_token_layout_eos_tokens_and_positions():
    config = DitConfig(**TINY_DIT)
    model = build_dit(config)
    assert config.tokens("audio") == 16 and config.tokens("video") == 4
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach()))  # returns None: args unchanged
    z_a, z_v = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    model(z_a, z_v, torch.tensor([5, 5]))
    x = seen["x"]
    assert x.shape == (2, 1 + 16 + 1 + 4, 32)  # [EOS_a, 16 audio, EOS_v, 4 video patches]
    assert torch.allclose(x[0, 0], model.eos[0]) and torch.allclose(x[0, 17], model.eos[1])
    # each modality has its own positional embedding from index 0: zero latents show it plus the embedding's bias
    assert torch.allclose(x[0, 1] - model.embed_a.bias, model.position_a[0], atol=1e-6)
    assert torch.allclose(x[0, 18] - model.embed_v.bias, model.position_v[0], atol=1e-6)


def test_conditions_enter_through_zero_initialised_layers_and_null_latents_are_zero():
    model = build_dit(DitConfig(**TINY_DIT))
    z_a, z_v, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    with torch.no_grad():
        for p in list(model.out_a.parameters()) + list(model.out_v.parameters()):  # outputs visible
            p.normal_()
        for block in model.blocks:
            block.modulation.weight.normal_(std=0.1)
        plain = model(z_a, z_v, t)
        given = model(z_a, z_v, t, torch.randn_like(z_a), None)
        assert all(torch.allclose(a, b) for a, b in zip(plain, given))  # zero-initialised: no effect at the start
        model.condition_a.weight.normal_()
        changed = model(z_a, z_v, t, torch.randn_like(z_a), None)
        null = model(z_a, z_v, t, torch.zeros_like(z_a), torch.zeros_like(z_v))
    assert not torch.allclose(changed[1], plain[1])  # once trained, the audio condition reaches the video output
    # the null latent is the zero latent: only the layer's bias (zero-initialised) is added
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(null, plain))


def test_task_draw_shares_and_dit_loss_trains():
    tasks = task_draw(20000, 0.05, torch.Generator().manual_seed(0))
    shares = [(tasks == k).float().mean().item() for k in (0, 1, 2)]
    assert shares[1] == pytest.approx(0.05, abs=0.01) and shares[2] == pytest.approx(0.05, abs=0.01)
    model = build_dit(DitConfig(**TINY_DIT))
    scheduler = make_scheduler(1000, "scaled_linear")
    z_a, z_v = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    first = None
    for step in range(40):
        loss = dit_loss(model, scheduler, z_a, z_v, torch.Generator().manual_seed(step % 4))
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < first  # Eq. (8) goes down on a fixed set


def test_guidance_rule_and_conditional_sampling():
    c, u = torch.full((3,), 2.0), torch.full((3,), 1.0)
    assert torch.equal(guided_noise(c, u, 1.0), c)
    assert torch.allclose(guided_noise(c, u, 3.0), u + 3.0 * (c - u))  # extrapolates from the unconditional one
    assert torch.allclose(guided_noise(c, u, 0.0), u)
    model = build_dit(DitConfig(**TINY_DIT)).eval()
    scheduler = make_scheduler(1000, "scaled_linear")
    known = torch.randn(2, 4, 4, 4)
    z_a, z_v = sample_dit(model, scheduler, 2, "a2v", known=known, phi=2.0, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z_a, known) and z_v.shape == (2, 4, 4, 4)  # the given modality comes back as given
    again = sample_dit(model, scheduler, 2, "a2v", known=known, phi=2.0, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[1], z_v)  # seeded on the host
    joint = sample_dit(model, scheduler, 2, "joint", steps=3, generator=torch.Generator().manual_seed(0))
    assert joint[0].shape == (2, 4, 4, 4) and torch.isfinite(joint[1]).all()
    with pytest.raises(ValueError, match="known"):
        sample_dit(model, scheduler, 2, "v2a", steps=2)


def test_contrastive_loss_of_eq1_rewards_matched_pairs():
    e = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    matched = contrastive_loss(e, e, torch.tensor(10.0))
    shuffled = contrastive_loss(e, e.roll(1, 0), torch.tensor(10.0))
    assert float(matched) < float(shuffled)
    assert float(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3))) == 0.0
    assert float(kl_divergence(torch.ones(2, 3), torch.zeros(2, 3))) == pytest.approx(1.5)


def test_autoencoder_loss_terms_and_ablations():
    scheduler = make_scheduler(1000, "scaled_linear")
    x_a, x_v, labels = _batch()
    rows = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1]])
    for semantic, shared in ((True, True), (False, True), (True, False)):
        model = build_autoencoder(AutoencoderConfig(**TINY_AE, semantic=semantic, shared_decoder=shared))
        terms = autoencoder_loss(model, scheduler, x_a, x_v, labels, rows, torch.Generator().manual_seed(0),
                                 cl_weight=0.1, co_weight=0.1, kl_weight=1e-6, keep_x0=True)
        terms.loss.backward(retain_graph=True)  # the adversarial term below reuses the graph
        assert torch.isfinite(terms.loss) and terms.mse > 0 and terms.kl > 0
        if semantic:
            assert terms.classification is not None and terms.contrastive > 0
            assert model.audio_projector.net[0].weight.grad is not None  # the semantic losses reach the projectors
        else:
            assert terms.classification is None and float(terms.contrastive) == 0.0
        assert (model.audio_decoder is None) == shared
        assert terms.x0_frames.shape == (4, 2, 4, 8, 8)
    discriminator = Discriminator(model.config)
    loss_d, loss_ae = adversarial_terms(discriminator, x_a, x_v, terms)
    assert torch.isfinite(loss_d) and torch.isfinite(loss_ae)
    loss_ae.backward()
    assert model.decoder.out[-1].weight.grad is not None  # the adversarial term trains the decoder


def test_decoder_loss_weightings_move_the_steps_to_high_noise_and_keep_the_scale():
    abar = make_scheduler(1000, "scaled_linear").alphas_cumprod
    every_t = torch.arange(1000)
    assert torch.equal(decoder_loss_weights(abar, every_t, "eps", 5.0), torch.ones(1000))
    low, high = torch.tensor([20]), torch.tensor([990])
    for weighting in ("min_snr", "x0"):
        w = decoder_loss_weights(abar, every_t, weighting, 20.0)
        assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)  # mean 1 over uniform t: the loss keeps its scale
        assert bool((w[1:] >= w[:-1] - 1e-6).all())  # more noise never counts less
        assert float(decoder_loss_weights(abar, high, weighting, 20.0) / decoder_loss_weights(abar, low, weighting, 20.0)) > 10
    # "x0" = the eps MSE + the x0 MSE it implies, truncated at gamma: at t = 500 (1 / SNR = 2.0) 3 / mean
    table = 1 + ((1 - abar) / abar).clamp(max=20.0)
    assert float(decoder_loss_weights(abar, torch.tensor([500]), "x0", 20.0)) == pytest.approx(float(table[500] / table.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        decoder_loss_weights(abar, low, "v", 5.0)
    # the weighted loss trains; terms.mse stays the plain noise MSE (the same draws give the same mse)
    x_a, x_v, labels = _batch()
    rows = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1]])
    model = build_autoencoder(AutoencoderConfig(**TINY_AE))
    plain, weighted = (autoencoder_loss(model, make_scheduler(1000, "scaled_linear"), x_a, x_v, labels, rows, torch.Generator().manual_seed(0),
                                        cl_weight=0.0, co_weight=0.0, kl_weight=0.0, weighting=w, snr_gamma=20.0) for w in ("eps", "x0"))
    assert float(plain.mse) == pytest.approx(float(weighted.mse))
    assert float(plain.loss) != pytest.approx(float(weighted.loss))
    weighted.loss.backward()
    assert model.decoder.out[-1].weight.grad is not None
    # "eps" (the paper's, the weighting of every autoencoder before the field) keeps those keys
    from stages.mmldm.train import AutoencoderTrainConfig

    assert not {"decoder_weighting", "snr_gamma"} & set(AutoencoderTrainConfig(decoder_weighting="eps").params())
    assert AutoencoderTrainConfig().params()["decoder_weighting"] == "x0"
    assert AutoencoderTrainConfig(snr_gamma=200).params() == AutoencoderTrainConfig(snr_gamma=200.0).params()
    with pytest.raises(ValueError, match="decoder_weighting"):
        AutoencoderTrainConfig(decoder_weighting="v")


def test_decoder_uses_its_latent_and_frame_index():
    model = build_autoencoder(AutoencoderConfig(**TINY_AE)).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():  # out of the zero-initialised start
            p.add_(torch.randn_like(p) * 0.05)
    scheduler = make_scheduler(1000, "scaled_linear")
    z_a, z_v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    audio, frames = decode_clips(model, scheduler, z_a, z_v, 3, torch.Generator().manual_seed(0))
    assert audio.shape == (2, 4, 8, 8) and frames.shape == (2, 4, 4, 8, 8)
    assert not torch.allclose(frames[0, 0], frames[0, 1])  # the frame index picks different frames
    other, _ = decode_clips(model, scheduler, z_a.flip(0), z_v, 3, torch.Generator().manual_seed(0))
    assert not torch.allclose(other, audio)  # the decoder reads its latent
    # one modality alone (the a2v / v2a evaluation): exactly what decoding both gives
    only_audio, none = decode_clips(model, scheduler, z_a, z_v, 3, torch.Generator().manual_seed(0), modalities=("audio",))
    none_too, only_frames = decode_clips(model, scheduler, z_a, z_v, 3, torch.Generator().manual_seed(0), modalities=("video",))
    assert none is None and none_too is None
    assert torch.equal(only_audio, audio) and torch.equal(only_frames, frames)


def test_training_resumes_to_the_same_weights(tmp_path):
    from stages.core.lineage import progress_hooks
    from stages.core.store import FeatureStore
    from stages.mmldm.train import AutoencoderTrainConfig, ClipLatents, train_autoencoder

    rng = np.random.default_rng(0)
    latents = ClipLatents([f"c{i}" for i in range(6)], rng.standard_normal((6, 4, 8, 8)).astype(np.float32),
                          rng.standard_normal((6, 4, 4, 8, 8)).astype(np.float32), np.array([0, 1, 2, 0, 1, -1]), ["train"] * 6, ["a", "b", "c"])
    config = AutoencoderTrainConfig(steps=4, batch_size=3, latent_channels=4, encoder_channels=16, decoder_channels=(16, 16),
                                    semantic_dim=16, checkpoint_every=2)
    whole = train_autoencoder(latents, config)
    store = FeatureStore(str(tmp_path))
    progress = progress_hooks(store, "demo", "mmldm_autoencoder", "k")
    half = AutoencoderTrainConfig(**{**config.__dict__, "steps": 4})
    # a run killed after its step-2 save: simulate by saving at 2 then resuming a fresh run from the save
    saved = {}
    original_save = progress.save
    progress.save = lambda step, model, optimizer, history: (original_save(step, model, optimizer, history), saved.setdefault("step", step))
    train_autoencoder(latents, half, progress)
    resumed = train_autoencoder(latents, half, progress_hooks(store, "demo", "mmldm_autoencoder", "k"))
    assert saved["step"] == 2 and resumed.resumed_from == 2 and resumed.steps_run == 2
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_audio_factor_auto_gives_the_same_z_a_on_either_audio_vae():
    """f_a = 0 (auto): 4, the paper's, on the 4x audio VAE's 20 x 88 KL latent and 2 on an 8x VAE's
    10 x 44, so z_a is 5 x 22 either way; a set f_a is kept, and auto stays out of the key."""
    from stages.mmldm.train import AutoencoderTrainConfig, ClipLatents, auto_audio_factor

    assert (auto_audio_factor((20, 88)), auto_audio_factor((10, 44)), auto_audio_factor((8, 8)), auto_audio_factor((5, 22))) == (4, 2, 2, 1)
    config = AutoencoderTrainConfig(latent_channels=4, encoder_channels=16, decoder_channels=(16, 16), semantic_dim=16)
    assert "audio_factor" not in config.params() and AutoencoderTrainConfig(audio_factor=2).params()["audio_factor"] == 2
    for hw in ((20, 88), (10, 44)):
        latents = ClipLatents(["a", "b"], np.zeros((2, 4, *hw), np.float32), np.zeros((2, 4, 4, 8, 8), np.float32),
                              np.array([0, 1]), ["train"] * 2, ["x", "y"])
        model_config = config.model_config(latents)
        assert model_config.audio_latent_shape == (4, 5, 22)
        mean, _ = build_autoencoder(model_config).audio_encoder(torch.zeros(1, 4, *hw))
        assert tuple(mean.shape) == (1, 4, 5, 22)
    assert AutoencoderTrainConfig(audio_factor=2).model_config(latents).audio_factor == 2
