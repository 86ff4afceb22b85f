"""Long steps say how far they are (issue 14): shard work per feature and every training loop log
`label: done/total unit (pct), rate, ETA` lines naming what they are about, to the ``log`` a stage
is given (assets pass ``context.log.info``). No timing is asserted: a tiny run logs its first and
its last line ("done in"), and nothing between unless 10 s pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.core.progress import LossWindow, Progress
from stages.core.store import FeatureStore
from stages.features.base import ShardFeature, ShardOutput, run_feature
from stages.core.parallel import InProcessExecutor
from stages.ingest.manifest import Clip, ClipManifest


class TextLengths(ShardFeature):
    """A feature of the clips' texts (no media to decode): the real driver and store, tiny work."""

    name, code_version = "text_lengths", "1"

    def extract(self, job, store) -> ShardOutput:
        ids = [clip_id for clip_id, _, _ in job.clips]
        return ShardOutput(ids, {"length": np.array([len(t) for t in job.texts], np.float32)}, [])


def _manifest(shards: int = 3, per_shard: int = 2) -> ClipManifest:
    clips = [Clip(id=f"c{s}{i}", uri=f"/nowhere/{s}{i}.wav", content_hash=f"h{s}{i}", shard_id=f"s{s:06d}",
                  split="train", caption="x" * (s + i + 1))
             for s in range(shards) for i in range(per_shard)]
    return ClipManifest("toy", len(clips), clips)


class CompletesInReverse:
    """An executor whose results come back last job first (as a cluster's may)."""

    def map(self, fn, items):
        return [fn(item) for item in items]

    def map_unordered(self, fn, items):
        return (fn(item) for item in reversed(list(items)))


@pytest.mark.parametrize("executor", [InProcessExecutor(), CompletesInReverse()], ids=["in_process", "unordered"])
def test_run_feature_logs_shards_done_of_total(tmp_path, executor):
    store, manifest, feature, lines = FeatureStore(str(tmp_path)), _manifest(), TextLengths(), []
    run = run_feature(store, manifest, feature.name, "k" * 16, {}, "1", feature.compute_shard, executor, log=lines.append)
    assert lines[0].startswith("text_lengths: 0/3 shards (0%)") and "clips 6" in lines[0] and "reused 0" in lines[0]
    assert lines[-1].startswith("text_lengths: 3/3 shards (100%)") and "done in" in lines[-1] and "clips 6" in lines[-1]
    assert len(lines) == 2  # a tiny run: the first line and the last, no flood
    assert run.shards_new == 3 and run.clips_ok == 6
    table = store.read_arrays("toy", feature.name, "k" * 16)
    assert table.clip_ids == [c.id for c in manifest.clips]  # job order, whatever the completion order

    again: list[str] = []
    rerun = run_feature(store, manifest, feature.name, "k" * 16, {}, "1", feature.compute_shard, executor, log=again.append)
    assert rerun.shards_reused == 3 and again == []  # nothing to compute: no progress lines


def _pairs(n: int = 16, d: int = 8):
    from stages.diffgap.train import EmbeddingPairs

    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return EmbeddingPairs([f"c{i}" for i in range(n)], unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d))), ["train"] * n)


def test_fits_log_model_space_seed_steps_loss_and_eta():
    from stages.diffgap.train import DiffgapTrainConfig, fit_label, train_diffgap
    from stages.embeddings.heads import CLAP_HEAD, PairedFeatures, HeadTrainConfig, train_head
    from stages.generation.train import GeneratorTrainConfig, LatentPairs, train_generator

    lines: list[str] = []
    config = DiffgapTrainConfig(steps=20, batch_size=4, width=16, seed=3, checkpoint_every=0)
    train_diffgap(_pairs(), config, log=lines.append, label=fit_label("clap", config))
    assert lines[0].startswith("diffgap clap seed 3: 0/20 steps (0%)")
    assert lines[-1].startswith("diffgap clap seed 3: 20/20 steps (100%)") and "done in" in lines[-1] and "loss " in lines[-1]
    ablation = DiffgapTrainConfig(**{**config.params(), "bst": False})
    assert fit_label("cavp", ablation) == "diffgap cavp seed 3, no BST (V->A only)"

    lines.clear()
    rng = np.random.default_rng(1)
    heads = PairedFeatures([f"c{i}" for i in range(8)], {"audio": rng.normal(size=(8, 6)).astype(np.float32),
                                                         "text": rng.normal(size=(8, 5)).astype(np.float32)}, ["train"] * 8)
    train_head(CLAP_HEAD, heads, heads.subset("val"), HeadTrainConfig(steps=6, batch_size=4, eval_every=3, embed_dim=4, hidden_dim=8, seed=2),
               log=lines.append)
    assert lines[0].startswith("clap head seed 2: 0/6 steps") and lines[-1].startswith("clap head seed 2: 6/6 steps (100%)")
    assert "loss " in lines[-1]

    lines.clear()
    pairs = _pairs()
    latents = LatentPairs(pairs.clip_ids, rng.normal(size=(16, 4, 4, 4)).astype(np.float32), pairs.audio, pairs.other, pairs.splits)
    train_generator(latents, GeneratorTrainConfig(steps=3, batch_size=4, block_out_channels=(8,), norm_num_groups=4, threads=1),
                    log=lines.append, label="audio generator cavp seed 0")
    assert lines[0].startswith("audio generator cavp seed 0: 0/3 steps") and "done in" in lines[-1]


def test_a_resumed_fit_counts_from_where_it_was_and_a_loss_is_read_only_when_logged():
    clock, lines, reads = [0.0], [], []

    def loss():
        reads.append(1)
        return 0.25

    progress = Progress("diffgap cavp seed 0", 100, "steps", lines.append, interval=10, clock=lambda: clock[0], done=60).start()
    for _ in range(40):
        clock[0] += 1.0
        progress.advance(loss=loss)
    assert lines[0].startswith("diffgap cavp seed 0: 60/100 steps (60%)")
    assert "ETA 30 s" in lines[1]  # 10 steps in 10 s of this run, 30 left: the 60 done before do not count
    assert len(reads) == len(lines) - 1  # read for each line after the first, not for each step
    assert "loss 0.25" in lines[-1] and "done in 40 s" in lines[-1]


def test_loss_window_names_the_first_non_finite_step():
    window = LossWindow("DiffGAP loss")
    for step, value in enumerate([1.0, 0.5, float("nan"), 0.25], start=1):
        window.add(step, torch.tensor(value))
    with pytest.raises(FloatingPointError, match=r"DiffGAP loss became nan at step 3; lower learning_rate"):
        window.check()
    fine = LossWindow("generator loss")
    for step in range(1, 4):
        fine.add(step, torch.tensor(float(step)))
    assert fine.check() == 3.0 and fine.take() == [1.0, 2.0, 3.0] and fine.take() == []
