"""Shared fixtures. Media, S3 and Postgres fixtures live in tests/fixtures/, loaded as plugins."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.fixtures.media", "tests.fixtures.corpus", "tests.fixtures.s3", "tests.fixtures.postgres"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test on one torch thread: the suite's models are small, and on a shared 2-core
    machine two OpenMP threads spinning against other processes measured 3-40x slower."""
    from stages.core.parallel import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A small demo dataset (40 clips of 2-4 s), generated once per test session; returns its clips.jsonl."""
    from stages.ingest.demo import DemoSpec, generate_demo

    out = tmp_path_factory.mktemp("demo")
    return generate_demo(out, DemoSpec(n_clips=40, seed=0))
