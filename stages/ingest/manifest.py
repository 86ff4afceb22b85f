"""The clip manifest: every clip's id, media URI, content hash, caption/label, split and shard.

Shard assignment is an append-only ledger kept in the store: a clip keeps its shard, new clips
(sorted by id) fill new shards after the last one, so adding clips never reshuffles full
shards. One exception keeps small appends from fragmenting the store: when clips are added and
the last shard holds fewer than half of ``shard_size`` clips, its clips join the new ones in the
new shards (fresh shard ids; the short shard leaves the new manifest version, while its committed
features stay in the store for readers of older versions: nothing committed is rewritten). So
an append recomputes fewer than ``shard_size / 2`` clips it already had, and every shard but the
last is at least half full. A source that did not change keeps every shard as it was.
A shard's store name is ``<shard_id>-<fingerprint>`` where the fingerprint
hashes its clip ids and content hashes (and a clip's span and extra captions when it has them):
a changed or removed file gives that one shard a new name (recomputed beside the old one), and
every other shard keeps its cached features.

Content hashes are reused from the previous version when a clip's ``stat`` token is unchanged
(stages.ingest.sources: size, mtime in ns, inode and ctime locally; size and ETag or
LastModified on object stores). What that trusts: a file whose bytes changed has a new size,
mtime, inode or ctime (local) or a new ETag (S3). Rewriting a file in place and setting its
mtime back also moves its ctime, which nothing but the kernel sets. Not caught: a same-size
rewrite in place within the file system's timestamp granularity of the listing that hashed it
(a few ms on ext4/xfs). New or changed files are hashed in threads (blake2b and file reads
release the GIL).

Splits: a clip keeps the split its source names; one without gets a split from the hash of its
group (``SPLIT_RATIOS``, 80/10/10): stable when clips are added, and grouped, so segments of one
video (``group`` = its YouTube id) and byte-identical media (same content hash) never straddle
train and test.

``ClipManifest.metadata`` (in the JSONL header, not part of the digest; derived from the clips):

    splits            {split: clip count}
    split_policy      {"given": clips whose source named a split, "assigned": the others,
                       "ratios": SPLIT_RATIOS, "grouped_by": how a group is chosen}
    duplicate_media   [[clip ids sharing one content hash], ...] (sorted)
    shared_captions   {caption: clip count} for captions used by more than one clip (the 50 most used)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

from stages.ingest.decode import ClipError, iter_chunks
from stages.core.ids import check_name
from stages.ingest.sources import Rejected, SourceListing
from stages.core.store import FeatureStore, StoreError, canonical_json, feature_key, modified_time

MANIFEST_FOLDER = "clip_manifest"
SPLIT_RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}
SHARED_CAPTIONS_SHOWN = 50


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def content_hash_of(uri: str, storage_options: dict | None = None) -> str:
    """``content_hash`` of a file, read in chunks (an hour-long file is not held in memory)."""
    digest = hashlib.blake2b(digest_size=16)
    for block in iter_chunks(uri, storage_options):
        digest.update(block)
    return digest.hexdigest()


def assigned_split(group: str) -> str:
    """The split of a group: a fixed point of [0, 1) from its hash, cut at SPLIT_RATIOS."""
    point = int.from_bytes(hashlib.blake2b(group.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") / 2**64
    edge = 0.0
    for split, share in SPLIT_RATIOS.items():
        edge += share
        if point < edge:
            return split
    return split


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
    captions: tuple[str, ...] = ()  # every caption when the source gives several; caption is the first
    group: str = ""  # split group: "youtube:<id>", else "hash:<content hash>"
    start: float = 0.0  # span in the media file, seconds
    end: float = 0.0  # 0 = to the end of the file
    name: str = ""  # the original file name or id, when the id was derived from it

    def to_row(self) -> dict:
        """The JSONL row: fields added after the first manifests are left out at their default,
        so manifests of sources that do not use them keep their digest."""
        row = {name: getattr(self, name) for name in _FIELD_NAMES}  # asdict's deep copy: 10x slower
        for name in _OPTIONAL_FIELDS:
            if row[name] == _DEFAULTS[name]:
                del row[name]
        if "captions" in row:
            row["captions"] = list(row["captions"])
        return row

    @classmethod
    def from_row(cls, row: dict) -> "Clip":
        if "captions" in row:
            row = {**row, "captions": tuple(row["captions"])}
        return cls(**row)

    @property
    def span(self) -> tuple[float, float]:
        return (self.start, self.end)


_FIELD_NAMES = tuple(f.name for f in fields(Clip))
_OPTIONAL_FIELDS = ("captions", "group", "start", "end", "name")
_DEFAULTS = {"captions": (), "group": "", "start": 0.0, "end": 0.0, "name": ""}


def _json_line(row: dict) -> str:
    line = json.dumps(row, sort_keys=True, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a name with undecodable bytes (surrogates): escape this line only
        line = json.dumps(row, sort_keys=True)
    return line


@dataclass
class ManifestDelta:
    """What changed since the previous manifest."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # kept clips of a short last shard, moved into the new shards


@dataclass
class ClipManifest:
    dataset: str
    shard_size: int
    clips: list[Clip]
    quarantined: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # see the module docstring

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
        # The metadata is derived from the clips: it is not part of what names the manifest.
        return hashlib.sha256(self._jsonl(with_metadata=False).encode()).hexdigest()[:16]

    def to_jsonl(self) -> str:
        return self._jsonl(with_metadata=True)

    def _jsonl(self, with_metadata: bool) -> str:
        header = {"dataset": self.dataset, "shard_size": self.shard_size, "quarantined": self.quarantined}
        if with_metadata and self.metadata:
            header["metadata"] = self.metadata
        lines = [_json_line({"manifest": header})]
        lines += [_json_line(c.to_row()) for c in self.clips]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_jsonl(cls, text: str) -> "ClipManifest":
        # Split on "\n" only: str.splitlines() also splits on U+2028, U+2029 and U+0085, which
        # json.dumps(ensure_ascii=False) leaves unescaped inside captions.
        lines = text.split("\n")
        header = json.loads(lines[0])["manifest"]
        clips = [Clip.from_row(json.loads(line)) for line in lines[1:] if line.strip()]
        return cls(header["dataset"], header["shard_size"], clips, header.get("quarantined", []),
                   header.get("metadata", {}))


def shard_fingerprint(clips: list[Clip]) -> str:
    # Captions and labels are inputs too (text features): editing one re-keys its shard.
    # A span or extra captions change what is computed: they count, only when a clip has them.
    members = sorted([c.id, c.content_hash, c.caption, c.label] + _extra(c) for c in clips)
    return hashlib.blake2b(canonical_json(members).encode(), digest_size=5).hexdigest()


def _extra(clip: Clip) -> list:
    extra = {k: v for k, v in (("start", clip.start), ("end", clip.end), ("captions", clip.captions))
             if v != _DEFAULTS[k]}
    if "captions" in extra:
        extra["captions"] = list(extra["captions"])
    return [extra] if extra else []


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
    """Hash new or changed media, keep old shard assignments, append new clips into new shards
    (with the clips of a short last shard: see the module docstring)."""
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
            return content_hash_of(source_clip.uri, storage_options)
        except ClipError as exc:
            return exc

    with ThreadPoolExecutor(max(1, hash_threads)) as pool:
        hashes = list(pool.map(hash_of, unique))

    hashed = []
    for source_clip, digest in zip(unique, hashes):
        if isinstance(digest, ClipError):
            quarantined.append(asdict(Rejected(source_clip.id, source_clip.uri, str(digest))))
        else:
            hashed.append((source_clip, digest))
    groups = split_groups([(c.group, digest) for c, digest in hashed])

    delta = ManifestDelta()
    kept: list[Clip] = []
    new: list[tuple] = []
    for (source_clip, digest), group in zip(hashed, groups):
        fields = dict(uri=source_clip.uri, content_hash=digest, caption=source_clip.caption,
                      label=source_clip.label, split=source_clip.split or assigned_split(group),
                      stat=source_clip.stat, captions=tuple(source_clip.captions), group=group,
                      start=float(source_clip.start), end=float(source_clip.end), name=source_clip.name)
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
    added = {clip_id for clip_id, _ in new}
    if new:
        new += [(c.id, _fields_of(c)) for c in short_last_shard(kept, shard_size)]
    moved = {clip_id for clip_id, _ in new} - added
    clips = [c for c in kept if c.id not in moved]
    for position, (clip_id, fields) in enumerate(sorted(new)):
        clips.append(Clip(id=clip_id, shard_id=shard_id_of(next_index + position // shard_size), **fields))
        (delta.moved if clip_id in moved else delta.added).append(clip_id)
    clips.sort(key=lambda c: (c.shard_id, c.id))
    given = sum(1 for c, _ in hashed if c.split)
    return ClipManifest(dataset, shard_size, clips, quarantined, manifest_metadata(clips, given)), delta


def short_last_shard(clips: list[Clip], shard_size: int) -> list[Clip]:
    """The clips of the last shard when it holds fewer than half of ``shard_size``, else none."""
    if not clips:
        return []
    last = max(clips, key=lambda c: int(c.shard_id[1:])).shard_id
    members = [c for c in clips if c.shard_id == last]
    return members if 2 * len(members) < shard_size else []


def _fields_of(clip: Clip) -> dict:
    fields = asdict(clip)
    del fields["id"], fields["shard_id"]
    fields["captions"] = tuple(fields["captions"])
    return fields


def split_groups(members: list[tuple[str, str]]) -> list[str]:
    """Each clip's split group, from (source group or "", content hash) per clip.

    Clips are joined when they share a source group (segments of one video) or a content hash
    (byte-identical media); a joined set's group is its smallest name ("youtube:<id>" or
    "hash:<content hash>"), so the split depends on the set, not on the order clips came in.
    """
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group, digest in members:
        a, b = root(f"hash:{digest}"), root(group or f"hash:{digest}")
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(f"hash:{digest}") for _, digest in members]


def manifest_metadata(clips: list[Clip], given: int) -> dict:
    """Split sizes and policy, duplicated media and shared captions (see the module docstring)."""
    splits: dict[str, int] = {}
    by_hash: dict[str, list[str]] = {}
    captions: dict[str, int] = {}
    for clip in clips:
        splits[clip.split] = splits.get(clip.split, 0) + 1
        by_hash.setdefault(clip.content_hash, []).append(clip.id)
        if clip.caption:
            captions[clip.caption] = captions.get(clip.caption, 0) + 1
    shared = sorted(((n, c) for c, n in captions.items() if n > 1), key=lambda t: (-t[0], t[1]))
    return {
        "splits": dict(sorted(splits.items())),
        "split_policy": {"given": given, "assigned": len(clips) - given, "ratios": SPLIT_RATIOS,
                         "grouped_by": "youtube id of a segment, else content hash; joined by shared media"},
        "duplicate_media": sorted(sorted(ids) for ids in by_hash.values() if len(ids) > 1),
        "shared_captions": {c: n for n, c in shared[:SHARED_CAPTIONS_SHOWN]},
    }


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
    """The latest (or a given) manifest of a dataset, or None when none was saved yet.

    A version is checked against its name (the digest of its content). A garbled ``latest.json``
    does not block the dataset: the newest version that reads and checks is taken instead (the
    next save_manifest writes the pointer again). A garbled version is a StoreError naming it.
    """
    folder = store.path(check_name(dataset, "dataset"), MANIFEST_FOLDER)
    if digest is not None:
        return _read_version(store, folder, digest)
    latest = posixpath.join(folder, "latest.json")
    if not store.exists(latest):
        return None
    try:
        pointer = store.read_json(latest)["manifest"]
        check_name(pointer, "manifest digest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return _newest_readable_version(store, folder, latest)
    return _read_version(store, folder, pointer)


# Versions read (and checked against their digest) in this process: one run reads its manifest in
# every step, and parsing + checking a large one costs. Keyed by the file's URL, size and mtime or
# ETag, so a file changed since (damaged, rewritten) is read and checked again. A few: they can be large.
_VERSIONS: "OrderedDict[tuple, ClipManifest]" = OrderedDict()
_VERSIONS_KEPT = 2
_VERSIONS_LOCK = threading.Lock()


def _read_version(store: FeatureStore, folder: str, digest: str) -> ClipManifest:
    path = posixpath.join(folder, f"{check_name(digest, 'manifest digest')}.jsonl")
    try:
        info = store.fs.info(path)
    except FileNotFoundError:
        raise StoreError(f"clip manifest {store.url(path)} is missing") from None
    token = (store.url(path), info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""))
    with _VERSIONS_LOCK:
        known = _VERSIONS.get(token)
    if known is None:
        known = _read_and_check(store, path, digest)
        with _VERSIONS_LOCK:
            _VERSIONS[token] = known
            while len(_VERSIONS) > _VERSIONS_KEPT:
                _VERSIONS.popitem(last=False)
    # A copy: callers may build on it (the clips themselves are frozen).
    return ClipManifest(known.dataset, known.shard_size, list(known.clips), [dict(q) for q in known.quarantined],
                        dict(known.metadata))


def _read_and_check(store: FeatureStore, path: str, digest: str) -> ClipManifest:
    try:
        with store.fs.open(path, "rb") as handle:
            manifest = ClipManifest.from_jsonl(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise StoreError(f"clip manifest {store.url(path)} is missing") from None
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise StoreError(f"clip manifest {store.url(path)} is damaged ({type(exc).__name__}): "
                         "rebuild it with a refresh after removing it") from None
    if manifest.digest() != digest:
        raise StoreError(f"clip manifest {store.url(path)} does not match its digest: "
                         "rebuild it with a refresh after removing it")
    return manifest


def _newest_readable_version(store: FeatureStore, folder: str, latest: str) -> ClipManifest:
    versions = [(modified_time(info), path) for path, info in store.fs.find(folder, detail=True).items()
                if path.endswith(".jsonl")]
    for _, path in sorted(versions, reverse=True):
        try:
            return _read_version(store, folder, posixpath.basename(path)[: -len(".jsonl")])
        except StoreError:
            continue
    raise StoreError(f"{store.url(latest)} is damaged and no clip manifest version in {store.url(folder)} "
                     "reads: remove the folder and refresh to rebuild the ledger")


def split_digest(clips, split: str = "train") -> str:
    """Hash of what one split's clips are (id, media hash, span): statistics fitted on the split
    (mel statistics, latent statistics) are keyed by it, so it changes when a clip of the split is
    added, removed or changed, and only then."""
    members = sorted(f"{c.id}|{c.content_hash}|{c.start}|{c.end}" for c in clips if c.split == split)
    return feature_key("split", {"split": split}, "", members)
