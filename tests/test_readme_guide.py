"""The README's guide "Train on our cached features without Dagster" runs as written: its Python
blocks are taken from README.md by their heading and run, unchanged, in a fresh interpreter whose
working directory holds a small store at the path the guide uses (``.data/features``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from stages.core.store import FeatureStore

from tests.fixtures.clip_store import build_clip_store

REPO = Path(__file__).resolve().parents[1]
HEADING = "### Train on our cached features without Dagster"


def guide_blocks() -> list[str]:
    """The ```python blocks between the guide's heading and the next heading of any level."""
    text = (REPO / "README.md").read_text()
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"\n#{1,6} ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_guide_runs_as_written(tmp_path):
    blocks = guide_blocks()
    assert len(blocks) >= 2 and "ClipDataset" in blocks[0]
    store = FeatureStore(str(tmp_path / ".data" / "features"))
    built = build_clip_store(store, clips=40, shard_size=8)
    # One interpreter for all blocks (each in a fresh namespace, in README order): torch is imported once.
    runner = tmp_path / "guide.py"
    runner.write_text("import sys\n"
                      f"for number, block in enumerate({blocks!r}):\n"
                      "    print(f'--- block {number}', flush=True)\n"
                      "    exec(compile(block, f'README guide block {number}', 'exec'), {'__name__': '__main__'})\n")
    result = subprocess.run([sys.executable, str(runner)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the README guide failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert f"--- block {len(blocks) - 1}" in result.stdout
    train = sum(c.split == "train" for c in built["clips"].values()) - 1  # clip 7 (train) has no CLAP row
    assert f"{train} train clips; left out: {{'demo_000007': 'clap_embeddings: no audio stream'}}" in result.stdout
