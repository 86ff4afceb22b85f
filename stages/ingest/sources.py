"""Where clips come from: a media folder (local or s3://), AudioCaps / VGGSound CSVs, a JSONL, or the demo.

Each reader returns ``SourceClip`` records plus ``Rejected`` rows (with a one-line reason) for
entries that cannot become clips: undecodable lines, missing media, links out of a confined root.

Media are found by content, not only by extension: a file with an unknown or missing extension
whose first bytes say media (``decode.sniff_media``) is listed. Symlinks are followed; with
``confine_to_root`` a link (or a JSONL path) whose target leaves the source root is refused.
A name that is not a safe store name (``café.wav``, ``with space.wav``, 200 characters) keeps its
clip under a derived id (``stages.core.ids.safe_id``: slug + short hash); the original is the
clip's ``name``. CSV / JSONL rows may give offsets into an uncut file (``start`` / ``end``).
A row without a split gets ``default_split``, or, when that is "" (the default), a deterministic
split by its group (stages.ingest.manifest.assign_splits).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec

from stages.core.errors import XmodalError
from stages.core.ids import printable_name, safe_id
from stages.ingest.decode import MEDIA_EXTENSIONS, sniff_media

SOURCE_KINDS = ("demo", "folder", "audiocaps", "vggsound", "jsonl")
# Files beside media that are never media: not worth opening to sniff.
NOT_MEDIA_EXTENSIONS = {".txt", ".csv", ".tsv", ".json", ".jsonl", ".md", ".py", ".yaml", ".yml", ".xml", ".html",
                        ".lab", ".srt", ".vtt", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".zip", ".gz", ".tar"}
# AudioCaps and VGGSound clips are 10 s segments of a YouTube video.
YOUTUBE_SEGMENT_SECONDS = 10.0


class SourceError(XmodalError, RuntimeError):
    """The source as configured cannot be read at all (a whole-run problem, not a bad clip)."""


@dataclass(frozen=True)
class SourceClip:
    id: str
    uri: str
    caption: str = ""
    label: str = ""
    split: str = ""  # "" = the source names none
    # When unchanged, the previous content hash is reused (see local_stat_token / _stat_token); "" = always hash.
    stat: str = ""
    captions: tuple[str, ...] = ()  # every caption, when the source gives more than one
    group: str = ""  # split group (a YouTube id); "" = the media's content hash
    start: float = 0.0
    end: float = 0.0  # 0 = to the end of the file
    name: str = ""  # the original name, when the id was derived from it


@dataclass(frozen=True)
class Rejected:
    id: str
    source: str
    reason: str


@dataclass
class SourceListing:
    clips: list[SourceClip] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class SourceConfig:
    """One dataset source. ``path`` is a folder (folder), a CSV (audiocaps/vggsound) or a JSONL."""

    kind: str = "demo"
    path: str = ""
    media_dir: str = ""  # for CSV sources: where the media files live (default: next to the CSV)
    default_split: str = ""  # "" = assign train/val/test by group (80/10/10); else every unsplit clip's split
    storage_options: dict[str, Any] = field(default_factory=dict)
    demo_clips: int = 300  # demo only: generated into ``path`` on first use
    demo_seed: int = 0
    confine_to_root: bool = False  # refuse links and JSONL paths whose target leaves the source root


def _fs(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"cannot open source {url!r}: {exc}") from exc


def _stat_token(info: dict) -> str:
    """An object store's size + ETag (content-derived on S3), else its modification time."""
    marker = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{info.get('size', '')}:{marker}"


def local_stat_token(st: os.stat_result) -> str:
    """Size, mtime and ctime in ns and inode of a local file: any write moves mtime and ctime
    (ctime cannot be set back by ``touch`` or ``utime``), a replacement (rsync, ``mv``) gives a
    new inode. A chmod or a new hard link moves ctime too: such a file is hashed again (safe)."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def _is_remote(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass
class MediaScan:
    """A folder's media (relative path -> (uri, stat token)), what was skipped and why, what was refused."""

    media: dict[str, tuple[str, str]] = field(default_factory=dict)
    files: int = 0
    skipped: Counter = field(default_factory=Counter)
    refused: list[Rejected] = field(default_factory=list)

    def why_empty(self) -> str:
        if not self.files:
            return "it holds no files"
        kinds = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda t: (-t[1], t[0]))[:6])
        return f"of its {self.files} files none is media ({kinds})"


def _is_media(name: str, head) -> str:
    """"" when the file is media, else why it is skipped. ``head()`` reads its first bytes."""
    ext = os.path.splitext(name)[1].lower()
    if ext in MEDIA_EXTENSIONS:
        return ""
    if ext in NOT_MEDIA_EXTENSIONS:
        return f"{ext or 'no extension'} (not media)"
    try:
        return "" if sniff_media(head()) else f"{ext or 'no extension'} (not media by content)"
    except OSError:
        return "unreadable"


def scan_media(url: str, storage_options: dict | None = None, confine: bool = False) -> MediaScan:
    """Every media file under a folder, symlinks followed (one listing call on object stores)."""
    fs, root = _fs(url, storage_options or {})
    if not fs.exists(root):
        raise SourceError(f"source folder {url!r} does not exist")
    if not fs.isdir(root):
        raise SourceError(f"source {url!r} is not a folder")
    scan = MediaScan()
    if _is_remote(fs):
        for path, info in fs.find(root, detail=True).items():
            if info.get("type", "file") != "file":
                continue
            scan.files += 1
            why = _is_media(path, lambda: fs.cat_file(path, 0, 256))
            if why:
                scan.skipped[why] += 1
            else:
                scan.media[posixpath.relpath(path, root)] = (fs.unstrip_protocol(path), _stat_token(info))
        return scan
    real_root = os.path.realpath(root)
    seen_dirs = set()
    # fsspec lists a symlink as type "other": walk the tree ourselves, following links once each.
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:  # a link back up the tree
            dirs[:] = []
            continue
        seen_dirs.add(real)
        if confine and not _inside(real, real_root):
            scan.refused.append(Rejected("", posixpath.relpath(folder, root),
                                         "symlinked folder leaves the source root (confine_to_root)"))
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(folder, name)
            relative = posixpath.relpath(path, root)
            scan.files += 1
            target = os.path.realpath(path)
            if not os.path.isfile(target):
                scan.skipped["broken symlink"] += 1
                continue
            if confine and not _inside(target, real_root):
                scan.refused.append(Rejected("", relative, "symlink target leaves the source root (confine_to_root)"))
                continue

            def head(target=target):
                with open(target, "rb") as handle:
                    return handle.read(256)

            why = _is_media(name, head)
            if why:
                scan.skipped[why] += 1
                continue
            scan.media[relative] = (path, local_stat_token(os.stat(target)))
    return scan


def list_media(url: str, storage_options: dict | None = None) -> dict[str, tuple[str, str]]:
    """Media files under a folder: relative path -> (full uri, stat token)."""
    return scan_media(url, storage_options).media


def read_source(config: SourceConfig) -> SourceListing:
    if config.kind == "folder":
        return _read_folder(config)
    if config.kind == "audiocaps":
        return _read_audiocaps(config)
    if config.kind == "vggsound":
        return _read_vggsound(config)
    if config.kind == "jsonl":
        return _read_jsonl(config)
    if config.kind == "demo":
        from stages.ingest.demo import DemoSpec, generate_demo

        if not config.path:
            raise SourceError("the demo source needs a folder to generate into (path)")
        jsonl = generate_demo(config.path, DemoSpec(n_clips=config.demo_clips, seed=config.demo_seed))
        return _read_jsonl(SourceConfig(kind="jsonl", path=str(jsonl), default_split=config.default_split or "train"))
    raise SourceError(f"unknown source kind {config.kind!r}: choose one of {', '.join(SOURCE_KINDS)}")


def _named(raw: str) -> tuple[str, str]:
    """(clip id, original name when the id had to be derived from it)."""
    clip_id = safe_id(raw)
    return clip_id, ("" if clip_id == raw else printable_name(raw))


def _read_folder(config: SourceConfig) -> SourceListing:
    """Every media file under the folder; id = relative path without extension, '/' -> '__'.

    A ``<name>.txt`` beside a clip is its caption; the first folder level is its label when the
    folder is organised by class. A folder without media is a SourceError that says what it holds.
    """
    fs, root = _fs(config.path, config.storage_options)
    scan = scan_media(config.path, config.storage_options, config.confine_to_root)
    if not scan.media:
        raise SourceError(f"source folder {config.path!r} holds no media: {scan.why_empty()}")
    listing = SourceListing(rejected=list(scan.refused))
    for relative, (uri, stat) in sorted(scan.media.items()):
        stem = os.path.splitext(relative)[0]
        clip_id, name = _named(stem.replace("/", "__"))
        caption = ""
        caption_path = posixpath.join(root, stem + ".txt")
        if fs.exists(caption_path):
            try:
                caption = fs.cat_file(caption_path).decode("utf-8").strip()
            except UnicodeDecodeError:
                listing.rejected.append(Rejected(clip_id, printable_name(relative), "caption file is not valid UTF-8"))
                continue
        label = relative.split("/")[0] if "/" in relative else ""
        listing.clips.append(SourceClip(clip_id, uri, caption, label, config.default_split, stat,
                                        name=name and printable_name(relative)))
    return listing


def _decoded_lines(config: SourceConfig, listing: SourceListing) -> list[tuple[int, str]]:
    """The file's lines that are valid UTF-8; bad lines are rejected with their line number.

    Lines are split as CSV would: a quoted field may hold a newline.
    """
    fs, path = _fs(config.path, config.storage_options)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise SourceError(f"source file {config.path!r} does not exist") from None
    except IsADirectoryError:
        raise SourceError(f"source {config.path!r} is a folder: give the {config.kind} file itself") from None
    lines = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            found = _ID_IN_JSON.search(line)  # a JSONL row's id, else a CSV row's first cell
            guess = (found.group(1) if found else line.split(b",")[0]).decode("ascii", "replace").strip()[:40]
            listing.rejected.append(Rejected(guess, f"line {number}", "line is not valid UTF-8 (broken caption?)"))
            continue
        if text.strip():
            lines.append((number, text))
    if not lines and not listing.rejected:
        raise SourceError(f"source file {config.path!r} holds no rows")
    return lines


def _csv_rows(lines: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """CSV records with the line each starts on; a quoted cell may span lines (its newline kept)."""
    rows, pending, first = [], "", 0
    for number, text in lines:
        pending, first = (pending + "\n" + text, first) if pending else (text, number)
        if pending.count('"') % 2 == 0:  # quotes balanced: the record is complete
            rows.extend((first, row) for row in csv.reader(io.StringIO(pending)))
            pending = ""
    if pending:
        rows.extend((first, row) for row in csv.reader(io.StringIO(pending + '"')))
    return rows


_ID_IN_JSON = re.compile(rb'"id"\s*:\s*"?([^",}]*)')


def _media_root(config: SourceConfig) -> str:
    return config.media_dir or posixpath.dirname(config.path.rstrip("/")) or "."


def _split_from_name(config: SourceConfig) -> str:
    stem = os.path.splitext(posixpath.basename(config.path))[0].lower()
    return stem if stem in ("train", "val", "test") else config.default_split


def _media_by_stem(config: SourceConfig) -> dict[str, tuple[str, str]]:
    return {os.path.splitext(rel)[0]: value for rel, value in list_media(_media_root(config), config.storage_options).items()}


def _add(listing: SourceListing, where: str, raw_id: str, media: tuple[str, str] | None, **fields) -> None:
    clip_id, name = _named(raw_id)
    if media is None:
        listing.rejected.append(Rejected(clip_id, where, "media file not found"))
        return
    listing.clips.append(SourceClip(clip_id, media[0], stat=media[1], name=name, **fields))


def _seconds(text: str, what: str) -> float:
    value = float(text)  # ValueError: not a number
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} {text!r} is not a finite, non-negative number")
    return value


def _youtube_media(media: dict, clip_id: str, youtube_id: str, start_text: str, start: float):
    """(media, span): a cut segment (``<id>``, ``<youtube_id>_<start>``) plays from 0; the uncut
    video (``<youtube_id>``) from ``start`` for one segment."""
    for stem in (clip_id, f"{youtube_id}_{start_text}", f"{youtube_id}_{int(start)}"):
        if stem in media:
            return media[stem], (0.0, 0.0)
    if youtube_id in media:
        return media[youtube_id], (start, start + YOUTUBE_SEGMENT_SECONDS)
    return None, (0.0, 0.0)


def _read_audiocaps(config: SourceConfig) -> SourceListing:
    """AudioCaps CSV: audiocap_id, youtube_id, start_time, caption (header row).

    Media are looked up as ``<audiocap_id>.*``, ``<youtube_id>_<start_time>.*`` or the uncut
    ``<youtube_id>.*`` (then decoded from start_time for 10 s). Rows of one (youtube_id, start_time)
    are one clip with every caption (val/test give five); its id is the first row's audiocap_id.
    """
    listing = SourceListing()
    lines = _decoded_lines(config, listing)
    media = _media_by_stem(config)
    split = _split_from_name(config)
    records = _csv_rows(lines)
    header = [cell.strip() for cell in records[0][1]] if records else []
    missing = {"audiocap_id", "youtube_id", "start_time", "caption"} - set(header)
    if missing:
        raise SourceError(f"AudioCaps CSV {config.path!r} lacks columns: {', '.join(sorted(missing))}")
    segments: dict[tuple[str, str], dict] = {}
    for number, cells in records[1:]:
        row = dict(zip(header, (cell.strip() for cell in cells)))
        clip_id, youtube_id, start_text = row.get("audiocap_id", ""), row.get("youtube_id", ""), row.get("start_time", "")
        caption, where = row.get("caption", ""), f"line {number}"
        if not caption:
            listing.rejected.append(Rejected(clip_id, where, "empty caption"))
            continue
        try:
            start = _seconds(start_text or "0", "start_time")
        except ValueError:
            listing.rejected.append(Rejected(clip_id, where, f"start_time {start_text!r} is not a number"))
            continue
        segment = segments.get((youtube_id, start_text))
        if segment is not None:
            segment["captions"].append(caption)
            continue
        found, span = _youtube_media(media, clip_id, youtube_id, start_text, start)
        segments[(youtube_id, start_text)] = {"where": where, "id": clip_id, "found": found, "span": span,
                                              "captions": [caption], "split": row.get("split") or split,
                                              "group": f"youtube:{youtube_id}" if youtube_id else ""}
    for segment in segments.values():
        captions = tuple(segment["captions"])
        _add(listing, segment["where"], segment["id"], segment["found"], caption=captions[0],
             captions=captions if len(captions) > 1 else (), split=segment["split"],
             group=segment["group"], start=segment["span"][0], end=segment["span"][1])
    return listing


def _read_vggsound(config: SourceConfig) -> SourceListing:
    """VGGSound CSV without header: youtube_id, start_seconds, label, split.

    id = ``<youtube_id>_<start:06d>``; media ``<id>.*``, ``<youtube_id>_<start>.*`` or the uncut
    ``<youtube_id>.*`` (decoded from start_seconds for 10 s). Segments of one video share a split group.
    """
    listing = SourceListing()
    lines = _decoded_lines(config, listing)
    media = _media_by_stem(config)
    for number, row in _csv_rows(lines):
        where = f"line {number}"
        if len(row) < 4:
            listing.rejected.append(Rejected(row[0] if row else "", where, f"expected 4 columns, found {len(row)}"))
            continue
        youtube_id, start, label, split = (cell.strip() for cell in row[:4])
        try:
            start_int = int(_seconds(start, "start_seconds"))
        except ValueError:
            listing.rejected.append(Rejected(youtube_id, where, f"start_seconds {start!r} is not a number"))
            continue
        clip_id = f"{youtube_id}_{start_int:06d}"
        found, span = _youtube_media(media, clip_id, youtube_id, str(start_int), float(start_int))
        _add(listing, where, clip_id, found, label=label, caption=label, split=split or config.default_split,
             group=f"youtube:{youtube_id}", start=span[0], end=span[1])
    return listing


def _read_jsonl(config: SourceConfig) -> SourceListing:
    """JSONL rows {id, path, caption and/or label, captions, split, start, end, group}.

    ``path`` is relative to the JSONL's folder, or absolute; ``id`` defaults to the file's stem.
    """
    listing = SourceListing()
    lines = _decoded_lines(config, listing)  # first: a missing JSONL is named as such, not its folder
    root = _media_root(config)
    fs, root_path = _fs(root, config.storage_options)
    scan = scan_media(root, config.storage_options)  # one listing, not a HEAD per row
    by_path = {posixpath.normpath(posixpath.join(root_path, rel)): value for rel, value in scan.media.items()}
    real_root = os.path.realpath(root_path) if not _is_remote(fs) else root_path
    for number, text in lines:
        where = f"line {number}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            listing.rejected.append(Rejected("", where, f"not valid JSON: {exc.msg}"))
            continue
        if not isinstance(row, dict):
            listing.rejected.append(Rejected("", where, "not a JSON object"))
            continue
        path = row.get("path")
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            listing.rejected.append(Rejected(str(row.get("id", ""))[:40], where, f"media path {path!r} is empty or not a string"))
            continue
        raw_id = row.get("id", os.path.splitext(posixpath.basename(path))[0])
        if not (isinstance(raw_id, str) and raw_id.strip()) and type(raw_id) is not int:  # null must not become "None"
            listing.rejected.append(Rejected("", where, f"id must be a non-empty string, got {json.dumps(raw_id)[:40]}"))
            continue
        clip_id = str(raw_id)
        caption, label = row.get("caption", ""), row.get("label", "")
        captions = row.get("captions", [])
        if not isinstance(caption, str) or not isinstance(label, str) or not (
            isinstance(captions, list) and all(isinstance(c, str) for c in captions)
        ):
            listing.rejected.append(Rejected(safe_id(clip_id), where, "caption and label must be strings, captions a list of strings"))
            continue
        captions = tuple(c.strip() for c in ([caption] if caption and not captions else captions) if c.strip())
        try:
            start = _seconds(str(row.get("start", 0) or 0), "start")
            end = _seconds(str(row.get("end", 0) or 0), "end")
            if end and end <= start:
                raise ValueError(f"end {end:g} is not after start {start:g}")
        except ValueError as exc:
            listing.rejected.append(Rejected(safe_id(clip_id), where, f"bad start/end: {exc}"))
            continue
        full = posixpath.normpath(path if path.startswith("/") or "://" in path else posixpath.join(root_path, path))
        found = by_path.get(full) or _stat_of(fs, full)  # outside the listed folder: one stat for this row
        if found is not None and config.confine_to_root and not _is_remote(fs):
            if not _inside(os.path.realpath(full), real_root):
                listing.rejected.append(Rejected(safe_id(clip_id), where,
                                                 f"media path {path!r} leaves the source root (confine_to_root)"))
                continue
        _add(listing, where, clip_id, found, caption=captions[0] if captions else "", label=label.strip(),
             captions=captions if len(captions) > 1 else (), split=str(row.get("split") or config.default_split),
             group=str(row.get("group") or ""), start=start, end=end)
    return listing


def _stat_of(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str] | None:
    """(uri, stat token) of a media file outside the listed folder, or None when there is none."""
    if not _is_remote(fs):
        if not os.path.isfile(path):  # follows symlinks
            return None
        return path, local_stat_token(os.stat(path))
    try:
        info = fs.info(path)
    except (FileNotFoundError, OSError, ValueError):
        return None
    return (fs.unstrip_protocol(path), _stat_token(info)) if info.get("type") == "file" else None
