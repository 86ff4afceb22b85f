"""Datasets as Dagster's dimension: one dynamic partition per dataset, one writer per dataset.

Why dynamic partitions (not one asset graph per dataset): datasets are added at run time by
researchers (``xmodal dataset add``) without a code change, every dataset keeps its own
materialization history, checks, staleness and lineage on the same asset graph, and a run names
its dataset as its partition key. ``dagster job execute -j train_diffgap`` without a partition runs
the default dataset (the jobs carry it as their default partition tag).

Two runs on one dataset never interleave: the run's first step takes the dataset's lease in the
feature store (stages.core.lease) and holds it until the run ends, on every machine and for every
way of launching (the UI's run queue also limits runs per partition, see dagster.yaml, but
``dagster job execute`` bypasses that queue).
"""

from __future__ import annotations

from dagster import ConfigurableResource, DynamicPartitionsDefinition, Failure, InitResourceContext
from pydantic import Field, PrivateAttr

from assets.resources import ClipSourceResource, FeatureStoreResource
from assets.run_config import check_run_config
from stages.core.errors import XmodalError
from stages.core.lease import DEFAULT_TTL_SECONDS, DatasetLease

DATASETS = DynamicPartitionsDefinition(name="dataset")
PARTITION_TAG = "dagster/partition"


def _register_partition(instance, dataset: str) -> None:
    """Add the run's dataset as a partition if it is new. Runs of one dataset add it under its lease;
    a run with the lease turned off may race another, so a concurrent add is not an error."""
    if instance is None or instance.has_dynamic_partition(DATASETS.name, dataset):
        return
    try:
        instance.add_dynamic_partitions(DATASETS.name, [dataset])
    except Exception:  # the storage's unique-constraint error differs between SQLite and Postgres
        if not instance.has_dynamic_partition(DATASETS.name, dataset):
            raise


class DatasetLeaseResource(ConfigurableResource):
    """Holds the run's dataset lease from the first step to the end of the run."""

    feature_store: FeatureStoreResource
    clip_source: ClipSourceResource
    enabled: bool = Field(default=True, description="Take the dataset's lease for the run (off: the caller guarantees one writer).")
    ttl_seconds: float = Field(default=DEFAULT_TTL_SECONDS, description="A lease not refreshed for this long belongs to a dead run and may be broken.")
    wait_seconds: float = Field(default=24 * 3600.0, description="How long a run waits for another run of its dataset before failing.")
    _lease: DatasetLease | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        run = context.dagster_run
        if run is not None and context.instance is not None:
            current = context.instance.get_run_by_id(run.run_id)
            if current is not None and current.is_finished:
                # `dagster job execute` sets resources up again after the run to read its results:
                # the run's writes are over, so it must not take (and wait for) the lease again.
                return
        problems = check_run_config(run.run_config if run is not None else None)
        if problems:  # before any step computes anything
            raise Failure("; ".join(problems))
        dataset = run.tags.get(PARTITION_TAG) if run is not None else None
        if not dataset:
            return
        store = self.feature_store.writable_store()
        try:
            known = self.clip_source.knows(dataset, store)
        except XmodalError as exc:
            raise Failure(str(exc)) from None
        if not known:
            raise Failure(f"dataset {dataset!r} is unknown in {store.url_root}: register it with "
                          f"`xmodal dataset add {dataset} --kind KIND --path PATH` (or set XMODAL_DATASET={dataset})")
        log = context.log.info if context.log is not None else None
        if self.enabled:
            try:
                self._lease = DatasetLease(store, dataset, owner=run.run_id, ttl=self.ttl_seconds, wait=self.wait_seconds,
                                           log=log).acquire()
            except XmodalError as exc:
                raise Failure(str(exc)) from None
            if self._lease.waited_seconds > 1 and log:
                log(f"dataset {dataset!r}: lease taken after waiting {self._lease.waited_seconds:.0f} s")
        _register_partition(context.instance, dataset)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
