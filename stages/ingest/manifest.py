"""The clip manifest: every clip's id, media URI, content hash, caption/label, split and shard.

Shard assignment is an append-only ledger kept in the store: a clip keeps its shard for life,
new clips (sorted by id) fill new shards after the last one, so adding clips never reshuffles
existing shards. A shard's store name is ``<shard_id>-<fingerprint>`` where the fingerprint
hashes its clip ids and content hashes: a changed or removed file gives that one shard a new
name (recomputed beside the old one), and every other shard keeps its cached features.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from stages.ingest.decode import ClipError, read_bytes
from stages.core.ids import check_name
from stages.ingest.sources import Rejected, SourceListing
from stages.core.store import FeatureStore, canonical_json

MANIFEST_FOLDER = "clip_manifest"


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Clip:
    id: str
    uri: str
    content_hash: str
    shard_id: str
    caption: str = ""
    label: str = ""
    split: str = "train"
    stat: str = ""


@dataclass
class ManifestDelta:
    """What changed since the previous manifest."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass
class ClipManifest:
    dataset: str
    shard_size: int
    clips: list[Clip]
    quarantined: list[dict] = field(default_factory=list)

    def by_shard(self) -> dict[str, list[Clip]]:
        """Shard store name -> its clips (in id order), for every shard that holds a clip."""
        groups: dict[str, list[Clip]] = {}
        for clip in self.clips:
            groups.setdefault(clip.shard_id, []).append(clip)
        return {
            f"{shard_id}-{shard_fingerprint(members)}": sorted(members, key=lambda c: c.id)
            for shard_id, members in sorted(groups.items())
        }

    def index(self) -> dict[str, Clip]:
        """Clip id -> clip (captions, labels and splits for rows read back from the store)."""
        return {c.id: c for c in self.clips}

    def digest(self) -> str:
        return hashlib.sha256(self.to_jsonl().encode()).hexdigest()[:16]

    def to_jsonl(self) -> str:
        header = {"dataset": self.dataset, "shard_size": self.shard_size, "quarantined": self.quarantined}
        lines = [json.dumps({"manifest": header}, sort_keys=True)]
        lines += [json.dumps(asdict(c), sort_keys=True, ensure_ascii=False) for c in self.clips]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_jsonl(cls, text: str) -> "ClipManifest":
        # Split on "\n" only: str.splitlines() also splits on U+2028, U+2029 and U+0085, which
        # json.dumps(ensure_ascii=False) leaves unescaped inside captions.
        lines = text.split("\n")
        header = json.loads(lines[0])["manifest"]
        clips = [Clip(**json.loads(line)) for line in lines[1:] if line.strip()]
        return cls(header["dataset"], header["shard_size"], clips, header.get("quarantined", []))


def shard_fingerprint(clips: list[Clip]) -> str:
    # Captions and labels are inputs too (text features): editing one re-keys its shard.
    members = sorted((c.id, c.content_hash, c.caption, c.label) for c in clips)
    return hashlib.blake2b(canonical_json(members).encode(), digest_size=5).hexdigest()


def shard_id_of(index: int) -> str:
    return f"s{index:06d}"


def build_manifest(
    dataset: str,
    listing: SourceListing,
    previous: ClipManifest | None,
    shard_size: int,
    storage_options: dict | None = None,
    hash_threads: int = 8,
) -> tuple[ClipManifest, ManifestDelta]:
    """Hash new or changed media, keep old shard assignments, append new clips into new shards."""
    check_name(dataset, "dataset")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    quarantined = [asdict(r) for r in listing.rejected]
    unique, seen = [], {}
    for source_clip in listing.clips:
        if source_clip.id in seen:
            quarantined.append(
                asdict(Rejected(source_clip.id, source_clip.uri, f"duplicate clip id (first seen at {seen[source_clip.id]})"))
            )
            continue
        seen[source_clip.id] = source_clip.uri
        unique.append(source_clip)

    old = {c.id: c for c in previous.clips} if previous else {}

    def hash_of(source_clip) -> str | ClipError:
        before = old.get(source_clip.id)
        if before and before.uri == source_clip.uri and source_clip.stat and before.stat == source_clip.stat:
            return before.content_hash  # same size and mtime/etag: no need to read it again
        try:
            return content_hash(read_bytes(source_clip.uri, storage_options))
        except ClipError as exc:
            return exc

    with ThreadPoolExecutor(max(1, hash_threads)) as pool:
        hashes = list(pool.map(hash_of, unique))

    delta = ManifestDelta()
    kept: list[Clip] = []
    new: list[tuple] = []
    for source_clip, digest in zip(unique, hashes):
        if isinstance(digest, ClipError):
            quarantined.append(asdict(Rejected(source_clip.id, source_clip.uri, str(digest))))
            continue
        fields = dict(uri=source_clip.uri, content_hash=digest, caption=source_clip.caption,
                      label=source_clip.label, split=source_clip.split, stat=source_clip.stat)
        before = old.get(source_clip.id)
        if before is not None:
            if before.content_hash != digest:
                delta.changed.append(source_clip.id)
            kept.append(Clip(id=source_clip.id, shard_id=before.shard_id, **fields))
        else:
            new.append((source_clip.id, fields))
    present = {c.id for c in kept} | {clip_id for clip_id, _ in new}
    delta.removed = sorted(set(old) - present)

    next_index = 1 + max((int(c.shard_id[1:]) for c in (previous.clips if previous else [])), default=-1)
    clips = list(kept)
    for position, (clip_id, fields) in enumerate(sorted(new)):
        clips.append(Clip(id=clip_id, shard_id=shard_id_of(next_index + position // shard_size), **fields))
        delta.added.append(clip_id)
    clips.sort(key=lambda c: (c.shard_id, c.id))
    return ClipManifest(dataset, shard_size, clips, quarantined), delta


def save_manifest(store: FeatureStore, manifest: ClipManifest) -> str:
    """Write the manifest under its digest (history is kept), then point ``latest.json`` at it."""
    digest = manifest.digest()
    folder = store.path(check_name(manifest.dataset, "dataset"), MANIFEST_FOLDER)
    store.write_bytes(posixpath.join(folder, f"{digest}.jsonl"), manifest.to_jsonl().encode())
    store.write_json(
        posixpath.join(folder, "latest.json"),
        {
            "manifest": digest,
            "clips": len(manifest.clips),
            "shards": len(manifest.by_shard()),
            "quarantined": len(manifest.quarantined),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return digest


def load_manifest(store: FeatureStore, dataset: str, digest: str | None = None) -> ClipManifest | None:
    """The latest (or a given) manifest of a dataset, or None when none was saved yet."""
    folder = store.path(check_name(dataset, "dataset"), MANIFEST_FOLDER)
    if digest is None:
        latest = posixpath.join(folder, "latest.json")
        if not store.exists(latest):
            return None
        digest = store.read_json(latest)["manifest"]
    with store.fs.open(posixpath.join(folder, f"{check_name(digest, 'manifest digest')}.jsonl"), "rb") as handle:
        return ClipManifest.from_jsonl(handle.read().decode("utf-8"))
