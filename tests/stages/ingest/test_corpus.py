"""Real datasets as they come (tests/fixtures/corpus.py): every file has its expected outcome through
every source kind, good media are never lost, and the run-level problems fail fast with one line."""

import json
import shutil

import numpy as np
import pytest

from stages.core.ids import safe_id
from stages.ingest.decode import AudioSpec, ClipError, FrameSpec, load_audio, load_frames
from stages.ingest.manifest import ClipManifest, assigned_split, build_manifest
from stages.ingest.sources import SourceConfig, SourceError, read_source
from tests.fixtures.corpus import (INGESTED, KINDS, LINKED_OUTSIDE, expected_ids, expected_outcomes, ingest_outcomes,
                                   source_config)


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_has_its_expected_outcome(corpus, tmp_path, kind):
    outcomes, manifest = ingest_outcomes(kind, corpus, str(tmp_path / "store"))
    ids, expected = expected_ids(kind), expected_outcomes(kind)
    table = {ids[clip_id]: outcome for clip_id, outcome in outcomes.items()}
    assert set(outcomes) == set(ids), "every file has one outcome, under the id derived from its name"
    for stem, want in expected.items():
        got = table[stem]
        assert (got == INGESTED) if want == INGESTED else (want in got), f"{kind}: {stem}: {got}"
        assert "\n" not in got and len(got) < 300 and "0x" not in got, got  # one line, no object addresses
    # Derived ids keep the original name; safe ids stay exactly as they were.
    for clip in manifest.clips:
        raw = ids[clip.id] + ("_000000" if kind == "vggsound" else "")
        assert (clip.name == "") == (clip.id == raw), clip
    # Manifest metadata: split sizes add up; the two files with the same bytes share a split.
    assert sum(manifest.metadata["splits"].values()) == len(manifest.clips)
    index = {ids[c.id]: c for c in manifest.clips}
    assert index["plain"].content_hash == index["link_inside"].content_hash
    assert index["plain"].split == index["link_inside"].split and index["plain"].group == index["link_inside"].group
    assert sorted([index["plain"].id, index["link_inside"].id]) in manifest.metadata["duplicate_media"]


def test_the_jsonl_duplicate_row_is_quarantined_and_the_first_kept(corpus):
    listing = read_source(source_config("jsonl", corpus))
    manifest, _ = build_manifest("corpus", listing, None, shard_size=1000)
    (duplicate,) = [q for q in manifest.quarantined if q["reason"].startswith("duplicate clip id")]
    assert duplicate["id"] == "plain" and manifest.index()["plain"].uri.endswith("plain.wav")


def test_names_people_use_keep_their_clip_under_a_stable_derived_id(corpus):
    listing = read_source(source_config("folder", corpus))
    by_name = {c.name: c.id for c in listing.clips if c.name}
    assert by_name["caf\u00e9.wav"] == safe_id("caf\u00e9") and by_name["caf\u00e9.wav"].startswith("cafe-")
    assert by_name["with space.wav"].startswith("with_space-")
    long_id = next(i for n, i in by_name.items() if n.startswith("a_long_"))
    assert len(long_id) <= 128
    undecodable = next(n for n in by_name if n.startswith("latin1_caf"))
    assert "\ufffd" in undecodable  # the manifest holds it printable; the uri keeps the real bytes
    assert read_source(source_config("folder", corpus)).clips == listing.clips  # stable across runs
    # A manifest with a non-UTF-8 file name round-trips through JSONL.
    manifest, _ = build_manifest("corpus", listing, None, shard_size=1000)
    again = ClipManifest.from_jsonl(manifest.to_jsonl().encode("utf-8").decode("utf-8"))
    assert [c.uri for c in again.clips] == [c.uri for c in manifest.clips]


def test_folder_follows_links_and_confinement_refuses_the_one_leaving_the_root(corpus):
    listing = read_source(source_config("folder", corpus))
    ids = {c.id for c in listing.clips}
    assert {"link_inside", "link_outside"} <= ids and "broken_link" not in ids
    confined = read_source(source_config("folder", corpus, confine_to_root=True))
    assert "link_outside" not in {c.id for c in confined.clips} and "link_inside" in {c.id for c in confined.clips}
    assert [(r.source, r.reason) for r in confined.rejected] == [
        (LINKED_OUTSIDE, "symlink target leaves the source root (confine_to_root)")]


def test_a_folder_without_media_says_what_it_holds(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no media: it holds no files$"):
        read_source(SourceConfig(kind="folder", path=str(tmp_path / "empty")))
    notes = tmp_path / "notes"
    notes.mkdir()
    for name in ("a.txt", "b.txt", "c.csv"):
        (notes / name).write_text("x")
    (notes / "blob").write_bytes(b"\x00" * 64)
    with pytest.raises(SourceError) as err:
        read_source(SourceConfig(kind="folder", path=str(notes)))
    assert str(err.value) == (f"source folder {str(notes)!r} holds no media: of its 4 files none is media "
                              "(2 .txt (not media), 1 .csv (not media), 1 no extension (not media by content))")


def test_an_empty_index_file_fails_fast(tmp_path):
    for kind, name in (("jsonl", "clips.jsonl"), ("vggsound", "vgg.csv"), ("audiocaps", "train.csv")):
        (tmp_path / name).write_text("\n")
        with pytest.raises(SourceError, match="holds no rows"):
            read_source(SourceConfig(kind=kind, path=str(tmp_path / name)))


def test_csv_quoting_with_commas_and_newlines(corpus):
    listing = read_source(source_config("audiocaps", corpus))
    captions = [c.caption for c in listing.clips]
    assert "a tone,\nwith a newline inside the quotes" in captions
    assert safe_id("comma, name") in {c.id for c in listing.clips}


# ---------------------------------------------------------------- splits


def test_unsplit_clips_get_a_grouped_deterministic_split(tmp_path, corpus):
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for video in range(40):  # 40 videos, three segments each, uncut: one file per video
        shutil.copy(corpus["media"] / "plain.wav", media / f"v{video:03d}.wav")
        with open(media / f"v{video:03d}.wav", "ab") as handle:
            handle.write(bytes([video]))  # distinct bytes, so distinct content hashes
        rows += [f"v{video:03d},{start},tone,\n" for start in (0, 10, 20)]
    (tmp_path / "vgg.csv").write_text("".join(rows))
    manifest, _ = build_manifest("v", read_source(SourceConfig(kind="vggsound", path=str(tmp_path / "vgg.csv"),
                                                               media_dir=str(media))), None, shard_size=50)
    by_video: dict[str, set] = {}
    for clip in manifest.clips:
        by_video.setdefault(clip.group, set()).add(clip.split)
        assert clip.split == assigned_split(clip.group) and (clip.start, clip.end) in ((0, 10), (10, 20), (20, 30))
    assert all(len(splits) == 1 for splits in by_video.values())  # segments of one video never straddle splits
    metadata = manifest.metadata
    assert sum(metadata["splits"].values()) == 120 and metadata["splits"]["train"] > metadata["splits"].get("test", 0)
    assert metadata["split_policy"]["assigned"] == 120 and metadata["split_policy"]["ratios"]["train"] == 0.8
    assert metadata["shared_captions"] == {"tone": 120}
    # Stable under additions: one more video leaves every other clip where it was.
    shutil.copy(media / "v000.wav", media / "v999.wav")
    (tmp_path / "vgg.csv").write_text("".join(rows) + "v999,0,tone,\n")
    grown, _ = build_manifest("v", read_source(SourceConfig(kind="vggsound", path=str(tmp_path / "vgg.csv"),
                                                            media_dir=str(media))), manifest, shard_size=50)
    before = {c.id: c.split for c in manifest.clips}
    after = {c.id: c.split for c in grown.clips}
    assert {k: after[k] for k in before if not k.startswith("v000")} == {k: v for k, v in before.items() if not k.startswith("v000")}
    # v999 is a byte copy of v000: the same group, the same split.
    assert grown.index()["v999_000000"].split == after["v000_000000"] and grown.index()["v999_000000"].group == grown.index()["v000_000000"].group


def test_old_manifests_read_back_and_new_fields_are_written_only_when_set(tmp_path, corpus):
    old_line = {"id": "a", "uri": "/x.wav", "content_hash": "h", "shard_id": "s000000", "caption": "", "label": "",
                "split": "train", "stat": ""}
    text = json.dumps({"manifest": {"dataset": "d", "shard_size": 1, "quarantined": []}}) + "\n" + json.dumps(old_line) + "\n"
    manifest = ClipManifest.from_jsonl(text)
    assert manifest.clips[0].captions == () and manifest.clips[0].start == 0.0
    assert json.loads(manifest.to_jsonl().split("\n")[1]) == old_line  # nothing new written at its default


# ---------------------------------------------------------------- decoding spans, crops, fallbacks


@pytest.fixture
def two_tones(tmp_path):
    """12 s at 8 kHz: 0-6 s at 440 Hz, 6-12 s at 880 Hz."""
    import soundfile

    rate = 8000
    t = np.arange(12 * rate) / rate
    x = np.where(t < 6, np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 880 * t)) * 0.5
    path = tmp_path / "two_tones.flac"
    soundfile.write(path, x.astype(np.float32), rate)
    return str(path), rate


def _hz(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def test_spans_and_crops_choose_the_seconds_decoded(two_tones, tmp_path):
    path, rate = two_tones
    spec = AudioSpec(sample_rate=rate, seconds=4.0)
    assert abs(_hz(load_audio(path, spec), rate) - 440) < 5  # crop "start": 0-4 s
    assert abs(_hz(load_audio(path, spec, span=(7.0, 0.0)), rate) - 880) < 5  # from 7 s
    centre = load_audio(path, AudioSpec(sample_rate=rate, seconds=2.0, crop="centre"))  # 5-7 s: both tones
    assert abs(_hz(centre[: rate // 2], rate) - 440) < 10 and abs(_hz(centre[-rate // 2 :], rate) - 880) < 10
    # A span shorter than the clip is padded, not filled from beyond its end.
    short = load_audio(path, spec, span=(1.0, 2.0))
    assert np.abs(short[: rate]).max() > 0.4 and not np.any(short[int(1.05 * rate):])
    with pytest.raises(ClipError, match="after the end of the media"):
        load_audio(path, spec, span=(20.0, 30.0))
    # The same through PyAV (an m4a has no soundfile path).
    from tests.fixtures.corpus import write_media

    m4a = tmp_path / "tone.m4a"
    write_media(m4a, "mp4", None, "aac", seconds=8.0, rate=22050)
    late = load_audio(str(m4a), AudioSpec(seconds=2.0), span=(5.0, 0.0))
    early = load_audio(str(m4a), AudioSpec(seconds=2.0))
    assert late.shape == early.shape and np.abs(late[:22050]).max() > 0.4
    assert np.abs(late[-2000:]).max() > 0.4  # 5-7 s lies inside the 8 s file: nothing padded


def test_source_offsets_reach_the_decoder(two_tones, tmp_path):
    from stages.core.store import FeatureStore
    from stages.features.base import shard_jobs
    from stages.features.mel import MEL_CODE_VERSION, MEL_FEATURE, MelParams, compute_mel_shard

    path, _ = two_tones
    jsonl = tmp_path / "clips.jsonl"
    jsonl.write_text(json.dumps({"id": "early", "path": path}) + "\n"
                     + json.dumps({"id": "late", "path": path, "start": 7.0, "end": 11.0}) + "\n")
    manifest, _ = build_manifest("spans", read_source(SourceConfig(kind="jsonl", path=str(jsonl))), None, shard_size=10)
    assert manifest.index()["late"].span == (7.0, 11.0) and manifest.index()["early"].span == (0.0, 0.0)
    store = FeatureStore(str(tmp_path / "store"))
    params = MelParams()
    (job,), _ = shard_jobs(store, manifest, MEL_FEATURE, params.key(), params.params(), MEL_CODE_VERSION)
    assert job.spans == ((0.0, 0.0), (7.0, 11.0))
    compute_mel_shard(job)
    committed = store.shard_manifest("spans", MEL_FEATURE, params.key(), job.shard)
    assert committed["clips"][1] == {"id": "late", "content_hash": manifest.index()["late"].content_hash,
                                     "start": 7.0, "end": 11.0}
    mels = store.read_arrays("spans", MEL_FEATURE, params.key()).arrays["mel"].astype(np.float32)
    # 880 Hz lies in a higher mel band than 440 Hz.
    assert mels[1].mean(axis=1).argmax() > mels[0].mean(axis=1).argmax()


def test_frames_fall_back_to_pyav_and_a_double_failure_names_both(corpus):
    frames = load_frames(str(corpus["media"] / "vp8_opus.ogv"), FrameSpec(fps=4.0, size=32, seconds=2.0))
    assert frames.shape == (8, 32, 32, 3) and frames[0].mean() < frames[-1].mean()  # the grey ramp
    with pytest.raises(ClipError) as err:
        load_frames(str(corpus["media"] / "text_named.mp4"), FrameSpec())
    assert str(err.value).startswith("cannot decode video (decord: ") and "; PyAV: " in str(err.value)


def test_audio_falls_back_to_pyav_when_soundfile_cannot_read_it(corpus):
    import soundfile

    path = str(corpus["media"] / "vp8_opus.ogv")
    with pytest.raises(Exception):
        soundfile.read(path)
    audio = load_audio(path, AudioSpec(seconds=2.0))
    assert abs(_hz(audio[:22050], 22050) - 440) < 5


# ---------------------------------------------------------------- the driver: finite or quarantined


def test_the_shard_driver_quarantines_rows_with_non_finite_values(tmp_path):
    from stages.core.store import FeatureStore
    from stages.features.base import ShardFeature, ShardJob, ShardOutput

    class Probe(ShardFeature):  # not registered: compute_shard is the driver every feature uses
        name, code_version = "probe", "1"

        def extract(self, job, store):
            values = np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, np.inf]], np.float32)
            return ShardOutput(["a", "b", "c"], {"x": values, "n": np.arange(3)}, [{"id": "d", "reason": "earlier"}],
                               sample_meta=[{"i": 0}, {"i": 1}, {"i": 2}])

    store = FeatureStore(str(tmp_path / "store"))
    job = ShardJob(store_root=store.url_root, storage_options={}, dataset="p", feature="probe", key="k1",
                   shard="s000000-x", clips=(("a", "", "h"), ("b", "", "h"), ("c", "", "h"), ("d", "", "h")),
                   params={}, code_version="1")
    result = Probe().compute_shard(job)
    assert result.rows == 1
    assert result.quarantined == [{"id": "d", "reason": "earlier"}, {"id": "b", "reason": "non-finite values in x"},
                                  {"id": "c", "reason": "non-finite values in x"}]
    table = store.read_arrays("p", "probe", "k1")
    assert table.clip_ids == ["a"] and table.arrays["n"].tolist() == [0]


class CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, path):
        self.handle, self.read_bytes = open(path, "rb"), 0

    def read(self, n=-1):
        data = self.handle.read(n)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset, whence=0):
        return self.handle.seek(offset, whence)

    def tell(self):
        return self.handle.tell()

    def seekable(self):
        return True

    def readable(self):
        return True


@pytest.mark.parametrize("fmt", ["flac", "m4a"])
def test_a_long_file_is_read_only_as_far_as_the_clip_needs(tmp_path, fmt):
    import soundfile

    from stages.ingest.decode import decode_audio
    from tests.fixtures.corpus import write_media

    path = tmp_path / f"long.{fmt}"
    if fmt == "flac":
        rng = np.random.default_rng(0)
        soundfile.write(path, (0.3 * rng.standard_normal(120 * 16000)).astype(np.float32), 16000)  # 2 min of noise
    else:
        write_media(path, "mp4", None, "aac", seconds=120.0, rate=16000)
    size = path.stat().st_size
    handle = CountingFile(path)
    samples, rate = decode_audio(handle, str(path), seconds=4.0)
    assert len(samples) == 4 * rate
    assert handle.read_bytes < 0.2 * size, f"read {handle.read_bytes} of {size} bytes for 4 s of 120 s"
    late = CountingFile(path)
    samples, rate = decode_audio(late, str(path), span=(100.0, 0.0), seconds=4.0)  # seek, not decode 100 s
    assert len(samples) == 4 * rate and late.read_bytes < 0.2 * size
