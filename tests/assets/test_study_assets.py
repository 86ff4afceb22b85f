"""Two datasets in one store: a pretrained space (heads of one dataset frozen for another),
DiffGAP models evaluated across datasets, and the diffgap_study chain, through Dagster on real
demo media with tiny settings."""

import json

import pytest
from dagster import DagsterInstance

from assets import contrastive, diffgap, study, towers
from assets.features import clip_manifest
from assets.resources import ClipSourceResource
from stages.core.checkpoints import has_checkpoint
from stages.core.store import FeatureStore
from stages.embeddings import heads
from tests.fixtures import tiny
from tests.fixtures.dagster_results import materialization_metadata
from tests.fixtures.tiny import materialize_dataset

TOWERS = [clip_manifest, towers.audio_tower, towers.frame_tower, towers.text_tower]
SPACE = [contrastive.clap_head, contrastive.cavp_head, contrastive.clap_embeddings, contrastive.cavp_embeddings,
         diffgap.diffgap_clap, diffgap.diffgap_cavp]
HEAD = {"steps": 40, "batch_size": 16, "eval_every": 20, "embed_dim": 32, "hidden_dim": 64}
CDM = {"steps": 60, "bst_interval": 20, "width": 64, "depth": 1, "checkpoint_every": 0}
STUDY = {"seeds": [0, 1], "fractions": [0.5, 1.0], "head_steps": [10, 30], "samples": [1, 2], "diffgap_steps": 30,
         "sampling_steps": 5, "space_sources": ["demo"]}
TRANSFER = {"model_dataset": "demo", "steps": 5, "samples": 2, "seeds": [0]}


def _config(assets, source: str = "") -> dict:
    """The tiny settings of the assets materialized (Dagster refuses config of others)."""
    head = {**HEAD, **({"source_dataset": source} if source else {})}
    names = {a.key.path[-1] for a in assets}
    return {"ops": {name: section for name, section in _ops(head).items() if name in names}}


def _ops(head: dict) -> dict:
    return {"clap_head": {"config": head}, "cavp_head": {"config": head}, "diffgap_clap": {"config": CDM},
                    "diffgap_cavp": {"config": CDM}, "frame_tower": {"config": {"size": 64}},
                    "diffgap_study": {"config": STUDY}, "diffgap_transfer": {"config": TRANSFER}}


@pytest.fixture
def two_datasets(demo_dataset, tmp_path):
    """The 40-clip demo as dataset "demo" and 30 of its clips as "other" (val/test every fifth clip)."""
    rows = [json.loads(line) for line in demo_dataset.read_text().splitlines()]
    media = demo_dataset.parent
    for i, row in enumerate(rows):
        row["split"] = ("val", "test", "train", "train", "train")[i % 5]
        row["path"] = str(media / row["path"])
    paths = {}
    for name, chosen in (("demo", rows), ("other", rows[5:35])):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return paths


def _resources(tmp_path, paths, dataset):
    return tiny.resources(tmp_path / "store", ClipSourceResource(kind="jsonl", path=str(paths[dataset]), dataset=dataset,
                                                                 shard_size=16))


def test_pretrained_space_cross_dataset_evaluation_and_study(two_datasets, tmp_path):
    instance = DagsterInstance.ephemeral()
    store = FeatureStore(str(tmp_path / "store"))
    own = materialize_dataset(TOWERS + SPACE, _resources(tmp_path, two_datasets, "demo"), instance=instance,
                              run_config=_config(TOWERS + SPACE))
    assert own.success
    demo_head = materialization_metadata(own, "clap_head")["checkpoint_key"]
    demo_embeddings = materialization_metadata(own, "clap_embeddings")["feature_key"]

    # "other" embedded in demo's space: demo's heads (same config: reused, not refitted), frozen.
    other = materialize_dataset(TOWERS + SPACE + [study.diffgap_transfer], _resources(tmp_path, two_datasets, "other"),
                                instance=instance, run_config=_config(TOWERS + SPACE + [study.diffgap_transfer], source="demo"))
    assert other.success
    head = materialization_metadata(other, "clap_head")
    assert head["source_dataset"] == "demo" and head["checkpoint_key"] == demo_head and head["reused"] is True
    assert not has_checkpoint(store, "other", heads.CLAP_HEAD, demo_head)
    embeddings = materialization_metadata(other, "clap_embeddings")
    assert embeddings["space_source_dataset"] == "demo" and embeddings["feature_key"] != demo_embeddings
    shard = store.committed_shards("other", heads.CLAP_FEATURE, embeddings["feature_key"])[0]
    assert store.shard_manifest("other", heads.CLAP_FEATURE, embeddings["feature_key"], shard)["params"]["head_dataset"] == "demo"
    own_shard = store.committed_shards("demo", heads.CLAP_FEATURE, demo_embeddings)[0]
    assert "head_dataset" not in store.shard_manifest("demo", heads.CLAP_FEATURE, demo_embeddings, own_shard)["params"]
    fitted = materialization_metadata(other, "diffgap_clap")
    assert fitted["status"] == "trained" and fitted["clips_train"] == 18  # other's train split, in demo's space

    # demo's DiffGAP models on other's test split, nothing retrained; the key names both datasets.
    transfer = materialization_metadata(other, "diffgap_transfer")
    assert transfer["model_dataset"] == "demo" and transfer["eval_dataset"] == "other"
    for method in ("base encoder", "ridge control", "DiffGAP"):
        assert method in transfer["table"]
    assert transfer["embedding_keys"]["clap"] == embeddings["feature_key"]  # the same space as the pretrained-space run
    document = json.loads(store.fs.cat_file(f"{store.path('other', 'evaluations', 'diffgap_transfer')}/{transfer['result_key']}.json"))
    inputs = document["provenance"]["inputs"]
    assert "model_dataset:demo" in inputs and "eval_dataset:other" in inputs

    # The study on "other": 4 distinct trainings x 2 seeds, each a cached result; then all reused.
    first = materialize_dataset(TOWERS + [study.diffgap_study], _resources(tmp_path, two_datasets, "other"), instance=instance,
                                selection=[study.diffgap_study],
                                run_config=_config([study.diffgap_study]))
    assert first.success
    found = materialization_metadata(first, "diffgap_study")
    assert found["reused"] is False and found["trainings_per_row"] == 2
    for text in ("train fraction", "head steps", "samples k", "other (own)", "| demo |", "T->A", "A->T", "ridge"):
        assert text in found["table"], text
    cells = store.fs.glob(f"{store.path('other', 'evaluations', 'diffgap_study_cell')}/*.json")
    assert len(cells) == 8
    again = materialize_dataset(TOWERS + [study.diffgap_study], _resources(tmp_path, two_datasets, "other"), instance=instance,
                                selection=[study.diffgap_study],
                                run_config=_config([study.diffgap_study]))
    assert materialization_metadata(again, "diffgap_study")["reused"] is True

    # One more seed: only its 4 trainings are new.
    more = _config([study.diffgap_study])
    more["ops"]["diffgap_study"]["config"] = {**STUDY, "seeds": [0, 1, 2]}
    third = materialize_dataset(TOWERS + [study.diffgap_study], _resources(tmp_path, two_datasets, "other"), instance=instance,
                                selection=[study.diffgap_study],
                                run_config=more)
    assert materialization_metadata(third, "diffgap_study")["reused"] is False
    assert len(store.fs.glob(f"{store.path('other', 'evaluations', 'diffgap_study_cell')}/*.json")) == 12


def test_transfer_to_a_dataset_without_video_skips_the_video_space(demo_dataset, tmp_path):
    """The demo's models (both spaces) on a WAV-only dataset: CLAP is evaluated, CAVP is a skipped
    row saying why (it failed the run before: no test clip in the CAVP space)."""
    import soundfile as sf

    from tests.fixtures.media import tone

    rows = [json.loads(line) for line in demo_dataset.read_text().splitlines()]
    media = demo_dataset.parent
    for i, row in enumerate(rows):
        row["split"] = ("val", "test", "train", "train", "train")[i % 5]
        row["path"] = str(media / row["path"])
    demo = tmp_path / "demo.jsonl"
    demo.write_text("".join(json.dumps(row) + "\n" for row in rows))
    audio_rows = []
    for i, row in enumerate(rows[:20]):
        wav = tmp_path / f"clip_{i}.wav"
        sf.write(wav, tone(2.0, 16000, freq=200 + 40 * i), 16000)
        audio_rows.append({"id": f"wav_{i}", "path": str(wav), "caption": row.get("caption", "a tone"), "split": row["split"]})
    sounds = tmp_path / "sounds.jsonl"
    sounds.write_text("".join(json.dumps(row) + "\n" for row in audio_rows))
    paths = {"demo": demo, "sounds": sounds}
    instance = DagsterInstance.ephemeral()
    assert materialize_dataset(TOWERS + SPACE, _resources(tmp_path, paths, "demo"), instance=instance,
                               run_config=_config(TOWERS + SPACE)).success
    run = materialize_dataset(TOWERS + [study.diffgap_transfer], _resources(tmp_path, paths, "sounds"), instance=instance,
                              selection=TOWERS + [study.diffgap_transfer], run_config=_config([study.diffgap_transfer]))
    assert run.success
    table = materialization_metadata(run, "diffgap_transfer")["table"]
    assert "skipped: sounds: no clip has video" in table and "| T->A | base encoder | demo | sounds |" in table
