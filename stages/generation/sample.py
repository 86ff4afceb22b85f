"""Generation: DiffGAP bridge -> latent diffusion -> VAE decode -> audio image -> mel -> vocoder -> WAV.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from stages.embeddings.heads import CAVP_FEATURE, CAVP_HEAD, CLAP_FEATURE, CLAP_HEAD
from stages.core.parallel import torch_threads
from stages.core.store import FeatureStore

if TYPE_CHECKING:
    from models.generator import LatentGenerator


# ---- generation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50
    guidance_scale: float = 3.0
    sampler: str = "ddim"
    seed: int = 0
    diffgap_steps: int = 50
    diffgap_samples: int = 16  # as in DiffGAP retrieval: the mean of 16 samples sits far closer to the real embedding than 1-4
    vocoder: str = "hifigan"  # or "griffinlim" (fast, low quality; for tests and previews)
    griffinlim_iters: int = 16
    threads: int = 2

    def params(self) -> dict:
        return asdict(self)


def bridge(diffgap_model, condition: np.ndarray, config: SampleConfig) -> np.ndarray:
    """DiffGAP: text / video embeddings -> generated audio-space embeddings (unit norm)."""
    from models.diffgap import TO_AUDIO
    from stages.diffgap.evaluate import generate

    return generate(diffgap_model, np.asarray(condition, np.float32), TO_AUDIO, steps=config.diffgap_steps,
                    samples=config.diffgap_samples, seed=config.seed)


def make_vocoder(config: SampleConfig, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """log-mels [B, 80, T] (hifigan22k) -> waveforms [B, 256 T] at 22.05 kHz."""
    if config.vocoder == "hifigan":
        from models.vocoder import get_vocoder

        return get_vocoder(device)
    if config.vocoder == "griffinlim":
        return lambda mels: griffinlim(mels, config.griffinlim_iters)
    raise ValueError(f"vocoder must be 'hifigan' or 'griffinlim', got {config.vocoder!r}")


def griffinlim(mels: np.ndarray, n_iter: int = 16) -> np.ndarray:
    """A cheap vocoder: librosa mel inversion + Griffin-Lim of hifigan22k log-mels."""
    import librosa

    from stages.features.spectral import get_preset

    p = get_preset("hifigan22k")
    out = []
    for mel in np.asarray(mels, np.float32):
        wave = librosa.feature.inverse.mel_to_audio(np.exp(mel), sr=p.sample_rate, n_fft=p.n_fft, hop_length=p.hop_length,
                                                    power=1.0, fmin=p.fmin, fmax=p.fmax, n_iter=n_iter, htk=False, norm="slaney")
        wave = np.pad(wave, (0, max(0, mel.shape[-1] * p.hop_length - len(wave))))[: mel.shape[-1] * p.hop_length]
        out.append(np.clip(wave, -1, 1).astype(np.float32))
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class Decoder:
    """VAE + vocoder of one latent key: scaled latents -> images, mels, waveforms."""

    vae: object
    scaling_factor: float
    preset: str
    seconds: float
    vocoder: Callable[[np.ndarray], np.ndarray]

    @property
    def sample_rate(self) -> int:
        from stages.generation.vocode import check_vocoder_preset

        return check_vocoder_preset(self.preset).sample_rate

    def __call__(self, latents: np.ndarray) -> dict[str, np.ndarray]:
        from stages.vae.train import decode_latents
        from stages.generation.vocode import check_vocoder_preset, images_to_mels

        p = check_vocoder_preset(self.preset)
        images = decode_latents(self.vae, np.asarray(latents, np.float32), self.scaling_factor)
        mels = images_to_mels(images, p, self.seconds)
        return {"images": images, "mels": mels, "audio": self.vocoder(mels)}


def make_decoder(store: FeatureStore, dataset: str, audio_vae: Mapping, config: SampleConfig, device: str = "cpu") -> Decoder:
    from stages.vae.train import load_vae

    vae, sidecar = load_vae(store, dataset, audio_vae["name"], audio_vae["key"], device)
    return Decoder(vae, float(audio_vae["scaling_factor"]), sidecar.get("mel_preset", "hifigan22k"),
                   float(sidecar.get("mel_seconds", 4.0)), make_vocoder(config, device))


def generate_latents(model: LatentGenerator, condition: np.ndarray, config: SampleConfig, seed_offset: int = 0) -> np.ndarray:
    import torch
    from models.generator import sample_latents

    with torch_threads(config.threads):
        generator = torch.Generator().manual_seed(config.seed * 1000003 + seed_offset)
        return sample_latents(model, torch.from_numpy(np.asarray(condition, np.float32)), steps=config.steps,
                              guidance_scale=config.guidance_scale, sampler=config.sampler, generator=generator).numpy()


def generate(model: LatentGenerator, decoder: Decoder, condition: np.ndarray, config: SampleConfig,
             diffgap_model=None) -> dict[str, np.ndarray]:
    """condition [B, d] (text / video embeddings) -> optionally DiffGAP -> latents -> audio."""
    cond = bridge(diffgap_model, condition, config) if diffgap_model is not None else np.asarray(condition, np.float32)
    latents = generate_latents(model, cond, config)
    with torch_threads(config.threads):
        out = decoder(latents)
    return {"condition": cond, "latents": latents, **out}


def text_condition(store: FeatureStore, dataset: str, embedding_key: str, texts: Sequence[str], device: str = "cpu") -> np.ndarray:
    """CLAP text embeddings of free text with the head behind a clap_embeddings key (text tower + head)."""
    import torch

    from models.towers import TextTower, get_tower
    from stages.embeddings.heads import load_head

    shards = store.committed_shards(dataset, CLAP_FEATURE, embedding_key)
    params = store.shard_manifest(dataset, CLAP_FEATURE, embedding_key, shards[0])["params"] if shards else {}
    if not params.get("head_key"):
        raise ValueError(f"clap_embeddings key {embedding_key} was not made by a trained CLAP head: free text needs one")
    head = load_head(store, dataset, CLAP_HEAD, params["head_key"])
    tokens = get_tower(TextTower, device).encode(list(texts))
    with torch.no_grad():
        return head.embed_text(torch.from_numpy(np.asarray(tokens, np.float32))).numpy()


def cavp_audio_head(store: FeatureStore, dataset: str, embedding_key: str):
    """The CAVP head behind a cavp_embeddings key (to embed generated audio per second), or None."""
    from stages.embeddings.heads import load_head

    shards = store.committed_shards(dataset, CAVP_FEATURE, embedding_key)
    params = store.shard_manifest(dataset, CAVP_FEATURE, embedding_key, shards[0])["params"] if shards else {}
    return load_head(store, dataset, CAVP_HEAD, params["head_key"]) if params.get("head_key") else None


def write_wav(store: FeatureStore, path: str, audio: np.ndarray, rate: int = 22050) -> str:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, np.float32), rate, format="WAV", subtype="PCM_16")
    store.write_bytes(path, buffer.getvalue())
    return store.url(path)
