"""DiffGAP retrieval with generated embeddings, the ridge-regression control, and the ablations of
Tables V-VII.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from models.constants import FROM_AUDIO, TO_AUDIO
from stages.ingest.manifest import ClipManifest
from stages.core.parallel import torch_threads
from stages.core.progress import Progress
from stages.core.refs import DiffgapRef
from stages.evaluation.retrieval import normalize, retrieval_metrics
from stages.core.store import FeatureStore, feature_key
from stages.diffgap.train import (BLEND_WEIGHTS, DIFFGAP_CODE_VERSION, SMALL_MODEL_THREADS, DiffgapTrainConfig, EmbeddingPairs,
                                  direction_names, fit_space, load_model, load_pairs)
from stages.embeddings.spaces import SkippedSpace

if TYPE_CHECKING:
    from models.diffgap import Denoiser

# Bump when the rows an evaluation computes change for the same inputs (cached results are keyed by it).
EVALUATION_CODE_VERSION = "2"
ABLATION_SAMPLING_STEPS = (50, 20, 5)  # Table VI
ABLATION_INTERVALS = "interval // 5, interval, 2 x interval"  # Table VII (what ablation_intervals does)
# Units of work per space in ablation_rows (for progress): per direction the no-BST fit, Table V and
# each sampling-step count; then each BST interval.
ABLATIONS_PER_SPACE = 2 * (2 + len(ABLATION_SAMPLING_STEPS)) + 3


def ablation_intervals(interval: int) -> tuple[int, int, int]:
    """Table VII: the paper's BST intervals 1000 / 5000 / 10000 scaled to this run's interval."""
    return (max(1, interval // 5), interval, 2 * interval)


# ---- generation and retrieval -------------------------------------------------------------------

def generate(
    model: Denoiser, condition: np.ndarray, direction: int, steps: int = 50, sampler: str = "ddim",
    samples: int = 4, seed: int = 0, project: bool = True, batch: int = 256,
) -> np.ndarray:
    """Mean of `samples` generated target embeddings per condition, renormalised: [N, d]."""
    with torch_threads(SMALL_MODEL_THREADS):
        return _generate(model, condition, direction, steps, sampler, samples, seed, project, batch)


def _generate(model, condition, direction, steps, sampler, samples, seed, project, batch) -> np.ndarray:
    import torch
    from models.diffgap import sample

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(condition), batch):
        chunk = torch.from_numpy(np.asarray(condition[i : i + batch], np.float32))
        drawn = sample(model, chunk, direction, steps=steps, sampler=sampler, samples_per_condition=samples,
                       project=project, generator=generator)
        out.append(normalize(drawn.mean(dim=1).numpy()))
    return np.concatenate(out) if out else np.zeros((0, condition.shape[-1]), np.float32)


def blended_ranks(query: np.ndarray, gallery: np.ndarray, predicted: np.ndarray, weight: float) -> np.ndarray:
    """1-based rank of each query's match when the gallery is ranked by
    (1 - w) * sim(query, g) + w * sim(predicted target, g)."""
    from stages.evaluation.retrieval import match_ranks

    return match_ranks((1 - weight) * (query @ gallery.T) + weight * (predicted @ gallery.T))


def blended_metrics(query: np.ndarray, gallery: np.ndarray, predicted: np.ndarray, weight: float) -> dict:
    """Rank the gallery by (1 - w) * sim(query, g) + w * sim(predicted target, g)."""
    ranks = blended_ranks(query, gallery, predicted, weight)
    return {
        "R@1": float(100 * np.mean(ranks <= 1)), "R@5": float(100 * np.mean(ranks <= 5)),
        "R@10": float(100 * np.mean(ranks <= 10)), "mean_rank": float(ranks.mean()),
        "median_rank": float(np.median(ranks)), "n": int(len(ranks)),
    }


def choose_blend(query: np.ndarray, gallery: np.ndarray, predicted: np.ndarray, weights: Sequence[float] = BLEND_WEIGHTS) -> float:
    """The blend weight with the best validation R@1 (mean rank breaks ties; smaller w wins ties)."""
    scored = []
    for w in weights:
        metrics = blended_metrics(query, gallery, predicted, w)
        scored.append((-metrics["R@1"], metrics["mean_rank"], w))
    return float(min(scored)[2])


def fit_ridge(condition: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    """Closed-form ridge map W: condition @ W ~ target."""
    d = condition.shape[1]
    return np.linalg.solve(condition.T @ condition + alpha * np.eye(d), condition.T @ target)


RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)


def choose_ridge(data: "SplitData", direction: int) -> tuple[np.ndarray, float, float]:
    """The ridge control of one direction: (map, alpha, blend weight), alpha and weight chosen on
    the validation split (best R@1, then mean rank), the map fitted on the train split."""
    train_q, train_g = data.train.condition_target(direction)
    val_q, val_g = data.val.condition_target(direction)
    best = None
    for alpha in RIDGE_ALPHAS:
        val_pred = normalize(val_q @ fit_ridge(train_q, train_g, alpha))
        weight = choose_blend(val_q, val_g, val_pred)
        score = blended_metrics(val_q, val_g, val_pred, weight)
        key = (-score["R@1"], score["mean_rank"])
        if best is None or key < best[0]:
            best = (key, alpha, weight)
    _, alpha, weight = best
    return fit_ridge(train_q, train_g, alpha), alpha, weight


def direction_ranks(direction: int, data: "SplitData", model: Denoiser | None, *, steps: int = 50, sampler: str = "ddim",
                    samples: Sequence[int] = (16,), seed: int = 0) -> dict[str, dict]:
    """Per-query ranks on the test split of one direction, for paired tests: {method: {"ranks",
    "blend_weight"}} for the base encoder, the ridge control and DiffGAP with each sample count k
    ("DiffGAP k=16"; blend weights chosen on the validation split, as in evaluate_direction; and
    "DiffGAP k=16 generated only", w = 1)."""
    val_q, val_g = data.val.condition_target(direction)
    test_q, test_g = data.test.condition_target(direction)
    ridge, _, ridge_weight = choose_ridge(data, direction)
    out = {
        "base encoder": {"ranks": blended_ranks(test_q, test_g, test_q, 0.0), "blend_weight": 0.0},
        "ridge control": {"ranks": blended_ranks(test_q, test_g, normalize(test_q @ ridge), ridge_weight),
                          "blend_weight": ridge_weight},
    }
    for k in (samples if model is not None else ()):
        val_pred = generate(model, val_q, direction, steps, sampler, k, seed)
        weight = choose_blend(val_q, val_g, val_pred)
        test_pred = generate(model, test_q, direction, steps, sampler, k, seed + 1)
        out[f"DiffGAP k={k}"] = {"ranks": blended_ranks(test_q, test_g, test_pred, weight), "blend_weight": weight}
        out[f"DiffGAP k={k} generated only"] = {"ranks": blended_ranks(test_q, test_g, test_pred, 1.0), "blend_weight": 1.0}
    return out


@dataclass
class SplitData:
    train: EmbeddingPairs
    val: EmbeddingPairs
    test: EmbeddingPairs


def split_pairs(pairs: EmbeddingPairs) -> SplitData:
    data = SplitData(pairs.subset("train"), pairs.subset("val"), pairs.subset("test"))
    for name in ("train", "val", "test"):
        if len(getattr(data, name)) < 2:
            raise ValueError(f"split {name!r} has {len(getattr(data, name))} clips with embeddings; need at least 2")
    return data


def evaluate_direction(
    space: str, direction: int, data: SplitData, model: Denoiser | None, *, steps: int = 50, sampler: str = "ddim",
    samples: int = 4, seed: int = 0, include_controls: bool = True, label: str = "DiffGAP",
) -> list[dict]:
    """Rows for one direction on the test split: base encoder, ridge control, DiffGAP.

    Blend weights (and the ridge alpha) are chosen on the validation split, never on test.
    """
    name = direction_names(space)[direction]
    val_q, val_g = data.val.condition_target(direction)
    test_q, test_g = data.test.condition_target(direction)
    rows = []

    def row(method: str, metrics: dict, weight: float | None, **extra) -> dict:
        return {"space": space, "direction": name, "method": method, "blend_weight": weight, "seed": seed,
                "steps": extra.get("steps", ""), "sampler": extra.get("sampler", ""), **metrics}

    if include_controls:
        rows.append(row("base encoder", retrieval_metrics(test_q, test_g), None))
        ridge, alpha, weight = choose_ridge(data, direction)
        rows.append(row(f"ridge control (alpha {alpha:g})", blended_metrics(test_q, test_g, normalize(test_q @ ridge), weight), weight))
    if model is not None:
        val_pred = generate(model, val_q, direction, steps, sampler, samples, seed)
        weight = choose_blend(val_q, val_g, val_pred)
        test_pred = generate(model, test_q, direction, steps, sampler, samples, seed + 1)
        rows.append(row(label, blended_metrics(test_q, test_g, test_pred, weight), weight, steps=steps, sampler=sampler))
        rows.append(row(f"{label} (generated only)", blended_metrics(test_q, test_g, test_pred, 1.0), 1.0, steps=steps, sampler=sampler))
    return rows


@dataclass(frozen=True)
class EvalConfig:
    steps: int = 50
    sampler: str = "ddim"
    samples: int = 16  # generated embeddings averaged per query (R@1 of generated-only grows with it: bench/diffgap_sweep.py)
    seed: int = 0


def evaluate_space(space: str, data: SplitData, model: Denoiser, evaluation: EvalConfig, label: str = "DiffGAP") -> list[dict]:
    rows = []
    for direction in (TO_AUDIO, FROM_AUDIO):
        rows += evaluate_direction(space, direction, data, model, steps=evaluation.steps, sampler=evaluation.sampler,
                                   samples=evaluation.samples, seed=evaluation.seed, label=label)
    return rows


def ablation_rows(
    store: FeatureStore, manifest: ClipManifest, space: str, embedding_key: str, config: DiffgapTrainConfig,
    evaluation: EvalConfig, log: Callable[[str], None] | None = None, progress: Progress | None = None,
    device: str = "cpu",
) -> dict[str, list[dict]]:
    """Tables V (CDM / BST), VI (sampling steps) and VII (BST interval) for one space.

    Extra models are fitted (and cached) like the main one. BST intervals are the paper's
    1000 / 5000 / 10000 scaled to this run: interval / 5, interval, 2 x interval. ``progress``
    (one is made when None) counts ABLATIONS_PER_SPACE units and says which ablation, space and seed.
    """
    progress = progress or Progress(f"diffgap ablations {space}", ABLATIONS_PER_SPACE, "ablations", log).start()

    def done(ablation: str) -> None:
        progress.advance(1, ablation=ablation, space=space, seed=evaluation.seed)

    data = split_pairs(load_pairs(store, manifest, space, embedding_key))
    main = fit_space(store, manifest, space, embedding_key, config, log, device)
    names = direction_names(space)
    table_v, table_vi, table_vii = [], [], []
    for direction in (TO_AUDIO, FROM_AUDIO):
        one_way = fit_space(store, manifest, space, embedding_key,
                            DiffgapTrainConfig(**{**config.params(), "bst": False, "single_direction": direction}), log, device)
        done(f"V fit CDM without BST {names[direction]}")
        common = dict(steps=evaluation.steps, sampler=evaluation.sampler, samples=evaluation.samples, seed=evaluation.seed)
        rows = evaluate_direction(space, direction, data, None, **common)[:1]  # base encoder
        rows[0]["method"] = "base (no CDM)"
        rows += evaluate_direction(space, direction, data, one_way.model, include_controls=False, label="CDM, no BST", **common)[:1]
        rows += evaluate_direction(space, direction, data, main.model, include_controls=False, label="CDM + BST", **common)[:1]
        for row, cdm, bst in zip(rows, (False, True, True), (False, False, True)):
            row.update(CDM=cdm, BST=bst)
        table_v += rows
        done(f"V CDM/BST {names[direction]}")
        for steps in ABLATION_SAMPLING_STEPS:
            row = evaluate_direction(space, direction, data, main.model, include_controls=False, label="CDM + BST",
                                     **{**common, "steps": steps})[0]
            table_vi.append(row)
            done(f"VI {steps} steps {names[direction]}")
    interval = config.bst_interval
    for scaled in ablation_intervals(interval):
        fitted = main if scaled == interval else fit_space(
            store, manifest, space, embedding_key, DiffgapTrainConfig(**{**config.params(), "bst_interval": scaled}), log, device)
        for direction in (TO_AUDIO, FROM_AUDIO):
            row = evaluate_direction(space, direction, data, fitted.model, include_controls=False, label="CDM + BST",
                                     steps=evaluation.steps, sampler=evaluation.sampler, samples=evaluation.samples,
                                     seed=evaluation.seed)[0]
            row["bst_interval"] = scaled
            row["final_loss"] = fitted.sidecar["history"][-1]["loss"] if fitted.sidecar["history"] else None
            table_vii.append(row)
        done(f"VII BST interval {scaled}")
    return {"V": table_v, "VI": table_vi, "VII": table_vii}


def seed_rows(
    store: FeatureStore, manifest: ClipManifest, ref: DiffgapRef, data: SplitData, evaluation: EvalConfig,
    seeds: Sequence[int], log: Callable[[str], None] | None = None, progress: Progress | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Tables III / IV rows of one space over ``seeds``: the checkpoint of ``ref`` for its own seed,
    a model fitted (and cached) with the same config for every other seed."""
    main_model, sidecar = load_model(store, manifest.dataset, ref.space, ref.key, device)
    trained_with = DiffgapTrainConfig(**sidecar["train_config"])
    progress = progress or Progress(f"diffgap evaluation {ref.space}", len(seeds), "seeds", log).start()
    rows = []
    for seed in seeds:
        if seed == trained_with.seed:
            model = main_model
        else:
            seeded = DiffgapTrainConfig(**{**trained_with.params(), "seed": seed})
            model = fit_space(store, manifest, ref.space, ref.embedding_key, seeded, log=log, device=device).model
        rows += evaluate_space(ref.space, data, model, EvalConfig(evaluation.steps, evaluation.sampler, evaluation.samples, seed))
        progress.advance(1, space=ref.space, seed=seed)
    return rows


# ---- cached results: keyed by what they evaluate and how ----------------------------------------

def result_key(name: str, config: Mapping[str, Any], manifest: ClipManifest, spaces: Sequence[DiffgapRef | SkippedSpace],
               extra: Mapping[str, Any] | None = None) -> tuple[str, dict]:
    """The key of an evaluation result and what it hashes (its provenance).

    Inputs: the splits of the clip manifest (which clip is train / val / test: what the tables
    evaluate on; not the whole manifest version, which also changes when only file times do), each
    space's DiffGAP checkpoint (hash of its config, embedding key and shards), lineage and embedding
    feature key, or the reason a space was skipped. Params: the evaluation config, the ablation
    settings (``extra``) and the DiffGAP training code version (models of other seeds / settings
    are fitted by it).
    """
    inputs = [f"splits:{splits_digest(manifest)}"]
    for ref in spaces:
        if isinstance(ref, SkippedSpace):
            inputs.append(f"{ref.space}:skipped:{ref.reason}")
        else:
            inputs += [f"{ref.space}:checkpoint:{ref.key}", f"{ref.space}:lineage:{ref.lineage}",
                       f"{ref.space}:embeddings:{ref.embedding_key}"]
    params = {"config": dict(config), **dict(extra or {}), "diffgap_code_version": DIFFGAP_CODE_VERSION}
    key = feature_key(name, params, EVALUATION_CODE_VERSION, inputs)
    return key, {"params": params, "code_version": EVALUATION_CODE_VERSION, "inputs": inputs, "manifest": manifest.digest()}


def splits_digest(manifest: ClipManifest) -> str:
    """Hash of (clip id, split) over the manifest: changes when a clip joins, leaves or changes split."""
    return feature_key("splits", {}, "", sorted(f"{c.id}:{c.split}" for c in manifest.clips))


def ablation_settings() -> dict:
    """What the ablation tables vary (part of their result key)."""
    return {"sampling_steps": list(ABLATION_SAMPLING_STEPS), "bst_intervals": ABLATION_INTERVALS,
            "tables": ["V", "VI", "VII"]}


# ---- a model evaluated on another dataset ---------------------------------------------------------

def cross_dataset_split(model_pairs: EmbeddingPairs, eval_pairs: EmbeddingPairs, split: str = "test") -> SplitData:
    """The model's own train / val pairs (ridge control fitted, blend weights chosen there: nothing
    is fitted or chosen on the other dataset) and the other dataset's ``split`` as the test set;
    both in the model's space (the other dataset embedded with the model's heads)."""
    data = SplitData(model_pairs.subset("train"), model_pairs.subset("val"), eval_pairs.subset(split))
    for name, part in (("train", data.train), ("val", data.val), (split, data.test)):
        if len(part) < 2:
            raise ValueError(f"split {name!r} has {len(part)} clips with embeddings; need at least 2")
    return data


def transfer_result_key(config: Mapping[str, Any], model_dataset: str, models: Sequence[DiffgapRef | SkippedSpace],
                        eval_manifest: ClipManifest, eval_embedding_keys: Mapping[str, str]) -> tuple[str, dict]:
    """The key of a cross-dataset evaluation: it names both datasets, the models' checkpoints and
    embedding keys (in the model's dataset), the evaluated dataset's splits and its embedding keys
    in the model's space."""
    inputs = [f"model_dataset:{model_dataset}", f"eval_dataset:{eval_manifest.dataset}",
              f"eval:splits:{splits_digest(eval_manifest)}"]
    for ref in models:
        if isinstance(ref, SkippedSpace):
            inputs.append(f"{ref.space}:skipped:{ref.reason}")
        else:
            inputs += [f"{ref.space}:checkpoint:{ref.key}", f"{ref.space}:embeddings:{ref.embedding_key}",
                       f"{ref.space}:eval_embeddings:{eval_embedding_keys.get(ref.space, '')}"]
    params = {"config": dict(config), "diffgap_code_version": DIFFGAP_CODE_VERSION}
    key = feature_key("diffgap_transfer", params, EVALUATION_CODE_VERSION, inputs)
    return key, {"params": params, "code_version": EVALUATION_CODE_VERSION, "inputs": inputs}
