"""The train_diffgap chain through Dagster on real demo media with tiny settings: towers ->
heads -> embeddings -> DiffGAP in both spaces -> evaluation and ablations; then incremental."""

import shutil

import pytest
from dagster import DagsterInstance

from assets import contrastive, diffgap, towers
from assets.features import clip_manifest
from assets.resources import (ClipSourceResource)
from stages.core.store import FeatureStore
from tests.fixtures import tiny
from tests.fixtures.tiny import materialize_dataset
from tests.fixtures.dagster_results import materialization_metadata

CHAIN = [clip_manifest, towers.audio_tower, towers.frame_tower, towers.text_tower,
         contrastive.clap_head, contrastive.cavp_head, contrastive.clap_embeddings, contrastive.cavp_embeddings,
         contrastive.retrieval_evaluation, contrastive.clap_embeddings_valid, contrastive.cavp_embeddings_valid,
         diffgap.diffgap_clap, diffgap.diffgap_cavp, diffgap.diffgap_evaluation, diffgap.diffgap_ablations]

HEAD = {"steps": 60, "batch_size": 16, "eval_every": 30, "embed_dim": 32, "hidden_dim": 64}
CDM = {"steps": 120, "bst_interval": 20, "width": 64, "depth": 1, "checkpoint_every": 0, "update_steps": 30,
       "learning_rate": 1e-3}
EVAL = {"steps": 5, "samples": 2, "seeds": [0, 1]}
RUN_CONFIG = {"ops": {
    "clap_head": {"config": HEAD}, "cavp_head": {"config": HEAD},
    "diffgap_clap": {"config": CDM}, "diffgap_cavp": {"config": CDM},
    "diffgap_evaluation": {"config": EVAL}, "diffgap_ablations": {"config": {**EVAL, "seeds": [0]}},
    "frame_tower": {"config": {"size": 64}},
}}


@pytest.fixture
def demo_copy(demo_dataset, tmp_path):
    """A private copy of the 40-clip demo so the test can add clips to it."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_dataset.parent, folder)
    return folder / "clips.jsonl"


def test_train_diffgap_chain_end_to_end_and_incremental(demo_copy, tmp_path):
    import json

    rows = [json.loads(line) for line in demo_copy.read_text().splitlines()]
    for i, row in enumerate(rows):  # enough val and test clips for blend weights and R@k on 40 clips
        row["split"] = ("val", "test", "train", "train", "train")[i % 5]
    lines = [json.dumps(row) for row in rows]
    demo_copy.write_text("\n".join(lines[:32]) + "\n")  # start with 32 clips, add 8 later
    resources = tiny.resources(tmp_path / "store", ClipSourceResource(kind="jsonl", path=str(demo_copy), dataset="demo", shard_size=16))
    instance = DagsterInstance.ephemeral()
    first = materialize_dataset(CHAIN, resources, instance=instance, run_config=RUN_CONFIG)
    assert first.success

    clap = materialization_metadata(first, "diffgap_clap")
    assert clap["status"] == "trained" and clap["steps_run"] == 120 and clap["weights_mb"] > 0
    evaluation = materialization_metadata(first, "diffgap_evaluation")
    for direction in ("T->A", "A->T", "V->A", "A->V"):
        assert direction in evaluation["summary"]
    assert "ridge control" in evaluation["table"] and "base encoder" in evaluation["table"]
    ablations = materialization_metadata(first, "diffgap_ablations")
    assert "CDM" in ablations["table_V"] and "| 5 |" in ablations["table_VI"]
    retrieval = materialization_metadata(first, "retrieval_evaluation")
    assert "random embeddings" in retrieval["table"] and "untrained head" in retrieval["table"]
    store = FeatureStore(str(tmp_path / "store"))
    assert store.fs.exists(evaluation["csv"]) and store.fs.exists(ablations["table_VII_csv"])
    clap_rows = store.read_arrays("demo", "clap_embeddings")
    assert clap_rows.arrays["audio"].shape[1] == 32

    # New clips arrive: new shards only; heads stay (a stable space), DiffGAP warm-starts.
    demo_copy.write_text("\n".join(lines) + "\n")
    second = materialize_dataset(CHAIN, resources, instance=instance, run_config=RUN_CONFIG)
    assert second.success
    assert materialization_metadata(second, "audio_tower")["shards_reused"] == 2
    assert materialization_metadata(second, "clap_head")["reused"] is True
    assert materialization_metadata(second, "clap_embeddings")["shards_new"] == 1
    warm = materialization_metadata(second, "diffgap_clap")
    assert warm["status"] == "warm-started" and warm["steps_run"] == 30 and warm["warm_start_from"] == clap["checkpoint_key"]
