"""Duplicate media and shared captions, several captions per clip: values worked out by hand."""

import numpy as np
import pytest

from stages.evaluation.duplicates import Duplicates, clip_texts, find_duplicates, relevance
from stages.evaluation.retrieval import match_ranks, owner_relevance, relevant_ranks, retrieval_metrics
from stages.ingest.manifest import Clip


def _clip(i, digest, caption="", label=""):
    return Clip(f"c{i}", f"m/{i}.wav", digest, "s000000", caption=caption, label=label, split="test")


def test_relevant_ranks_take_the_best_relevant_item_and_count_ties_against_it():
    similarity = np.array([[0.9, 0.5, 0.9], [0.1, 0.2, 0.3]])
    relevant = np.array([[False, True, False], [True, False, True]])
    assert relevant_ranks(similarity, relevant).tolist() == [3, 1]
    tied = np.array([[0.5, 0.5, 0.1]])
    assert relevant_ranks(tied, np.array([[True, False, False]])).tolist() == [2]
    with pytest.raises(ValueError):
        relevant_ranks(similarity, np.zeros((2, 3), bool))  # a query with nothing to find


def test_identity_relevance_is_the_standard_protocol():
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(7, 7))
    assert relevant_ranks(similarity, np.eye(7, dtype=bool)).tolist() == match_ranks(similarity).tolist()


def test_several_captions_per_clip_follow_the_audiocaps_protocol():
    audio = np.array([[1.0, 0.0], [0.0, 1.0]])
    captions = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])  # two per clip
    owner = np.array([0, 0, 1, 1])
    t2a = retrieval_metrics(captions, audio, ks=(1,), relevant=owner_relevance(owner, np.arange(2)))
    # caption 1 of clip 0 is nearest clip 1's audio: ranks 1, 2, 1, 1
    assert t2a["R@1"] == 75.0 and t2a["n"] == 4 and t2a["mean_rank"] == 1.25
    a2t = retrieval_metrics(audio, captions, ks=(1,), relevant=owner_relevance(np.arange(2), owner))
    # clip 1's audio scores caption 1 (clip 0's) as high as its own best: a tie counts against it
    assert a2t["R@1"] == 50.0 and a2t["n"] == 2


def test_every_caption_of_a_clip_is_a_text():
    clip = Clip("c0", "m/0.wav", "h", "s000000", caption="one", captions=("one", " two  words"), label="x")
    assert clip_texts(clip) == ("one", "two words")
    assert clip_texts(_clip(1, "h", label="rain")) == ("rain",)


def test_shared_caption_and_duplicate_media_are_hits_only_in_the_aware_metric():
    clips = [_clip(0, "h0", "a dog barks"), _clip(1, "h1", "a dog  barks"), _clip(2, "h0", "rain"), _clip(3, "h3", "wind")]
    texts = [clip_texts(c) for c in clips]
    assert texts[1] == ("a dog barks",)  # whitespace-normalised: the same caption
    hashes = [c.content_hash for c in clips]
    paired, aware = relevance(np.arange(4), np.arange(4), hashes, texts, texts)
    assert paired.tolist() == np.eye(4, dtype=bool).tolist()
    assert aware[0, 1] and aware[1, 0]  # the same caption
    assert aware[0, 2] and aware[2, 0]  # byte-identical media
    assert not aware[1, 2] and aware[3].tolist() == [False, False, False, True]
    # Text query 0 ranks clip 1's audio first: a miss by R@1, a hit by the caption-aware R@1.
    query = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    gallery = np.array([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    standard = retrieval_metrics(query, gallery, ks=(1,), relevant=paired)
    aware_metrics = retrieval_metrics(query, gallery, ks=(1,), relevant=aware)
    assert standard["R@1"] == 75.0 and aware_metrics["R@1"] == 100.0


def test_find_duplicates_counts_media_and_captions_and_prefers_the_manifests_media():
    clips = [_clip(0, "h0", "a dog barks"), _clip(1, "h0", "a dog barks"), _clip(2, "h2", label="rain"),
             _clip(3, "h3", label="rain"), _clip(4, "h4", "wind")]
    found = find_duplicates(clips)
    assert found == Duplicates([["c0", "c1"]], {"a dog barks": 2, "rain": 2})
    assert found.summary() == "1 byte-identical media groups (2 clips); 2 captions shared by 4 clips"
    assert "c0, c1" in found.markdown()
    given = find_duplicates(clips, {"duplicate_media": [["c3", "c2"]], "shared_captions": {"a dog barks": 2}})
    assert given == Duplicates([["c2", "c3"]], {"a dog barks": 2, "rain": 2})  # labels count as texts too
    assert find_duplicates(clips[4:]).markdown() == "No duplicate media or shared caption."
