"""DiffGAP fitting with lineage against a real store: reuse, warm start, resume after a kill, evaluation."""

import numpy as np
import pytest

from stages.diffgap import evaluate as diffgap_eval
from stages.diffgap import train as diffgap_train
from stages.core.checkpoints import list_checkpoints
from stages.ingest.manifest import Clip, ClipManifest
from stages.evaluation.retrieval import normalize
from stages.core.store import FeatureStore

DIM = 16
SMALL = dict(width=64, depth=2, learning_rate=2e-3, steps=300, bst_interval=50, checkpoint_every=100, update_steps=60)


def _clips(n: int, start: int = 0, shard_size: int = 40) -> list[Clip]:
    splits = ["train"] * 6 + ["val", "val", "test", "test"]
    return [
        Clip(id=f"c{i:04d}", uri=f"/nowhere/{i}.wav", content_hash=f"h{i}", shard_id=f"s{i // shard_size:06d}", split=splits[i % 10])
        for i in range(start, start + n)
    ]


def _write_space(store: FeatureStore, manifest: ClipManifest, key: str = "emb0000000000000") -> str:
    """CLAP-like embeddings: text and audio are noisy rotations of shared latents."""
    rot_a = np.linalg.qr(np.random.default_rng(7).normal(size=(DIM, DIM)))[0]
    rot_t = np.linalg.qr(np.random.default_rng(8).normal(size=(DIM, DIM)))[0]
    for shard, clips in manifest.by_shard().items():
        if store.has_shard(manifest.dataset, "clap_embeddings", key, shard):
            continue
        latent = np.stack([np.random.default_rng(int(c.id[1:])).normal(size=DIM) for c in clips])
        noise = np.random.default_rng(len(clips)).normal(size=(2, len(clips), DIM))
        store.write_shard(
            manifest.dataset, "clap_embeddings", key, shard, clip_ids=[c.id for c in clips],
            arrays={"audio": normalize(latent @ rot_a + 0.3 * noise[0]), "text": normalize(latent @ rot_t + 0.3 * noise[1])},
            manifest={"params": {}, "quarantined": []},
        )
    return key


def test_fit_reuses_then_warm_starts_on_new_shards(tmp_path):
    store = FeatureStore(str(tmp_path))
    manifest = ClipManifest("toy", 40, _clips(200))
    key = _write_space(store, manifest)
    config = diffgap_train.DiffgapTrainConfig(**SMALL)

    first = diffgap_train.fit_space(store, manifest, "clap", key, config)
    assert first.status == "trained" and first.sidecar["steps_run"] == 300
    assert first.sidecar["shards_seen"] == sorted(manifest.by_shard())
    assert diffgap_train.fit_space(store, manifest, "clap", key, config).status == "reused"

    grown = ClipManifest("toy", 40, _clips(200) + _clips(40, start=200))
    _write_space(store, grown, key)
    second = diffgap_train.fit_space(store, grown, "clap", key, config)
    assert second.status == "warm-started" and second.sidecar["warm_start_from"] == first.key
    assert second.sidecar["steps_run"] == 60 and second.sidecar["clips_new"] == 24  # 6 of every 10 clips are train
    assert [s["checkpoint_key"] for s in list_checkpoints(store, "toy", "diffgap_clap")] == [second.key, first.key]


def test_a_killed_run_resumes_from_its_last_progress_save(tmp_path, monkeypatch):
    store = FeatureStore(str(tmp_path))
    manifest = ClipManifest("toy", 40, _clips(200))
    key = _write_space(store, manifest)
    config = diffgap_train.DiffgapTrainConfig(**SMALL)

    import stages.core.checkpoints as checkpoints

    real_save = checkpoints.save_progress

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[-1]["step"] == 200:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoints, "save_progress", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        diffgap_train.fit_space(store, manifest, "clap", key, config)
    monkeypatch.setattr(checkpoints, "save_progress", real_save)
    assert list_checkpoints(store, "toy", "diffgap_clap") == []  # nothing half-finished is committed

    resumed = diffgap_train.fit_space(store, manifest, "clap", key, config)
    assert resumed.status == "resumed" and resumed.sidecar["resumed_from_step"] == 200 and resumed.sidecar["steps_run"] == 100
    assert resumed.sidecar["history"][-1]["step"] == 300
    # Progress saves are removed once the model is committed: they used to pile up beside it.
    assert store.fs.glob(f"{tmp_path}/toy/models/diffgap_clap/**/progress*") == []
    assert store.fs.glob(f"{tmp_path}/toy/models/diffgap_clap/**/*.safetensors")  # while the model stays


def test_evaluation_rows_choose_blend_on_val_and_report_controls(tmp_path):
    store = FeatureStore(str(tmp_path))
    manifest = ClipManifest("toy", 40, _clips(400))
    key = _write_space(store, manifest)
    fitted = diffgap_train.fit_space(store, manifest, "clap", key, diffgap_train.DiffgapTrainConfig(**{**SMALL, "steps": 600}))
    data = diffgap_eval.split_pairs(diffgap_train.load_pairs(store, manifest, "clap", key))
    rows = diffgap_eval.evaluate_space("clap", data, fitted.model, diffgap_eval.EvalConfig(steps=20, samples=2))
    methods = {(r["direction"], r["method"].split(" (alpha")[0]) for r in rows}
    for direction in ("T->A", "A->T"):
        assert {(direction, m) for m in ("base encoder", "ridge control", "DiffGAP", "DiffGAP (generated only)")} <= methods
    by = {(r["direction"], r["method"].split(" (alpha")[0]): r for r in rows}
    # The toy gap is a rotation: the raw cosine ranks at chance, a learned bridge far above it.
    assert by[("T->A", "base encoder")]["R@1"] < 20
    assert by[("T->A", "DiffGAP")]["R@1"] > 3 * max(by[("T->A", "base encoder")]["R@1"], 2.5)
    assert all(0 <= r["blend_weight"] <= 1 for r in rows if r["blend_weight"] is not None)
    assert all(r["n"] == 80 for r in rows)


def test_two_fits_of_one_config_and_seed_give_identical_weights(tmp_path):
    """The denoiser is initialised from the config's seed, not the global RNG (issue 12)."""
    import torch

    config = diffgap_train.DiffgapTrainConfig(**{**SMALL, "steps": 20, "checkpoint_every": 0})
    weights = []
    for run in range(2):
        store = FeatureStore(str(tmp_path / f"run{run}"))
        manifest = ClipManifest("toy", 40, _clips(80))
        key = _write_space(store, manifest)
        torch.manual_seed(1000 + run)  # a different global RNG state must not matter
        weights.append(diffgap_train.fit_space(store, manifest, "clap", key, config).model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    other = diffgap_train.DiffgapTrainConfig(**{**config.params(), "seed": 1})
    store = FeatureStore(str(tmp_path / "seed1"))
    manifest = ClipManifest("toy", 40, _clips(80))
    changed = diffgap_train.fit_space(store, manifest, "clap", _write_space(store, manifest), other).model.state_dict()
    assert any(not torch.equal(weights[0][n], changed[n]) for n in weights[0])
