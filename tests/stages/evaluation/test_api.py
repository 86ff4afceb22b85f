"""The package is the one place for metrics: every exported name resolves, old names still work,
the numpy metrics import without torch, and nothing under stages/ imports dagster."""

import re
import subprocess
import sys
from pathlib import Path

from stages import evaluation
from stages.evaluation import audio, distribution

STAGES = Path(__file__).resolve().parents[3] / "stages"


def test_every_exported_name_resolves_and_is_listed_in_the_docstring():
    for name in evaluation.__all__:
        assert getattr(evaluation, name) is not None, name
        if name not in ("Metric", "FeatureBuffer", "ConfidenceInterval"):
            assert name in evaluation.__doc__, f"{name} is exported but not described in the package docstring"
    assert evaluation.AlignmentConfig.__module__ == "stages.evaluation.alignment"


def test_old_frechet_names_are_the_distribution_ones():
    assert audio.frechet_distance is distribution.frechet_distance
    assert audio.frechet_distance_of is distribution.frechet_distance_of
    assert audio.gaussian_fit is distribution.gaussian_fit


def test_numpy_metrics_import_without_torch():
    code = "import sys, stages.evaluation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=STAGES.parent, check=True)
    assert out.stdout.strip() == "False"


def test_no_dagster_imports_under_stages():
    pattern = re.compile(r"^\s*(import|from)\s+dagster", re.MULTILINE)
    offenders = [str(p) for p in STAGES.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders
