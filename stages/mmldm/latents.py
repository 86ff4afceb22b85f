"""``mmldm_latents``: every clip's MM-LDM posterior, per shard, cached like every feature.

    audio_mean [N, C, h_a, w_a]   z_a's posterior mean (the autoencoder's audio encoder)
    audio_std  [N, C, h_a, w_a]   its std
    video_mean [N, C, h_v, w_v]   z_v's posterior mean: the whole clip's frames in one latent
    video_std  [N, C, h_v, w_v]

computed from the shard's ``vae_latents`` (the KL-VAE posterior means) with the autoencoder named
in the params. Key = hash(params, code version, [autoencoder key, vae_latents key]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from stages.core.errors import ConfigError
from stages.core.parallel import torch_threads
from stages.core.store import feature_key
from stages.features.base import ShardFeature, ShardJob, ShardOutput, register_feature, registered_feature

MMLDM_LATENT_FEATURE = "mmldm_latents"
MMLDM_LATENT_CODE_VERSION = "1"


@dataclass(frozen=True)
class MmldmLatentParams:
    autoencoder_key: str = ""
    dtype: str = "float32"
    batch_size: int = 16  # speed only

    def __post_init__(self) -> None:
        if not self.autoencoder_key:
            raise ConfigError("mmldm_latents need the key of their autoencoder (mmldm_autoencoder)")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be 'float16' or 'float32', got {self.dtype!r}")

    def params(self) -> dict:
        return asdict(self)

    def key(self, vae_latent_key: str) -> str:
        keyed = {k: v for k, v in self.params().items() if k != "batch_size"}
        return feature_key(MMLDM_LATENT_FEATURE, keyed, MMLDM_LATENT_CODE_VERSION, [self.autoencoder_key, vae_latent_key])


_MODELS: dict = {}  # (store root, dataset, key, device) -> autoencoder: loaded once per worker process


@register_feature
class MmldmLatents(ShardFeature):
    name, code_version, params_type = MMLDM_LATENT_FEATURE, MMLDM_LATENT_CODE_VERSION, MmldmLatentParams
    inputs = ("vae_latents",)
    group, kinds = "mmldm", ("pytorch",)
    description = "MM-LDM posterior (mean, std) of z_a (audio) and z_v (the clip's video) from the KL-VAE latents."
    sets_threads = False

    def extract(self, job: ShardJob, store) -> ShardOutput:
        import torch
        from stages.features.latents import LATENT_FEATURE, read_latent_means
        from stages.mmldm.train import encode_posteriors, load_autoencoder

        params = job.params
        vae_key = job.input_keys[-1]
        manifest = store.shard_manifest(job.dataset, LATENT_FEATURE, vae_key, job.shard)
        reasons = {e["id"]: f"vae_latents: {e['reason']}" for e in manifest.get("quarantined", [])}
        table = read_latent_means(store, job.dataset, vae_key, ["audio", "frames"], shards=[job.shard])
        rows = {c: i for i, c in enumerate(table.clip_ids)}
        ids = [c for c, _, _ in job.clips if c in rows]
        quarantined = [{"id": c, "reason": reasons.get(c, "no vae_latents row")} for c, _, _ in job.clips if c not in rows]
        cache_key = (store.url_root, job.dataset, params["autoencoder_key"], job.device)
        if cache_key not in _MODELS:
            _MODELS.clear()
            _MODELS[cache_key] = load_autoencoder(store, job.dataset, params["autoencoder_key"], job.device)[0]
        model = _MODELS[cache_key]
        with torch_threads(job.worker_threads or torch.get_num_threads()):
            order = [rows[c] for c in ids]
            out = encode_posteriors(model, table.arrays["audio"][order], table.arrays["frames"][order], params["batch_size"], job.device)
        if not ids:
            c = model.config
            out = {f"{m}_{s}": np.zeros((0, *shape), np.float32) for m, shape in (("audio", c.audio_latent_shape), ("video", c.video_latent_shape))
                   for s in ("mean", "std")}
        return ShardOutput(ids, {k: v.astype(params["dtype"]) for k, v in out.items()}, quarantined)


compute_mmldm_latent_shard = registered_feature(MMLDM_LATENT_FEATURE).compute_shard
