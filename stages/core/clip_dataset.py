"""A torch dataset of clips over the feature store, for training on cached features without Dagster.

    from stages.store import ClipDataset, FeatureStore

    clips = ClipDataset(FeatureStore(".data/features"), "demo", ["mel_spectrograms", "clap_embeddings"],
                        split="train", seed=0)
    loader = clips.loader(batch_size=32, num_workers=2)
    for epoch in range(10):
        clips.set_epoch(epoch)
        for batch in loader:
            batch["clip_id"], batch["caption"], batch["mel_spectrograms"]["mel"]   # ids, captions, tensors

What it promises:

- One snapshot. Every feature is read at the same clip-manifest version (the current one unless
  ``manifest=`` names another) under one feature key each (``keys=`` when a feature has several);
  features are joined by clip id. A clip missing from any feature (quarantined there) is left out,
  with its reason in ``left_out``. Caption, label and split come from that clip manifest.
- Each clip once per epoch, however many nodes and workers read: the snapshot's shards are split
  by node (``rank`` / ``world_size``, else torch.distributed when it is initialised) and then by
  DataLoader worker. Storage is opened in the process that reads (fork- and spawn-safe, local and
  S3), lazily, and every array is verified against its shard manifest (sha256, shape, dtype).
- A seeded order per epoch (``set_epoch``): the shard order is shuffled, and each worker shuffles
  the samples of ``shuffle_window`` shards together. Same seed and epoch, same order.
- Resumable mid-epoch. ``state_dict()`` says what the training loop has consumed of the epoch;
  ``load_state_dict`` makes the next pass yield exactly the rest (each clip once), whatever
  ``num_workers`` the new loader has. With worker processes the count comes from ``loader()``
  (a DataLoader that counts the batches it hands out); iterating the dataset in the main process
  (directly, or a DataLoader with ``num_workers=0``) counts by itself.
- Random access by clip id: ``clips["clip_id"]`` reads only the shards holding it (a few decoded
  shards are cached per process).

Samples are dicts: ``clip_id``, ``caption``, ``label``, ``split`` (strings; '' when unknown) and one
dict of numpy arrays per feature (``sample["clap_embeddings"]["audio"]``); the DataLoader makes the
arrays tensors. ``FeatureStore.webdataset`` is the lower-level alternative: one feature's tar
shards, as WebDataset tools expect them.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.core.store import FeatureStore, StoreError

STATE_FORMAT = 1


class ClipDataset(IterableDataset):
    """Clips of one dataset with the arrays of one or more features (see the module docstring).

    ``features``: a feature name, a list of them, or ``{feature: [array names]}`` to read only
    some arrays. ``split``: a split name or several (``"train"``, ``("val", "test")``); None reads
    every clip. ``shuffle=False`` reads shards and rows in stored order (still split by node and
    worker). ``cache_shards``: decoded shards kept per process (default: what a shuffle window
    needs).
    """

    def __init__(
        self,
        store: FeatureStore | str,
        dataset: str,
        features: str | Sequence[str] | Mapping[str, Sequence[str] | None],
        *,
        keys: Mapping[str, str] | None = None,
        split: str | Sequence[str] | None = None,
        manifest: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_window: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        verify: bool = True,
        cache_shards: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(str(store), storage_options)
        self.dataset = dataset
        if isinstance(features, str):
            features = [features]
        wanted = dict(features) if isinstance(features, Mapping) else {f: None for f in features}
        if not wanted:
            raise ValueError("ClipDataset needs at least one feature")
        if (rank is None) != (world_size is None):
            raise ValueError("pass rank and world_size together (or neither: torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be at least 1, not {shuffle_window}")
        self.shuffle, self.seed, self.shuffle_window, self.verify = bool(shuffle), int(seed), int(shuffle_window), verify
        if world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self._rank, self._world = rank, world_size
        self._pass_node: tuple[int, int] | None = None  # the main process's node, for spawned workers
        self.epoch = 0
        self._segments: list[dict] = []  # what was consumed of this epoch, pass by pass (see state_dict)
        self._loader_segment: dict | None = None  # set while loader() drives a pass
        self._plan(wanted, dict(keys or {}), split, manifest)
        self.cache_shards = cache_shards or max(2, self.shuffle_window) * len(self.features)
        self._cache: OrderedDict = OrderedDict()
        self._cache_pid = os.getpid()

    # ---- the snapshot and the join, from shard manifests only (no array is read) --------------
    def _plan(self, wanted: dict, keys: dict, split, manifest: str | None) -> None:
        store, dataset = self.store, self.dataset
        unknown = sorted(set(keys) - set(wanted))
        if unknown:
            raise ValueError(f"keys= names {unknown[0]!r}, which is not one of the features read")
        first = next(iter(wanted))
        key, shards, version = store._read_plan(dataset, first, keys.get(first), None, manifest)
        self.manifest = version
        self.features: dict[str, str] = {}  # feature -> key
        self._arrays: dict[str, list[str] | None] = {}
        self._shards: dict[str, list[str]] = {}
        plans = {first: (key, shards)}
        for feature in wanted:
            if feature not in plans:
                other_key, other_shards, _ = store._read_plan(dataset, feature, keys.get(feature), None, version)
                plans[feature] = (other_key, other_shards)
        rows: dict[str, dict[str, tuple[int, int]]] = {}
        reasons: dict[str, str] = {}
        for feature, (key, shards) in plans.items():
            self.features[feature], self._shards[feature] = key, list(shards)
            names = wanted[feature]
            manifests = store.shard_manifests(dataset, feature, key, shards)
            located = rows[feature] = {}
            for index, shard in enumerate(shards):
                committed = manifests[shard]
                if names is not None:
                    missing = [n for n in names if n not in committed["arrays"]]
                    if missing and committed["rows"]:
                        raise StoreError(f"{feature!r} key {key} has no array {missing[0]!r} "
                                         f"(it has {', '.join(committed['arrays'])})")
                for row, clip_id in enumerate(committed["clip_ids"]):
                    located[clip_id] = (index, row)
                for q in committed.get("quarantined", []):
                    reasons.setdefault(q["id"], f"{feature}: {q['reason']}")
            self._arrays[feature] = list(names) if names is not None else None

        clips = _clip_manifest(store, dataset, version)
        info = clips.index() if clips is not None else {}
        splits = _split_names(split)
        if splits is not None:
            if clips is None:
                raise StoreError(f"dataset {dataset!r} has no clip manifest in {store.url_root!r}: "
                                 "its splits are unknown, read it without split=")
            known = {c.split for c in clips.clips}
            strange = sorted(set(splits) - known)
            if strange:
                raise ValueError(f"dataset {dataset!r} has no split {strange[0]!r} (it has {', '.join(sorted(known))})")
        self.split = splits

        # Candidates: the clip manifest's clips, else the first feature's rows; in the first
        # feature's stored order (its shard is the unit each worker reads).
        order = sorted(rows[first], key=lambda c: rows[first][c])
        candidates = [c.id for c in clips.clips] if clips is not None else order
        if splits is not None:
            candidates = [c for c in candidates if info[c].split in splits]
        self.left_out: dict[str, str] = {}
        kept = set()
        for clip_id in candidates:
            absent = next((f for f in plans if clip_id not in rows[f]), None)
            if absent is None:
                kept.add(clip_id)
            else:
                self.left_out[clip_id] = reasons.get(clip_id) or f"{absent}: not in key {self.features[absent]}"
        self.clip_ids: list[str] = [c for c in order if c in kept]
        self._index = {c: i for i, c in enumerate(self.clip_ids)}
        self._meta = [(info[c].caption, info[c].label, info[c].split) if c in info else ("", "", "")
                      for c in self.clip_ids]
        # _where[f][i] = (shard index, row) of clip i in feature f
        self._where = {f: np.array([rows[f][c] for c in self.clip_ids], dtype=np.int64).reshape(-1, 2)
                       for f in plans}
        units = self._where[first][:, 0]
        self._units = [np.flatnonzero(units == u) for u in np.unique(units)]  # samples of each first-feature shard

    # ---- nodes, epochs, order -------------------------------------------------------------
    def node(self) -> tuple[int, int]:
        """(rank, world size) this dataset reads for: the given ones, else torch.distributed's (when
        it was initialised before the dataset was made, or by the time a pass starts)."""
        if self._world is not None:
            return self._rank, self._world
        if self._pass_node is not None and get_worker_info() is not None:
            return self._pass_node  # a spawned worker has no process group of its own
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (its own seeded order). Setting the epoch a loaded state is in
        keeps that state's position; another epoch starts from its beginning."""
        if int(epoch) != self.epoch:
            self.epoch, self._segments = int(epoch), []

    def _rank_units(self) -> list[np.ndarray]:
        rank, world = self.node()
        order = np.arange(len(self._units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._units))
        return [self._units[u] for u in order[rank::world]]

    def __len__(self) -> int:
        """Clips this node reads per epoch."""
        return int(sum(len(u) for u in self._rank_units()))

    def _streams(self, remaining: np.ndarray, streams: int) -> list[np.ndarray]:
        """The sample order of each of ``streams`` workers of this node, over ``remaining`` clips."""
        rank, _ = self.node()
        units = [u[remaining[u]] for u in self._rank_units()]
        units = [u for u in units if len(u)]
        found = []
        for worker in range(streams):
            mine = units[worker::streams]
            if not self.shuffle:
                found.append(np.concatenate(mine) if mine else np.zeros(0, np.int64))
                continue
            parts = []
            for start in range(0, len(mine), self.shuffle_window):
                window = np.concatenate(mine[start:start + self.shuffle_window])
                rng = np.random.default_rng([self.seed, self.epoch, rank, streams, worker, start])
                parts.append(window[rng.permutation(len(window))])
            found.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return found

    def _remaining(self) -> np.ndarray:
        """Clips not yet consumed this epoch: each pass's workers, batches and count replayed
        (a DataLoader hands out its workers' batches round-robin, skipping finished workers)."""
        remaining = np.ones(len(self.clip_ids), dtype=bool)
        for segment in self._segments:
            if segment["batches"]:
                streams = self._streams(remaining, segment["streams"])
                remaining[_first_batches(streams, segment["batch_size"], segment["drop_last"], segment["batches"])] = False
        return remaining

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        streams, index = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        stream = self._streams(self._remaining(), streams)[index]
        counting = worker is None and self._loader_segment is None
        if counting:  # iterated in the main process without loader(): count samples as handed out
            segment = {"streams": 1, "batch_size": 1, "drop_last": False, "batches": 0}
            self._segments.append(segment)
        for sample in stream:
            item = self._sample(int(sample), copy_arrays=True)
            if counting:
                segment["batches"] += 1
            yield item
        if counting:
            self._segments = []  # the epoch is complete: a new pass reads it again from the start

    def loader(self, **kwargs) -> "ClipLoader":
        """A DataLoader over this dataset that records what it hands out (for ``state_dict``);
        takes DataLoader's arguments (``batch_size``, ``num_workers``, ``collate_fn``, ...)."""
        return ClipLoader(self, **kwargs)

    # ---- resuming -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position in the epoch: what the training loop has consumed so far (JSON-able)."""
        rank, world = self.node()
        return {
            "format": STATE_FORMAT,
            "dataset": self.dataset,
            "features": dict(self.features),
            "manifest": self.manifest,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
            "rank": rank,
            "world_size": world,
            "epoch": self.epoch,
            "segments": [dict(s) for s in self._segments if s["batches"]],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``'s position: the next pass yields the rest of its epoch."""
        mine = self.state_dict()
        for name in ("format", "dataset", "features", "manifest", "split", "seed", "shuffle", "shuffle_window",
                     "rank", "world_size"):
            theirs = list(state[name]) if name == "split" and state.get(name) is not None else state.get(name)
            if theirs != mine[name]:
                raise ValueError(f"cannot resume: the saved state has {name}={theirs!r}, this dataset {mine[name]!r}")
        self.epoch = int(state["epoch"])
        self._segments = copy.deepcopy(list(state["segments"]))

    # ---- random access --------------------------------------------------------------------
    def __getitem__(self, clip_id: str) -> dict:
        return self.get(clip_id)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._index

    def get(self, clip_id: str) -> dict:
        """The sample of one clip, reading only the shards that hold it."""
        index = self._index.get(clip_id)
        if index is None:
            if clip_id in self.left_out:
                raise KeyError(f"clip {clip_id!r} is left out: {self.left_out[clip_id]}")
            raise KeyError(f"clip {clip_id!r} is not in {self.dataset!r}"
                           + (f" split {', '.join(self.split)}" if self.split else ""))
        return self._sample(index, copy_arrays=False)

    def _sample(self, index: int, copy_arrays: bool) -> dict:
        caption, label, split = self._meta[index]
        sample: dict[str, Any] = {"clip_id": self.clip_ids[index], "caption": caption, "label": label, "split": split}
        for feature, where in self._where.items():
            shard, row = where[index]
            arrays = self._shard_arrays(feature, int(shard))
            sample[feature] = {name: (np.array(a[row]) if copy_arrays else a[row]) for name, a in arrays.items()}
        return sample

    def _shard_arrays(self, feature: str, shard: int) -> dict[str, np.ndarray]:
        if self._cache_pid != os.getpid():  # a forked worker starts with its own cache
            self._cache, self._cache_pid = OrderedDict(), os.getpid()
        entry = (feature, shard)
        if entry in self._cache:
            self._cache.move_to_end(entry)
            return self._cache[entry]
        _, arrays = self.store.read_shard_arrays(self.dataset, feature, self.features[feature],
                                                 self._shards[feature][shard], names=self._arrays[feature],
                                                 verify=self.verify)
        self._cache[entry] = arrays
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return arrays

    def __getstate__(self) -> dict:  # spawned workers: no decoded shards travel with the dataset
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (f"ClipDataset({self.store.url_root!r}, {self.dataset!r}, {list(self.features)}, "
                f"clips={len(self.clip_ids)}, left_out={len(self.left_out)})")


class ClipLoader(DataLoader):
    """A DataLoader over a ClipDataset that counts the batches it hands out, so the dataset's
    ``state_dict`` knows the position with worker processes too. Made by ``ClipDataset.loader``.

    Workers start with each pass (the epoch and position reach them then): ``persistent_workers``
    and ``in_order=False`` (which makes the batch order depend on timing) are refused."""

    def __init__(self, dataset: ClipDataset, **kwargs):
        if not isinstance(dataset, ClipDataset):
            raise TypeError("ClipLoader reads a ClipDataset")
        if kwargs.get("persistent_workers"):
            raise ValueError("ClipLoader starts its workers each pass (they learn the epoch and position then): "
                             "leave persistent_workers off")
        if kwargs.get("in_order") is False:
            raise ValueError("ClipLoader needs in_order=True: the resume position is counted in batch order")
        super().__init__(dataset, **kwargs)

    def __iter__(self):
        dataset: ClipDataset = self.dataset
        segment = {"streams": max(1, self.num_workers), "batch_size": self.batch_size or 1,
                   "drop_last": bool(self.drop_last), "batches": 0}
        dataset._segments.append(segment)
        dataset._loader_segment = segment
        dataset._pass_node = dataset.node()
        try:
            for batch in super().__iter__():
                segment["batches"] += 1
                yield batch
            dataset._segments = []  # the epoch is complete
        finally:
            dataset._loader_segment = None


def _first_batches(streams: list[np.ndarray], batch_size: int, drop_last: bool, batches: int) -> np.ndarray:
    """The samples of the first ``batches`` batches a DataLoader yields from these worker
    streams: batch r of every worker in worker order, then r + 1, skipping workers that are done."""
    chunks = []
    for stream in streams:
        ends = range(batch_size, len(stream) + (1 if drop_last else batch_size), batch_size)
        chunks.append([stream[end - batch_size:end] for end in ends])
    taken: list[np.ndarray] = []
    for round_ in range(max((len(c) for c in chunks), default=0)):
        for worker_chunks in chunks:
            if round_ < len(worker_chunks):
                if len(taken) == batches:
                    return np.concatenate(taken)
                taken.append(worker_chunks[round_])
    return np.concatenate(taken) if taken else np.zeros(0, np.int64)


def _split_names(split: str | Sequence[str] | None) -> list[str] | None:
    if split is None:
        return None
    return [split] if isinstance(split, str) else sorted(split)


def _clip_manifest(store: FeatureStore, dataset: str, version: str | None):
    if version is None:
        return None
    # The ledger's format belongs to stages.ingest.manifest (imported where it is used, as
    # FeatureStore.snapshot does: that package builds on stages.core).
    from stages.ingest.manifest import load_manifest

    return load_manifest(store, dataset, version)
