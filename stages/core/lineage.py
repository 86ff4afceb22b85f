"""One lineage mechanism for every trained model: key -> reuse -> warm start -> resume -> sidecar.

A model family calls ``fit_with_lineage`` with

    name          the checkpoint name (``diffgap_clap``, ``audio_vae``, ``clap_head``, ...)
    key           its checkpoint key; the family decides what the key hashes, and so what new
                  shards do (``NewShards``):
                    REUSE       the key leaves the shards out: new clips use the trained model, so
                                the space it defines and every key downstream stay fixed (heads);
                    RETRAIN     the key hashes the shards: new shards train a new model (VAEs, generator);
                    WARM_START  the key hashes the shards, and a checkpoint of the same ``lineage``
                                (same config and inputs, earlier shards) is the starting point, with
                                the clips of the new shards (DiffGAP)
    lineage       what stays the same across warm starts (a hash of config and input keys)
    train(start)  fits the model: ``start.state`` (weights to start from, or None),
                  ``start.new_shards`` and ``start.progress`` (save / load hooks for resuming a
                  killed run); returns ``Trained(state, model, steps_run, resumed_from, seconds, sidecar)``

and gets back ``Fitted(key, sidecar, status, model)``. The sidecar always holds ``lineage``,
``shards_seen``, ``new_shards``, ``warm_start_from`` (what this model started from: part of its
lineage), ``status``, ``steps_run``, ``resumed_from_step`` and ``train_seconds``, next to the family's
own fields. Progress saves are deleted once the final checkpoint is committed.
"""

from __future__ import annotations

import enum
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from stages.core import checkpoints
from stages.core.checkpoints import (checkpoint_dir, has_checkpoint, list_checkpoints, load_checkpoint, load_progress,
                                     optimizer_tensors, save_checkpoint)
from stages.core.store import FeatureStore

if TYPE_CHECKING:
    import torch


class NewShards(str, enum.Enum):
    REUSE = "reuse"
    RETRAIN = "retrain"
    WARM_START = "warm_start"


@dataclass
class Progress:
    """Hooks to save and restore mid-run state; the training loop stays storage-agnostic."""

    load: Callable[[], tuple[int, dict, dict, dict] | None] = lambda: None  # -> (step, model, optimizer tensors, meta)
    save: Callable[[int, torch.nn.Module, torch.optim.Optimizer, list], None] = lambda step, model, optimizer, history: None


@dataclass
class Start:
    """Where a training run starts: fresh, from an earlier checkpoint of the lineage, or resumed."""

    state: Mapping[str, torch.Tensor] | None = None
    previous: dict | None = None  # the sidecar of the checkpoint warm-started from
    new_shards: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    resuming: bool = False


@dataclass
class Trained:
    state: Mapping[str, torch.Tensor]
    model: Any = None
    steps_run: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    sidecar: dict = field(default_factory=dict)
    save: Callable[[FeatureStore, str, str, str, Mapping[str, Any]], dict] | None = None  # a family's own writer


@dataclass
class Fitted:
    key: str
    sidecar: dict
    status: str  # "reused" | "trained" | "warm-started" | "resumed" | "carried over"
    model: Any = None

    @property
    def reused(self) -> bool:
        return self.status == "reused"


def progress_hooks(store: FeatureStore, dataset: str, name: str, key: str) -> Progress:
    """Save / load resumable training state (model + optimizer + step + history) beside the checkpoint."""

    def save(step, model, optimizer, history):
        tensors, groups = optimizer_tensors(optimizer)
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
        checkpoints.save_progress(store, dataset, name, key, tensors, {"step": step, **groups, "history": history})

    def load():
        found = load_progress(store, dataset, name, key)
        if found is None:
            return None
        tensors, meta = found
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        return meta["step"], model_state, {k: v for k, v in tensors.items() if k.startswith("optimizer.")}, meta

    return Progress(load=load, save=save)


def clear_progress(store: FeatureStore, dataset: str, name: str, key: str) -> None:
    """Remove the progress saves of a committed checkpoint (they would only pile up)."""
    folder = checkpoint_dir(store, dataset, name, key)
    for path in store.fs.glob(posixpath.join(folder, "progress*")):
        try:
            store.fs.rm_file(path)
        except FileNotFoundError:
            pass


def fit_with_lineage(
    store: FeatureStore,
    dataset: str,
    name: str,
    key: str,
    shards: Sequence[str],
    train: Callable[[Start], Trained],
    *,
    on_new_shards: NewShards = NewShards.RETRAIN,
    lineage: str = "",
    load: Callable[[str], tuple[Any, dict]] | None = None,
) -> Fitted:
    """The checkpoint ``name/key`` of ``dataset``: reused if committed, else trained (see the module docstring)."""
    if has_checkpoint(store, dataset, name, key):
        if load is not None:
            model, sidecar = load(key)
        else:
            model, (_, sidecar) = None, load_checkpoint(store, dataset, name, key)
        return Fitted(key, sidecar, "reused", model)

    shards = sorted(shards)
    start, status = Start(progress=progress_hooks(store, dataset, name, key)), "trained"
    if on_new_shards == NewShards.WARM_START and lineage:
        previous = next((s for s in list_checkpoints(store, dataset, name) if s.get("lineage") == lineage), None)
        if previous is not None:
            seen = set(previous.get("shards_seen", []))
            start.previous = previous
            start.new_shards = [s for s in shards if s not in seen]
            start.state, _ = load_checkpoint(store, dataset, name, previous["checkpoint_key"])
            status = "warm-started" if start.new_shards else "carried over"
    start.resuming = load_progress(store, dataset, name, key) is not None
    trained = train(start)
    if start.resuming and trained.steps_run:
        status = "resumed"
    if status == "warm-started" and not trained.steps_run:
        status = "carried over"
    sidecar = {
        **trained.sidecar,
        "lineage": lineage or key,
        "on_new_shards": on_new_shards.value,
        "shards_seen": shards,
        "new_shards": start.new_shards if start.previous else shards,
        "warm_start_from": start.previous["checkpoint_key"] if start.previous else None,
        "status": status,
        "steps_run": trained.steps_run,
        "resumed_from_step": trained.resumed_from,
        "train_seconds": round(trained.seconds, 2),
    }
    writer = trained.save or (lambda st, ds, nm, k, extra: save_checkpoint(st, ds, nm, k, trained.state, extra))
    written = writer(store, dataset, name, key, sidecar)
    clear_progress(store, dataset, name, key)
    return Fitted(key, written, status, trained.model)
