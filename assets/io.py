"""Asset outputs live in the feature store, per dataset, as JSON: every machine can resolve them.

    <root>/<dataset>/_outputs/<asset>.json            the latest committed output of the asset
    <root>/<dataset>/_runs/<run id>/<asset>.json      what each run produced (the run's own steps read it)

Outputs are small refs into the store (stages.core.refs), never the data itself, and nothing is
pickled. A step reads an input produced earlier in its own run from that run's folder, so a
concurrent run on the same dataset can never hand it another run's output; an input from an
earlier run comes from ``_outputs``. Datasets are folders, so two datasets never see each other's
outputs. Which run may write a dataset at all is the dataset lease's job (assets.datasets).
"""

from __future__ import annotations

import posixpath

from dagster import ConfigurableIOManager, Failure, InputContext, OutputContext

from assets.datasets import DatasetLeaseResource
from assets.resources import FeatureStoreResource
from stages.core import refs
from stages.core.ids import check_name

OUTPUTS_FOLDER = "_outputs"
RUNS_FOLDER = "_runs"
EPHEMERAL_RUN_ID = "__EPHEMERAL_RUN_ID"  # what Dagster reports for an input made outside this run


def _asset_name(context) -> str:
    return check_name("__".join(context.asset_key.path), "asset name")


def latest_output(store, dataset: str, asset: str):
    """The latest committed output of ``asset`` in another dataset (a pretrained space, a model
    evaluated across datasets); a Failure naming what to run when there is none."""
    path = posixpath.join(store.path(check_name(dataset, "dataset")), OUTPUTS_FOLDER, f"{check_name(asset, 'asset name')}.json")
    if not store.exists(path):
        raise Failure(f"{asset} of dataset {dataset!r} has not been materialized in {store.url_root}: run it on "
                      f"that dataset first (e.g. `dagster job execute -j train_diffgap --tags "
                      f"'{{\"dagster/partition\": \"{dataset}\"}}'`)")
    return refs.decode(store.read_json(path)["value"])


class StoreIOManager(ConfigurableIOManager):
    """Stores each asset output as JSON beside its dataset in the feature store."""

    feature_store: FeatureStoreResource
    # Held for the whole run (set up before the first step): no other run writes this dataset meanwhile.
    dataset_lease: DatasetLeaseResource

    def _paths(self, dataset: str, asset: str, run_id: str) -> tuple[str, str]:
        store = self.feature_store.store()
        base = store.path(check_name(dataset, "dataset"))
        return (posixpath.join(base, OUTPUTS_FOLDER, f"{asset}.json"),
                posixpath.join(base, RUNS_FOLDER, check_name(run_id, "run id"), f"{asset}.json"))

    def handle_output(self, context: OutputContext, obj) -> None:
        store = self.feature_store.writable_store()
        latest, own = self._paths(context.asset_partition_key, _asset_name(context), context.run_id)
        document = {"asset": _asset_name(context), "dataset": context.asset_partition_key, "run_id": context.run_id,
                    "value": refs.encode(obj)}
        store.write_json(own, document)  # the run's copy first: its later steps read it
        store.write_json(latest, document)

    def load_input(self, context: InputContext):
        store = self.feature_store.store()
        dataset, asset = context.asset_partition_key, _asset_name(context)
        upstream_run = context.upstream_output.run_id if context.upstream_output is not None else EPHEMERAL_RUN_ID
        latest, own = self._paths(dataset, asset, upstream_run if upstream_run != EPHEMERAL_RUN_ID else "none")
        for path in ((own, latest) if upstream_run != EPHEMERAL_RUN_ID else (latest,)):
            if store.exists(path):
                return refs.decode(store.read_json(path)["value"])
        raise Failure(f"{asset} of dataset {dataset!r} has not been materialized in {store.url_root}: "
                      f"materialize it first (it is upstream of this step)")
