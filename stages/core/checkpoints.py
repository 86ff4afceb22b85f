"""Model checkpoints in the feature store: safetensors weights + a JSON sidecar with lineage.

    <root>/<dataset>/models/<name>/<key>/weights.safetensors
    <root>/<dataset>/models/<name>/<key>/checkpoint.json     written last: its presence commits

The sidecar names the feature keys and shards the model was trained on, its steps and metrics.
Weights are never pickled, so loading a checkpoint runs no code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import posixpath
from typing import TYPE_CHECKING, Any, Mapping

from stages.core.ids import check_name
from stages.core.store import FeatureStore, library_versions

if TYPE_CHECKING:
    import torch

MODELS_FOLDER = "models"


def checkpoint_dir(store: FeatureStore, dataset: str, name: str, key: str) -> str:
    return store.path(check_name(dataset, "dataset"), MODELS_FOLDER, check_name(name, "model name"), check_name(key, "checkpoint key"))


def save_checkpoint(
    store: FeatureStore, dataset: str, name: str, key: str, state: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any]
) -> dict:
    """Write weights, then the sidecar (the commit). Returns the sidecar as written."""
    from safetensors.torch import save as save_safetensors

    folder = checkpoint_dir(store, dataset, name, key)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = save_safetensors(tensors)
    store.write_bytes(posixpath.join(folder, "weights.safetensors"), data)
    written = dict(sidecar)
    written.update(
        model=name,
        checkpoint_key=key,
        dataset=dataset,
        weights_sha256=hashlib.sha256(data).hexdigest(),
        parameters=int(sum(t.numel() for t in tensors.values())),
        weights_bytes=len(data),
        versions=library_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
        url=store.url(folder),
    )
    store.write_json(posixpath.join(folder, "checkpoint.json"), written)
    return written


def has_checkpoint(store: FeatureStore, dataset: str, name: str, key: str) -> bool:
    return store.exists(posixpath.join(checkpoint_dir(store, dataset, name, key), "checkpoint.json"))


def load_checkpoint(store: FeatureStore, dataset: str, name: str, key: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and sidecar; the weights' sha256 must match the sidecar."""
    from safetensors.torch import load as load_safetensors

    folder = checkpoint_dir(store, dataset, name, key)
    sidecar = store.read_json(posixpath.join(folder, "checkpoint.json"))
    with store.fs.open(posixpath.join(folder, "weights.safetensors"), "rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != sidecar["weights_sha256"]:
        raise ValueError(f"checkpoint {name}/{key} in {store.url_root}: weights do not match their sidecar's sha256")
    return load_safetensors(data), sidecar


def load_module(store: FeatureStore, dataset: str, name: str, key: str, build) -> tuple[torch.nn.Module, dict]:
    """A stored torch module in eval mode and its sidecar; ``build(sidecar)`` makes the empty
    module from the configuration the sidecar recorded."""
    state, sidecar = load_checkpoint(store, dataset, name, key)
    module = build(sidecar)
    module.load_state_dict(state)
    module.eval()
    return module, sidecar


def list_checkpoints(store: FeatureStore, dataset: str, name: str) -> list[dict]:
    """Sidecars of every committed checkpoint of one model, newest first."""
    pattern = posixpath.join(store.path(check_name(dataset, "dataset"), MODELS_FOLDER, check_name(name, "model name")), "*", "checkpoint.json")
    sidecars = [store.read_json(p) for p in store.fs.glob(pattern)]
    return sorted(sidecars, key=lambda s: s.get("created", ""), reverse=True)


# ---- in-progress training state (resume after a kill) ---------------------------------------------

def save_progress(store: FeatureStore, dataset: str, name: str, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Training state mid-run (model + optimizer tensors, step, ...) beside the final checkpoint.

    Tensors first, then the JSON that points at their hash: a kill between the two leaves the
    previous progress valid.
    """
    from safetensors.torch import save as save_safetensors

    folder = checkpoint_dir(store, dataset, name, key)
    data = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    digest = hashlib.sha256(data).hexdigest()
    store.write_bytes(posixpath.join(folder, f"progress-{digest[:16]}.safetensors"), data)
    store.write_json(posixpath.join(folder, "progress.json"), {**meta, "tensors_sha256": digest})


def load_progress(store: FeatureStore, dataset: str, name: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load as load_safetensors

    folder = checkpoint_dir(store, dataset, name, key)
    meta_path = posixpath.join(folder, "progress.json")
    if not store.exists(meta_path):
        return None
    meta = store.read_json(meta_path)
    with store.fs.open(posixpath.join(folder, f"progress-{meta['tensors_sha256'][:16]}.safetensors"), "rb") as handle:
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        return None
    return load_safetensors(data), meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into safetensors-friendly tensors + JSON-able groups."""
    import torch

    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{index}.{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups: Mapping[str, Any]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, slot = name.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})
