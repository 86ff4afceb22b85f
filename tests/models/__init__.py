"""Tests of models/. ``tower_weights_dir`` is shared with the tower tests of other packages:
``from tests.models import tower_weights_dir  # noqa: F401`` makes it available there."""

import pytest


@pytest.fixture(scope="module", autouse=False)
def tower_weights_dir(tmp_path_factory):
    """XMODAL_WEIGHTS_DIR pointed at one folder per test session: aisfx's pickle is converted to
    safetensors there once, and nothing is written into the project's own .data/weights."""
    path = tmp_path_factory.getbasetemp() / "tower_weights"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XMODAL_WEIGHTS_DIR", str(path))
        yield path
