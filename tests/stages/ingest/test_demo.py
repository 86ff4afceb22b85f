"""Tests for the built-in demo dataset generator (stages/demo.py)."""

from __future__ import annotations

import json
import re
import shutil

import av
import decord
import numpy as np
import pytest

from stages.ingest import demo
from stages.ingest.demo import CLASSES, DemoSpec, generate_demo, make_clip, write_mp4

SR = 22050
FPS = 8
AAC_FRAME = 1024


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _decode_audio(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)[0]


def _decode_frames(path) -> np.ndarray:
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def _audio_onset(audio: np.ndarray, sr: int) -> float:
    """Seconds at which a 10 ms RMS envelope first exceeds half its maximum."""
    w = int(0.01 * sr)
    env = np.sqrt(np.convolve(audio.astype(np.float64) ** 2, np.ones(w) / w, mode="same"))
    return float(np.argmax(env > 0.5 * env.max())) / sr


def _visual_event_frame(frames: np.ndarray) -> int:
    """First frame whose mean absolute difference to the previous one exceeds half the maximum."""
    d = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    return int(np.argmax(d > 0.5 * d.max())) + 1


@pytest.fixture(scope="module")
def ds20(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("a") / "demo", DemoSpec(n_clips=20))


@pytest.fixture(scope="module")
def ds40(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("b") / "demo", DemoSpec(n_clips=40))


# ---------------------------------------------------------------- write_mp4


def test_write_mp4_round_trip_keeps_length_and_timing(tmp_path):
    n = int(3.25 * SR)
    audio = np.zeros(n, np.float32)
    onset = SR  # a burst at exactly 1.0 s
    audio[onset:onset + 4000] = 0.8 * np.sin(2 * np.pi * 600 * np.arange(4000) / SR)
    frames = np.zeros((26, 32, 64, 3), np.uint8)  # non-square catches H/W mix-ups
    frames[8:, 8:16, 8:16] = 255  # the square appears at frame 8 = 1.0 s
    path = tmp_path / "x.mp4"
    write_mp4(path, frames, FPS, audio, SR)

    with av.open(str(path)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        assert c.streams.audio[0].sample_rate == SR
        assert c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.video[0].codec_context.name == "h264"
    dec = _decode_audio(path)
    assert abs(len(dec) - n) < AAC_FRAME
    # Encoder priming is trimmed: the burst starts where it was written (within 1 ms).
    assert abs(int(np.argmax(np.abs(dec) > 0.1)) - onset) < SR // 1000
    assert 0.7 < np.abs(dec).max() < 0.95
    got = _decode_frames(path)
    assert got.shape == (26, 32, 64, 3)
    assert _visual_event_frame(got) == 8


def test_write_mp4_without_audio_has_no_audio_stream(tmp_path):
    path = tmp_path / "v.mp4"
    write_mp4(path, np.zeros((4, 16, 16, 3), np.uint8), FPS, None, SR)
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 0
        assert len(c.streams.video) == 1
    assert len(decord.VideoReader(str(path))) == 4


def test_write_mp4_audio_only(tmp_path):
    path = tmp_path / "a.mp4"
    write_mp4(path, None, FPS, np.full(SR, 0.3, np.float32), SR)
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 0
        assert len(c.streams.audio) == 1
    assert abs(len(_decode_audio(path)) - SR) < AAC_FRAME


def test_write_mp4_rejects_odd_size_and_empty(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "o.mp4", np.zeros((2, 15, 16, 3), np.uint8), FPS, None, SR)
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "n.mp4", None, FPS, None, SR)


# ---------------------------------------------------------------- the dataset


def test_every_clip_decodes_with_declared_length(ds40):
    spec = DemoSpec(n_clips=40)
    recs = _read_jsonl(ds40)
    assert [r["id"] for r in recs] == [f"demo_{i:06d}" for i in range(40)]
    for r in recs:
        assert set(r) >= {"id", "path", "caption", "label", "split", "seconds"}
        assert r["path"] == f"media/{r['id']}.mp4"
        assert spec.min_seconds - 0.5 / FPS <= r["seconds"] <= spec.max_seconds + 0.5 / FPS
        n_frames = r["seconds"] * FPS
        assert n_frames == int(n_frames)  # whole video frames
        path = ds40.parent / r["path"]
        audio = _decode_audio(path)
        assert abs(len(audio) - r["seconds"] * SR) < AAC_FRAME
        assert 0.4 < np.abs(audio).max() <= 1.0  # peak-normalised, never silent
        vr = decord.VideoReader(str(path))
        assert len(vr) == int(n_frames)
        assert vr[0].shape == (spec.size, spec.size, 3)


def test_classes_and_splits(ds40):
    recs = _read_jsonl(ds40)
    labels = {r["label"] for r in recs}
    assert len(CLASSES) >= 10 and len(set(CLASSES)) == len(CLASSES)
    assert labels <= set(CLASSES)
    assert len(labels) >= 10
    by_split = {s: {r["label"] for r in recs if r["split"] == s} for s in ("train", "val", "test")}
    assert {r["split"] for r in recs} == set(by_split)
    assert len(by_split["train"]) >= 10
    assert len(by_split["val"]) >= 2 and len(by_split["test"]) >= 2
    # Fractions close to the spec on a larger set (no encoding needed: make_clip's metadata).
    spec = DemoSpec(n_clips=240)
    splits = [demo._split_of(spec, i, demo._class_of(spec.seed, i)) for i in range(240)]
    assert 0.07 < splits.count("test") / 240 < 0.13
    assert 0.07 < splits.count("val") / 240 < 0.13


_COUNT_WORDS = {1: ("one", "once"), 2: ("two", "twice"), 3: ("three",), 4: ("four",)}


def _template_of(caption: str) -> str:
    if caption.startswith("You hear"):
        return "hear"
    if " background " in caption:
        return "background"
    if " in sync with " in caption:
        return "sync"
    if re.match(r"(One|Two|Three|Four) ", caption):
        return "count-first"
    return "while"


def test_captions_name_the_event_count(ds40):
    recs = _read_jsonl(ds40)
    templates = set()
    for r in recs:
        cap = r["caption"]
        assert cap.strip() and cap == cap.strip()
        n = len(r["event_times"])
        assert 1 <= n <= 4
        words = set(re.findall(r"[a-z]+", cap.lower()))
        assert words & set(_COUNT_WORDS[n]), cap
        for other, ws in _COUNT_WORDS.items():
            if other != n:
                assert not words & set(ws), cap  # no contradicting count
        shape = demo._CLASS_DEFS[CLASSES.index(r["label"])].shape
        assert shape in words, cap
        templates.add(_template_of(cap))
    assert len(templates) >= 4  # several sentence forms are in use


def test_sound_onset_matches_first_visual_event(tmp_path):
    spec = DemoSpec()
    seen = set()
    for i in range(len(CLASSES)):  # the first block holds every class once
        clip = make_clip(spec, i, clean=True)
        seen.add(clip.label)
        path = tmp_path / f"{i}.mp4"
        write_mp4(path, clip.frames, spec.fps, clip.audio, spec.sample_rate)
        onset = _audio_onset(_decode_audio(path), spec.sample_rate)
        frame = _visual_event_frame(_decode_frames(path))
        assert frame == clip.event_frames[0], clip.label
        assert abs(onset - frame / spec.fps) <= 1.5 / spec.fps, (clip.label, onset, frame)
        # The recorded onset is where the sound starts (a click train may need a click or two
        # to pass half its peak envelope, hence 50 ms rather than a few).
        assert abs(onset - clip.event_times[0]) < 0.05, clip.label
    assert seen == set(CLASSES)


def test_noisy_clip_keeps_events_and_metadata_of_clean_one():
    spec = DemoSpec()
    clean, noisy = make_clip(spec, 9, clean=True), make_clip(spec, 9)
    assert (clean.caption, clean.label, clean.event_times) == (noisy.caption, noisy.label, noisy.event_times)
    assert clean.frames.shape == noisy.frames.shape and clean.audio.shape == noisy.audio.shape
    assert not np.array_equal(clean.audio, noisy.audio)
    # Event onsets stay audible above the background noise.
    onset = _audio_onset(noisy.audio, spec.sample_rate)
    assert abs(onset - noisy.event_times[0]) <= 1.5 / spec.fps


def test_deterministic(ds20, tmp_path):
    again = generate_demo(tmp_path / "demo", DemoSpec(n_clips=20))
    assert again.read_bytes() == ds20.read_bytes()
    for r in _read_jsonl(ds20)[:6]:
        a, b = _decode_audio(ds20.parent / r["path"]), _decode_audio(again.parent / r["path"])
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= 1e-6
        assert np.array_equal(_decode_frames(ds20.parent / r["path"]), _decode_frames(again.parent / r["path"]))
    other = make_clip(DemoSpec(seed=1), 0)
    assert not np.array_equal(other.audio, make_clip(DemoSpec(), 0).audio)


def test_more_clips_append_without_reshuffling(ds20, ds40, tmp_path):
    small, big = _read_jsonl(ds20), _read_jsonl(ds40)
    assert big[:20] == small
    for r in small[:: 5]:
        a, b = _decode_audio(ds20.parent / r["path"]), _decode_audio(ds40.parent / r["path"])
        assert np.max(np.abs(a - b)) <= 1e-6
    # Growing an existing dataset in place gives the same result as building it fresh.
    grown = tmp_path / "grown"
    shutil.copytree(ds20.parent, grown)
    out = generate_demo(grown, DemoSpec(n_clips=40))
    assert out.read_bytes() == ds40.read_bytes()
    assert (grown / "media" / "demo_000039.mp4").read_bytes() == (ds40.parent / "media" / "demo_000039.mp4").read_bytes()
    assert json.loads((grown / demo.SPEC_FILE).read_text())["spec"]["n_clips"] == 40


def test_idempotent_second_call_does_not_rewrite(tmp_path):
    spec = DemoSpec(n_clips=3)
    out = generate_demo(tmp_path / "d", spec)
    media = out.parent / "media" / "demo_000000.mp4"
    stamps = [p.stat().st_mtime_ns for p in (out, media, out.parent / demo.SPEC_FILE)]
    assert generate_demo(tmp_path / "d", spec) == out
    assert [p.stat().st_mtime_ns for p in (out, media, out.parent / demo.SPEC_FILE)] == stamps
    # A different spec rebuilds the folder.
    generate_demo(tmp_path / "d", DemoSpec(n_clips=3, seed=5))
    assert json.loads((out.parent / demo.SPEC_FILE).read_text())["spec"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left


def test_crash_leaves_no_dataset_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def flaky(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return write_mp4(path, *args, **kwargs)

    monkeypatch.setattr(demo, "write_mp4", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_demo(tmp_path / "d", DemoSpec(n_clips=5))
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder
    monkeypatch.undo()
    out = generate_demo(tmp_path / "d", DemoSpec(n_clips=5))
    assert len(_read_jsonl(out)) == 5


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        generate_demo(tmp_path / "d", DemoSpec(n_clips=2))
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_bad_spec_fails_fast(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate_demo(tmp_path / "d", DemoSpec(size=63))
    with pytest.raises(ValueError, match="fraction"):
        generate_demo(tmp_path / "d", DemoSpec(val_fraction=0.5, test_fraction=0.5))
    assert not (tmp_path / "d").exists()
