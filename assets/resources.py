"""Resources: where clips come from, where features go, where shard work runs, which device.

Each setting's default lives once, in its Field below. ``resources_from_env`` passes a setting as
``EnvVar("XMODAL_...")`` only when that variable is set, so the launchpad shows where a value came
from and an unset variable leaves the Field's default.
"""


import hashlib
import os

from dagster import ConfigurableResource, EnvVar, Failure
from pydantic import Field, PrivateAttr

from stages.core.errors import ConfigError, DatasetError
from stages.core.ids import UnsafeNameError, check_name
from stages.core.settings import check_bucket, default_demo_dir, default_store_root, s3_options
from stages.ingest.datasets import register_source, registered_source
from stages.core.parallel import DaskExecutor, Executor, InProcessExecutor
from stages.ingest.sources import SOURCE_KINDS, SourceConfig, SourceError, SourceListing, list_media, read_source
from stages.core.store import FeatureStore, StoreError


class FeatureStoreResource(ConfigurableResource):
    """The feature store root: a local folder or s3://bucket/prefix."""

    root: str = Field(default_factory=default_store_root, description="Local path or s3://bucket/prefix of the feature store.")
    s3_endpoint_url: str = Field(default="", description="S3-compatible endpoint (MinIO, moto); empty = AWS.")
    s3_anon: bool = Field(default=False, description="Access S3 without credentials.")

    def store(self) -> FeatureStore:
        try:
            return FeatureStore(self.root, s3_options(self.s3_endpoint_url, self.s3_anon) if self.root.startswith("s3://") else {})
        except StoreError as exc:
            raise Failure(str(exc)) from None

    def writable_store(self) -> FeatureStore:
        store = self.store()
        try:
            check_bucket(store)  # an unreachable endpoint, a missing bucket or credentials: their own fix
        except StoreError as exc:
            raise Failure(str(exc)) from None
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
    default_split: str = Field(default="", description="Split for clips whose source names none; empty: assigned "
                               "train/val/test 80/10/10 by group (same video or same bytes), stable under additions.")
    confine_to_root: bool = Field(default=False, description="Refuse media (links, absolute paths) outside the source's folder.")
    demo_clips: int = Field(default=300, description="Demo only: number of generated clips.")
    demo_seed: int = Field(default=0, description="Demo only: generator seed.")
    s3_endpoint_url: str = Field(default="", description="S3-compatible endpoint for s3:// sources; empty = AWS.")
    s3_anon: bool = Field(default=False, description="Read s3:// sources without credentials.")

    def setup_for_execution(self, context) -> None:
        self.config()  # a bad kind, path or shard size fails the run before any step

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
        options = s3_options(self.s3_endpoint_url, self.s3_anon) if path.startswith("s3://") else {}
        return SourceConfig(
            kind=self.kind, path=path, media_dir=self.media_dir, default_split=self.default_split,
            confine_to_root=self.confine_to_root,
            storage_options=options, demo_clips=self.demo_clips, demo_seed=self.demo_seed,
        )

    def source_for(self, dataset: str, store: FeatureStore) -> SourceConfig:
        """The source of ``dataset``: this resource's own for its dataset (recorded in the store, so
        other machines and runs find it), else the one registered in the store for that name."""
        if dataset == self.dataset:
            config = self.config()
            register_source(store, dataset, config)
            return config
        registered = registered_source(store, dataset, s3_options(self.s3_endpoint_url, self.s3_anon))
        if registered is None:
            raise DatasetError(
                f"dataset {dataset!r} has no source registered in {store.url_root}: run "
                f"`xmodal dataset add {dataset} --kind KIND --path PATH`, or set XMODAL_DATASET={dataset} with its "
                "XMODAL_SOURCE_KIND / XMODAL_SOURCE_PATH"
            )
        if not registered.path.startswith("s3://"):
            registered = SourceConfig(**{**registered.__dict__, "storage_options": {}})
        return registered

    def knows(self, dataset: str, store: FeatureStore) -> bool:
        return dataset == self.dataset or registered_source(store, dataset) is not None

    def listing(self, config: SourceConfig | None = None) -> SourceListing:
        try:
            return read_source(config or self.config())
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


COMPUTE_MODES = ("in_process", "local_cluster", "scheduler")


class ComputeResource(ConfigurableResource):
    """Where shard jobs run: in this process (default), a LocalCluster started for the run, or an
    existing Dask cluster whose workers stay warm between runs (README "Scale")."""

    # in_process by default: faster on this machine than a LocalCluster started per run, whose two
    # fresh interpreters import torch and load towers every run (bench/bench_compute.py, BENCHMARKS.md).
    mode: str = Field(default="in_process", description="in_process | local_cluster | scheduler")
    n_workers: int = Field(default=2, description="Worker processes of the LocalCluster.")
    scheduler_address: str = Field(default="", description="Address of an existing Dask scheduler (mode=scheduler).")
    _executor: Executor | None = PrivateAttr(default=None)
    _log: object = PrivateAttr(default=None)

    def setup_for_execution(self, context) -> None:
        """Check the settings when the run starts; the cluster itself starts on first use."""
        if self.mode not in COMPUTE_MODES:
            raise Failure(f"compute mode {self.mode!r} is unknown: {', '.join(COMPUTE_MODES)} (XMODAL_COMPUTE)")
        if self.mode == "scheduler" and not self.scheduler_address:
            raise Failure("compute mode 'scheduler' needs scheduler_address (e.g. tcp://10.0.0.5:8786; XMODAL_DASK_SCHEDULER)")
        if self.mode == "local_cluster" and self.n_workers < 1:
            raise Failure(f"compute n_workers must be at least 1, got {self.n_workers} (XMODAL_WORKERS)")
        self._log = getattr(context, "log", None)

    def executor(self) -> Executor:
        """Started on first use, so a run with nothing to compute never starts or joins a cluster."""
        if self._executor is None:
            if self.mode == "in_process":
                self._executor = InProcessExecutor()
            elif self.mode == "local_cluster":
                self._executor = DaskExecutor(n_workers=self.n_workers)
            elif self.mode == "scheduler":
                if not self.scheduler_address:
                    raise Failure("compute mode 'scheduler' needs scheduler_address (e.g. tcp://10.0.0.5:8786)")
                try:
                    self._executor = DaskExecutor(scheduler_address=self.scheduler_address)
                except ConfigError as exc:
                    raise Failure(str(exc)) from None
            else:
                raise Failure(f"compute mode {self.mode!r} is unknown: in_process, local_cluster or scheduler")
            if isinstance(self._executor, DaskExecutor) and self._log is not None:
                self._log.info(self._executor.describe())
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

    def setup_for_execution(self, context) -> None:
        self.device()  # an unknown or unavailable device fails the run before any step

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


# ---- the environment, read in one place ----------------------------------------------------------

# resource key -> field -> environment variable. Only variables that are set are passed (as EnvVar),
# so every default stays in the Field above.
ENV_FIELDS: dict[str, dict[str, str]] = {
    "clip_source": {"kind": "XMODAL_SOURCE_KIND", "path": "XMODAL_SOURCE_PATH", "media_dir": "XMODAL_MEDIA_DIR",
                    "dataset": "XMODAL_DATASET", "shard_size": "XMODAL_SHARD_SIZE", "demo_clips": "XMODAL_DEMO_CLIPS",
                    "s3_endpoint_url": "XMODAL_S3_ENDPOINT_URL"},
    "feature_store": {"root": "XMODAL_STORE_ROOT", "s3_endpoint_url": "XMODAL_S3_ENDPOINT_URL"},
    "compute": {"mode": "XMODAL_COMPUTE", "n_workers": "XMODAL_WORKERS", "scheduler_address": "XMODAL_DASK_SCHEDULER"},
    "device": {"name": "XMODAL_DEVICE"},
    "pretrained_clap": {"model_dir": "XMODAL_CLAP_MODEL_DIR"},
}
RESOURCE_TYPES: dict[str, type[ConfigurableResource]] = {
    "clip_source": ClipSourceResource, "feature_store": FeatureStoreResource, "compute": ComputeResource,
    "device": DeviceResource, "pretrained_clap": PretrainedClapResource,
}


def _env_value(cls: type[ConfigurableResource], field: str, variable: str):
    """EnvVar for a set variable, after checking it parses as the field's type (one line naming it)."""
    raw = os.environ[variable]
    annotation = cls.model_fields[field].annotation
    if annotation is int:
        try:
            int(raw)
        except ValueError:
            raise ConfigError(f"{variable}={raw!r} is not an integer (it sets {cls.__name__}.{field})") from None
        return EnvVar.int(variable)
    return EnvVar(variable)


def env_settings(key: str) -> dict:
    """The fields of one resource that the environment sets, as EnvVar values."""
    cls = RESOURCE_TYPES[key]
    return {field: _env_value(cls, field, variable) for field, variable in ENV_FIELDS[key].items() if os.environ.get(variable)}


def resolved_env_settings(key: str) -> dict:
    """The same fields with their values (for code that needs them at load time, e.g. the default dataset)."""
    return {field: value.get_value() for field, value in env_settings(key).items()}


def resources_from_env() -> dict[str, ConfigurableResource]:
    """Every resource, configured from the environment where it says so, else from its defaults."""
    return {key: RESOURCE_TYPES[key](**env_settings(key)) for key in RESOURCE_TYPES}


def default_dataset() -> str:
    """The dataset a run without a partition works on: $XMODAL_DATASET, else the clip_source default."""
    return str(resolved_env_settings("clip_source").get("dataset", ClipSourceResource.model_fields["dataset"].default))
