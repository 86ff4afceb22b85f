"""Where clips come from: a media folder (local or s3://), AudioCaps / VGGSound CSVs, a JSONL, or the demo.

Each reader returns ``SourceClip`` records plus ``Rejected`` rows (with a one-line reason) for
entries that cannot become clips: unsafe ids or paths, undecodable captions, missing media.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec

from stages.ingest.decode import MEDIA_EXTENSIONS
from stages.core.errors import XmodalError
from stages.core.ids import UnsafeNameError, check_name, check_relative_path

SOURCE_KINDS = ("demo", "folder", "audiocaps", "vggsound", "jsonl")


class SourceError(XmodalError, RuntimeError):
    """The source as configured cannot be read at all (a whole-run problem, not a bad clip)."""


@dataclass(frozen=True)
class SourceClip:
    id: str
    uri: str
    caption: str = ""
    label: str = ""
    split: str = "train"
    # fsspec size + mtime/etag: when unchanged, the previous content hash is reused.
    stat: str = ""


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
    default_split: str = "train"
    storage_options: dict[str, Any] = field(default_factory=dict)
    demo_clips: int = 300  # demo only: generated into ``path`` on first use
    demo_seed: int = 0


def _fs(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"cannot open source {url!r}: {exc}") from exc


def _stat_token(info: dict) -> str:
    marker = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{info.get('size', '')}:{marker}"


def list_media(url: str, storage_options: dict | None = None) -> dict[str, tuple[str, str]]:
    """Media files under a folder: relative path -> (full uri, stat token). One listing call."""
    fs, root = _fs(url, storage_options or {})
    if not fs.exists(root):
        raise SourceError(f"source folder {url!r} does not exist")
    if not fs.isdir(root):
        raise SourceError(f"source {url!r} is not a folder")
    found = {}
    for path, info in fs.find(root, detail=True).items():
        if os.path.splitext(path)[1].lower() in MEDIA_EXTENSIONS and info.get("type", "file") == "file":
            relative = posixpath.relpath(path, root)
            found[relative] = (fs.unstrip_protocol(path) if _is_remote(fs) else path, _stat_token(info))
    return found


def _is_remote(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


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
        return _read_jsonl(SourceConfig(kind="jsonl", path=str(jsonl)))
    raise SourceError(f"unknown source kind {config.kind!r}: choose one of {', '.join(SOURCE_KINDS)}")


def _read_folder(config: SourceConfig) -> SourceListing:
    """Every media file under the folder; id = relative path without extension, '/' -> '__'.

    A ``<name>.txt`` beside a clip is its caption; the first folder level is its label when the
    folder is organised by class.
    """
    fs, root = _fs(config.path, config.storage_options)
    listing = SourceListing()
    media = list_media(config.path, config.storage_options)
    for relative, (uri, stat) in sorted(media.items()):
        stem = os.path.splitext(relative)[0]
        clip_id = stem.replace("/", "__")
        try:
            check_name(clip_id, "clip id")
        except UnsafeNameError as exc:
            listing.rejected.append(Rejected(clip_id, relative, str(exc)))
            continue
        caption = ""
        caption_path = posixpath.join(root, stem + ".txt")
        if fs.exists(caption_path):
            try:
                caption = fs.cat_file(caption_path).decode("utf-8").strip()
            except UnicodeDecodeError:
                listing.rejected.append(Rejected(clip_id, relative, "caption file is not valid UTF-8"))
                continue
        label = relative.split("/")[0] if "/" in relative else ""
        listing.clips.append(SourceClip(clip_id, uri, caption, label, config.default_split, stat))
    return listing


def _decoded_lines(config: SourceConfig, listing: SourceListing) -> list[tuple[int, str]]:
    """The file's lines that are valid UTF-8; bad lines are rejected with their line number."""
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
    return lines


_ID_IN_JSON = re.compile(rb'"id"\s*:\s*"?([^",}]*)')


def _media_root(config: SourceConfig) -> str:
    return config.media_dir or posixpath.dirname(config.path.rstrip("/")) or "."


def _split_from_name(config: SourceConfig) -> str:
    stem = os.path.splitext(posixpath.basename(config.path))[0].lower()
    return stem if stem in ("train", "val", "test") else config.default_split


def _media_by_stem(config: SourceConfig) -> dict[str, tuple[str, str]]:
    return {os.path.splitext(rel)[0]: value for rel, value in list_media(_media_root(config), config.storage_options).items()}


def _add(listing: SourceListing, where: str, clip_id: str, media: tuple[str, str] | None, **fields: str) -> None:
    try:
        check_name(clip_id, "clip id")
    except UnsafeNameError as exc:
        listing.rejected.append(Rejected(clip_id, where, str(exc)))
        return
    if media is None:
        listing.rejected.append(Rejected(clip_id, where, "media file not found"))
        return
    listing.clips.append(SourceClip(clip_id, media[0], stat=media[1], **fields))


def _read_audiocaps(config: SourceConfig) -> SourceListing:
    """AudioCaps CSV: audiocap_id, youtube_id, start_time, caption (header row).

    Media are looked up as ``<audiocap_id>.*``, ``<youtube_id>_<start_time>.*`` or ``<youtube_id>.*``.
    """
    listing = SourceListing()
    lines = _decoded_lines(config, listing)
    media = _media_by_stem(config)
    split = _split_from_name(config)
    rows = csv.DictReader(io.StringIO("\n".join(text for _, text in lines)))
    missing = {"audiocap_id", "youtube_id", "start_time", "caption"} - set(rows.fieldnames or [])
    if missing:
        raise SourceError(f"AudioCaps CSV {config.path!r} lacks columns: {', '.join(sorted(missing))}")
    for (number, _), row in zip(lines[1:], rows):
        clip_id = (row["audiocap_id"] or "").strip()
        youtube_id, start = (row["youtube_id"] or "").strip(), (row["start_time"] or "").strip()
        caption = (row["caption"] or "").strip()
        where = f"line {number}"
        if not caption:
            listing.rejected.append(Rejected(clip_id, where, "empty caption"))
            continue
        found = media.get(clip_id) or media.get(f"{youtube_id}_{start}") or media.get(youtube_id)
        _add(listing, where, clip_id, found, caption=caption, split=(row.get("split") or split))
    return listing


def _read_vggsound(config: SourceConfig) -> SourceListing:
    """VGGSound CSV without header: youtube_id, start_seconds, label, split.

    id = ``<youtube_id>_<start:06d>``; media ``<id>.*`` or ``<youtube_id>_<start>.*``.
    """
    listing = SourceListing()
    lines = _decoded_lines(config, listing)
    media = _media_by_stem(config)
    for (number, _), row in zip(lines, csv.reader(io.StringIO("\n".join(text for _, text in lines)))):
        where = f"line {number}"
        if len(row) < 4:
            listing.rejected.append(Rejected(row[0] if row else "", where, f"expected 4 columns, found {len(row)}"))
            continue
        youtube_id, start, label, split = (cell.strip() for cell in row[:4])
        try:
            start_int = int(float(start))
        except (ValueError, OverflowError):  # OverflowError: "inf"
            listing.rejected.append(Rejected(youtube_id, where, f"start_seconds {start!r} is not a number"))
            continue
        clip_id = f"{youtube_id}_{start_int:06d}"
        found = media.get(clip_id) or media.get(f"{youtube_id}_{start_int}")
        _add(listing, where, clip_id, found, label=label, caption=label, split=split or config.default_split)
    return listing


def _read_jsonl(config: SourceConfig) -> SourceListing:
    """JSONL rows {id, path, caption and/or label, split}; path relative to the JSONL's folder."""
    listing = SourceListing()
    lines = _decoded_lines(config, listing)  # first: a missing JSONL is named as such, not its folder
    media = list_media(_media_root(config), config.storage_options)  # one listing, not a HEAD per row
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
        raw_id = row.get("id", "")
        if not isinstance(raw_id, str) and type(raw_id) is not int:  # null must not become the clip "None"
            listing.rejected.append(Rejected("", where, f"id must be a string, got {json.dumps(raw_id)[:40]}"))
            continue
        clip_id = str(raw_id)
        caption, label = row.get("caption", ""), row.get("label", "")
        if not isinstance(caption, str) or not isinstance(label, str):
            listing.rejected.append(Rejected(clip_id, where, "caption and label must be strings"))
            continue
        try:
            relative = check_relative_path(row.get("path"), "media path")
        except UnsafeNameError as exc:
            listing.rejected.append(Rejected(clip_id, where, str(exc)))
            continue
        found = media.get(posixpath.normpath(relative))
        _add(listing, where, clip_id, found, caption=caption.strip(), label=label.strip(),
             split=str(row.get("split") or config.default_split))
    return listing
