"""The espeak-ng speech collection: real synthesis (apt package espeak-ng, installed by
scripts/setup.sh --test), read back through the jsonl source kind like any captioned collection."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from stages.ingest.sources import SourceConfig, read_source
from stages.ingest.speech import LOUDNESS, RATES, SAMPLE_RATE, SpeechSpec, caption, clip_attributes, make_speech_dataset
from tests.fixtures.services import require_service


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    require_service(shutil.which("espeak-ng") is not None, "espeak-ng not installed (apt package espeak-ng)")
    out = tmp_path_factory.mktemp("speech")
    return make_speech_dataset(out, SpeechSpec(n_clips=20, seed=3))


def test_collection_reads_through_the_jsonl_source_with_given_splits_and_captions(speech):
    listing = read_source(SourceConfig(kind="jsonl", path=speech))
    assert not listing.rejected and len(listing.clips) == 20
    assert sorted({c.split for c in listing.clips}) == ["test", "train", "val"]
    assert sum(c.split == "train" for c in listing.clips) == 14
    rows = [json.loads(line) for line in open(speech)]
    for row, clip in zip(rows, listing.clips):
        attributes = clip_attributes(SpeechSpec(n_clips=20, seed=3), int(row["id"].split("_")[1]))
        assert clip.caption == caption(attributes)
        # The caption says what can be heard, never the words spoken.
        assert attributes["pitch"] in clip.caption and attributes["rate"] in clip.caption
        assert attributes["text"] not in clip.caption


def test_audio_follows_its_attributes(speech):
    spec = SpeechSpec(n_clips=20, seed=3)
    rows = [json.loads(line) for line in open(speech)]
    folder = speech.rsplit("/", 1)[0]
    peaks = {}
    for row in rows:
        audio, rate = sf.read(f"{folder}/{row['path']}", dtype="float32")
        attributes = clip_attributes(spec, int(row["id"].split("_")[1]))
        assert rate == SAMPLE_RATE and 0.2 < len(audio) / rate <= spec.max_seconds
        peaks.setdefault(attributes["loud"], []).append(float(np.abs(audio).max()))
    for loudness, values in peaks.items():  # scaled to the peak its caption names (16-bit rounding aside)
        assert np.allclose(values, LOUDNESS[loudness], atol=2e-3)


def test_a_faster_rate_says_the_same_sentence_in_less_time(tmp_path):
    require_service(shutil.which("espeak-ng") is not None, "espeak-ng not installed (apt package espeak-ng)")
    from stages.ingest.speech import synthesise

    attributes = {**clip_attributes(SpeechSpec(), 0), "text": "the library closes early on the first friday",
                  "pitch_jitter": 0, "rate_jitter": 0}
    slow = synthesise({**attributes, "rate": "slowly"}, 10.0)
    fast = synthesise({**attributes, "rate": "quickly"}, 10.0)
    assert len(fast) < 0.75 * len(slow) and RATES["quickly"] > RATES["slowly"]


def test_same_spec_reuses_the_folder(speech):
    before = open(speech).read()
    folder = speech.rsplit("/", 1)[0]
    assert make_speech_dataset(folder, SpeechSpec(n_clips=20, seed=3)) == speech and open(speech).read() == before
