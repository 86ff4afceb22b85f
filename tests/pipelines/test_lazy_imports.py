"""Loading the Dagster definitions (the first thing every `dagster job execute` does) imports no
heavy library a step may not need: they are imported inside the steps that use them (issue 14)."""

import json
import os
import subprocess
import sys

import pytest

# Decoders, DSP, model and storage libraries: each costs a noticeable share of a no-op run's CPU.
LAZY = ("librosa", "transformers", "diffusers", "sentence_transformers", "zarr", "numcodecs", "av", "decord",
        "soundfile", "scipy", "PIL", "dask", "distributed", "webdataset", "s3fs", "efficientnet_lite_pytorch", "aisfx")
# torch loads in the steps that use it: stage modules import it (and models/*) inside their functions;
# the constants assets and configs need at load live in models/constants.py.
TORCH = ("torch", "safetensors")


@pytest.fixture(scope="module")
def loaded_at_definitions(tmp_path_factory) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    env["XMODAL_DATA_DIR"] = str(tmp_path_factory.mktemp("lazy-data"))
    probe = ("import json, sys; import pipelines.definitions; "
             f"print(json.dumps(sorted(m for m in {LAZY + TORCH!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_loading_the_definitions_imports_no_decoder_dsp_or_model_library(loaded_at_definitions):
    assert loaded_at_definitions.isdisjoint(LAZY), sorted(loaded_at_definitions & set(LAZY))


def test_loading_the_definitions_does_not_import_torch(loaded_at_definitions):
    assert loaded_at_definitions.isdisjoint(TORCH), sorted(loaded_at_definitions & set(TORCH))
