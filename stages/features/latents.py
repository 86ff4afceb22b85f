"""``vae_latents``: the scaled KL-VAE posterior of every clip's audio image and video frames, per
shard; ``latent_statistics``: their per-channel statistics over the train split.

    audio_mean  [N, C, h, w]      posterior mean of the clip's audio image (scaled)
    audio_std   [N, C, h, w]      posterior std, times the same scaling factor
    frames_mean [N, T, C, h, w]   posterior mean of each of its video frames (scaled)
    frames_std  [N, T, C, h, w]   posterior std, likewise

read through ``read_latent_means`` (which also reads the keys of code version 1: they stored the
means alone, as ``audio`` / ``frames``) or ``FeatureStore.read_arrays(dataset, "vae_latents", key)``;
a sample is ``mean + std * eps``. The shard manifest's ``params["vaes"]`` names each VAE
checkpoint and its scaling factor (``decode_latents`` undoes it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stages.features.base import ShardFeature, ShardJob, ShardOutput, ShardResult, register_feature, registered_feature
from stages.core.errors import ConfigError
from stages.core.moments import AxisMoments
from stages.core.parallel import torch_threads
from stages.features.spectral import get_preset
from stages.core.results import CachedResult, cached_result, load_result
from stages.core.store import FeatureStore, FeatureTable, feature_key
from stages.ingest.manifest import ClipManifest, split_digest
from stages.vae.train import (DEFAULT_BATCH, MODALITIES, MODALITY_INPUTS, comparison_png, decode_latents,
                               encode_scaled_posterior, load_vae)

LATENT_FEATURE = "vae_latents"
# Bump when the code changes the latents it stores. 2: the posterior's mean and std
# (<modality>_mean, <modality>_std) instead of the mean alone (<modality>); the means are the same
# numbers, but a shard of version 1 lacks the std, so it must not be reused under the new layout.
LATENT_CODE_VERSION = "2"


def mean_array(modality: str) -> str:
    return f"{modality}_mean"


def std_array(modality: str) -> str:
    return f"{modality}_std"


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
    description = ("Scaled KL-VAE posterior (mean and std) of every clip's audio image [C, h, w] and video frames "
                   "[T, C, h, w]: audio_mean, audio_std, frames_mean, frames_std.")
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
                mean, std = encode_scaled_posterior(vae, images, info["scaling_factor"], params["dtype"], params["batch_size"])
            else:
                shape = _empty_latent_shape(store, job, modality, sidecar)
                mean = std = np.zeros((0, *shape), params["dtype"])
            arrays[mean_array(modality)], arrays[std_array(modality)] = mean, std
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


def _first_manifest(store: FeatureStore, dataset: str, key: str) -> dict:
    shards = store.committed_shards(dataset, LATENT_FEATURE, key)
    if not shards:
        raise ConfigError(f"no committed {LATENT_FEATURE} shards for key {key}")
    return store.shard_manifest(dataset, LATENT_FEATURE, key, shards[0])


def latent_vaes(store: FeatureStore, dataset: str, key: str | None = None) -> dict[str, dict]:
    """Per modality, the VAE checkpoint (name, key, scaling factor) a latent feature key was made with."""
    key = store.resolve_key(dataset, LATENT_FEATURE, key)
    return dict(_first_manifest(store, dataset, key)["params"]["vaes"])


def mean_arrays(store: FeatureStore, dataset: str, key: str) -> dict[str, str]:
    """Per modality of a latent key, the array of its scaled posterior means: ``<m>_mean``, or
    ``<m>`` in a key of code version 1 (which stored the means alone)."""
    manifest = _first_manifest(store, dataset, key)
    stored = manifest["arrays"]
    return {m: mean_array(m) if mean_array(m) in stored else m for m in manifest["params"]["vaes"]}


def read_latent_means(store: FeatureStore, dataset: str, key: str | None = None, modalities: Sequence[str] | None = None,
                      shards: Sequence[str] | None = None) -> FeatureTable:
    """The scaled posterior means of a latent key, one array per modality named by the modality
    (all of the key's, or ``modalities``), from keys of every code version."""
    key = store.resolve_key(dataset, LATENT_FEATURE, key)
    names = mean_arrays(store, dataset, key)
    wanted = list(modalities) if modalities is not None else list(names)
    missing = [m for m in wanted if m not in names]
    if missing:
        raise ConfigError(f"{LATENT_FEATURE} key {key} holds no {missing} latents (modalities: {sorted(names)})")
    table = store.read_arrays(dataset, LATENT_FEATURE, key, shards=shards, names=[names[m] for m in wanted])
    return dataclasses.replace(table, arrays={m: table.arrays[names[m]] for m in wanted if names[m] in table.arrays})


def latent_summary(store: FeatureStore, dataset: str, key: str, shards: Sequence[str] | None = None) -> dict[str, dict]:
    """Per modality of a latent key: row shape, scaling factor, ``array_statistics`` over the
    posterior means and the mean posterior std."""
    vaes = latent_vaes(store, dataset, key)
    means = read_latent_means(store, dataset, key, shards=shards)
    stds = store.read_arrays(dataset, LATENT_FEATURE, key, shards=shards, names=[std_array(m) for m in vaes])
    return {
        m: {"shape": list(means.arrays[m].shape[1:]), "scaling_factor": float(vaes[m]["scaling_factor"]),
            **array_statistics(means.arrays[m]),
            "posterior_std": float(np.mean(stds.arrays[std_array(m)], dtype=np.float64)) if len(stds) else float("nan")}
        for m in vaes
    }


def latent_preview_png(
    store: FeatureStore, dataset: str, key: str, shards: Sequence[str], count: int = 4, device: str = "cpu"
) -> bytes | None:
    """Input audio images next to their decoded stored latents (posterior means; and both mels) for
    the first ``count`` clips; None when the key holds no audio latents or no rows."""
    manifest = store.shard_manifest(dataset, LATENT_FEATURE, key, shards[0]) if shards else None
    if manifest is None or "audio" not in manifest["params"]["modalities"]:
        return None
    params = manifest["params"]
    source = params["inputs"]["audio"]
    info = params["vaes"]["audio"]
    latents, originals = [], []
    for shard in shards:
        table = read_latent_means(store, dataset, key, ["audio"], shards=[shard])
        images = store.read_arrays(dataset, source["feature"], source["key"], shards=[shard], names=[source["array"]])
        by_id = dict(zip(images.clip_ids, images.arrays[source["array"]]))
        for clip_id, latent in zip(table.clip_ids, table.arrays.get("audio", [])):
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


def array_statistics(latents: np.ndarray) -> dict[str, float]:
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


# ---- latent_statistics: the train split's posterior means, per channel ----------------------------

LATENT_STATISTICS = "latent_statistics"
# Bump when the statistics computed from the same latents change.
LATENT_STATISTICS_CODE_VERSION = "1"


def train_split_digest(manifest: ClipManifest) -> str:
    """The train split's digest (stages.ingest.manifest.split_digest): the statistics change exactly when it does."""
    return split_digest(manifest.clips)


def latent_statistics_key(vaes: Mapping[str, Mapping[str, Any]], latent_key: str, train_digest: str) -> str:
    """hash(code version, the VAE checkpoint keys, the latent feature key, the train-split digest)."""
    return feature_key(LATENT_STATISTICS, {"split": "train", "of": "posterior means"}, LATENT_STATISTICS_CODE_VERSION,
                       [*(f"{m}:{vaes[m]['key']}" for m in sorted(vaes)), latent_key, train_digest])


def compute_latent_statistics(store: FeatureStore, manifest: ClipManifest, latent_key: str) -> dict[str, dict]:
    """Per modality of a latent key: per-channel mean / std and the global mean / std of the train
    split's stored posterior means (already scaled by the VAE's factor), with ``scale`` = 1 / std
    (multiply stored latents by it for unit std) and ``scaling_factor`` = the VAE's factor times
    ``scale`` (1 / std of the unscaled means over every train row; the sidecar's comes from a
    subset). Read shard by shard."""
    vaes = latent_vaes(store, manifest.dataset, latent_key)
    train = {c.id for c in manifest.clips if c.split == "train"}
    if not train:
        raise ConfigError(f"dataset {manifest.dataset!r} has no train clips: latent statistics come from the train split only")
    moments: dict[str, AxisMoments | None] = {m: None for m in vaes}  # per latent channel (axis -3 of [..., C, h, w])
    non_finite = {m: 0 for m in vaes}
    clips, shape = 0, {}
    for shard in store.committed_shards(manifest.dataset, LATENT_FEATURE, latent_key):
        table = read_latent_means(store, manifest.dataset, latent_key, shards=[shard])
        rows = [i for i, c in enumerate(table.clip_ids) if c in train]
        clips += len(rows)
        for m in vaes:
            if rows:
                values = table.arrays[m][rows]
                non_finite[m] += int(values.size - np.isfinite(values).sum())
                moments[m] = AxisMoments.add(moments[m], values, axis=-3)
                shape[m] = list(values.shape[1:])
    if not clips:
        raise ConfigError(f"{LATENT_FEATURE} key {latent_key} holds none of the {len(train)} train clips of {manifest.dataset!r}")
    out = {}
    for m, moment in moments.items():
        if non_finite[m]:
            raise ValueError(f"{LATENT_FEATURE} key {latent_key}: {non_finite[m]} NaN/Inf values in the train split's "
                             f"{m} latents (the VAE diverged: retrain {vaes[m]['name']})")
        overall_mean, overall_std = moment.overall()
        summary = {"channel_mean": [float(v) for v in moment.mean], "channel_std": [float(v) for v in moment.std],
                   "mean": overall_mean, "std": overall_std}
        if not summary["std"] > 0:
            raise ValueError(f"{LATENT_FEATURE} key {latent_key}: the train split's {m} latents are constant")
        scale = 1.0 / summary["std"]
        out[m] = {"vae": dict(vaes[m]), "shape": shape[m], "clips": clips, "values_per_channel": moment.count, **summary,
                  "scale": scale, "scaling_factor": float(vaes[m]["scaling_factor"]) * scale}
    return out


def latent_statistics(store: FeatureStore, manifest: ClipManifest, latent_key: str,
                      log: Callable[[str], None] | None = None) -> CachedResult:
    """``compute_latent_statistics`` of a latent key, stored as one small JSON document in the store
    (stages.core.results) under ``latent_statistics_key`` and reused while that key exists."""
    vaes = latent_vaes(store, manifest.dataset, latent_key)
    digest = train_split_digest(manifest)
    key = latent_statistics_key(vaes, latent_key, digest)
    provenance = {"latent_key": latent_key, "vae_keys": {m: v["key"] for m, v in vaes.items()}, "train_digest": digest,
                  "manifest": manifest.digest(), "code_version": LATENT_STATISTICS_CODE_VERSION}
    return cached_result(store, manifest.dataset, LATENT_STATISTICS, key,
                         lambda: compute_latent_statistics(store, manifest, latent_key), provenance, log)


def load_latent_statistics(store: FeatureStore, dataset: str, key: str) -> dict[str, dict]:
    """The stored statistics of a ``latent_statistics`` key (per modality, as computed)."""
    value, problem = load_result(store, dataset, LATENT_STATISTICS, key)
    if value is None:
        raise ConfigError(f"no usable {LATENT_STATISTICS} {key} in {store.url_root}/{dataset}"
                          f"{f' ({problem})' if problem else ''}: materialize latent_statistics first")
    return value
