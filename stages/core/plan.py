"""A dry run: how many shards and clips each per-shard feature of a run would compute, and an estimate
of the time and bytes that costs, before anything runs.

Nothing is decoded, hashed or computed: the plan reads the dataset's clip manifest, the source's
listing when one is given (names, sizes and mtimes, as ``clip_manifest`` sees them: new clips go
into new shards, a clip whose file, caption or span changed and a removed clip change their shard),
and the store's listings of committed shards. Rates come from the shard manifests already in the
store (``compute_seconds``, rows + quarantined, tar + zarr bytes, as ``write_shard`` records them):
of the key being planned, else of another key of that feature. With none measured, a default from
BENCHMARKS.md is used and flagged as a guess.

Which key a feature would compute is the one its dataset's last run wrote (the newest in the
catalog); a feature the dataset never computed has no key yet, so all its shards are to compute.
A run with a changed config computes a new key: plan that run as one without a key.

    from stages.core.plan import plan_run
    plan = plan_run(store, "demo", ["mel_spectrograms", "audio_images"], listing=listing)
    print(plan.table())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from stages.core.store import FeatureStore, StoreError

# Shard manifests read per feature to measure its rates (the newest keys first).
RATE_SAMPLE_SHARDS = 16

# (seconds per clip on one worker, stored bytes per clip: tar + zarr) when nothing was measured.
# Guesses from BENCHMARKS.md (2 cores, 1 torch thread, 4 s demo clips): mels 192 clips/s (issue:
# Foundation), towers: audio 9.4, frames 7.6 at 128 px, text 124 clips/s (Pretrained towers); video
# frame decode 248 clips/s (ARCHITECTURE.md). Bytes: array sizes of the default settings, twice
# (every row is in the tar and in the zarr). The rest are rough orders of magnitude.
DEFAULT_RATES: dict[str, tuple[float, float]] = {
    "mel_spectrograms": (1 / 192, 2 * 80 * 345 * 2),
    "audio_images": (1 / 500, 2 * 80 * 352 * 3),  # the default shape, mel80
    "mel_latents": (1 / 2000, 2 * 80 * 345 * 4),
    "audio_tower": (1 / 9.4, 2 * (512 * 4 + 4 * 512 * 2 + 69 * 4)),
    "frame_tower": (1 / 7.6, 2 * (1280 * 4 + 4 * 1280 * 2)),
    "text_tower": (1 / 124, 2 * 384 * 4),
    "clap_embeddings": (1 / 500, 2 * 2 * 256 * 4),
    "cavp_embeddings": (1 / 500, 2 * 2 * 5 * 256 * 4),
    "video_frames": (1 / 248, 2 * 16 * 64 * 64 * 3),
    "vae_latents": (1 / 50, 2 * 2 * 17 * 4 * 16 * 16 * 2),  # posterior mean and std
}
FALLBACK_RATE = (0.1, 100_000.0)


@dataclass(frozen=True)
class Rate:
    seconds_per_clip: float
    bytes_per_clip: float
    source: str  # "measured on 16 shards (1024 clips) of key ..." or "guess: ..."
    measured: bool


@dataclass
class SourceChanges:
    """What the source's listing holds beyond the clip manifest (as clip_manifest would see it)."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # caption, label, span or media URI differ: their shard changes
    # Same clip, but the file's size/mtime differ (or the source gives none): clip_manifest hashes it
    # again, and its shard changes only if the bytes did (which a plan cannot know without reading them).
    restat: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    new_shards: list[int] = field(default_factory=list)  # clips per new shard
    dirty_shards: set[str] = field(default_factory=set)  # current shards a changed / removed clip is in


@dataclass
class FeaturePlan:
    feature: str
    key: str | None  # None: the dataset has no key of this feature yet
    shards_total: int
    shards_cached: int
    shards_to_compute: int
    clips_to_compute: int
    rate: Rate

    @property
    def seconds(self) -> float:
        return self.clips_to_compute * self.rate.seconds_per_clip

    @property
    def bytes(self) -> float:
        return self.clips_to_compute * self.rate.bytes_per_clip


@dataclass
class RunPlan:
    dataset: str
    manifest: str | None  # the clip-manifest version planned from (None: the dataset has none yet)
    clips: int  # clips the run would cover (manifest + new - removed)
    features: list[FeaturePlan]
    changes: SourceChanges | None  # None: the source was not listed
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.features)

    @property
    def bytes(self) -> float:
        return sum(f.bytes for f in self.features)

    def table(self) -> str:
        headers = ["feature", "key", "shards", "cached", "to compute", "clips to compute", "est. s", "est. MB", "rate from"]
        rows = [[f.feature, f.key or "(new)", f.shards_total, f.shards_cached, f.shards_to_compute, f.clips_to_compute,
                 f"{f.seconds:.0f}", f"{f.bytes / 1e6:.1f}", f.rate.source] for f in self.features]
        rows.append(["total", "", "", "", sum(f.shards_to_compute for f in self.features),
                     sum(f.clips_to_compute for f in self.features), f"{self.seconds:.0f}", f"{self.bytes / 1e6:.1f}", ""])
        cells = [[str(c) for c in row] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        numeric = set(range(2, 8))

        def line(row):
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        if self.changes is None:
            source = "source not listed"
        else:
            source = (f"source: +{len(self.changes.new)} new clips in {len(self.changes.new_shards)} new shards, "
                      f"{len(self.changes.changed)} changed, {len(self.changes.restat)} to re-hash, "
                      f"{len(self.changes.removed)} removed")
        head = (f"dataset {self.dataset!r}: clip manifest {self.manifest or '(none yet)'}, {self.clips} clips; {source}. "
                "Seconds are one worker's (divide by the workers that run in parallel).")
        notes = list(self.notes)
        if self.changes is not None and self.changes.restat:
            notes.append(f"{len(self.changes.restat)} clips' files differ in size/mtime: clip_manifest hashes them again "
                         "(reading every byte), and their shards are computed again only if the bytes changed (not counted)")
        return "\n".join([head, line(headers), *(line(r) for r in cells), *notes])


def source_changes(manifest, listing, shard_size: int | None = None) -> SourceChanges:
    """How a source's listing differs from the clip manifest, without reading any media.

    Mirrors build_manifest: a listed clip whose caption, label, span or URI differ is changed (its
    shard is computed again); one whose file's size/mtime differ is only re-hashed (``restat``: its
    shard changes if the bytes did); new clips fill new shards of ``shard_size`` (the manifest's by
    default); a removed clip changes the shard it was in.
    """
    old = {c.id: c for c in manifest.clips} if manifest is not None else {}
    shard_of = {c.id: name for name, clips in manifest.by_shard().items() for c in clips} if manifest is not None else {}
    changes, seen = SourceChanges(), set()
    for clip in listing.clips:
        if clip.id in seen:  # a duplicate id is quarantined by clip_manifest
            continue
        seen.add(clip.id)
        before = old.get(clip.id)
        if before is None:
            changes.new.append(clip.id)
        elif (before.uri != clip.uri or before.caption != clip.caption or before.label != clip.label
              or tuple(before.captions) != tuple(clip.captions) or (before.start, before.end) != (float(clip.start), float(clip.end))):
            changes.changed.append(clip.id)
        elif not clip.stat or before.stat != clip.stat:
            changes.restat.append(clip.id)
    changes.removed = sorted(set(old) - seen)
    changes.dirty_shards = {shard_of[c] for c in changes.changed + changes.removed}
    size = shard_size or (manifest.shard_size if manifest is not None else 64)
    new = len(changes.new)
    changes.new_shards = [min(size, new - start) for start in range(0, new, size)]
    return changes


def measured_rate(store: FeatureStore, dataset: str, feature: str, key: str | None) -> Rate:
    """Seconds and bytes per clip from committed shard manifests of ``feature``: of ``key`` first,
    then of the dataset's other keys, then of other datasets; else the documented default."""
    candidates = [(dataset, key)] if key else []
    candidates += [(dataset, k) for k in store.feature_keys(dataset, feature) if k != key]
    candidates += [(d, k) for d, f, k in store.stored_keys(None, feature) if d != dataset]
    seconds = clips = rows = stored = shards = 0.0
    used: list[str] = []
    for where, candidate in candidates:
        for shard in sorted(store.committed_shards(where, feature, candidate), reverse=True):
            if shards >= RATE_SAMPLE_SHARDS:
                break
            try:
                manifest = store.shard_manifest(where, feature, candidate, shard)
            except StoreError:  # a damaged manifest says nothing about rates
                continue
            n = manifest.get("rows", 0) + len(manifest.get("quarantined", []))
            if "compute_seconds" not in manifest or not n:
                continue
            seconds += float(manifest["compute_seconds"])
            clips += n
            rows += manifest.get("rows", 0)
            files = manifest.get("files", {})
            stored += sum(int(files.get(kind, {}).get("bytes", 0)) for kind in ("tar", "zarr"))
            shards += 1
            if candidate not in used:
                used.append(candidate)
        if shards >= RATE_SAMPLE_SHARDS:
            break
    if clips:
        where = f"key {used[0]}" + (f" (+{len(used) - 1} other keys)" if len(used) > 1 else "")
        return Rate(seconds / clips, stored / max(rows, 1), f"measured: {int(shards)} shards, {int(clips)} clips of {where}", True)
    per_clip, size = DEFAULT_RATES.get(feature, FALLBACK_RATE)
    return Rate(per_clip, size, "guess: BENCHMARKS.md default (nothing measured yet)", False)


def current_key(store: FeatureStore, dataset: str, feature: str) -> str | None:
    """The key the dataset's last run of ``feature`` wrote (newest in the catalog), None if none."""
    keys = store.feature_keys(dataset, feature)
    return keys[0] if keys else None


def plan_run(store: FeatureStore, dataset: str, features: Sequence[str], listing=None,
             keys: dict[str, str | None] | None = None, shard_size: int | None = None) -> RunPlan:
    """The dry run of a run computing ``features`` of ``dataset`` (see the module docstring).

    ``listing`` (a SourceListing) adds the clips the source holds beyond the manifest; ``keys``
    names the key to plan per feature (default: ``current_key``).
    """
    from stages.ingest.manifest import load_manifest

    manifest = load_manifest(store, dataset)
    by_shard = manifest.by_shard() if manifest is not None else {}
    changes = source_changes(manifest, listing, shard_size) if listing is not None else None
    dirty = changes.dirty_shards if changes else set()
    removed = set(changes.removed) if changes else set()
    notes = []
    if manifest is None and listing is None:
        notes.append(f"dataset {dataset!r} has no clip manifest yet and its source was not listed: nothing to count")
    plans = []
    for feature in _unique(features):
        key = keys[feature] if keys and feature in keys else current_key(store, dataset, feature)
        committed = set(store.committed_shards(dataset, feature, key)) if key else set()
        cached = [s for s in by_shard if s in committed and s not in dirty]
        stale = [s for s in by_shard if s not in cached]
        clips = sum(sum(1 for c in by_shard[s] if c.id not in removed) for s in stale)
        new_shards = changes.new_shards if changes else []
        stale_count = sum(1 for s in stale if any(c.id not in removed for c in by_shard[s]))
        plans.append(FeaturePlan(
            feature, key, len(cached) + stale_count + len(new_shards), len(cached), stale_count + len(new_shards),
            clips + sum(new_shards), measured_rate(store, dataset, feature, key)))
    total_clips = (len(manifest.clips) if manifest else 0) + (len(changes.new) - len(changes.removed) if changes else 0)
    if any(not p.rate.measured for p in plans):
        notes.append("rates marked 'guess' are BENCHMARKS.md defaults (stages.core.plan.DEFAULT_RATES): no shard of that "
                     "feature has been computed in this store yet")
    return RunPlan(dataset, manifest.digest() if manifest else None, total_clips, plans, changes, notes)


def _unique(names: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen
