"""The device the models train and sample on (issue 14, GPU-ready).

Here (no GPU): the CPU path is the old one bit for bit, devices are validated in one line, and the
prepared GPU check (scripts/check_cuda.py) runs end to end with ``--device cpu``. With a GPU the
CUDA tests below also run: fits and sampling on CUDA against the CPU, within float error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.devices import DeviceRows, check_device, fitting_batch, to_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the CUDA paths run in "
                                                               "scripts/check_cuda.py on a GPU machine")
PROJECT = Path(__file__).resolve().parents[2]


def test_the_cpu_path_leaves_tensors_and_batches_as_they_were():
    x = torch.arange(12.0).reshape(6, 2)
    assert to_device(x, "cpu") is x  # no copy, no new dtype
    rows = DeviceRows({"x": x.numpy(), "y": np.arange(6)}, "cpu")
    batch = rows.take(np.array([4, 1]))
    assert torch.equal(batch["x"], x[[4, 1]]) and batch["y"].tolist() == [4, 1]
    assert [b["y"].tolist() for b in rows.prefetch([np.array([0]), np.array([5, 2])])] == [[0], [5, 2]]
    assert fitting_batch("cpu", 16, bytes_per_item=1 << 20) == 16  # CPU batch sizes (and so numbers) unchanged


def test_a_device_that_cannot_be_used_is_one_line():
    for name, says in (("meta", "not supported"), ("gpu0", "unknown")):
        with pytest.raises(ValueError, match=says) as info:
            check_device(name)
        assert "\n" not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here: use 'cpu'"):
            check_device("cuda")


def test_check_cuda_script_runs_with_the_cpu_as_its_device():
    done = subprocess.run([sys.executable, "scripts/check_cuda.py", "--device", "cpu", "--tiny", "--steps", "2", "--skip-towers"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for check in ("clap_head fit", "cavp_head fit", "vae fit", "vae encode/decode", "diffgap fit", "diffgap sample ddim",
                  "diffgap sample ddpm", "generator fit", "generator sample ddim", "training rows", "cmmd fit", "cmmd sample v2a guided",
                  "mmldm autoencoder fit", "mmldm dit fit"):
        assert any(line.startswith(f"PASS  {check}:") for line in lines), (check, done.stdout)
    assert "14/14 checks passed" in lines[-1]


def test_check_cuda_script_refuses_a_device_it_cannot_use_in_one_line():
    done = subprocess.run([sys.executable, "scripts/check_cuda.py", "--device", "tpu"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "unknown" in done.stderr


# ---- with a GPU ------------------------------------------------------------------------------------

def _pairs(n: int = 64, d: int = 16):
    from stages.diffgap.train import EmbeddingPairs

    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return EmbeddingPairs([f"c{i}" for i in range(n)], unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d))), ["train"] * n)


@CUDA
def test_diffgap_fit_and_sampling_on_cuda_match_the_cpu():
    from models.diffgap import TO_AUDIO, sample
    from stages.diffgap.train import DiffgapTrainConfig, train_diffgap

    torch.backends.cuda.matmul.allow_tf32 = False
    config = DiffgapTrainConfig(steps=1, batch_size=16, width=32, checkpoint_every=0)
    first = [train_diffgap(_pairs(), config, device=d).history[-1]["loss"] for d in ("cpu", "cuda")]
    assert first[0] == pytest.approx(first[1], rel=1e-4)  # same init, rows and noise: float error only
    model = train_diffgap(_pairs(), DiffgapTrainConfig(steps=30, batch_size=16, width=32, checkpoint_every=0)).model
    condition = torch.from_numpy(_pairs().other[:8])
    drawn = [sample(model.to(d), condition, TO_AUDIO, steps=10, samples_per_condition=4, generator=torch.Generator().manual_seed(1))
             for d in ("cpu", "cuda")]
    assert drawn[1].device.type == "cpu" and torch.allclose(drawn[0], drawn[1], atol=1e-4)


@CUDA
def test_generator_fit_and_sampling_on_cuda_match_the_cpu():
    from models.generator import sample_latents
    from stages.generation.train import GeneratorTrainConfig, LatentPairs, train_generator

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pairs = _pairs(16, 8)
    latents = LatentPairs(pairs.clip_ids, np.random.default_rng(2).normal(size=(16, 4, 8, 8)).astype(np.float32), pairs.audio,
                          pairs.other, pairs.splits)
    config = GeneratorTrainConfig(steps=1, batch_size=4, block_out_channels=(8, 16), norm_num_groups=4, threads=1)
    first = [train_generator(latents, config, device=d).history[-1]["loss"] for d in ("cpu", "cuda")]
    assert first[0] == pytest.approx(first[1], rel=1e-3)
    model = train_generator(latents, config).model
    out = [sample_latents(model.to(d), torch.from_numpy(pairs.audio[:4]), steps=5, generator=torch.Generator().manual_seed(3))
           for d in ("cpu", "cuda")]
    assert torch.allclose(out[0], out[1], atol=1e-3)


@CUDA
def test_training_rows_resident_and_streamed_give_the_host_rows():
    import models.devices as devices

    arrays = {"x": np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)}
    batches = [np.array([3, 1, 99]), np.array([0, 50])]
    resident = DeviceRows(arrays, "cuda")
    share, devices.RESIDENT_SHARE = devices.RESIDENT_SHARE, 0.0
    try:
        streamed = DeviceRows(arrays, "cuda")
    finally:
        devices.RESIDENT_SHARE = share
    assert resident.resident and not streamed.resident and streamed.arrays["x"].is_pinned()
    for rows, a, b in zip(batches, resident.prefetch(batches), streamed.prefetch(batches)):
        assert a["x"].is_cuda and b["x"].is_cuda
        assert np.array_equal(a["x"].cpu().numpy(), arrays["x"][rows]) and np.array_equal(b["x"].cpu().numpy(), arrays["x"][rows])
