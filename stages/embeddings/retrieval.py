"""Retrieval evaluation of the contrastive embeddings against random and untrained-head baselines.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from models.contrastive import HeadConfig
from stages.core.checkpoints import load_checkpoint
from stages.ingest.manifest import ClipManifest
from stages.core.store import FeatureStore

from stages.embeddings.heads import CAVP_FEATURE, CAVP_HEAD, CLAP_FEATURE, CLAP_HEAD, build_head, embed, paired_features


# ---- retrieval evaluation ------------------------------------------------------------------------

# (query, gallery) arrays of each head's embedding feature, by direction name.
DIRECTIONS = {
    CLAP_HEAD: (("T->A", "text", "audio"), ("A->T", "audio", "text")),
    CAVP_HEAD: (("V->A", "video", "audio"), ("A->V", "audio", "video")),
}
EMBEDDING_FEATURE = {CLAP_HEAD: CLAP_FEATURE, CAVP_HEAD: CAVP_FEATURE}


def evaluate_retrieval(
    store: FeatureStore,
    manifest: ClipManifest,
    heads: Mapping[str, Mapping],
    split: str = "test",
    seed: int = 0,
) -> list[dict]:
    """R@1/5/10, mean and median rank per direction on one split, for the trained embeddings and
    two baselines: random unit vectors, and the same towers through an untrained (randomly
    initialised) head of the same shape.

    ``heads`` maps a head kind to {"embedding_key", "head_key" (or "" for a pretrained model),
    "tower_keys"}.
    """
    from stages.evaluation.retrieval import normalize, retrieval_metrics

    index = manifest.index()
    rows: list[dict] = []
    rng = np.random.default_rng(seed)
    for kind, info in heads.items():
        table = store.read_arrays(manifest.dataset, EMBEDDING_FEATURE[kind], info["embedding_key"])
        keep = [i for i, clip_id in enumerate(table.clip_ids) if index.get(clip_id) and index[clip_id].split == split]
        if len(keep) < 2:
            raise ValueError(f"{kind}: only {len(keep)} clips with embeddings in split {split!r}; need at least 2")
        ids = [table.clip_ids[i] for i in keep]
        methods = {"trained": {name: table.arrays[name][keep] for name in ("audio", "text", "video") if name in table.arrays}}
        dim = next(iter(methods["trained"].values())).shape[-1]
        methods["random embeddings"] = {name: normalize(rng.normal(size=(len(ids), dim))) for name in methods["trained"]}
        if info.get("head_key"):
            _, sidecar = load_checkpoint(store, manifest.dataset, kind, info["head_key"])
            torch.manual_seed(seed)
            untrained = build_head(kind, sidecar["input_dims"], HeadConfig(**sidecar["head_config"]))
            towers = paired_features(store, manifest, kind, info["tower_keys"])
            by_id = {clip_id: row for row, clip_id in enumerate(towers.clip_ids)}
            rows_of = [by_id[i] for i in ids]
            methods["untrained head"] = embed(untrained, kind, {k: v[rows_of] for k, v in towers.arrays.items()})
        for direction, query, gallery in DIRECTIONS[kind]:
            for method, arrays in methods.items():
                metrics = retrieval_metrics(arrays[query], arrays[gallery])
                rows.append({"direction": direction, "method": method, "split": split, "seed": seed, **metrics})
    return rows
