"""Shared fixtures. Media, S3 and Postgres fixtures live in tests/fixtures/, loaded as plugins."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.fixtures.media", "tests.fixtures.s3", "tests.fixtures.postgres"]


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A small demo dataset (40 clips of 2-4 s), generated once per test session; returns its clips.jsonl."""
    from stages.demo import DemoSpec, generate_demo

    out = tmp_path_factory.mktemp("demo")
    return generate_demo(out, DemoSpec(n_clips=40, seed=0))
