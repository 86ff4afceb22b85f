"""Datasets with one modality missing run the train_diffgap chain on the space they have: the
other space's head says once why it is skipped, and every table has one row saying so."""

import csv
import logging

from dagster import DagsterInstance

from assets.resources import ClipSourceResource
from tests.assets.test_diffgap_assets import CHAIN, RUN_CONFIG
from tests.fixtures import tiny
from tests.fixtures.dagster_results import materialization_metadata
from tests.fixtures.single_modality import write_audio_only, write_video_without_captions


def _run(jsonl, tmp_path, dataset):
    resources = tiny.resources(tmp_path / "store", ClipSourceResource(kind="jsonl", path=str(jsonl), dataset=dataset, shard_size=16))
    instance = DagsterInstance.ephemeral()
    result = tiny.materialize_dataset(CHAIN, resources, instance=instance, run_config=RUN_CONFIG)
    assert result.success
    warnings = [e.user_message for e in instance.all_logs(result.run_id)
                if e.level == logging.WARNING and "skipped" in e.user_message]
    return result, warnings


def _assert_half(result, warnings, present: tuple[str, str], absent: tuple[str, str], head: str, reason: str):
    assert len(warnings) == 1 and reason in warnings[0], warnings  # said once, by the head
    assert reason in materialization_metadata(result, head)["skipped"]
    retrieval = materialization_metadata(result, "retrieval_evaluation")
    table = retrieval["table"]
    for direction in present:
        assert f"| {direction} | trained |" in table
    for direction in absent:
        assert f"| {direction} | trained |" not in table
    assert table.count(f"skipped: {reason}") == 1
    summary = materialization_metadata(result, "diffgap_evaluation")["summary"]
    assert all(f"| {d} | DiffGAP |" in summary for d in present), summary
    assert f"| {' / '.join(absent)} | skipped: {reason}" in summary
    assert f"skipped: {reason}" in materialization_metadata(result, "diffgap_ablations")["table_V"]


def test_audio_only_dataset_runs_the_text_audio_half(demo_dataset, tmp_path):
    # Two captions per clip; a test clip's WAV again under another id (its captions too), as scraped datasets have.
    jsonl = write_audio_only(demo_dataset, tmp_path / "audio_only", duplicate_of={"copy_of_000001": "demo_000001"},
                             two_captions=True)
    result, warnings = _run(jsonl, tmp_path, "audio_only")
    _assert_half(result, warnings, ("T->A", "A->T"), ("V->A", "A->V"), "cavp_head", "no clip has video")
    assert materialization_metadata(result, "diffgap_clap")["status"] == "trained"
    assert "skipped" in materialization_metadata(result, "diffgap_cavp")

    retrieval = materialization_metadata(result, "retrieval_evaluation")
    assert retrieval["duplicate_media"] == 1 and retrieval["shared_captions"] == 2
    assert retrieval["duplicates_in_split"] == "1 byte-identical media groups (2 clips); 2 captions shared by 4 clips"
    assert "copy_of_000001, demo_000001" in retrieval["duplicates_table"]
    with open(retrieval["csv"]) as f:
        rows = [row for row in csv.DictReader(f) if row["R@1"]]
    assert {row["direction"] for row in rows} == {"T->A", "A->T"}
    for row in rows:  # every caption a T->A query over the clips' audio; one A->T query per clip
        captions, audios = (row["n"], row["gallery"]) if row["direction"] == "T->A" else (row["gallery"], row["n"])
        assert int(captions) == 2 * int(audios), row
    for row in rows:  # the aware R@k sits beside the standard one and never below it
        assert all(float(row[f"dup-aware R@{k}"]) >= float(row[f"R@{k}"]) for k in (1, 5, 10)), row


def test_video_without_captions_runs_the_video_audio_half(demo_dataset, tmp_path):
    jsonl = write_video_without_captions(demo_dataset, tmp_path / "no_captions")
    result, warnings = _run(jsonl, tmp_path, "no_captions")
    _assert_half(result, warnings, ("V->A", "A->V"), ("T->A", "A->T"), "clap_head", "no clip has a caption or label")
    assert materialization_metadata(result, "diffgap_cavp")["status"] == "trained"
    retrieval = materialization_metadata(result, "retrieval_evaluation")
    assert retrieval["duplicate_media"] == 0 and retrieval["shared_captions"] == 0
