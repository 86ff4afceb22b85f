"""``mel_latents``: the normalised mel of a preset, for models that diffuse on the spectrogram directly
(CMMD's latent-spectrogram design), with the dataset statistics it is normalised by.

    z = (mel - mean[bin]) / std[bin]          mel_latent [N, n_mels, T] float32, per shard
    mel = z * std[bin] + mean[bin]            ``denormalise``: the exact inverse (float32 rounding only)

The statistics are each mel bin's mean and std over every frame of every clip of the train split
(never val / test), computed from the stored mels (``mel_spectrograms``, float16) in float64. They
are stored once per (mel key, train-split digest) at ``<dataset>/mel_statistics/<key>.json`` and
reused while neither changes; the mel_latents feature key holds the statistics key, so new
statistics make new latents. HiFi-GAN reads ``denormalise(z)`` as it reads the stored mel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from stages.core.errors import ConfigError
from stages.core.moments import AxisMoments
from stages.core.store import FeatureStore, feature_key
from stages.features.base import ShardFeature, ShardJob, ShardOutput, register_feature, registered_feature
from stages.features.mel import MEL_FEATURE, read_mel_shard
from stages.ingest.manifest import split_digest

MEL_LATENT_FEATURE = "mel_latents"
MEL_STATISTICS = "mel_statistics"
# Bump when the code changes the numbers it stores.
MEL_LATENT_CODE_VERSION = "1"
MEL_STATISTICS_CODE_VERSION = "1"
# A bin that never varies in the train split (e.g. always at the floor) keeps std 1: its latent is
# the offset from the mean, and the inverse stays exact.
MIN_STD = 1e-6


@dataclass(frozen=True)
class MelStatistics:
    """Per-mel-bin mean and std of the train split's stored mels."""

    mean: np.ndarray  # [n_mels] float64
    std: np.ndarray  # [n_mels] float64, >= MIN_STD (else 1)
    clips: int
    frames: int

    def to_json(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "clips": self.clips, "frames": self.frames}

    @classmethod
    def from_json(cls, data: dict) -> "MelStatistics":
        return cls(np.asarray(data["mean"], np.float64), np.asarray(data["std"], np.float64),
                   int(data["clips"]), int(data["frames"]))


def bin_statistics(mels: np.ndarray) -> MelStatistics:
    """Mean and (population) std per mel bin over every frame of mels [N, n_mels, T]."""
    mels = np.asarray(mels)
    if mels.ndim != 3 or mels.shape[0] == 0 or mels.shape[2] == 0:
        raise ValueError(f"need mels [N >= 1, n_mels, T >= 1] for statistics, got shape {mels.shape}")
    return _statistics(AxisMoments.of(mels, axis=1), len(mels))


def _statistics(moments: AxisMoments, clips: int) -> MelStatistics:
    std = moments.std
    return MelStatistics(moments.mean, np.where(std < MIN_STD, 1.0, std), int(clips), int(moments.count))


def normalise(mels: np.ndarray, statistics: MelStatistics) -> np.ndarray:
    """mel [..., n_mels, T] -> mel latent float32 (zero mean, unit std per bin over the train split)."""
    mean, std = statistics.mean[:, None], statistics.std[:, None]
    return ((np.asarray(mels, np.float64) - mean) / std).astype(np.float32)


def denormalise(latents: np.ndarray, statistics: MelStatistics) -> np.ndarray:
    """The exact inverse of ``normalise``: mel latent [..., n_mels, T] -> the vocoder's log-mel (float32)."""
    mean, std = statistics.mean[:, None], statistics.std[:, None]
    return (np.asarray(latents, np.float64) * std + mean).astype(np.float32)


# ---- statistics in the store -----------------------------------------------------------------------

def statistics_key(mel_key: str, train_digest: str) -> str:
    return feature_key(MEL_STATISTICS, {"split": "train"}, MEL_STATISTICS_CODE_VERSION, [mel_key, train_digest])


def statistics_path(store: FeatureStore, dataset: str, key: str) -> str:
    return store.path(dataset, MEL_STATISTICS, f"{key}.json")


def load_statistics(store: FeatureStore, dataset: str, key: str) -> MelStatistics:
    path = statistics_path(store, dataset, key)
    if not store.exists(path):
        raise ConfigError(f"no mel statistics {key} in {store.url_root}/{dataset}: materialize mel_latents "
                          f"(its step computes them) or call ensure_statistics")
    return MelStatistics.from_json(store.read_json(path)["statistics"])


def latent_statistics(store: FeatureStore, dataset: str, latent_key: str) -> MelStatistics:
    """The statistics a stored mel_latents key was normalised by (what ``denormalise`` needs)."""
    shards = store.committed_shards(dataset, MEL_LATENT_FEATURE, latent_key)
    if not shards:
        raise ConfigError(f"no committed mel_latents {latent_key} in {store.url_root}/{dataset}")
    params = store.shard_manifest(dataset, MEL_LATENT_FEATURE, latent_key, shards[0])["params"]
    return load_statistics(store, dataset, params["statistics_key"])


def ensure_statistics(store: FeatureStore, manifest, mel_key: str) -> tuple[str, MelStatistics, bool]:
    """(key, statistics, computed): the train split's per-bin statistics of ``mel_key``, read from
    the store when their key (mel key + train-split digest) is there, else computed from the mel
    shards that hold train clips (all of them must be committed) and stored."""
    train = {c.id for c in manifest.clips if c.split == "train"}
    if not train:
        raise ConfigError(f"dataset {manifest.dataset!r} has no train clips: mel statistics come from the train split only")
    digest = split_digest(manifest.clips)
    key = statistics_key(mel_key, digest)
    path = statistics_path(store, manifest.dataset, key)
    if store.exists(path):
        return key, MelStatistics.from_json(store.read_json(path)["statistics"]), False
    shards = sorted(shard for shard, clips in manifest.by_shard().items() if any(c.id in train for c in clips))
    missing = sorted(set(shards) - set(store.committed_shards(manifest.dataset, MEL_FEATURE, mel_key)))
    if missing:
        raise ConfigError(f"mel key {mel_key} lacks {len(missing)} shards with train clips ({', '.join(missing[:3])}): "
                          f"materialize mel_spectrograms first")
    moments, clips = None, 0
    for shard in shards:
        table = store.read_arrays(manifest.dataset, MEL_FEATURE, mel_key, shards=[shard], names=["mel"])
        rows = [i for i, c in enumerate(table.clip_ids) if c in train]
        if rows:
            moments = AxisMoments.add(moments, table.arrays["mel"][rows], axis=1)
            clips += len(rows)
    if moments is None:  # every train clip was quarantined (undecodable, silent, too short)
        raise ConfigError(f"mel key {mel_key} holds none of the {len(train)} train clips of {manifest.dataset!r}")
    statistics = _statistics(moments, clips)
    store.write_json(path, {"key": key, "mel_key": mel_key, "split": "train", "train_digest": digest,
                            "code_version": MEL_STATISTICS_CODE_VERSION, "statistics": statistics.to_json()})
    return key, statistics, True


# ---- the per-shard feature ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MelLatentParams:
    statistics_key: str = ""

    def __post_init__(self) -> None:
        if not self.statistics_key:
            raise ConfigError("mel latents need the key of their mel statistics (ensure_statistics)")

    def params(self) -> dict:
        return asdict(self)

    def key(self, mel_key: str) -> str:
        return feature_key(MEL_LATENT_FEATURE, self.params(), MEL_LATENT_CODE_VERSION, [mel_key])


@register_feature
class MelLatents(ShardFeature):
    name, code_version, params_type = MEL_LATENT_FEATURE, MEL_LATENT_CODE_VERSION, MelLatentParams
    inputs = (MEL_FEATURE,)
    kinds = ("numpy", "zarr")
    description = "Normalised mels (per-bin train-split mean / std) for spectrogram diffusion; denormalise() inverts them."
    sets_threads = False

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Mel latents of one shard from its cached mels and the stored statistics."""
        _, table, quarantined = read_mel_shard(job, store)
        statistics = load_statistics(store, job.dataset, job.params["statistics_key"])
        latents = normalise(table.arrays["mel"], statistics) if len(table) else np.zeros((0, len(statistics.mean), 0), np.float32)
        return ShardOutput(table.clip_ids, {"mel_latent": latents}, quarantined)


compute_mel_latent_shard = registered_feature(MEL_LATENT_FEATURE).compute_shard
