"""stages.ingest.sources: folder, AudioCaps CSV, VGGSound CSV and JSONL sources, with their bad rows."""

import json
import shutil

import pytest

from stages.ingest.manifest import build_manifest
from stages.core.ids import safe_id
from stages.ingest.sources import SourceConfig, SourceError, read_source
from tests.fixtures.media import JSONL_BAD_LINES, JSONL_GOOD_LINES


def rejected_by_line(listing):
    return {r.source: (r.id, r.reason) for r in listing.rejected}


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) < 300


# ---------------------------------------------------------------- folder


@pytest.fixture
def clip_folder(bad_media, tmp_path):
    root = tmp_path / "clips"
    files = {
        "dog/bark_1.wav": "good_wav",
        "dog/bark_2.flac": "good_flac",
        "cat/meow.mp4": "good_mp4",
        "deep/nested/clip.m4a": "audio_only_m4a",
        "top.wav": "good_wav",
        "bad name.wav": "good_wav",
        "x.y.wav": "good_wav",
    }
    for relative, name in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bad_media[name], root / relative)
    (root / "dog" / "bark_1.txt").write_text("  a dog barks twice\n", encoding="utf-8")
    (root / "cat" / "meow.txt").write_bytes("un chat miaule \u00e0 c\u00f4t\u00e9".encode("latin-1"))
    (root / "notes.txt").write_text("not media")
    (root / "deep" / "README.md").write_text("not media")
    return root


def test_folder_ids_captions_labels(clip_folder):
    listing = read_source(SourceConfig(kind="folder", path=str(clip_folder), default_split="val"))
    clips = [(c.id, c.uri, c.caption, c.label, c.split, c.name) for c in listing.clips]
    # Names that are not safe store names keep their clip under a derived id; safe ids stay as they are.
    bad_name, dotted = safe_id("bad name"), safe_id("x.y")
    assert bad_name.startswith("bad_name-") and dotted.startswith("x_y-")
    assert clips == [
        (bad_name, str(clip_folder / "bad name.wav"), "", "", "val", "bad name.wav"),
        ("deep__nested__clip", str(clip_folder / "deep/nested/clip.m4a"), "", "deep", "val", ""),
        ("dog__bark_1", str(clip_folder / "dog/bark_1.wav"), "a dog barks twice", "dog", "val", ""),
        ("dog__bark_2", str(clip_folder / "dog/bark_2.flac"), "", "dog", "val", ""),
        ("top", str(clip_folder / "top.wav"), "", "", "val", ""),
        (dotted, str(clip_folder / "x.y.wav"), "", "", "val", "x.y.wav"),
    ]
    for clip in listing.clips:
        size = (clip_folder / clip.uri).stat().st_size
        assert clip.stat.startswith(f"{size}:") and len(clip.stat) > len(f"{size}:")

    rejected = {r.source: (r.id, r.reason) for r in listing.rejected}
    assert rejected == {"cat/meow.mp4": ("cat__meow", "caption file is not valid UTF-8")}


def test_folder_that_is_a_file_or_missing(clip_folder):
    with pytest.raises(SourceError, match="is not a folder"):
        read_source(SourceConfig(kind="folder", path=str(clip_folder / "top.wav")))


# ---------------------------------------------------------------- AudioCaps


def test_audiocaps_csv(bad_manifests):
    csv_path, media = bad_manifests["audiocaps_csv"], bad_manifests["audiocaps_media"]
    listing = read_source(SourceConfig(kind="audiocaps", path=str(csv_path), media_dir=str(media)))
    assert [(c.id, c.uri, c.caption, c.split, c.start, c.end, c.group) for c in listing.clips] == [
        ("101", str(media / "101.wav"), "media found by audiocap id", "train", 0.0, 0.0, "youtube:yt0001"),
        ("102", str(media / "yt0002_40.wav"), "media found by youtube id and start", "train", 0.0, 0.0, "youtube:yt0002"),
        # The uncut video: decoded from start_time for one 10 s segment.
        ("103", str(media / "yt0003.wav"), "media found by youtube id alone", "train", 50.0, 60.0, "youtube:yt0003"),
        ("106", str(media / "yt0006.mp4"), "a caption, with a comma", "train", 80.0, 90.0, "youtube:yt0006"),
    ]
    # Every row of one (youtube_id, start_time) is one clip with all its captions, the first row's id.
    assert listing.clips[0].captions == ("media found by audiocap id", "unsafe id", "dotted id", "duplicate of 101")
    assert all(c.captions == () for c in listing.clips[1:])
    rejected = rejected_by_line(listing)
    assert rejected["line 5"] == ("104", "empty caption")
    assert rejected["line 6"] == ("105", "media file not found")
    assert rejected["line 10"][0] == "107" and "UTF-8" in rejected["line 10"][1]
    assert len(rejected) == 3


@pytest.mark.parametrize(
    "file_name,default_split,split",
    [("train.csv", "val", "train"), ("val.csv", "train", "val"), ("TEST.csv", "train", "test"),
     ("audiocaps.csv", "val", "val")],
)
def test_audiocaps_split_from_file_name_and_media_beside_the_csv(bad_media, tmp_path, file_name, default_split, split):
    shutil.copy(bad_media["good_wav"], tmp_path / "7.wav")
    (tmp_path / file_name).write_text("audiocap_id,youtube_id,start_time,caption\n7,ytX,0,a tone\n")
    listing = read_source(SourceConfig(kind="audiocaps", path=str(tmp_path / file_name), default_split=default_split))
    assert [(c.id, c.uri, c.split) for c in listing.clips] == [("7", str(tmp_path / "7.wav"), split)]


def test_audiocaps_without_its_columns_fails_the_run(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("id,caption\n1,a tone\n")
    with pytest.raises(SourceError) as err:
        read_source(SourceConfig(kind="audiocaps", path=str(csv_path)))
    assert str(err.value) == f"AudioCaps CSV {str(csv_path)!r} lacks columns: audiocap_id, start_time, youtube_id"


# ---------------------------------------------------------------- VGGSound


def test_vggsound_csv(bad_manifests):
    csv_path = bad_manifests["vggsound_csv"]
    folder = csv_path.parent
    listing = read_source(SourceConfig(kind="vggsound", path=str(csv_path)))
    assert [(c.id, c.uri, c.label, c.caption, c.split, c.group) for c in listing.clips] == [
        ("-0BIyqJj9ZU_000030", str(folder / "-0BIyqJj9ZU_000030.mp4"), "dog barking", "dog barking", "train",
         "youtube:-0BIyqJj9ZU"),
        ("abcdefghijk_000005", str(folder / "abcdefghijk_5.wav"), "cat meowing", "cat meowing", "test",
         "youtube:abcdefghijk"),
        ("-0BIyqJj9ZU_000040", str(folder / "-0BIyqJj9ZU_000040.flac"), "speech, crowd", "speech, crowd", "train",
         "youtube:-0BIyqJj9ZU"),
        ("-0BIyqJj9ZU_000030", str(folder / "-0BIyqJj9ZU_000030.mp4"), "dog barking", "dog barking", "train",
         "youtube:-0BIyqJj9ZU"),
    ]
    rejected = rejected_by_line(listing)
    assert rejected["line 3"] == ("noMedia0000_000012", "media file not found")
    assert rejected["line 4"] == ("badstart000", "start_seconds 'soon' is not a number")
    assert rejected["line 5"] == ("infstart000", "start_seconds 'inf' is not a number")
    assert rejected["line 6"] == ("short", "expected 4 columns, found 2")
    assert rejected["line 7"] == (safe_id("../evil_000000"), "media file not found")  # a safe id, no media
    assert rejected["line 9"][0] == "latin1label" and "UTF-8" in rejected["line 9"][1]
    assert len(rejected) == 6


# ---------------------------------------------------------------- JSONL


JSONL_REASONS = {
    "non_utf8_caption": ("latin1_caption", "not valid UTF-8"),
    "duplicate_id": None,  # a valid row: build_manifest quarantines it
    "id_dotdot": None,  # unsafe ids keep their row under a derived safe id (below)
    "id_slash": None,
    "id_dot": None,
    "id_empty": ("", "id must be a non-empty string"),
    "id_null": ("", "id must be a non-empty string, got null"),
    "id_newline": None,
    "path_dotdot": ("passwd", "media file not found"),  # '..' and absolute paths are normal paths
    "path_absolute": ("absolute", "media file not found"),
    "invalid_json": ("", "not valid JSON"),
    "missing_media": ("ghost", "media file not found"),
}


def test_jsonl_rows_and_rejections(bad_manifests):
    jsonl = bad_manifests["jsonl"]
    media = jsonl.parent / "media"
    listing = read_source(SourceConfig(kind="jsonl", path=str(jsonl)))
    a, b = str(media / "a.wav"), str(media / "b.wav")
    assert [(c.id, c.uri, c.caption, c.label, c.split, c.name) for c in listing.clips] == [
        ("good_a", a, "a tone", "tone", "val", ""),
        ("dup", a, "first row with id dup", "", "", ""),  # "": no split given, the manifest assigns one
        ("utf8_caption", b, "caf\u00e9 cr\u00e8me", "", "", ""),  # "./media/b.wav"
        ("dup", b, "second row with id dup", "", "", ""),
        (safe_id("../evil"), a, "escape", "", "", "../evil"),
        (safe_id("a/b"), a, "slash", "", "", "a/b"),
        (safe_id("x.y"), a, "dot", "", "", "x.y"),
        (safe_id("abc\n"), a, "id ends with a newline", "", "", "abc\\n"),
    ]
    assert set(JSONL_REASONS) == set(JSONL_BAD_LINES)
    rejected = rejected_by_line(listing)
    expected_lines = set()
    for position, problem in enumerate(JSONL_BAD_LINES, start=len(JSONL_GOOD_LINES) + 1):
        if JSONL_REASONS[problem] is None:
            continue
        expected_lines.add(f"line {position}")
        clip_id, reason = rejected[f"line {position}"]
        assert clip_id == JSONL_REASONS[problem][0], problem
        assert JSONL_REASONS[problem][1] in reason, problem
        assert_one_line(reason)
    assert set(rejected) == expected_lines


def test_jsonl_absolute_and_parent_paths_are_normal_and_confinement_refuses_them(bad_media, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(bad_media["good_wav"], elsewhere / "x.wav")
    root = tmp_path / "set"
    (root / "media").mkdir(parents=True)
    shutil.copy(bad_media["good_wav"], root / "media" / "y.wav")
    rows = [{"id": "abs", "path": str(elsewhere / "x.wav")}, {"id": "up", "path": "../elsewhere/x.wav"},
            {"id": "in", "path": "media/y.wav"}]
    jsonl = root / "clips.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    listing = read_source(SourceConfig(kind="jsonl", path=str(jsonl)))
    assert [(c.id, c.uri) for c in listing.clips] == [
        ("abs", str(elsewhere / "x.wav")), ("up", str(elsewhere / "x.wav")), ("in", str(root / "media" / "y.wav"))]
    assert listing.rejected == []
    confined = read_source(SourceConfig(kind="jsonl", path=str(jsonl), confine_to_root=True))
    assert [c.id for c in confined.clips] == ["in"]
    assert {r.id: r.reason for r in confined.rejected} == {
        "abs": f"media path {str(elsewhere / 'x.wav')!r} leaves the source root (confine_to_root)",
        "up": "media path '../elsewhere/x.wav' leaves the source root (confine_to_root)",
    }


def test_jsonl_paths_are_relative_to_the_jsonl_not_the_cwd(bad_manifests, tmp_path, monkeypatch):
    decoy = tmp_path / "media"
    decoy.mkdir()
    shutil.copy(bad_manifests["jsonl"].parent / "media" / "a.wav", decoy / "a.wav")
    monkeypatch.chdir(tmp_path)
    listing = read_source(SourceConfig(kind="jsonl", path=str(bad_manifests["jsonl"])))
    assert {c.uri for c in listing.clips} == {str(bad_manifests["jsonl"].parent / "media" / n) for n in ("a.wav", "b.wav")}
    # A JSONL given by a relative path resolves against its own folder, to absolute URIs.
    nested = tmp_path / "sub" / "clips.jsonl"
    nested.parent.mkdir()
    (nested.parent / "media").mkdir()
    shutil.copy(decoy / "a.wav", nested.parent / "media" / "a.wav")
    nested.write_text('{"id": "n1", "path": "media/a.wav"}\n')
    listing = read_source(SourceConfig(kind="jsonl", path="sub/clips.jsonl"))
    assert [(c.id, c.uri) for c in listing.clips] == [("n1", str(nested.parent / "media" / "a.wav"))]


# ---------------------------------------------------------------- duplicates, through the manifest


@pytest.mark.parametrize(
    "kind,duplicate,kept_caption",
    [("jsonl", "dup", "first row with id dup"), ("vggsound", "-0BIyqJj9ZU_000030", "dog barking")],
)
def test_duplicate_ids_keep_the_first_row(bad_manifests, kind, duplicate, kept_caption):
    config = {
        "jsonl": SourceConfig(kind="jsonl", path=str(bad_manifests["jsonl"])),
        "audiocaps": SourceConfig(kind="audiocaps", path=str(bad_manifests["audiocaps_csv"]),
                                  media_dir=str(bad_manifests["audiocaps_media"])),
        "vggsound": SourceConfig(kind="vggsound", path=str(bad_manifests["vggsound_csv"])),
    }[kind]
    listing = read_source(config)
    manifest, delta = build_manifest("dups", listing, None, shard_size=10)
    ids = [c.id for c in manifest.clips]
    assert ids.count(duplicate) == 1 and len(ids) == len(set(ids)) == len(listing.clips) - 1
    assert manifest.index()[duplicate].caption == kept_caption
    duplicates = [q for q in manifest.quarantined if "duplicate" in q["reason"]]
    assert [q["id"] for q in duplicates] == [duplicate]
    assert duplicates[0]["reason"].startswith("duplicate clip id (first seen at ")
    # Every row the source rejected is in the manifest's quarantine too, with its reason.
    assert len(manifest.quarantined) == len(listing.rejected) + 1
    assert sorted(delta.added) == sorted(ids)


# ---------------------------------------------------------------- whole-run problems


@pytest.mark.parametrize(
    "kind,relative",
    [("folder", "no_such_dir"), ("jsonl", "no_such_dir/clips.jsonl"), ("jsonl", "clips.jsonl"),
     ("audiocaps", "no_such_dir/train.csv"), ("vggsound", "vggsound.csv")],
)
def test_a_missing_source_fails_with_one_line_naming_it(tmp_path, kind, relative):
    path = str(tmp_path / relative)
    with pytest.raises(SourceError) as err:
        read_source(SourceConfig(kind=kind, path=path))
    message = str(err.value)
    assert repr(path) in message and "does not exist" in message
    assert_one_line(message)


def test_a_folder_given_as_a_jsonl_fails_with_one_line(tmp_path):
    with pytest.raises(SourceError) as err:
        read_source(SourceConfig(kind="jsonl", path=str(tmp_path)))
    assert str(err.value) == f"source {str(tmp_path)!r} is a folder: give the jsonl file itself"


def test_unknown_kind_and_demo_without_a_folder(tmp_path):
    with pytest.raises(SourceError, match="unknown source kind 'csv': choose one of demo, folder, audiocaps"):
        read_source(SourceConfig(kind="csv", path=str(tmp_path)))
    with pytest.raises(SourceError, match="needs a folder"):
        read_source(SourceConfig(kind="demo", path=""))
