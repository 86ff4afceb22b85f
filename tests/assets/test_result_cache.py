"""Evaluation and ablation results are keyed by their inputs and config, stored in the feature store
and reused while nothing changed (issue 14): a second materialization fits and evaluates nothing,
a config change recomputes, a garbled stored result is recomputed instead of failing the run."""

import dataclasses
import posixpath

import pytest
from dagster import SourceAsset

from assets import diffgap
from assets.datasets import DATASETS
from assets.io import OUTPUTS_FOLDER
from assets.resources import ClipSourceResource
from stages.core.refs import FeatureRef, ManifestRef, encode
from stages.core.results import cached_result, result_path
from stages.core.store import FeatureStore
from stages.diffgap import evaluate as diffgap_eval
from stages.embeddings.spaces import SkippedSpace
from stages.ingest.manifest import ClipManifest, save_manifest
from tests.fixtures import tiny
from tests.fixtures.dagster_results import materialization_metadata
from tests.stages.diffgap.test_diffgap import _clips, _write_space

# The steps before DiffGAP ran earlier: their outputs are in the store (see _upstream).
UPSTREAM = [SourceAsset(name, partitions_def=DATASETS) for name in ("clip_manifest", "clap_embeddings", "cavp_embeddings")]
ASSETS = [diffgap.diffgap_clap, diffgap.diffgap_cavp, diffgap.diffgap_evaluation, diffgap.diffgap_ablations, *UPSTREAM]
CDM = {"steps": 40, "bst_interval": 10, "width": 32, "depth": 1, "checkpoint_every": 0}
EVAL = {"steps": 5, "samples": 2, "seeds": [0, 1]}


def _run_config(evaluation: dict) -> dict:
    return {"ops": {"diffgap_clap": {"config": CDM}, "diffgap_evaluation": {"config": evaluation},
                    "diffgap_ablations": {"config": {**evaluation, "seeds": [0]}}}}


def _upstream(store: FeatureStore, dataset: str, manifest: ClipManifest | None = None) -> ClipManifest:
    """A clip manifest, CLAP embeddings and a skipped CAVP space in the store, as earlier steps leave them."""
    manifest = manifest or ClipManifest(dataset, 40, _clips(80))
    digest = save_manifest(store, manifest)
    key = _write_space(store, manifest)
    shards = tuple(sorted(manifest.by_shard()))
    outputs = {
        "clip_manifest": ManifestRef(dataset, digest, len(manifest.clips), shards),
        "clap_embeddings": FeatureRef(dataset, "clap_embeddings", key, digest, shards),
        "cavp_embeddings": SkippedSpace(dataset, "cavp", "no clip has video"),
    }
    for asset, value in outputs.items():
        store.write_json(store.path(dataset, OUTPUTS_FOLDER, f"{asset}.json"),
                         {"asset": asset, "dataset": dataset, "run_id": "earlier", "value": encode(value)})
    return manifest


@pytest.fixture
def counted_evaluations(monkeypatch):
    """How many retrieval evaluations (each one samples the denoiser) the assets run."""
    calls = []
    real = diffgap_eval.evaluate_direction

    def counting(*args, **kwargs):
        calls.append(args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(diffgap_eval, "evaluate_direction", counting)
    return calls


def test_results_are_reused_until_an_input_or_the_config_changes(tmp_path, counted_evaluations):
    store = FeatureStore(str(tmp_path / "store"))
    manifest = _upstream(store, "toy")
    source = ClipSourceResource(kind="jsonl", path=str(tmp_path / "clips.jsonl"), dataset="toy")
    resources = tiny.resources(tmp_path / "store", source)

    def run(evaluation: dict):
        counted_evaluations.clear()
        result = tiny.materialize_dataset(ASSETS, resources, run_config=_run_config(evaluation))
        assert result.success
        return (materialization_metadata(result, "diffgap_evaluation"), materialization_metadata(result, "diffgap_ablations"),
                len(counted_evaluations))

    evaluation, ablations, evaluated = run(EVAL)
    assert not evaluation["reused"] and not ablations["reused"] and evaluated > 0
    assert "skipped: no clip has video" in evaluation["table"] and "| 5 |" in ablations["table_VI"]

    again, ablations_again, evaluated = run(EVAL)
    assert again["reused"] and ablations_again["reused"]
    assert evaluated == 0  # nothing sampled, nothing fitted: the stored tables came back
    assert again["result_key"] == evaluation["result_key"] and again["table"] == evaluation["table"]
    assert ablations_again["table_VII"] == ablations["table_VII"]

    changed, ablations_changed, evaluated = run({**EVAL, "samples": 3})
    assert not changed["reused"] and not ablations_changed["reused"] and evaluated > 0
    assert changed["result_key"] != evaluation["result_key"]

    # A garbled stored result costs its recomputation, not the run.
    path = result_path(store, "toy", "diffgap_evaluation", evaluation["result_key"])
    store.write_bytes(path, store.fs.cat_file(path)[:-40])
    repaired, _, evaluated = run(EVAL)
    assert not repaired["reused"] and "not valid JSON" in repaired["recomputed_because"] and evaluated > 0
    assert repaired["table"] == evaluation["table"]  # same inputs, same seeds: the same numbers
    assert run(EVAL)[0]["reused"]

    # A new manifest version whose files only changed their times (new stats): same splits, reused.
    touched = _upstream(store, "toy", dataclasses.replace(manifest, clips=[
        dataclasses.replace(c, stat=f"touched:{i}") for i, c in enumerate(manifest.clips)]))
    assert touched.digest() != manifest.digest()
    assert run(EVAL)[0]["reused"]
    # A clip moves from test to val: the tables evaluate other clips, so they are computed again.
    moved = next(i for i, c in enumerate(touched.clips) if c.split == "test")
    clips = list(touched.clips)
    clips[moved] = dataclasses.replace(clips[moved], split="val")
    _upstream(store, "toy", dataclasses.replace(touched, clips=clips))
    resplit, _, evaluated = run(EVAL)
    assert not resplit["reused"] and evaluated > 0


def test_cached_result_recomputes_an_edited_value_and_keeps_row_order(tmp_path):
    store = FeatureStore(str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return [{"direction": "T->A", "method": "DiffGAP", "R@1": 12.5}]

    first = cached_result(store, "toy", "demo_table", "k0000000000000001", compute)
    assert not first.reused and list(first.value[0]) == ["direction", "method", "R@1"]
    assert cached_result(store, "toy", "demo_table", "k0000000000000001", compute).reused and len(calls) == 1

    path = result_path(store, "toy", "demo_table", "k0000000000000001")
    text = store.fs.cat_file(path).decode().replace("12.5", "99.5")  # valid JSON, wrong numbers
    store.write_bytes(path, text.encode())
    edited = cached_result(store, "toy", "demo_table", "k0000000000000001", compute)
    assert not edited.reused and "sha256" in edited.recomputed_because and edited.value[0]["R@1"] == 12.5
    assert posixpath.basename(path) == "k0000000000000001.json" and len(calls) == 2
