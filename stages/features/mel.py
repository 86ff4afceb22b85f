"""Log-mel spectrograms of decoded audio and MM-LDM audio images of the cached mels, per shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from stages.ingest.decode import AudioSpec, ClipLength, DecodeAhead, DecodedAhead, load_audio
from stages.features.spectral import STFT_SUB_BATCH, MelSpectrogram, get_preset, mel_to_audio_image
from stages.core.store import FeatureTable, feature_key
from stages.core.errors import ConfigError
from stages.features.base import (ShardFeature, ShardJob, ShardOutput, content_hash_meta, iter_decoded, register_feature,
                                  registered_feature)


MEL_FEATURE = "mel_spectrograms"
AUDIO_IMAGE_FEATURE = "audio_images"
# Bump when the code changes the numbers it stores: the key changes and old caches stay valid.
MEL_CODE_VERSION = "1"
AUDIO_IMAGE_CODE_VERSION = "1"


@dataclass(frozen=True)
class MelParams:
    preset: str = "hifigan22k"
    # Clip length: ClipLength's fields and defaults (one setting for every feature that decodes audio).
    seconds: float = ClipLength.seconds
    min_seconds: float = ClipLength.min_seconds
    fit: str = ClipLength.fit
    silence_dbfs: float = -60.0
    dtype: str = "float16"  # log-mel error <= 0.004 against float32, half the bytes
    crop: str = ClipLength.crop

    def __post_init__(self) -> None:
        get_preset(self.preset)
        self.clip_length()  # validates seconds, min_seconds, fit, crop
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be 'float16' or 'float32', got {self.dtype!r}")

    def clip_length(self) -> ClipLength:
        return ClipLength(self.seconds, self.min_seconds, self.fit, self.crop)

    @classmethod
    def from_params(cls, params: dict) -> "MelParams":
        return cls(**{k: v for k, v in params.items() if k != "preset_values"})

    def params(self) -> dict:
        # The preset's values, not only its name, go into the key: editing a preset re-keys.
        own = {k: v for k, v in asdict(self).items() if k not in ("seconds", "min_seconds", "fit", "crop")}
        return {**own, **self.clip_length().key_params(), "preset_values": get_preset(self.preset).params()}

    def key(self) -> str:
        return feature_key(MEL_FEATURE, self.params(), MEL_CODE_VERSION)

    def audio_spec(self) -> AudioSpec:
        return AudioSpec.of(self.clip_length(), get_preset(self.preset).sample_rate, self.silence_dbfs)


# Named audio image shapes (height, width). "frame64" is the demo's video frame size (MM-LDM resizes
# audio images to it); it keeps a third of what aiSFX recognises in a 4 s hifigan22k mel
# (BENCHMARKS.md, "Decode-path ceiling"). The mel shapes keep the mel's own time axis: 345
# frames of 4 s hifigan22k resized to 352, a multiple of 16, so the audio VAE's 3 levels (4x) give
# 20 x 88 latents (an 8x VAE: 10 x 44) whose sides the generator's UNet can halve again.
AUDIO_IMAGE_SHAPES: dict[str, tuple[int, int]] = {
    "frame64": (64, 64),
    "square128": (128, 128),
    "square256": (256, 256),
    "mel80": (80, 352),  # n_mels x frames: no vertical resize
    "mel160": (160, 352),  # 2x height
}
# The one place the default shape is written (the asset config reads it from here).
DEFAULT_AUDIO_IMAGE_SHAPE = "mel80"


@dataclass(frozen=True)
class AudioImageParams:
    """Audio image height x width: ``shape`` names a preset of AUDIO_IMAGE_SHAPES; ``size`` (a
    square side, as MM-LDM's frame size) or ``height`` and ``width``, when given, take its place.
    After construction ``height`` and ``width`` hold the image's sides whichever way they were given."""

    shape: str = DEFAULT_AUDIO_IMAGE_SHAPE
    size: int | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.shape not in AUDIO_IMAGE_SHAPES:
            raise ConfigError(f"unknown audio image shape {self.shape!r}: choose one of {', '.join(AUDIO_IMAGE_SHAPES)}")
        given = []
        if self.size is not None:
            if not 8 <= self.size <= 1024:
                raise ConfigError(f"audio image size must be within 8..1024, got {self.size}")
            given.append((int(self.size), int(self.size)))
        if self.height is not None or self.width is not None:
            if self.height is None or self.width is None:
                raise ConfigError("give both the audio image height and width (or a size, or a shape)")
            given.append((int(self.height), int(self.width)))
        preset = AUDIO_IMAGE_SHAPES[self.shape]
        # A shape other than the default, given with sides, must agree with them (the default
        # shape cannot be told from an unset one, so sides simply replace it).
        if self.shape != DEFAULT_AUDIO_IMAGE_SHAPE:
            given.append(preset)
        if len(set(given)) > 1:
            described = " vs ".join(f"{h} x {w}" for h, w in dict.fromkeys(given))
            raise ConfigError(f"the audio image shape, size and height x width disagree ({described}): give one of them")
        height, width = given[0] if given else preset
        if not (8 <= height <= 1024 and 8 <= width <= 1024):
            raise ConfigError(f"audio image sides must be within 8..1024, got {height} x {width}")
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "width", width)

    def params(self) -> dict:
        # Only the sides are keyed (not how they were named); a square keeps the params, and so the
        # key, it had before non-square shapes existed.
        return {"size": self.height} if self.height == self.width else {"height": self.height, "width": self.width}

    @classmethod
    def from_params(cls, params: dict) -> "AudioImageParams":
        """The params of a stored key (``params()``) back: ``{"size"}`` or ``{"height", "width"}``."""
        if "size" in params:
            return cls(size=int(params["size"]))
        return cls(height=int(params["height"]), width=int(params["width"]))

    def key(self, mel_key: str) -> str:
        return feature_key(AUDIO_IMAGE_FEATURE, self.params(), AUDIO_IMAGE_CODE_VERSION, [mel_key])


@register_feature
class MelSpectrograms(ShardFeature):
    name, code_version, params_type = MEL_FEATURE, MEL_CODE_VERSION, MelParams
    kinds = ("numpy", "zarr")
    description = "Log-mel spectrograms of every clip, per shard, from a named preset (hifigan22k by default)."
    # Clips decoded ahead on a thread while the STFT runs on earlier ones (not part of the key).
    decode_ahead: DecodeAhead = DecodeAhead()

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Decode every clip of the shard (bad ones quarantined), batched log-mel."""
        params = MelParams.from_params(job.params)
        spec = params.audio_spec()
        preset = get_preset(params.preset)
        extractor = MelSpectrogram(preset, job.device)
        ok_ids, hashes, quarantined, mel_parts, pending = [], [], [], [], []
        decode = lambda uri, span: load_audio(uri, spec, job.storage_options, span)  # noqa: E731
        with DecodedAhead.of_shard(decode, job, self.decode_ahead) as decode_next:
            for clip_id, digest, decoded in iter_decoded(job, decode_next, quarantined):
                ok_ids.append(clip_id)
                hashes.append(digest)
                pending.append(decoded)
                if len(pending) == STFT_SUB_BATCH:
                    mel_parts.append(extractor(np.stack(pending)).astype(params.dtype))
                    pending = []
        if pending:
            mel_parts.append(extractor(np.stack(pending)).astype(params.dtype))
        if mel_parts:
            mels = np.concatenate(mel_parts)
        else:
            mels = np.zeros((0, preset.n_mels, preset.n_frames(params.seconds)), params.dtype)
        return ShardOutput(ok_ids, {"mel": mels}, quarantined, sample_meta=content_hash_meta(hashes))


def read_mel_shard(job: ShardJob, store) -> tuple[dict, FeatureTable, list[dict]]:
    """(shard manifest, mel rows, quarantine) of the cached mels a derived feature's job reads (its
    one input key): the derived rows are the mel rows, quarantined with the same reasons."""
    (mel_key,) = job.input_keys
    mel_manifest = store.shard_manifest(job.dataset, MEL_FEATURE, mel_key, job.shard)
    table = store.read_arrays(job.dataset, MEL_FEATURE, mel_key, shards=[job.shard], names=["mel"])
    return mel_manifest, table, list(mel_manifest.get("quarantined", []))


@register_feature
class AudioImages(ShardFeature):
    name, code_version, params_type = AUDIO_IMAGE_FEATURE, AUDIO_IMAGE_CODE_VERSION, AudioImageParams
    inputs = (MEL_FEATURE,)
    kinds = ("numpy", "zarr")
    description = "MM-LDM audio images: normalised mel -> grayscale -> RGB -> resize, from the cached mels."
    sets_threads = False

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Audio images of one shard from its cached mels (no decoding)."""
        mel_manifest, table, quarantined = read_mel_shard(job, store)
        preset = get_preset(mel_manifest["params"]["preset"])
        image = AudioImageParams.from_params(job.params)
        if len(table):
            images = mel_to_audio_image(table.arrays["mel"].astype(np.float32), preset, (image.height, image.width))
        else:
            images = np.zeros((0, image.height, image.width, 3), np.uint8)
        return ShardOutput(table.clip_ids, {"image": images}, quarantined, tar_encodings={"image": "png"})


compute_mel_shard = registered_feature(MEL_FEATURE).compute_shard
compute_audio_image_shard = registered_feature(AUDIO_IMAGE_FEATURE).compute_shard
