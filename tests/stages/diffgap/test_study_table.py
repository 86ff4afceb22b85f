"""The study's table from its cells (trainings): every row carries the ridge control with its
spread over trainings and its own paired test, beside DiffGAP's."""

import numpy as np
import pytest

from stages.diffgap import study


def _cell(seed: int) -> dict:
    base, ridge = [1, 2, 1, 3], ([1, 1, 1, 3] if seed == 0 else [1, 1, 2, 3])  # ridge: +25 / 0 points
    methods = {"base encoder": base, "ridge control": ridge, "DiffGAP k=2": [1, 2, 1, 1], "DiffGAP k=2 generated only": [2, 2, 2, 2]}
    direction = {m: {"ranks": r, "blend_weight": 0.5 if m.startswith("DiffGAP") else 0.0} for m, r in methods.items()}
    return {"clips_train": 10, "clips_test": 4, "gap_test": {"matched_cosine": 0.5},
            "directions": {"T->A": direction, "A->T": direction}}


def test_every_row_has_the_ridge_control_with_its_spread_and_paired_test():
    config = study.StudyConfig(seeds=(0, 1), fractions=(1.0,), head_steps=(10,), samples=(2,))
    cells = {("demo", 10, 1.0, seed): _cell(seed) for seed in (0, 1)}
    rows = study.study_rows(config, "demo", cells)
    assert {r["axis"] for r in rows} == {"train fraction", "head steps", "samples k", "space from"}
    for row in rows:
        assert row["ridge R@1"] == pytest.approx(62.5) and row["ridge std"] == pytest.approx(np.std([75, 50], ddof=1))
        assert row["ridge-base"] == pytest.approx(12.5) and row["ridge-base std"] == pytest.approx(np.std([25, 0], ddof=1))
        assert row["DiffGAP-base"] == pytest.approx(25.0) and row["DiffGAP wins"] == "2/2" and row["trainings"] == 2
    table = study.markdown(rows)
    header, _, first = table.splitlines()[:3]
    columns = [c.strip() for c in header.strip("|").split("|")]
    values = dict(zip(columns, (c.strip() for c in first.strip("|").split("|"))))
    assert values["ridge R@1"] == "62.5 ± 17.7" and values["ridge-base"] == "+12.5 ± 17.7" and values["ridge-base p"] == "0.50"
    assert values["test queries"] == "4" and values["trainings"] == "2"


def test_the_svg_plot_has_a_panel_per_axis_and_a_point_per_row():
    import xml.dom.minidom

    config = study.StudyConfig(seeds=(0, 1), fractions=(1.0,), head_steps=(10,), samples=(2,))
    rows = study.study_rows(config, "demo", {("demo", 10, 1.0, seed): _cell(seed) for seed in (0, 1)})
    svg = xml.dom.minidom.parseString(study.plot_svg(rows))
    assert len(svg.getElementsByTagName("circle")) == len(rows)
    titles = {t.firstChild.data for t in svg.getElementsByTagName("text") if t.getAttribute("font-weight") == "bold"}
    assert titles == {"train fraction", "head steps", "samples k", "space from"}
