"""CLAP embeddings from a user's local LAION CLAP weights (``transformers.ClapModel``), per shard.

When the configuration points at a folder holding a ``ClapModel`` as LAION ships it (config.json,
model.safetensors, preprocessor_config.json for ``ClapFeatureExtractor``, tokenizer files), the
``clap_embeddings`` feature comes from that model instead of our trained projection heads
(stages.embeddings.heads). Nothing is ever downloaded: every load is ``local_files_only``.

Two places where this module deliberately does not call transformers' CLAP preprocessing as is:

* ``ClapFeatureExtractor.__call__`` with ``truncation="fusion"`` marks one *random* clip of a batch
  as "longer" when none is (a LAION training trick), and a fused model embeds that clip through its
  fusion branch: the same clip gets a different embedding depending on the batch and on numpy's
  global RNG. Clips longer than the model's window are cropped at random positions too. Stored
  features must be a function of the clip, so ``is_longer`` is what is true of the clip, and the
  crops of a longer clip are taken deterministically (the middle of each third, a centred crop for
  ``rand_trunc``).
* The truncation mode follows the model, not the preprocessor config: a fused model needs the
  4-channel "fusion" input, an unfused one the 1-channel "rand_trunc" input (4 channels crash it).

Usable without Dagster::

    from stages.embeddings.pretrained_clap import load_pretrained_clap
    clap = load_pretrained_clap("/models/clap-htsat-unfused")
    clap.embed_text(["a dog barking"])            # [1, 512], L2-normalised
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from stages.embeddings.heads import CLAP_FEATURE
from stages.ingest.decode import AudioSpec, ClipError, ClipLength, load_audio
from stages.core.errors import ConfigError
from stages.features.base import ShardFeature, ShardJob, ShardOutput, content_hash_meta, register_feature, registered_feature
from stages.core.store import feature_key

# Bump when this code changes the numbers it stores (preprocessing, pooling, normalisation).
PRETRAINED_CLAP_CODE_VERSION = "1"
# LAION-CLAP tokenises captions to at most 77 tokens (training and its own inference code).
TEXT_MAX_TOKENS = 77
DEFAULT_BATCH_SIZE = 16

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Either a tokenizers JSON or the slow (GPT-2 style BPE) pair; the rest is optional.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class PretrainedClapError(ConfigError):
    """The pretrained CLAP folder cannot be used; ``str(err)`` is one line naming the folder."""


# ---------------------------------------------------------------------------------- the folder


def _folder_files(model_dir: str) -> tuple[str, list[str]]:
    """(absolute folder, weight files) after checking that everything a ClapModel needs is there."""
    path = os.path.abspath(os.path.expanduser(str(model_dir)))
    if not os.path.exists(path):
        raise PretrainedClapError(f"pretrained CLAP folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise PretrainedClapError(f"pretrained CLAP folder {path!r} is not a directory")
    present = set(os.listdir(path))
    missing: list[str] = []
    if CONFIG_FILE not in present:
        missing.append(CONFIG_FILE)
    weights: list[str] = []
    if WEIGHTS_FILE in present:
        weights = [WEIGHTS_FILE]
    elif WEIGHTS_INDEX_FILE in present:
        try:
            with open(os.path.join(path, WEIGHTS_INDEX_FILE), encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PretrainedClapError(
                f"pretrained CLAP folder {path!r}: unreadable {WEIGHTS_INDEX_FILE} ({_one_line(exc)})"
            ) from None
        absent = [name for name in shards if name not in present]
        if absent:
            missing.append(f"weight shard(s) {', '.join(absent)} listed in {WEIGHTS_INDEX_FILE}")
        weights = [WEIGHTS_INDEX_FILE, *shards]
    elif present & set(PICKLE_WEIGHTS):
        # Pickled checkpoints run code when loaded; this project never loads them.
        missing.append(f"{WEIGHTS_FILE} (found only pickled pytorch_model.bin weights; convert them to safetensors)")
    else:
        missing.append(WEIGHTS_FILE)
    if PREPROCESSOR_FILE not in present:
        missing.append(f"{PREPROCESSOR_FILE} (ClapFeatureExtractor)")
    if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= present:
        missing.append("tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    if missing:
        raise PretrainedClapError(f"pretrained CLAP folder {path!r} is missing {'; '.join(missing)}")
    return path, weights


def _read_json(path: str, name: str) -> dict:
    try:
        with open(os.path.join(path, name), encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as exc:
        raise PretrainedClapError(f"pretrained CLAP folder {path!r}: unreadable {name} ({_one_line(exc)})") from None
    if not isinstance(value, dict):
        raise PretrainedClapError(f"pretrained CLAP folder {path!r}: {name} is not a JSON object")
    return value


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: str) -> tuple:
    """Names, sizes and mtimes of the folder's files: changes whenever a file is replaced."""
    entries = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            info = os.stat(full)
            entries.append((name, info.st_size, info.st_mtime_ns))
    return tuple(entries)


def _transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


@lru_cache(maxsize=8)
def _settings_cached(path: str, stamp: tuple) -> dict:
    _, weights = _folder_files(path)
    config = _read_json(path, CONFIG_FILE)
    if config.get("model_type") != "clap":
        raise PretrainedClapError(
            f"pretrained CLAP folder {path!r}: config.json has model_type {config.get('model_type')!r}, not 'clap'"
        )
    audio_config = config.get("audio_config") or {}
    other = [n for n in (CONFIG_FILE, PREPROCESSOR_FILE, *TOKENIZER_FILES) if os.path.isfile(os.path.join(path, n))]
    return {
        "model": os.path.basename(path),
        "weights_sha256": {name: _sha256(os.path.join(path, name)) for name in weights},
        # The preprocessing and the tokenizer shape the numbers as much as the weights do.
        "files_sha256": {name: _sha256(os.path.join(path, name)) for name in other},
        "projection_dim": int(config.get("projection_dim", 512)),
        "audio_mode": "fusion" if audio_config.get("enable_fusion") else "rand_trunc",
        "text_max_tokens": TEXT_MAX_TOKENS,
        "transformers": _transformers_version(),
    }


def pretrained_clap_settings(model_dir: str) -> dict:
    """What identifies the model's numbers, for the feature key, read from the files alone.

    The folder's basename, the sha256 of its weight file(s) and of its config, preprocessor and
    tokenizer files, the projection dim, the audio mode and the transformers version. Not the
    folder's absolute path: the same files elsewhere give the same key. Hashes are cached per
    process until a file's size or mtime changes.
    """
    path, _ = _folder_files(model_dir)
    return dict(_settings_cached(path, _stamp(path)))


# ---------------------------------------------------------------------------------- the model


class PretrainedClap:
    """A local ``transformers.ClapModel`` with its feature extractor and tokenizer, in eval mode."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        path, _ = _folder_files(model_dir)
        self.model_dir = path
        self.device = device
        self._settings = pretrained_clap_settings(path)
        try:
            import torch
            from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

            # disable_mmap: on CPU the loaded tensors otherwise stay backed by the mmap'd file, and a
            # weight file overwritten in place silently changes a model already in memory.
            model, info = ClapModel.from_pretrained(
                path, local_files_only=True, use_safetensors=True, dtype=torch.float32, disable_mmap=True,
                output_loading_info=True,
            )
            self.feature_extractor = ClapFeatureExtractor.from_pretrained(path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except PretrainedClapError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers raises many types; the caller needs one line
            raise PretrainedClapError(f"cannot load pretrained CLAP from {path!r}: {_one_line(exc)}") from None
        # from_pretrained initialises absent weights at random and only warns: refuse instead.
        broken = sorted(info.get("missing_keys") or []) + sorted(str(k[0]) for k in info.get("mismatched_keys") or [])
        if broken:
            shown = ", ".join(broken[:3]) + (f" (+{len(broken) - 3} more)" if len(broken) > 3 else "")
            raise PretrainedClapError(
                f"pretrained CLAP folder {path!r}: {WEIGHTS_FILE} lacks or mis-shapes {len(broken)} weight(s): {shown}"
            )
        self.model = model.to(device).eval()
        audio_config = model.config.audio_config
        self.fusion = bool(audio_config.enable_fusion)
        fe = self.feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self.dim = int(model.config.projection_dim)
        self.max_samples = int(fe.nb_max_samples)  # the model's window (max_length_s * sample_rate)
        if int(fe.feature_size) != int(audio_config.num_mel_bins):
            raise PretrainedClapError(
                f"pretrained CLAP folder {path!r}: feature extractor makes {fe.feature_size} mel bins, "
                f"the audio model expects {audio_config.num_mel_bins}"
            )
        text_config = model.config.text_config
        # RoBERTa positions start after the padding index: max_position_embeddings - pad - 1 tokens fit.
        fit = int(text_config.max_position_embeddings) - int(text_config.pad_token_id or 0) - 1
        self.max_tokens = min(TEXT_MAX_TOKENS, fit, int(getattr(self.tokenizer, "model_max_length", fit) or fit))
        self._lock = threading.Lock()  # one forward at a time per model (Dask threads share it)

    def __repr__(self) -> str:
        return f"PretrainedClap({self.model_dir!r}, device={self.device!r}, dim={self.dim}, sample_rate={self.sample_rate})"

    def settings(self) -> dict:
        """For the feature key: see ``pretrained_clap_settings`` (the files as they were loaded)."""
        return dict(self._settings)

    # ---- audio ----------------------------------------------------------------------------
    def audio_inputs(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs (input_features [B, C, T, mels], is_longer [B, 1]) for mono audio [B, L].

        Short clips go through ``ClapFeatureExtractor.__call__`` (its padding mode, its mel
        filters); ``is_longer`` is then set to what is true of each clip. Clips longer than the
        model's window are cropped deterministically (see the module docstring).
        """
        audio = _check_audio(audio)
        mode = "fusion" if self.fusion else "rand_trunc"
        fe = self.feature_extractor
        length = audio.shape[1]
        if length <= self.max_samples:
            out = fe(list(audio), truncation=mode, sampling_rate=self.sample_rate, return_tensors="np")
            features = np.asarray(out["input_features"], np.float32)
            return features, np.zeros((len(audio), 1), bool)
        if not self.fusion:
            start = (length - self.max_samples) // 2  # a centred crop instead of a random one
            crop = [clip[start : start + self.max_samples] for clip in audio]
            out = fe(crop, truncation=mode, sampling_rate=self.sample_rate, return_tensors="np")
            return np.asarray(out["input_features"], np.float32), np.ones((len(audio), 1), bool)
        features, longer = zip(*(self._fusion_mel(clip) for clip in audio))
        return np.stack(features).astype(np.float32), np.array(longer, bool)[:, None]

    def _fusion_mel(self, clip: np.ndarray) -> tuple[np.ndarray, bool]:
        """ClapFeatureExtractor's fusion input for a clip longer than the window, without randomness:
        the whole mel shrunk to the window, then one window from the middle of each third."""
        import torch

        fe = self.feature_extractor
        # With max_length = the clip's length nothing is padded or cut: channel 0 is the whole mel.
        whole = fe(clip, truncation="fusion", max_length=len(clip), sampling_rate=self.sample_rate, return_tensors="np")
        mel = np.asarray(whole["input_features"][0][0], np.float64)  # [frames, mels]
        chunk = self.max_samples // int(fe.hop_length) + 1
        total = mel.shape[0]
        if total == chunk:  # longer than the window by less than one hop: the extractor uses it whole
            return np.stack([mel] * 4), False
        ranges = np.array_split(np.arange(0, total - chunk + 1), 3)
        starts = [int(r[len(r) // 2]) if len(r) else 0 for r in ranges]
        shrunk = torch.nn.functional.interpolate(
            torch.from_numpy(mel)[None, None], size=[chunk, mel.shape[1]], mode="bilinear", align_corners=False
        )[0, 0].numpy()
        return np.stack([shrunk] + [mel[s : s + chunk] for s in starts]), True

    def embed_audio(self, audio: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """float32 [B, L] mono at ``sample_rate`` -> [B, dim] float32, L2-normalised."""
        import torch

        audio = _check_audio(audio)
        step = max(1, int(batch_size))
        parts = []
        for begin in range(0, len(audio), step):
            features, longer = self.audio_inputs(audio[begin : begin + step])
            with self._lock, torch.inference_mode():
                out = self.model.get_audio_features(
                    input_features=torch.from_numpy(features).to(self.device),
                    is_longer=torch.from_numpy(longer).to(self.device),
                )
            parts.append(_pooled(out))
        return _normalised(parts, self.dim)

    # ---- text -----------------------------------------------------------------------------
    def embed_text(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """[B] strings -> [B, dim] float32, L2-normalised (at most ``max_tokens`` tokens each)."""
        import torch

        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of strings, not one string")
        texts = [str(t) for t in texts]
        step = max(1, int(batch_size))
        parts = []
        for begin in range(0, len(texts), step):
            tokens = self.tokenizer(
                texts[begin : begin + step],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            with self._lock, torch.inference_mode():
                out = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            parts.append(_pooled(out))
        return _normalised(parts, self.dim)


def _check_audio(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2:
        raise ValueError(f"audio must be mono float32 [batch, samples], got shape {audio.shape}")
    if audio.shape[0] and audio.shape[1] == 0:
        raise ValueError("audio has no samples")
    return audio


def _pooled(out: Any) -> np.ndarray:
    """get_*_features returns a tensor in transformers 4.x; in 5.x a BaseModelOutputWithPooling whose
    pooler_output holds the projected, already normalised embedding (not the tower's pooled
    state, as the name suggests). Accept both; the caller normalises again."""
    tensor = out if hasattr(out, "detach") else out.pooler_output
    return tensor.detach().float().cpu().numpy()


def _normalised(parts: list[np.ndarray], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dim), np.float32)
    vectors = np.concatenate(parts).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@lru_cache(maxsize=2)
def _load_cached(path: str, device: str, stamp: tuple) -> PretrainedClap:
    return PretrainedClap(path, device)


def load_pretrained_clap(model_dir: str, device: str = "cpu") -> PretrainedClap:
    """A PretrainedClap cached per process (loading is slow); replaced files are loaded again."""
    path, _ = _folder_files(model_dir)
    return _load_cached(path, str(device), _stamp(path))


# ---------------------------------------------------------------------------------- the feature


@dataclass(frozen=True)
class PretrainedClapParams:
    """What a ``clap_embeddings`` run from a local LAION CLAP folder computes.

    ``seconds`` of audio per clip at the model's sample rate (LAION: 48 kHz, a 10 s window; longer
    clips are fused/cropped deterministically, shorter ones padded by the feature extractor's own
    mode after ``fit``). ``fit="tile"`` repeats a short clip like LAION's "repeatpad".
    ``batch_size`` does not change the numbers and stays out of the key, as does the folder's
    absolute path (its basename and file hashes are in it).
    """

    model_dir: str
    # Clip length (ClipLength): LAION's 10 s window and "repeatpad"; the floor and crop are the shared defaults.
    seconds: float = 10.0
    min_seconds: float = ClipLength.min_seconds
    fit: str = "tile"
    silence_dbfs: float = -60.0
    batch_size: int = DEFAULT_BATCH_SIZE
    crop: str = ClipLength.crop

    def __post_init__(self) -> None:
        self.clip_length()  # validates seconds, min_seconds, fit, crop
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_params(cls, params: dict) -> "PretrainedClapParams":
        """From a job's params (the "model" settings and other extra entries are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def clip_length(self) -> ClipLength:
        return ClipLength(self.seconds, self.min_seconds, self.fit, self.crop)

    def params(self) -> dict:
        """The shard jobs' params: these fields plus "model" (pretrained_clap_settings)."""
        own = {k: v for k, v in asdict(self).items() if k not in ("seconds", "min_seconds", "fit", "crop")}
        return {**own, **self.clip_length().key_params(), "model": pretrained_clap_settings(self.model_dir)}

    def key(self) -> str:
        params = {k: v for k, v in self.params().items() if k not in ("model_dir", "batch_size")}
        return feature_key(CLAP_FEATURE, {**params, "source": "transformers.ClapModel"}, PRETRAINED_CLAP_CODE_VERSION)

    def audio_spec(self, sample_rate: int) -> AudioSpec:
        return AudioSpec.of(self.clip_length(), sample_rate, self.silence_dbfs)


@register_feature
class PretrainedClapEmbeddings(ShardFeature):
    """``clap_embeddings`` from a local LAION CLAP folder instead of our trained head."""

    name, variant, code_version, params_type = CLAP_FEATURE, "pretrained", PRETRAINED_CLAP_CODE_VERSION, PretrainedClapParams
    group, kinds = "embeddings", ("pytorch",)
    description = "CLAP audio and caption embeddings from a local transformers ClapModel folder."

    def extract(self, job: ShardJob, store) -> ShardOutput:
        """Decode every clip at the model's rate, embed audio and caption with the local CLAP model.

        ``job.params``: ``PretrainedClapParams.params()`` (model_dir, seconds, min_seconds, fit,
        silence_dbfs, batch_size, model). When "model" is present the loaded files must still match
        it, else the shard would be stored under a key computed for other weights. A clip whose audio
        is unusable is quarantined with the decoder's reason; one without caption or label with
        "no caption or label". Writes "audio" and "text", [N, dim] float32, L2-normalised.
        """
        params = PretrainedClapParams.from_params(job.params)
        clap = load_pretrained_clap(params.model_dir, job.device)
        expected = job.params.get("model")
        if expected is not None and _plain(expected) != _plain(clap.settings()):
            raise PretrainedClapError(
                f"pretrained CLAP folder {clap.model_dir!r} changed since its feature key was computed; compute the key again"
            )
        spec = params.audio_spec(clap.sample_rate)
        texts = list(job.texts)
        ok_ids, hashes, audio, captions, quarantined = [], [], [], [], []
        for row, (clip_id, uri, digest) in enumerate(job.clips):
            try:
                samples = load_audio(uri, spec, job.storage_options, job.span(row))
            except ClipError as exc:
                quarantined.append({"id": clip_id, "reason": str(exc)})
                continue
            text = texts[row] if row < len(texts) and texts[row] is not None else ""
            if not str(text).strip():
                quarantined.append({"id": clip_id, "reason": "no caption or label"})
                continue
            ok_ids.append(clip_id)
            hashes.append(digest)
            audio.append(samples)
            captions.append(str(text))
        if audio:
            audio_vectors = clap.embed_audio(np.stack(audio), params.batch_size)
            text_vectors = clap.embed_text(captions, params.batch_size)
        else:
            audio_vectors = text_vectors = np.zeros((0, clap.dim), np.float32)
        return ShardOutput(ok_ids, {"audio": audio_vectors, "text": text_vectors}, quarantined,
                           sample_meta=content_hash_meta(hashes))


compute_pretrained_clap_shard = registered_feature(f"{CLAP_FEATURE}:pretrained").compute_shard


def _plain(value: Any) -> Any:
    """JSON round trip, so settings compare equal after a job's params went through JSON."""
    return json.loads(json.dumps(value, sort_keys=True))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
