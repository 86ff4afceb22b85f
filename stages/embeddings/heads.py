"""Train CLAP / CAVP projection heads on cached tower features; write clip embeddings per shard.

Tower features (stages.features.towers) are read from the store, so training never decodes media again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from stages.core.checkpoints import load_module
from stages.features.base import ShardFeature, ShardJob, ShardOutput, ShardResult, register_feature, registered_feature
from stages.ingest.manifest import ClipManifest
from stages.core.lineage import Fitted, NewShards, Start, Trained, fit_with_lineage
from stages.core.progress import LossWindow, Progress
from stages.core.store import FeatureStore, canonical_json, feature_key

if TYPE_CHECKING:
    import torch
    from models.contrastive import HeadConfig



AUDIO_TOWER, FRAME_TOWER, TEXT_TOWER = "audio_tower", "frame_tower", "text_tower"
CLAP_HEAD, CAVP_HEAD = "clap_head", "cavp_head"
CLAP_FEATURE, CAVP_FEATURE = "clap_embeddings", "cavp_embeddings"
HEAD_CODE_VERSION = "1"
EMBEDDING_CODE_VERSION = "1"

# What each head reads: (input name, tower feature, array in that feature).
HEAD_INPUTS = {
    CLAP_HEAD: (("audio", AUDIO_TOWER, "pooled"), ("text", TEXT_TOWER, "text")),
    CAVP_HEAD: (("audio", AUDIO_TOWER, "per_second"), ("video", FRAME_TOWER, "per_second")),
}


# What a missing input is called when no clip has it ("no clip has video").
INPUT_NOUNS = {"audio": "audio", "text": "a caption or label", "video": "video"}


def missing_input_reason(store: FeatureStore, manifest: ClipManifest, head: str, tower_keys: Mapping[str, str]) -> str:
    """Why this dataset cannot fill the head's space ("" when it can): no clip has one of its
    inputs, or none has both. Reads the tower shards' manifests only, not their arrays."""
    present: dict[str, set] = {}
    quarantined: dict[str, list] = {}
    for name, feature, _ in HEAD_INPUTS[head]:
        present[name], quarantined[name] = set(), []
        for shard in manifest.by_shard():
            committed = store.shard_manifest(manifest.dataset, feature, tower_keys[feature], shard)
            present[name].update(committed["clip_ids"])
            quarantined[name] += [entry.get("reason", "") for entry in committed.get("quarantined", [])]
    for name, ids in present.items():
        if not ids:
            reasons = sorted(set(quarantined[name]))
            why = f" ({len(quarantined[name])} clips quarantined: {'; '.join(reasons[:2])})" if reasons else ""
            return f"no clip has {INPUT_NOUNS[name]}{why}"
    if not set.intersection(*present.values()):
        return f"no clip has both {' and '.join(INPUT_NOUNS[n] for n in present)}"
    return ""


@dataclass(frozen=True)
class HeadTrainConfig:
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 50
    seed: int = 0
    temporal_negatives: bool = True  # CAVP only
    embed_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1

    def head_config(self) -> HeadConfig:
        from models.contrastive import HeadConfig

        return HeadConfig(embed_dim=self.embed_dim, hidden_dim=self.hidden_dim, dropout=self.dropout)

    def params(self) -> dict:
        return asdict(self)


@dataclass
class PairedFeatures:
    """Rows of two tower features for the same clips, in the same order."""

    clip_ids: list[str]
    arrays: dict[str, np.ndarray]
    splits: list[str]
    shards: list[str] = field(default_factory=list)

    def subset(self, split: str) -> "PairedFeatures":
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return PairedFeatures(
            [self.clip_ids[i] for i in keep], {k: v[keep] for k, v in self.arrays.items()}, [split] * len(keep), self.shards
        )

    def __len__(self) -> int:
        return len(self.clip_ids)


def paired_features(
    store: FeatureStore, manifest: ClipManifest, head: str, tower_keys: Mapping[str, str], shards=None
) -> PairedFeatures:
    """Read the head's two inputs for every clip present in both, in manifest order."""
    tables = {}
    for name, feature, array in HEAD_INPUTS[head]:
        table = store.read_arrays(manifest.dataset, feature, tower_keys[feature], shards=shards, names=[array])
        tables[name] = dict(zip(table.clip_ids, table.arrays[array])) if table.clip_ids else {}
    index = manifest.index()
    ids = [c.id for c in manifest.clips if all(c.id in t for t in tables.values())]
    arrays = {name: np.stack([t[i] for i in ids]).astype(np.float32) if ids else np.zeros((0,)) for name, t in tables.items()}
    return PairedFeatures(ids, arrays, [index[i].split for i in ids], list(shards or []))


def build_head(kind: str, dims: Mapping[str, int], config: HeadConfig):
    from models.contrastive import CavpHead, ClapHead

    if kind == CLAP_HEAD:
        return ClapHead(dims["audio"], dims["text"], config)
    if kind == CAVP_HEAD:
        return CavpHead(dims["audio"], dims["video"], config)
    raise ValueError(f"unknown head {kind!r}")


def input_dims(data: PairedFeatures) -> dict[str, int]:
    return {name: int(array.shape[-1]) for name, array in data.arrays.items()}


def _loss(model, kind: str, batch: dict[str, torch.Tensor], config: HeadTrainConfig) -> torch.Tensor:
    if kind == CLAP_HEAD:
        return model.loss(batch["audio"], batch["text"])
    return model.loss(batch["audio"], batch["video"], temporal_negatives=config.temporal_negatives)


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[dict]
    best_step: int
    best_val_loss: float
    seconds: float


def train_head(*args, device: str = "cpu", **kwargs) -> "TrainResult":
    """See _train_head; small heads train on one thread (see stages.core.parallel.torch_threads)."""
    import torch
    from models.devices import seeded_devices

    from stages.core.parallel import torch_threads

    # Seeded from the config's seed (init and dropout) in a scope of its own: the caller's global RNG is left as it was.
    with torch_threads(1), torch.random.fork_rng(devices=seeded_devices(device)):
        return _train_head(*args, device=device, **kwargs)


def _train_head(
    kind: str,
    train: PairedFeatures,
    val: PairedFeatures,
    config: HeadTrainConfig,
    init_state: Mapping[str, torch.Tensor] | None = None,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> TrainResult:
    """AdamW on random mini-batches; keeps the weights with the lowest validation loss.

    On ``device`` (models.devices: batch rows drawn on the host as on CPU, the arrays copied once
    when they fit). The loss is read back at evaluations and progress lines only, so a CUDA step
    does not wait for the one before; a non-finite loss still fails naming its step.
    """
    import torch
    from models.devices import DeviceRows, check_device, to_device

    if len(train) < 2:
        raise ValueError(f"{kind}: need at least 2 training clips with both inputs, got {len(train)}")
    start = time.perf_counter()
    check_device(device)
    torch.manual_seed(config.seed)
    generator = np.random.default_rng(config.seed)
    model = build_head(kind, input_dims(train), config.head_config())
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.steps))
    rows = DeviceRows(train.arrays, device)
    val_tensors = {k: to_device(torch.from_numpy(v), device) for k, v in val.arrays.items()} if len(val) >= 2 else None
    batch_size = min(config.batch_size, len(train))
    progress = Progress(f"{kind.replace('_', ' ')} seed {config.seed}", config.steps, "steps", log).start()

    def val_loss() -> float:
        if val_tensors is None:
            return float("nan")
        model.eval()
        with torch.no_grad():
            loss = float(_loss(model, kind, val_tensors, config))
        model.train()
        return loss

    def batches():
        for _ in range(config.steps):
            yield torch.from_numpy(generator.choice(len(train), size=batch_size, replace=False))

    history, best = [], (float("inf"), 0, {k: v.clone() for k, v in model.state_dict().items()})
    losses = LossWindow(f"{kind}: training loss")
    current = float("nan")
    model.train()
    for step, batch in enumerate(rows.prefetch(batches()), start=1):
        loss = _loss(model, kind, batch, config)
        losses.add(step, loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            train_loss = losses.check()
            current = val_loss()
            with torch.no_grad():
                temperature = float(1 / model.scale())
            history.append({"step": step, "train_loss": train_loss, "val_loss": current, "temperature": temperature})
            score = current if np.isfinite(current) else train_loss
            if score < best[0]:
                best = (score, step, {k: v.clone() for k, v in model.state_dict().items()})
        if progress.due() or step == config.steps:
            progress.advance(step - progress.done, loss=losses.check, **({"val": current} if np.isfinite(current) else {}))
    model.load_state_dict(best[2])
    model.to("cpu").eval()  # the caller embeds and saves on the host
    return TrainResult(model, history, best[1], best[0], time.perf_counter() - start)


def embed(model, kind: str, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Clip embeddings (L2-normalised). CAVP also returns the per-second embeddings."""
    import torch

    with torch.no_grad():
        model.eval()
        tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in data.items()}
        if kind == CLAP_HEAD:
            return {"audio": model.embed_audio(tensors["audio"]).numpy(), "text": model.embed_text(tensors["text"]).numpy()}
        audio_seconds = model.embed_audio(tensors["audio"])
        video_seconds = model.embed_video(tensors["video"])
        return {
            "audio": model.pool(audio_seconds).numpy(),
            "video": model.pool(video_seconds).numpy(),
            "audio_per_second": audio_seconds.numpy(),
            "video_per_second": video_seconds.numpy(),
        }


@lru_cache(maxsize=4)
def _cached_head(store_root: str, storage_json: str, dataset: str, kind: str, key: str):
    from models.contrastive import HeadConfig

    store = FeatureStore(store_root, json.loads(storage_json))
    model, _ = load_module(store, dataset, kind, key,
                           lambda s: build_head(kind, s["input_dims"], HeadConfig(**s["head_config"])))
    return model


def load_head(store: FeatureStore, dataset: str, kind: str, key: str):
    """A trained head from its checkpoint (cached per process: workers embed many shards)."""
    # JSON, not a tuple of items: S3 options hold dicts (client_kwargs, config_kwargs), which do not hash.
    return _cached_head(store.url_root, canonical_json(store.storage_options), dataset, kind, key)


def head_key(kind: str, config: HeadTrainConfig, revision: str, tower_keys: Mapping[str, str]) -> str:
    """The head's checkpoint key. It leaves the shards out on purpose: new clips are embedded with
    the head already trained, so the space DiffGAP and downstream models live in stays fixed (and
    so do their keys). ``revision`` retrains on the current data."""
    return feature_key(kind, {**config.params(), "revision": revision}, HEAD_CODE_VERSION, sorted(tower_keys.values()))


def fit_head(store: FeatureStore, manifest: ClipManifest, kind: str, tower_keys: Mapping[str, str], config: HeadTrainConfig,
             revision: str = "", log: Callable[[str], None] | None = None, device: str = "cpu") -> Fitted:
    """The trained projection heads of one space (stages.core.lineage, new shards: reuse), trained
    on ``device``; ``log`` gets progress lines (steps, loss, ETA)."""
    key = head_key(kind, config, revision, tower_keys)

    def train(start: Start) -> Trained:
        data = paired_features(store, manifest, kind, dict(tower_keys))
        train_set, val_set = data.subset("train"), data.subset("val")
        result = train_head(kind, train_set, val_set, config, log=log, device=device)
        return Trained(result.model.state_dict(), result.model, config.steps, 0, result.seconds, {
            "head_config": config.head_config().params(),
            "train_config": config.params(),
            "input_dims": input_dims(train_set),
            "tower_keys": dict(tower_keys),
            "shards": sorted(manifest.by_shard()),
            "clips_train": len(train_set),
            "clips_val": len(val_set),
            "history": result.history,
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "device": str(device),  # where it trained (provenance; not in the key)
        })

    return fit_with_lineage(store, manifest.dataset, kind, key, sorted(manifest.by_shard()), train,
                            on_new_shards=NewShards.REUSE)


def embedding_params(kind: str, head_key: str, tower_keys: Mapping[str, str], head_dataset: str = "") -> dict:
    """What an embedding feature's key hashes. ``head_dataset``: the dataset whose train split the
    head was fitted on, when it is not the embedded one (a pretrained space); it enters the params
    only then, so a dataset's own embeddings keep their key."""
    params = {"head": kind, "head_key": head_key, "tower_keys": dict(tower_keys)}
    if head_dataset:
        params["head_dataset"] = head_dataset
    return params


class _HeadEmbeddings(ShardFeature):
    """Embed one shard's tower features with a trained head; clips missing an input are quarantined."""

    code_version = EMBEDDING_CODE_VERSION
    group, kinds = "embeddings", ("pytorch",)

    def extract(self, job: ShardJob, store) -> ShardOutput:
        kind, head_key = job.params["head"], job.params["head_key"]
        tower_keys = job.params["tower_keys"]
        rows: dict[str, dict[str, np.ndarray]] = {}
        quarantine_reasons: dict[str, str] = {}
        for name, feature, array in HEAD_INPUTS[kind]:
            manifest = store.shard_manifest(job.dataset, feature, tower_keys[feature], job.shard)
            for entry in manifest.get("quarantined", []):
                quarantine_reasons.setdefault(entry["id"], f"{feature}: {entry['reason']}")
            table = store.read_arrays(job.dataset, feature, tower_keys[feature], shards=[job.shard], names=[array])
            rows[name] = dict(zip(table.clip_ids, table.arrays[array]))
        clip_ids = [clip_id for clip_id, _, _ in job.clips if all(clip_id in r for r in rows.values())]
        quarantined = [
            {"id": clip_id, "reason": quarantine_reasons.get(clip_id, "missing a tower feature")}
            for clip_id, _, _ in job.clips
            if clip_id not in clip_ids
        ]
        if clip_ids:
            # A space trained on another dataset (a pretrained space) has its checkpoint there.
            model = load_head(store, job.params.get("head_dataset") or job.dataset, kind, head_key)
            out = embed(model, kind, {name: np.stack([r[i] for i in clip_ids]) for name, r in rows.items()})
        else:
            out = {}
        return ShardOutput(clip_ids, {k: v.astype(np.float32) for k, v in out.items()}, quarantined)


@register_feature
class ClapEmbeddings(_HeadEmbeddings):
    name, inputs = CLAP_FEATURE, (AUDIO_TOWER, TEXT_TOWER)
    description = "CLAP embeddings of every clip's audio and caption (L2-normalised), from the trained head."


@register_feature
class CavpEmbeddings(_HeadEmbeddings):
    name, inputs = CAVP_FEATURE, (AUDIO_TOWER, FRAME_TOWER)
    description = "CAVP embeddings of every clip's audio and video: pooled and per second (L2-normalised)."


def compute_embedding_shard(job: ShardJob) -> ShardResult:
    return registered_feature(job.feature).compute_shard(job)
