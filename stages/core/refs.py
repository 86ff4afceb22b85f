"""What assets pass downstream: small, JSON-able pointers into the feature store.

Every asset's output is one of these refs (or plain rows / dicts of them), never the data itself:
the data is in the store under content-addressed keys. They are written as JSON beside the
dataset in the store (see ``encode`` / ``decode`` and assets.io), so a step on any machine can
resolve its inputs; nothing is pickled. A new kind of ref is a frozen dataclass decorated with
``@ref_type``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from stages.core.store import FeatureStore

REF_TYPES: dict[str, type] = {}


def ref_type(cls: type) -> type:
    """Register a frozen dataclass as something assets may pass (and the store may hold) as JSON."""
    REF_TYPES[cls.__name__] = cls
    return cls


@ref_type
@dataclass(frozen=True)
class FeatureRef:
    """A pointer to one feature key's shards for one clip manifest (what assets pass downstream)."""

    dataset: str
    feature: str
    key: str
    manifest_digest: str
    shards: tuple[str, ...]

    def read(self, store: FeatureStore, names=None):
        return store.read_arrays(self.dataset, self.feature, self.key, shards=self.shards, names=names)


@ref_type
@dataclass(frozen=True)
class ManifestRef:
    """One committed version of a dataset's clip manifest."""

    dataset: str
    digest: str
    clips: int
    shards: tuple[str, ...]


@ref_type
@dataclass(frozen=True)
class HeadRef:
    """A trained head (or a pretrained CLAP model folder) and the tower features it reads."""

    dataset: str
    kind: str
    key: str
    tower_keys: dict = field(default_factory=dict)  # the tower features it reads in ``dataset``
    pretrained_dir: str = ""
    # The dataset whose train split the head was fitted on and where its checkpoint lives, when not
    # ``dataset``: a pretrained space, frozen, that this dataset's clips are embedded in.
    head_dataset: str = ""

    @property
    def source_dataset(self) -> str:
        return self.head_dataset or self.dataset


@ref_type
@dataclass(frozen=True)
class DiffgapRef:
    """A DiffGAP checkpoint of one space and the embedding key it bridges."""

    dataset: str
    space: str
    key: str
    embedding_key: str
    lineage: str


@ref_type
@dataclass(frozen=True)
class VaeRef:
    """A VAE checkpoint in the feature store and what it was fitted on."""

    dataset: str
    name: str
    key: str
    modality: str
    scaling_factor: float
    input_key: str
    manifest_digest: str


@ref_type
@dataclass(frozen=True)
class GeneratorRef:
    """The generator checkpoint of each space and what it was trained on."""

    dataset: str
    keys: dict = field(default_factory=dict)  # space -> checkpoint key
    latent_key: str = ""
    embedding_keys: dict = field(default_factory=dict)  # space -> embedding feature key


@ref_type
@dataclass(frozen=True)
class CmmdRef:
    """A CMMD checkpoint and the cached features it was trained on."""

    dataset: str
    key: str
    mel_latent_key: str
    frame_latent_key: str
    frames_key: str
    frame_vae_key: str
    scaling_factor: float
    variant: str = "CMMD"


@ref_type
@dataclass(frozen=True)
class MmldmAutoencoderRef:
    """An MM-LDM autoencoder checkpoint and the KL-VAE latents it was fitted on."""

    dataset: str
    key: str
    vae_latent_key: str
    variant: str = "MM-LDM autoencoder"


@ref_type
@dataclass(frozen=True)
class MmldmRef:
    """An MM-LDM DiT checkpoint, its autoencoder and the cached latents it was trained on."""

    dataset: str
    key: str
    autoencoder_key: str
    mmldm_latent_key: str
    vae_latent_key: str


# ---- JSON ---------------------------------------------------------------------------------------

def encode(value: Any) -> Any:
    """A JSON-able form of an output: refs become {"__ref__": name, fields}, containers recurse."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if REF_TYPES.get(name) is not type(value):
            raise TypeError(f"{name} is not a registered ref type (decorate it with @ref_type)")
        return {"__ref__": name, **{f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item"):  # numpy scalars in result rows
        return value.item()
    raise TypeError(f"cannot store an output of type {type(value).__name__} as JSON")


def decode(value: Any) -> Any:
    """Inverse of ``encode``: tuple-typed ref fields come back as tuples, so refs compare equal."""
    if isinstance(value, dict) and "__ref__" in value:
        cls = REF_TYPES[value["__ref__"]]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in value:
                item = decode(value[f.name])
                if typing.get_origin(hints.get(f.name)) is tuple and isinstance(item, list):
                    item = tuple(item)
                kwargs[f.name] = item
        return cls(**kwargs)
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value
