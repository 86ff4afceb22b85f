"""Where the models train and sample: host-to-device copies and training rows on cpu or cuda[:n].

One rule keeps the CPU numbers what they were and makes a CUDA run comparable with a CPU run: every
random draw (batch rows, noise, timesteps, dropout masks of the diffusion losses) is made on the host
from the same seeded generators as before, and only then copied to the device. On CPU every helper
here returns its input unchanged (no copy, no new dtype), so a CPU fit is bit-for-bit the fit it was.

On CUDA, copies come from pinned (page-locked) host memory with ``non_blocking=True``: the host goes
on drawing the next batch while the device computes, and ``DeviceRows.prefetch`` copies batch k+1 on a
side stream while the device computes batch k. Training arrays that fit in a share of the free device
memory are copied once and indexed on the device; larger ones stay on the host (pinned) and only each
batch travels. Training batch sizes are part of a model's key and stay as configured; inference and
sampling batches (``fitting_batch``) grow on a device with room.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

# Training arrays are kept on the device when they take at most this share of its free memory.
RESIDENT_SHARE = 0.25


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device`` of a name, or a one-line ValueError (unknown name, CUDA not available here)."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is unknown: use 'cpu' or 'cuda[:index]'") from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here: use 'cpu'")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif where.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use 'cpu' or 'cuda[:index]'")
    return where


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: unchanged when it is there already (always on CPU); from the host,
    through pinned memory and a non-blocking copy."""
    device = torch.device(device)
    if tensor.device == device or (device.type == tensor.device.type and device.index is None):
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A result on the host (what numpy and the store take): unchanged on CPU."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def free_bytes(device: str | torch.device) -> int:
    """Free memory on a CUDA device (0 on CPU: nothing to budget)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def fitting_batch(device: str | torch.device, batch: int, bytes_per_item: int, share: float = 0.25, limit: int = 8) -> int:
    """The inference / sampling batch for ``device``: ``batch`` on CPU (its numbers unchanged); on
    CUDA up to ``limit`` times larger, as long as ``bytes_per_item`` each stay within ``share`` of the
    free memory (and at least 1)."""
    if not is_cuda(device):
        return batch
    room = int(free_bytes(device) * share // max(1, bytes_per_item))
    return max(1, min(batch * limit, room))


def seeded_devices(device: str | torch.device) -> list[int]:
    """The CUDA devices ``torch.random.fork_rng`` must save and restore for a fit on ``device``."""
    where = torch.device(device)
    if where.type != "cuda":
        return []
    return [where.index if where.index is not None else torch.cuda.current_device()]


class DeviceRows:
    """Training arrays (same first axis) and mini-batches of their rows on the training device.

    CPU: ``take(rows)`` is ``{name: array[rows]}`` as the loops always did. CUDA: arrays that fit in
    ``RESIDENT_SHARE`` of the free memory are copied once (pinned, non-blocking) and indexed there;
    larger ones are pinned on the host and each batch is gathered and copied.
    """

    def __init__(self, arrays: Mapping[str, torch.Tensor | np.ndarray], device: str | torch.device = "cpu"):
        self.device = check_device(device)
        tensors = {k: v if torch.is_tensor(v) else _host_tensor(v) for k, v in arrays.items()}
        self.resident = True
        if self.device.type == "cuda":
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            self.resident = total <= RESIDENT_SHARE * free_bytes(self.device)
            tensors = {k: to_device(t, self.device) if self.resident else t.pin_memory() for k, t in tensors.items()}
        self.arrays = tensors
        self._stream = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the resident copies above

    def take(self, rows: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of ``rows`` (host indices) on the device."""
        rows = torch.as_tensor(rows)
        if self.device.type == "cpu":
            return {k: v[rows] for k, v in self.arrays.items()}
        if self.resident:
            rows = to_device(rows, self.device)
            return {k: v.index_select(0, rows) for k, v in self.arrays.items()}
        return {k: to_device(v.index_select(0, rows), self.device) for k, v in self.arrays.items()}

    def prefetch(self, batches: Iterable[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        """``take`` of each batch of rows in turn; on CUDA the next batch is gathered and copied on a
        side stream while the caller computes on the current one."""
        if self._stream is None:
            for rows in batches:
                yield self.take(rows)
            return
        current = torch.cuda.current_stream(self.device)
        pending = None
        for rows in batches:
            with torch.cuda.stream(self._stream):
                ready = self.take(rows)
                event = torch.cuda.Event()
                event.record(self._stream)
            if pending is not None:
                yield _after(current, *pending)
            pending = (ready, event)
        if pending is not None:
            yield _after(current, *pending)


def _host_tensor(array) -> torch.Tensor:
    """A tensor sharing the array's memory. Arrays read from the store may be read-only: the rows are
    only ever read, so torch's warning about writing to them does not apply."""
    array = np.asarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _after(stream, batch: dict[str, torch.Tensor], event) -> dict[str, torch.Tensor]:
    """The batch, usable on ``stream`` once the copy that made it has finished."""
    stream.wait_event(event)
    for tensor in batch.values():
        tensor.record_stream(stream)  # its memory is not reused while ``stream`` still reads it
    return batch


def describe(device: str | torch.device) -> str:
    """`cpu (2 threads)` or `cuda:0 (NVIDIA H200, 139.8 GiB)`: for logs and reports."""
    where = torch.device(device)
    if where.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads)"
    index = where.index if where.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"


__all__: Sequence[str] = ("DeviceRows", "check_device", "describe", "device_of", "fitting_batch", "free_bytes", "is_cuda",
                          "seeded_devices", "to_device", "to_host")
