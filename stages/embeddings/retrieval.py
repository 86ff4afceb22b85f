"""Retrieval evaluation of the contrastive embeddings against random and untrained-head baselines.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

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


AWARE_KS = (1, 5, 10)


def evaluate_retrieval(
    store: FeatureStore,
    manifest: ClipManifest,
    heads: Mapping[str, Mapping],
    split: str = "test",
    seed: int = 0,
) -> list[dict]:
    """R@1/5/10, mean and median rank per direction on one split, for the trained embeddings and
    two baselines: random unit vectors, and the same towers through an untrained (randomly
    initialised) head of the same shape. Beside each R@k, "dup-aware R@k": a hit on any gallery
    item with the identical caption or byte-identical media (not a miss the model could avoid).
    Clips with several captions (AudioCaps, Clotho) follow those datasets' protocol: every caption
    is a T->A query, and A->T hits when any of the clip's captions is in the top k.

    ``heads`` maps a head kind to {"embedding_key", "head_key" (or "" for a pretrained model),
    "tower_keys", optionally "head_dataset" (where a head trained on another dataset lives)}.
    """
    import torch
    from models.contrastive import HeadConfig

    from stages.evaluation.duplicates import clip_texts, relevance
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
        clips = [index[i] for i in ids]
        methods = {"trained": {name: table.arrays[name][keep] for name in ("audio", "text", "video") if name in table.arrays}}
        dim = next(iter(methods["trained"].values())).shape[-1]
        methods["random embeddings"] = {name: normalize(rng.normal(size=(len(ids), dim))) for name in methods["trained"]}
        untrained = None
        if info.get("head_key"):
            head_dataset = info.get("head_dataset") or manifest.dataset  # a pretrained space lives in its source
            _, sidecar = load_checkpoint(store, head_dataset, kind, info["head_key"])
            torch.manual_seed(seed)
            untrained = build_head(kind, sidecar["input_dims"], HeadConfig(**sidecar["head_config"]))
            towers = paired_features(store, manifest, kind, info["tower_keys"])
            by_id = {clip_id: row for row, clip_id in enumerate(towers.clip_ids)}
            rows_of = [by_id[i] for i in ids]
            methods["untrained head"] = embed(untrained, kind, {k: v[rows_of] for k, v in towers.arrays.items()})
        owners = {name: np.arange(len(ids)) for name in methods["trained"]}
        texts = {}  # per row of each side: the texts it stands for (text sides only)
        if kind == CLAP_HEAD:
            captions = [clip_texts(clip) for clip in clips]
            if info.get("head_key") and any(len(c) > 1 for c in captions):
                owners["text"] = np.array([i for i, own in enumerate(captions) for _ in own])
                flat = [text for own in captions for text in own]
                for method, text in _caption_embeddings(store, head_dataset, info["head_key"], flat, untrained, rng).items():
                    methods[method]["text"] = text
                texts = {"text": [(t,) for t in flat], "audio": captions}
            else:  # one text per clip: the one its embedding was made from
                texts = {"text": [own[:1] for own in captions], "audio": [own[:1] for own in captions]}
        hashes = [clip.content_hash for clip in clips]
        for direction, query, gallery in DIRECTIONS[kind]:
            paired, aware = relevance(owners[query], owners[gallery], hashes, texts.get(query), texts.get(gallery))
            for method, arrays in methods.items():
                metrics = retrieval_metrics(arrays[query], arrays[gallery], relevant=paired)
                dup_aware = retrieval_metrics(arrays[query], arrays[gallery], AWARE_KS, relevant=aware)
                rows.append({"direction": direction, "method": method, "split": split, "seed": seed, **metrics,
                             **{f"dup-aware R@{k}": dup_aware[f"R@{k}"] for k in AWARE_KS},
                             "gallery": len(arrays[gallery])})
    return rows


def _caption_embeddings(store: FeatureStore, dataset: str, head_key: str, captions: list[str], untrained, rng) -> dict:
    """Every caption through the text tower and the trained / untrained CLAP text head (and random
    vectors): the text rows of the multi-caption protocol. The text tower feature embeds one text
    per clip, so the others are embedded here, for the evaluated split only."""
    import torch

    from models.towers import TextTower, get_tower
    from stages.embeddings.heads import load_head
    from stages.evaluation.retrieval import normalize

    vectors = torch.from_numpy(get_tower(TextTower).encode(captions))
    trained = load_head(store, dataset, CLAP_HEAD, head_key).eval()
    untrained.eval()
    with torch.no_grad():
        out = {"trained": trained.embed_text(vectors).numpy(), "untrained head": untrained.embed_text(vectors).numpy()}
    out["random embeddings"] = normalize(rng.normal(size=(len(captions), out["trained"].shape[-1])))
    return out
