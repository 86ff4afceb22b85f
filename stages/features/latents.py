"""``vae_latents``: scaled posterior means of every clip's audio image and video frames, per shard.

    audio  [N, C, h, w]      latents of the clip's audio image
    frames [N, T, C, h, w]   latents of each of its video frames

read through ``FeatureStore.read_arrays(dataset, "vae_latents", key)``; the shard manifest's
``params["vaes"]`` names each VAE checkpoint and its scaling factor (``decode_latents`` undoes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from stages.features.base import ShardFeature, ShardJob, ShardOutput, ShardResult, register_feature, registered_feature
from stages.core.errors import ConfigError
from stages.core.parallel import torch_threads
from stages.features.spectral import get_preset
from stages.core.store import FeatureStore, feature_key
from stages.vae.train import (DEFAULT_BATCH, MODALITIES, MODALITY_INPUTS, comparison_png, decode_latents, encode_scaled,
                               load_vae)

LATENT_FEATURE = "vae_latents"
# Bump when the code changes the latents it stores.
LATENT_CODE_VERSION = "1"


# ---- latents per shard ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LatentParams:
    modalities: tuple[str, ...] = MODALITIES
    dtype: str = "float16"
    batch_size: int = DEFAULT_BATCH  # speed only: not part of the feature key

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        unknown = [m for m in self.modalities if m not in MODALITY_INPUTS]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities must be a non-empty subset of {list(MODALITIES)}, got {list(self.modalities)}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be 'float16' or 'float32', got {self.dtype!r}")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")

    def job_params(self, vaes: Mapping[str, Mapping[str, Any]], input_keys: Mapping[str, str]) -> dict:
        """What a shard job needs: per modality, the VAE checkpoint (name, key, scaling factor) and
        the input feature key."""
        missing = [m for m in self.modalities if m not in vaes or m not in input_keys]
        if missing:
            raise ConfigError(f"no VAE or input feature for modality {missing}")
        return {
            "modalities": list(self.modalities),
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "vaes": {m: {"name": vaes[m]["name"], "key": vaes[m]["key"], "scaling_factor": float(vaes[m]["scaling_factor"])}
                     for m in self.modalities},
            "inputs": {m: {"feature": MODALITY_INPUTS[m][0], "array": MODALITY_INPUTS[m][1], "key": input_keys[m]}
                       for m in self.modalities},
        }

    @staticmethod
    def input_keys(job_params: Mapping[str, Any]) -> tuple[str, ...]:
        """The VAE checkpoint keys, then the input feature keys, in modality order."""
        modalities = job_params["modalities"]
        return (*[job_params["vaes"][m]["key"] for m in modalities], *[job_params["inputs"][m]["key"] for m in modalities])

    @staticmethod
    def key(job_params: Mapping[str, Any]) -> str:
        """hash(feature, params without the batch size, code version, VAE keys + input feature keys)."""
        keyed = {k: v for k, v in job_params.items() if k != "batch_size"}
        return feature_key(LATENT_FEATURE, keyed, LATENT_CODE_VERSION, LatentParams.input_keys(job_params))


@register_feature
class VaeLatents(ShardFeature):
    name, code_version = LATENT_FEATURE, LATENT_CODE_VERSION
    inputs = ("audio_images", "video_frames")
    group, kinds = "vae", ("pytorch",)
    description = "Scaled KL-VAE posterior means of every clip's audio image [C, h, w] and video frames [T, C, h, w]."
    sets_threads = False  # compute_shard below: the job's threads, else torch's default, for this shard only

    def compute_shard(self, job: ShardJob) -> ShardResult:
        import torch

        with torch_threads(job.worker_threads or torch.get_num_threads()):
            return super().compute_shard(job)

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Latents of one shard's audio images and/or video frames; clips missing an input are quarantined."""
        params = job.params
        rows: dict[str, dict[str, np.ndarray]] = {}
        reasons: dict[str, str] = {}
        for modality in params["modalities"]:
            source = params["inputs"][modality]
            manifest = store.shard_manifest(job.dataset, source["feature"], source["key"], job.shard)
            for entry in manifest.get("quarantined", []):
                reasons.setdefault(entry["id"], f"{source['feature']}: {entry['reason']}")
            table = store.read_arrays(job.dataset, source["feature"], source["key"], shards=[job.shard], names=[source["array"]])
            rows[modality] = dict(zip(table.clip_ids, table.arrays[source["array"]])) if len(table) else {}
        clip_ids = [clip_id for clip_id, _, _ in job.clips if all(clip_id in r for r in rows.values())]
        quarantined = [
            {"id": clip_id, "reason": reasons.get(clip_id, "missing an input image")}
            for clip_id, _, _ in job.clips if clip_id not in clip_ids
        ]
        arrays = {}
        for modality in params["modalities"]:
            info = params["vaes"][modality]
            vae, sidecar = load_vae(store, job.dataset, info["name"], info["key"], job.device)
            if clip_ids:
                images = np.stack([rows[modality][clip_id] for clip_id in clip_ids])
                arrays[modality] = encode_scaled(vae, images, info["scaling_factor"], params["dtype"], params["batch_size"])
            else:
                shape = _empty_latent_shape(store, job, modality, sidecar)
                arrays[modality] = np.zeros((0, *shape), params["dtype"])
        return ShardOutput(clip_ids, arrays, quarantined)


compute_latent_shard = registered_feature(LATENT_FEATURE).compute_shard


def _empty_latent_shape(store: FeatureStore, job: ShardJob, modality: str, sidecar: Mapping[str, Any]) -> tuple[int, ...]:
    """Row shape of an empty shard's latents, from the input's recorded array shape."""
    source = job.params["inputs"][modality]
    info = store.shard_manifest(job.dataset, source["feature"], source["key"], job.shard)["arrays"][source["array"]]
    shape = info["shape"][1:]
    config = sidecar["diffusers_config"]
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    spatial = (config["latent_channels"], shape[-3] // factor, shape[-2] // factor)
    return (*shape[:-3], *spatial)


def latent_vaes(store: FeatureStore, dataset: str, key: str | None = None) -> dict[str, dict]:
    """Per modality, the VAE checkpoint (name, key, scaling factor) a latent feature key was made with."""
    key = store.resolve_key(dataset, LATENT_FEATURE, key)
    shards = store.committed_shards(dataset, LATENT_FEATURE, key)
    if not shards:
        raise ConfigError(f"no committed {LATENT_FEATURE} shards for key {key}")
    return dict(store.shard_manifest(dataset, LATENT_FEATURE, key, shards[0])["params"]["vaes"])


def latent_summary(store: FeatureStore, dataset: str, key: str, shards: Sequence[str] | None = None) -> dict[str, dict]:
    """Per modality of a latent key: row shape, scaling factor and ``latent_statistics`` over the rows."""
    vaes = latent_vaes(store, dataset, key)
    table = store.read_arrays(dataset, LATENT_FEATURE, key, shards=shards, names=list(vaes))
    return {
        m: {"shape": list(table.arrays[m].shape[1:]), "scaling_factor": float(vaes[m]["scaling_factor"]),
            **latent_statistics(table.arrays[m])}
        for m in vaes
    }


def latent_preview_png(
    store: FeatureStore, dataset: str, key: str, shards: Sequence[str], count: int = 4, device: str = "cpu"
) -> bytes | None:
    """Input audio images next to their decoded stored latents (and both mels) for the first
    ``count`` clips; None when the key holds no audio latents or no rows."""
    manifest = store.shard_manifest(dataset, LATENT_FEATURE, key, shards[0]) if shards else None
    if manifest is None or "audio" not in manifest["params"]["modalities"]:
        return None
    params = manifest["params"]
    source = params["inputs"]["audio"]
    info = params["vaes"]["audio"]
    latents, originals = [], []
    for shard in shards:
        table = store.read_arrays(dataset, LATENT_FEATURE, key, shards=[shard], names=["audio"])
        images = store.read_arrays(dataset, source["feature"], source["key"], shards=[shard], names=[source["array"]])
        by_id = dict(zip(images.clip_ids, images.arrays[source["array"]]))
        for clip_id, latent in zip(table.clip_ids, table.arrays["audio"]):
            if len(latents) < count:
                latents.append(latent)
                originals.append(by_id[clip_id])
        if len(latents) >= count:
            break
    if not latents:
        return None
    vae, sidecar = load_vae(store, dataset, info["name"], info["key"], device)
    decoded = decode_latents(vae, np.stack(latents), info["scaling_factor"])
    preset = get_preset(sidecar.get("mel_preset", "hifigan22k"))
    return comparison_png(np.stack(originals), decoded, preset, preset.n_frames(float(sidecar.get("mel_seconds", 4.0))))


def latent_statistics(latents: np.ndarray) -> dict[str, float]:
    """Finite count, mean, std and max |z| of (scaled) latents, in float64."""
    values = np.asarray(latents, np.float64)
    finite = np.isfinite(values)
    good = values[finite]
    return {
        "values": int(values.size),
        "non_finite": int(values.size - finite.sum()),
        "mean": float(good.mean()) if good.size else float("nan"),
        "std": float(good.std()) if good.size else float("nan"),
        "max_abs": float(np.abs(good).max()) if good.size else float("nan"),
    }
