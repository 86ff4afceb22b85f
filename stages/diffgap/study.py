"""Where DiffGAP helps: its retrieval gain against training-set size, space tightness and sample
count, over several trainings, with the ridge control in every row.

A *cell* is one training: contrastive heads fitted on a source dataset's train split (``head_steps``
steps, seed s) and frozen, the target dataset's clips embedded in that space, DiffGAP (seed s)
fitted on a ``fraction`` of the target's train split, and the per-query ranks of the base
encoder, the ridge control (fitted on the same fraction) and DiffGAP with each sample count k on
the target's test split (blend weights on its val split). Each cell is a cached result
(stages.core.results) keyed by both datasets' splits and tower keys and every setting, so a
study with one more seed or setting computes only the new cells.

The study varies one factor at a time around a base point (the last value of each list):

    train fraction   fractions  (DiffGAP and ridge see 25 / 50 / 100% of the target's train split)
    head steps       head_steps (few steps = a loose space, far from converged: the gap is wide)
    samples k        samples    (generated embeddings averaged per query)
    space from       space_sources (heads fitted on another dataset: the paper's pretrained space)

and states, per row and direction, the trainings and clips behind it and the paired tests of
stages.diffgap.evidence (DiffGAP vs base, ridge vs base, DiffGAP vs ridge).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from models.constants import FROM_AUDIO, TO_AUDIO
from stages.core.results import cached_result
from stages.core.store import FeatureStore, feature_key
from stages.diffgap import evidence
from stages.diffgap.evaluate import EVALUATION_CODE_VERSION, SplitData, direction_ranks, splits_digest
from stages.diffgap.train import DIFFGAP_CODE_VERSION, DiffgapTrainConfig, EmbeddingPairs, direction_names, gap_statistics, train_diffgap
from stages.embeddings import heads
from stages.embeddings.spaces import get_space
from stages.evaluation.retrieval import normalize
from stages.ingest.manifest import ClipManifest

STUDY_CODE_VERSION = "1"  # of the cells (trainings): a change retrains every cell
ROWS_VERSION = "2"  # of the table assembled from the cells: a change re-reads them, retrains nothing
CELL_RESULT = "diffgap_study_cell"


@dataclass(frozen=True)
class StudyConfig:
    space: str = "clap"
    seeds: tuple[int, ...] = (0, 1, 2)  # trainings: seed of the heads and of DiffGAP
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    head_steps: tuple[int, ...] = (25, 100, 600)
    samples: tuple[int, ...] = (1, 4, 16)
    space_sources: tuple[str, ...] = ()  # other datasets whose heads are tried at the base point
    diffgap_steps: int = 3000
    sampling_steps: int = 50
    sampler: str = "ddim"

    def __post_init__(self):
        for name in ("seeds", "fractions", "head_steps", "samples"):
            if not getattr(self, name):
                raise ValueError(f"study: {name} must not be empty")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"study: fractions must be in (0, 1], got {list(self.fractions)}")
        if any(s < 1 for s in self.head_steps) or any(k < 1 for k in self.samples):
            raise ValueError("study: head_steps and samples must be >= 1")
        get_space(self.space)

    @property
    def base(self) -> tuple[float, int, int]:
        """(fraction, head steps, k) every other axis is held at."""
        return self.fractions[-1], self.head_steps[-1], self.samples[-1]

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class DatasetTowers:
    """A dataset's tower features of one space (what a head reads), read once per study."""

    dataset: str
    manifest: ClipManifest
    tower_keys: dict
    _features: heads.PairedFeatures | None = field(default=None, repr=False)

    def features(self, store: FeatureStore, head: str) -> heads.PairedFeatures:
        if self._features is None:
            self._features = heads.paired_features(store, self.manifest, head, self.tower_keys)
        return self._features

    def identity(self) -> list[str]:
        """What a cell's key hashes of this dataset: its name, splits and tower keys."""
        return [f"{self.dataset}:splits:{splits_digest(self.manifest)}",
                *(f"{self.dataset}:{feature}:{key}" for feature, key in sorted(self.tower_keys.items()))]


def head_config(steps: int, seed: int) -> heads.HeadTrainConfig:
    return heads.HeadTrainConfig(steps=steps, seed=seed, eval_every=min(50, steps))


def diffgap_config(config: StudyConfig, seed: int) -> DiffgapTrainConfig:
    return DiffgapTrainConfig(steps=config.diffgap_steps, seed=seed, checkpoint_every=0)


def train_fraction(pairs: EmbeddingPairs, fraction: float, seed: int) -> EmbeddingPairs:
    """A seeded subset of the train pairs; smaller fractions are subsets of larger ones (one
    permutation per seed), so the fraction rows differ only in how much DiffGAP sees."""
    order = np.random.default_rng([seed, 104729]).permutation(len(pairs))
    keep = np.sort(order[: max(2, int(math.ceil(fraction * len(pairs))))])
    return EmbeddingPairs([pairs.clip_ids[i] for i in keep], pairs.audio[keep], pairs.other[keep],
                          [pairs.splits[i] for i in keep], pairs.shards)


def embed_pairs(model, space: str, data: heads.PairedFeatures) -> EmbeddingPairs:
    """A dataset's clips in a trained space (the head frozen), as DiffGAP's unit-vector pairs."""
    spec = get_space(space)
    out = heads.embed(model, spec.head, data.arrays)
    return EmbeddingPairs(list(data.clip_ids), normalize(out["audio"]), normalize(out[spec.other]), list(data.splits))


def cell_key(config: StudyConfig, source: DatasetTowers, target: DatasetTowers, head_steps: int, fraction: float,
             seed: int) -> str:
    params = {
        "space": config.space, "head_config": head_config(head_steps, seed).params(),
        "diffgap_config": diffgap_config(config, seed).params(), "fraction": fraction, "samples": list(config.samples),
        "sampling_steps": config.sampling_steps, "sampler": config.sampler,
        "versions": [heads.HEAD_CODE_VERSION, DIFFGAP_CODE_VERSION, EVALUATION_CODE_VERSION],
    }
    return feature_key(CELL_RESULT, params, STUDY_CODE_VERSION,
                       [f"source:{s}" for s in source.identity()] + [f"target:{t}" for t in target.identity()])


class HeadCache:
    """Heads fitted in this study, by (source, steps, seed): the fraction rows share one space."""

    def __init__(self) -> None:
        self._heads: dict[tuple, tuple] = {}

    def get(self, store: FeatureStore, source: DatasetTowers, space: str, steps: int, seed: int, log=None):
        key = (source.dataset, steps, seed)
        if key not in self._heads:
            kind = get_space(space).head
            data = source.features(store, kind)
            train, val = data.subset("train"), data.subset("val")
            result = heads.train_head(kind, train, val, head_config(steps, seed), log=log)
            self._heads[key] = (result.model, {"best_val_loss": result.best_val_loss, "clips": len(train)})
        return self._heads[key]


def run_cell(store: FeatureStore, config: StudyConfig, source: DatasetTowers, target: DatasetTowers, head_steps: int,
             fraction: float, seed: int, head_cache: HeadCache, log: Callable[[str], None] | None = None) -> dict:
    """One training and its per-query ranks (see the module docstring); JSON-able."""
    space = config.space
    model, head_info = head_cache.get(store, source, space, head_steps, seed, log)
    pairs = embed_pairs(model, space, target.features(store, get_space(space).head))
    full_train = pairs.subset("train")
    data = SplitData(train_fraction(full_train, fraction, seed), pairs.subset("val"), pairs.subset("test"))
    for split in ("train", "val", "test"):
        if len(getattr(data, split)) < 2:
            raise ValueError(f"study: {target.dataset!r} has {len(getattr(data, split))} {split} clips in the {space} space")
    label = f"study {space} {target.dataset}: heads of {source.dataset} ({head_steps} steps), {fraction:.0%} train, seed {seed}"
    denoiser = train_diffgap(data.train, diffgap_config(config, seed), log=log, label=label).model
    names = direction_names(space)
    directions = {}
    for direction in (TO_AUDIO, FROM_AUDIO):
        ranks = direction_ranks(direction, data, denoiser, steps=config.sampling_steps, sampler=config.sampler,
                                samples=config.samples, seed=seed)
        directions[names[direction]] = {m: {"ranks": v["ranks"].tolist(), "blend_weight": v["blend_weight"]}
                                        for m, v in ranks.items()}
    return {"source": source.dataset, "target": target.dataset, "head_steps": head_steps, "fraction": fraction,
            "seed": seed, "clips_train": len(data.train), "clips_val": len(data.val), "clips_test": len(data.test),
            "head_train_clips": head_info["clips"], "head_best_val_loss": head_info["best_val_loss"],
            "gap_train": gap_statistics(data.train), "gap_test": gap_statistics(data.test), "directions": directions}


@dataclass(frozen=True)
class Setting:
    axis: str     # "train fraction" | "head steps" | "samples k" | "space from"
    value: str    # what the row shows on that axis
    source: str   # dataset of the heads
    head_steps: int
    fraction: float
    k: int


def settings(config: StudyConfig, target: str) -> list[Setting]:
    fraction, steps, k = config.base
    rows = [Setting("train fraction", f"{f:.0%}", target, steps, f, k) for f in config.fractions]
    rows += [Setting("head steps", str(s), target, s, fraction, k) for s in config.head_steps]
    rows += [Setting("samples k", str(kk), target, steps, fraction, kk) for kk in config.samples]
    rows += [Setting("space from", target + " (own)", target, steps, fraction, k)]
    rows += [Setting("space from", s, s, steps, fraction, k) for s in config.space_sources if s != target]
    return rows


def run_study(store: FeatureStore, config: StudyConfig, target: DatasetTowers, sources: Mapping[str, DatasetTowers],
              log: Callable[[str], None] | None = None, progress=None) -> dict:
    """Every cell the settings need (cached each), then the table. ``sources`` maps a dataset name
    to its towers (the target's own included). Returns {"rows", "cells": [keys], "config"}."""
    needed = sorted({(s.source, s.head_steps, s.fraction) for s in settings(config, target.dataset)})
    head_cache, cells = HeadCache(), {}
    for source_name, steps, fraction in needed:
        for seed in config.seeds:
            source = sources[source_name]
            key = cell_key(config, source, target, steps, fraction, seed)
            result = cached_result(store, target.dataset, CELL_RESULT, key,
                                   lambda: run_cell(store, config, source, target, steps, fraction, seed, head_cache, log),
                                   {"config": config.params(), "source": source_name, "head_steps": steps,
                                    "fraction": fraction, "seed": seed}, log)
            cells[(source_name, steps, fraction, seed)] = result.value
            if progress is not None:
                progress.advance(1, source=source_name, head_steps=steps, fraction=fraction, seed=seed)
    rows = study_rows(config, target.dataset, cells)
    return {"rows": rows, "config": config.params(), "cells": len(cells)}


def cells_needed(config: StudyConfig, target: str) -> int:
    return len({(s.source, s.head_steps, s.fraction) for s in settings(config, target)}) * len(config.seeds)


def study_rows(config: StudyConfig, target: str, cells: Mapping[tuple, dict]) -> list[dict]:
    """One row per direction and setting: R@1 of base / ridge / DiffGAP over trainings and the
    paired gains (stages.diffgap.evidence)."""
    rows = []
    for direction in direction_names(config.space).values():
        for s in settings(config, target):
            trained = [cells[(s.source, s.head_steps, s.fraction, seed)] for seed in config.seeds]
            ranks = [{m: v["ranks"] for m, v in c["directions"][direction].items()} for c in trained]
            diffgap = f"DiffGAP k={s.k}"
            recall = {m: evidence.recall_over_trainings(ranks, m) for m in ("base encoder", "ridge control", diffgap)}
            vs_base = evidence.paired_over_trainings(ranks, diffgap, "base encoder")
            ridge_base = evidence.paired_over_trainings(ranks, "ridge control", "base encoder")
            vs_ridge = evidence.paired_over_trainings(ranks, diffgap, "ridge control")
            weights = [c["directions"][direction][diffgap]["blend_weight"] for c in trained]
            generated = evidence.recall_over_trainings(ranks, f"{diffgap} generated only")
            rows.append({
                "direction": direction, "axis": s.axis, "value": s.value, "source": s.source, "head_steps": s.head_steps,
                "fraction": s.fraction, "k": s.k, "trainings": len(trained),
                "train clips": trained[0]["clips_train"], "test queries": trained[0]["clips_test"],
                "matched cos": float(np.mean([c["gap_test"]["matched_cosine"] for c in trained])),
                "base R@1": recall["base encoder"]["mean"], "base std": recall["base encoder"]["std"],
                "ridge R@1": recall["ridge control"]["mean"], "ridge std": recall["ridge control"]["std"], "DiffGAP R@1": recall[diffgap]["mean"],
                "DiffGAP std": recall[diffgap]["std"], "blend w": float(np.mean(weights)),
                "generated only R@1": generated["mean"],
                "DiffGAP-base": vs_base["gain"], "DiffGAP-base std": vs_base["gain_std"], "DiffGAP-base p": vs_base["p"],
                "DiffGAP wins": f"{vs_base['wins']}/{vs_base['trainings']}", "within SE": vs_base["within_se"],
                "ridge-base": ridge_base["gain"], "ridge-base std": ridge_base["gain_std"], "ridge-base p": ridge_base["p"],
                "DiffGAP-ridge": vs_ridge["gain"], "DiffGAP-ridge std": vs_ridge["gain_std"], "DiffGAP-ridge p": vs_ridge["p"],
            })
    return rows


TABLE_COLUMNS = ["direction", "axis", "value", "trainings", "train clips", "test queries", "matched cos", "base R@1",
                 "ridge R@1", "DiffGAP R@1", "blend w", "generated only R@1", "DiffGAP-base", "DiffGAP-base p", "DiffGAP wins", "ridge-base",
                 "ridge-base p", "DiffGAP-ridge", "DiffGAP-ridge p"]


def _fmt(value, std=None) -> str:
    if isinstance(value, float):
        if not np.isfinite(value):
            return "-"
        text = f"{value:+.1f}" if std == "signed" else f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"
        return text
    return str(value)


def markdown(rows: Sequence[dict]) -> str:
    """The study table: R@1 in %, gains in points (mean over trainings +- their std), p of the t
    test over trainings."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = []
        for column in TABLE_COLUMNS:
            value = row[column]
            if column in ("base R@1", "ridge R@1", "DiffGAP R@1"):
                std = row.get(column.split()[0] + " std", float("nan"))  # rows of ROWS_VERSION 1 lack "ridge std"
                cells.append(f"{value:.1f} ± {std:.1f}" if np.isfinite(std) else f"{value:.1f}")
            elif column in ("DiffGAP-base", "DiffGAP-ridge", "ridge-base"):
                std = row.get(f"{column} std", float("nan"))
                cells.append(f"{value:+.1f} ± {std:.1f}" if np.isfinite(std) else f"{value:+.1f}")
            elif column.endswith(" p"):
                cells.append(f"{value:.2f}" if np.isfinite(value) else "-")
            else:
                cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_png(rows: Sequence[dict]) -> bytes | None:
    """Gains (DiffGAP - base, ridge - base; R@1 points, error bars = std over trainings) against each
    axis, one panel per axis; None when matplotlib is not installed (the table says the same)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    axes_names = list(dict.fromkeys(r["axis"] for r in rows))
    fig, axes = plt.subplots(1, len(axes_names), figsize=(4 * len(axes_names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], axes_names):
        for direction in dict.fromkeys(r["direction"] for r in rows):
            sub = [r for r in rows if r["axis"] == name and r["direction"] == direction]
            x = np.arange(len(sub))
            std = [r["DiffGAP-base std"] if np.isfinite(r["DiffGAP-base std"]) else 0 for r in sub]
            ax.errorbar(x, [r["DiffGAP-base"] for r in sub], yerr=std, marker="o", capsize=3, label=f"DiffGAP {direction}")
            ax.plot(x, [r["ridge-base"] for r in sub], linestyle="--", marker="x", label=f"ridge {direction}")
            ax.set_xticks(x, [r["value"] for r in sub], fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(name)
        ax.set_ylabel("R@1 gain over base (points)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def plot_svg(rows: Sequence[dict]) -> str:
    """The same gains as ``plot_png`` drawn as SVG without matplotlib (what the UI shows when it is
    not installed): one panel per axis, DiffGAP - base (dots, bars = std over trainings) and ridge -
    base (crosses, dashed) per direction, R@1 points against the axis' values."""
    axes_names = list(dict.fromkeys(r["axis"] for r in rows))
    directions = list(dict.fromkeys(r["direction"] for r in rows))
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]

    def finite(value) -> float:
        return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else 0.0

    values = [finite(r["DiffGAP-base"]) + s * finite(r["DiffGAP-base std"]) for r in rows for s in (-1, 1)]
    values += [finite(r["ridge-base"]) for r in rows] + [0.0]
    low, high = min(values) - 1, max(values) + 1
    width, height, pad = 260, 200, 36
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(axes_names)}" height="{height + 40}" '
           'font-family="sans-serif" font-size="10">']

    def y(value: float) -> float:
        return pad / 2 + (high - value) / (high - low) * (height - pad)

    for panel, name in enumerate(axes_names):
        left = panel * width + pad
        out.append(f'<text x="{left + (width - pad) / 2}" y="10" text-anchor="middle" font-weight="bold">{name}</text>')
        out.append(f'<line x1="{left}" y1="{y(0):.1f}" x2="{left + width - pad - 10}" y2="{y(0):.1f}" stroke="grey"/>')
        for tick in (low, 0.0, high):
            out.append(f'<text x="{left - 4}" y="{y(tick) + 3:.1f}" text-anchor="end">{tick:+.0f}</text>')
        for d, direction in enumerate(directions):
            sub = [r for r in rows if r["axis"] == name and r["direction"] == direction]
            step = (width - pad - 20) / max(1, len(sub))
            colour = colours[d % len(colours)]
            xs = [left + 10 + step * (i + 0.5) + 4 * d for i in range(len(sub))]
            ridge = " ".join(f"{x:.1f},{y(finite(r['ridge-base'])):.1f}" for x, r in zip(xs, sub))
            out.append(f'<polyline points="{ridge}" fill="none" stroke="{colour}" stroke-dasharray="3,2"/>')
            for x, r in zip(xs, sub):
                gain, std = finite(r["DiffGAP-base"]), finite(r["DiffGAP-base std"])
                out.append(f'<line x1="{x:.1f}" y1="{y(gain - std):.1f}" x2="{x:.1f}" y2="{y(gain + std):.1f}" stroke="{colour}"/>')
                out.append(f'<circle cx="{x:.1f}" cy="{y(gain):.1f}" r="3" fill="{colour}"/>')
                ry = y(finite(r["ridge-base"]))
                out.append(f'<text x="{x:.1f}" y="{ry + 3:.1f}" text-anchor="middle" fill="{colour}">x</text>')
                if d == 0:
                    out.append(f'<text x="{x:.1f}" y="{height - 4}" text-anchor="middle">{r["value"]}</text>')
    legend = "   ".join(f"{d}: DiffGAP-base (dot, std bar) / ridge-base (x, dashed)" for d in directions)
    out.append(f'<text x="4" y="{height + 20}">R@1 gain over the base encoder (points). {legend}</text>')
    out.append("</svg>")
    return "".join(out)
