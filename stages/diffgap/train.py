"""DiffGAP training (Algorithm 1: bidirectional split training), retrieval with generated
embeddings, the ridge-regression control, and the ablations of Tables V-VII.

One model per contrastive space: CLAP (text <-> audio) and CAVP (video <-> audio, pooled).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from models.constants import FROM_AUDIO, TO_AUDIO
from stages.embeddings.spaces import get_space
from stages.ingest.manifest import ClipManifest
from stages.core.parallel import torch_threads
from stages.evaluation.retrieval import normalize
from stages.core.checkpoints import load_module, restore_optimizer
from stages.core.lineage import NewShards, Progress, Start, Trained, fit_with_lineage
from stages.core.progress import LossWindow
from stages.core.progress import Progress as ProgressLog
from stages.core.store import FeatureStore, feature_key

if TYPE_CHECKING:
    import torch
    from models.diffgap import Denoiser, DenoiserConfig


DIFFGAP_CODE_VERSION = "1"
# space -> (embedding feature, the non-audio modality, its letter in direction names)
BLEND_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def model_name(space: str) -> str:
    return f"diffgap_{space}"


def direction_names(space: str) -> dict[int, str]:
    letter = get_space(space).letter
    return {TO_AUDIO: f"{letter}->A", FROM_AUDIO: f"A->{letter}"}


@dataclass(frozen=True)
class DiffgapTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 2e-4  # the paper's Adam learning rate
    weight_decay: float = 0.0
    bst: bool = True
    # The paper swaps every 5000 of roughly 20k-90k iterations; 250 of 3000 keeps about that ratio.
    bst_interval: int = 250
    single_direction: int = TO_AUDIO  # when bst is off: which way the model learns
    condition_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    update_steps: int = 1000  # warm start on new shards: steps on new + replayed clips
    replay_fraction: float = 0.5  # share of each warm-start batch drawn from previously seen clips
    width: int = 280
    depth: int = 2
    direction_embedding: bool = True

    def denoiser_config(self, embed_dim: int) -> DenoiserConfig:
        from models.diffgap import DenoiserConfig

        return DenoiserConfig(embed_dim=embed_dim, width=self.width, depth=self.depth, direction_embedding=self.direction_embedding)

    def params(self) -> dict:
        return asdict(self)

    def direction_at(self, step: int) -> int:
        """Algorithm 1: condition and target swap every bst_interval iterations."""
        if not self.bst:
            return self.single_direction
        return TO_AUDIO if ((step - 1) // max(1, self.bst_interval)) % 2 == 0 else FROM_AUDIO


@dataclass
class EmbeddingPairs:
    """Audio and the other modality's embeddings of the same clips, unit vectors."""

    clip_ids: list[str]
    audio: np.ndarray
    other: np.ndarray
    splits: list[str]
    shards: list[str] = field(default_factory=list)

    def subset(self, split: str) -> "EmbeddingPairs":
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return EmbeddingPairs([self.clip_ids[i] for i in keep], self.audio[keep], self.other[keep], [split] * len(keep), self.shards)

    def rows_of(self, clip_ids: set[str]) -> np.ndarray:
        return np.array([i for i, c in enumerate(self.clip_ids) if c in clip_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def condition_target(self, direction: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.other, self.audio) if direction == TO_AUDIO else (self.audio, self.other)


def load_pairs(store: FeatureStore, manifest: ClipManifest, space: str, embedding_key: str) -> EmbeddingPairs:
    feature, other = get_space(space).embedding_feature, get_space(space).other
    shards = sorted(manifest.by_shard())
    table = store.read_arrays(manifest.dataset, feature, embedding_key, shards=shards, names=["audio", other])
    index = manifest.index()
    return EmbeddingPairs(
        table.clip_ids,
        normalize(table.arrays["audio"]) if len(table) else np.zeros((0, 0), np.float32),
        normalize(table.arrays[other]) if len(table) else np.zeros((0, 0), np.float32),
        [index[c].split for c in table.clip_ids],
        shards,
    )


# ---- training -------------------------------------------------------------------------------------

@dataclass
class DiffgapTrainResult:
    model: Denoiser
    history: list[dict]
    steps_run: int
    resumed_from: int
    seconds: float


SMALL_MODEL_THREADS = 1


def train_diffgap(*args, **kwargs) -> "DiffgapTrainResult":
    with torch_threads(SMALL_MODEL_THREADS):
        return _train_diffgap(*args, **kwargs)


def _train_diffgap(
    train: EmbeddingPairs,
    config: DiffgapTrainConfig,
    init_state: Mapping[str, torch.Tensor] | None = None,
    new_clip_ids: set[str] | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
    label: str = "diffgap",
) -> DiffgapTrainResult:
    """Train (or warm-start) a denoiser on one space's training pairs.

    From scratch: ``config.steps`` steps on all clips. Warm start (``init_state`` and
    ``new_clip_ids``): ``config.update_steps`` steps whose batches mix new clips with replayed
    old ones (``replay_fraction``), so the model learns the new data without forgetting.
    On ``device``, with rows and noise drawn on the host as on CPU (models.devices); ``log`` gets
    progress lines named by ``label`` (steps, loss, ETA). The returned model is on the host.
    """
    import torch
    from models.devices import DeviceRows, check_device, to_device
    from models.diffgap import Denoiser, diffusion_loss, make_train_scheduler

    if len(train) < 2:
        raise ValueError(f"need at least 2 training clips with embeddings, got {len(train)}")
    start = time.perf_counter()
    check_device(device)
    progress = progress or Progress()
    # Initialisation from the config's seed, not the caller's global RNG: two fits of one config
    # end with identical weights (the caller's RNG is left as it was).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Denoiser(config.denoiser_config(train.audio.shape[1]))
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    scheduler = make_train_scheduler(model.config)
    warm = init_state is not None and new_clip_ids is not None
    total_steps = config.update_steps if warm else config.steps
    new_rows = train.rows_of(new_clip_ids) if warm else np.arange(len(train))
    old_rows = np.setdiff1d(np.arange(len(train)), new_rows)
    if warm and not len(new_rows):
        raise ValueError("warm start asked for, but none of the new clips is in the training split")
    first_step, history = 1, []
    restored = progress.load()
    if restored is not None:
        step_done, model_state, optimizer_state, groups = restored
        model.load_state_dict(model_state)
        restore_optimizer(optimizer, optimizer_state, groups)
        first_step, history = step_done + 1, list(groups.get("history", []))
        if log:
            log(f"{label}: resuming at step {first_step} of {total_steps}")
    pairs = DeviceRows({"audio": train.audio, "other": train.other}, device)
    rng = np.random.default_rng([config.seed, first_step])
    generator = torch.Generator().manual_seed(config.seed * 100003 + first_step)
    batch_size = min(config.batch_size, len(train))
    steps = range(first_step, total_steps + 1)

    def batches():
        for _ in steps:
            if warm and len(old_rows):
                n_old = int(round(batch_size * config.replay_fraction))
                yield torch.from_numpy(np.concatenate([rng.choice(new_rows, batch_size - n_old), rng.choice(old_rows, n_old)]))
            else:
                yield torch.from_numpy(rng.choice(new_rows, batch_size, replace=len(new_rows) < batch_size))

    shown = ProgressLog(label, total_steps, "steps", log, done=first_step - 1).start()
    losses = LossWindow("DiffGAP loss")
    model.train()
    for step, batch in zip(steps, pairs.prefetch(batches())):
        direction = config.direction_at(step)
        condition, target = (batch["other"], batch["audio"]) if direction == TO_AUDIO else (batch["audio"], batch["other"])
        directions = to_device(torch.full((len(target),), direction), target.device)
        loss = diffusion_loss(model, scheduler, target, condition, directions, config.condition_dropout, generator)
        losses.add(step, loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == total_steps:
            history.append({"step": step, "loss": float(np.mean(losses.take())), "direction": int(direction)})
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
            losses.check()  # never save a step past a non-finite loss
            progress.save(step, model, optimizer, history)
        if shown.due() or step == total_steps:
            shown.advance(step - shown.done, loss=losses.check)
    model.to("cpu").eval()  # the caller saves and samples on the host
    return DiffgapTrainResult(model, history, total_steps - first_step + 1, first_step - 1, time.perf_counter() - start)


def gap_statistics(pairs: EmbeddingPairs) -> dict:
    """How far apart the two modalities sit: mean cosine of matched pairs vs unmatched ones, and
    the distance between the modality centroids (the 'modality gap')."""
    matched = float(np.mean(np.sum(pairs.audio * pairs.other, axis=1)))
    sims = pairs.audio @ pairs.other.T
    unmatched = float((sims.sum() - np.trace(sims)) / max(1, sims.size - len(sims)))
    gap = float(np.linalg.norm(pairs.audio.mean(0) - pairs.other.mean(0)))
    return {"matched_cosine": matched, "unmatched_cosine": unmatched, "centroid_gap": gap}


# ---- fitting with lineage: reuse, warm start on new shards, resume after a kill -------------------

def lineage_key(space: str, config: DiffgapTrainConfig, embedding_key: str) -> str:
    return feature_key(model_name(space), config.params(), DIFFGAP_CODE_VERSION, [embedding_key])


@dataclass
class FitResult:
    key: str
    sidecar: dict
    status: str  # "reused" | "trained" | "warm-started" | "resumed" | "carried over"
    model: Denoiser


def load_model(store: FeatureStore, dataset: str, space: str, key: str, device: str = "cpu") -> tuple[Denoiser, dict]:
    """A stored denoiser on ``device`` (sampling runs where the model is) and its sidecar."""
    from models.devices import check_device
    from models.diffgap import Denoiser, DenoiserConfig

    model, sidecar = load_module(store, dataset, model_name(space), key, lambda s: Denoiser(DenoiserConfig(**s["denoiser_config"])))
    return model.to(check_device(device)), sidecar


def fit_label(space: str, config: DiffgapTrainConfig) -> str:
    """`diffgap clap seed 1`, plus what an ablation changed (`, no BST`, `, bst_interval 500`): which fit a
    progress line is about."""
    default = DiffgapTrainConfig()
    label = f"diffgap {space} seed {config.seed}"
    if not config.bst:
        label += f", no BST ({direction_names(space)[config.single_direction]} only)"
    elif config.bst_interval != default.bst_interval:
        label += f", bst_interval {config.bst_interval}"
    if config.direction_embedding != default.direction_embedding:
        label += f", direction_embedding {config.direction_embedding}"
    return label


def fit_space(
    store: FeatureStore,
    manifest: ClipManifest,
    space: str,
    embedding_key: str,
    config: DiffgapTrainConfig,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> FitResult:
    """The DiffGAP model of one space for the manifest's current shards (stages.core.lineage),
    trained on ``device`` and returned there (so sampling with it runs there too); ``log`` gets
    progress lines (space, seed, steps, loss, ETA).

    Checkpoint key = hash(lineage, shards). Same shards: reuse. New shards and an earlier
    checkpoint of the same lineage (same config and embedding key): warm start on the new
    training clips plus replayed old ones. A run killed mid-training resumes from its last
    progress save.
    """
    from models.devices import check_device
    from models.diffgap import Denoiser

    name = model_name(space)
    lineage = lineage_key(space, config, embedding_key)
    shards = sorted(manifest.by_shard())
    key = feature_key(name, {"lineage": lineage}, DIFFGAP_CODE_VERSION, shards)
    shard_of = {c.id: shard for shard, clips in manifest.by_shard().items() for c in clips}

    def train(start: Start) -> Trained:
        train_pairs = load_pairs(store, manifest, space, embedding_key).subset("train")
        new_ids = None
        if start.previous is not None:
            new = set(start.new_shards)
            new_ids = {c for c in train_pairs.clip_ids if shard_of[c] in new}
        if start.previous is not None and not new_ids:  # no new training clip: the previous weights carry over
            model = Denoiser(config.denoiser_config(train_pairs.audio.shape[1]))
            model.load_state_dict(start.state)
            result = DiffgapTrainResult(model, [], 0, 0, 0.0)
        else:
            result = train_diffgap(train_pairs, config, init_state=start.state, new_clip_ids=new_ids,
                                   progress=start.progress, log=log, device=device, label=fit_label(space, config))
        return Trained(result.model.state_dict(), result.model, result.steps_run, result.resumed_from, result.seconds, {
            "space": space,
            "embedding_key": embedding_key,
            "train_config": config.params(),
            "denoiser_config": result.model.config.params(),
            "clips_train": len(train_pairs),
            "clips_new": len(new_ids) if new_ids is not None else len(train_pairs),
            "history": result.history,
            "gap": gap_statistics(train_pairs),
            "device": str(device),  # where it trained (provenance; not in the key)
        })

    fitted = fit_with_lineage(store, manifest.dataset, name, key, shards, train, on_new_shards=NewShards.WARM_START,
                              lineage=lineage, load=lambda k: load_model(store, manifest.dataset, space, k))
    return FitResult(fitted.key, fitted.sidecar, fitted.status, fitted.model.to(check_device(device)))
