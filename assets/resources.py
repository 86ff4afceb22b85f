"""Resources: where clips come from, where features go, where shard work runs, which device."""


import hashlib
import os
from typing import Any

from dagster import ConfigurableResource, Failure
from pydantic import Field, PrivateAttr

from stages.core.ids import UnsafeNameError, check_name
from stages.core.parallel import DaskExecutor, Executor, InProcessExecutor
from stages.ingest.sources import SOURCE_KINDS, SourceConfig, SourceError, SourceListing, list_media, read_source
from stages.core.store import FeatureStore, StoreError

from assets.settings import default_demo_dir, default_store_root


def _s3_options(endpoint_url: str, anon: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if endpoint_url:
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    if anon:
        options["anon"] = True
    return options


class FeatureStoreResource(ConfigurableResource):
    """The feature store root: a local folder or s3://bucket/prefix."""

    root: str = Field(default_factory=default_store_root, description="Local path or s3://bucket/prefix of the feature store.")
    s3_endpoint_url: str = Field(default="", description="S3-compatible endpoint (MinIO, moto); empty = AWS.")
    s3_anon: bool = Field(default=False, description="Access S3 without credentials.")

    def store(self) -> FeatureStore:
        try:
            return FeatureStore(self.root, _s3_options(self.s3_endpoint_url, self.s3_anon) if self.root.startswith("s3://") else {})
        except StoreError as exc:
            raise Failure(str(exc)) from None

    def writable_store(self) -> FeatureStore:
        store = self.store()
        try:
            store.check_writable()
        except StoreError as exc:
            raise Failure(f"{exc}. Fix: set the feature_store resource's root (or XMODAL_STORE_ROOT) to a writable location.") from None
        return store


class ClipSourceResource(ConfigurableResource):
    """Where the clips of one dataset come from; the built-in demo when nothing is configured."""

    kind: str = Field(default="demo", description=f"One of {', '.join(SOURCE_KINDS)}.")
    path: str = Field(default="", description="Folder (folder), CSV (audiocaps, vggsound) or JSONL; local or s3://. Demo: where it is generated.")
    media_dir: str = Field(default="", description="Folder of the media for CSV/JSONL sources; default: the CSV's folder.")
    dataset: str = Field(default="demo", description="Dataset name in the feature store (letters, digits, '_' or '-').")
    shard_size: int = Field(default=64, description="Clips per shard; the unit of caching and parallel work.")
    default_split: str = Field(default="train", description="Split for clips whose source names none.")
    demo_clips: int = Field(default=300, description="Demo only: number of generated clips.")
    demo_seed: int = Field(default=0, description="Demo only: generator seed.")
    s3_endpoint_url: str = Field(default="", description="S3-compatible endpoint for s3:// sources; empty = AWS.")
    s3_anon: bool = Field(default=False, description="Read s3:// sources without credentials.")

    def config(self) -> SourceConfig:
        try:
            check_name(self.dataset, "dataset")
        except UnsafeNameError as exc:
            raise Failure(f"{exc}. Fix: the clip_source resource's dataset.") from None
        if self.kind not in SOURCE_KINDS:
            raise Failure(f"clip source kind {self.kind!r} is unknown: choose one of {', '.join(SOURCE_KINDS)}")
        if self.kind != "demo" and not self.path:
            raise Failure(f"clip source kind {self.kind!r} needs a path: set the clip_source resource's path")
        if self.shard_size < 1:
            raise Failure(f"shard_size must be at least 1, got {self.shard_size}")
        path = self.path or (default_demo_dir() if self.kind == "demo" else "")
        options = _s3_options(self.s3_endpoint_url, self.s3_anon) if path.startswith("s3://") else {}
        return SourceConfig(
            kind=self.kind, path=path, media_dir=self.media_dir, default_split=self.default_split,
            storage_options=options, demo_clips=self.demo_clips, demo_seed=self.demo_seed,
        )

    def listing(self) -> SourceListing:
        try:
            return read_source(self.config())
        except SourceError as exc:
            raise Failure(str(exc)) from None

    def fingerprint(self) -> str:
        """Cheap summary of what the source holds (names, sizes, mtimes) for the new-media sensor."""
        config = self.config()
        if config.kind == "demo":
            return f"demo-{config.demo_clips}-{config.demo_seed}"
        folder = config.path if config.kind == "folder" else (config.media_dir or os.path.dirname(config.path))
        media = list_media(folder, config.storage_options)
        digest = hashlib.sha256()
        for relative, (_, stat) in sorted(media.items()):
            digest.update(f"{relative}\t{stat}\n".encode())
        if config.kind != "folder":  # the index file itself can gain rows
            import fsspec

            fs, index_path = fsspec.core.url_to_fs(config.path, **config.storage_options)
            digest.update(str(fs.info(index_path).get("size")).encode())
        return digest.hexdigest()[:20]


class ComputeResource(ConfigurableResource):
    """Where shard jobs run: in this process, a fresh Dask LocalCluster, or an existing Dask cluster."""

    mode: str = Field(default="local_cluster", description="in_process | local_cluster | scheduler")
    n_workers: int = Field(default=2, description="Worker processes of the LocalCluster.")
    scheduler_address: str = Field(default="", description="Address of an existing Dask scheduler (mode=scheduler).")
    _executor: Executor | None = PrivateAttr(default=None)

    def executor(self) -> Executor:
        """Started on first use, so a run with nothing to compute never starts a cluster."""
        if self._executor is None:
            if self.mode == "in_process":
                self._executor = InProcessExecutor()
            elif self.mode == "local_cluster":
                self._executor = DaskExecutor(n_workers=self.n_workers)
            elif self.mode == "scheduler":
                if not self.scheduler_address:
                    raise Failure("compute mode 'scheduler' needs scheduler_address (e.g. tcp://10.0.0.5:8786)")
                self._executor = DaskExecutor(scheduler_address=self.scheduler_address)
            else:
                raise Failure(f"compute mode {self.mode!r} is unknown: in_process, local_cluster or scheduler")
        return self._executor

    @property
    def worker_threads(self) -> int:
        """One torch thread per task, in-process too: our models are small, and two spinning
        torch threads against a busy core measured 3-40x slower (see stages.core.parallel.torch_threads)."""
        return 1

    def teardown_after_execution(self, context) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None


class DeviceResource(ConfigurableResource):
    """The torch device for feature and model work: cpu or cuda[:n]."""

    name: str = Field(default="cpu", description="cpu or cuda[:index]; everything runs on cpu.")

    def device(self) -> str:
        if self.name.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise Failure(f"device {self.name!r} requested but CUDA is not available here: use device name 'cpu'")
        elif self.name != "cpu":
            raise Failure(f"device {self.name!r} is unknown: use 'cpu' or 'cuda[:index]'")
        return self.name


class PretrainedClapResource(ConfigurableResource):
    """A local folder of transformers ClapModel weights (as LAION ships them); empty = use our heads."""

    model_dir: str = Field(default="", description="Folder with config.json, model weights, preprocessor and tokenizer files; never downloaded.")

    @property
    def enabled(self) -> bool:
        return bool(self.model_dir)
