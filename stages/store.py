"""The reader API's stable import path for code outside this project.

    from stages.store import FeatureStore, ClipDataset

The store itself lives in stages.core.store and the torch dataset in stages.core.clip_dataset;
this module only names them, so notebooks written against the README keep working whatever the
package layout. ClipDataset (and ClipLoader) are imported on first use: reading arrays with
FeatureStore does not import torch.
"""

from stages.core.store import FeatureStore, FeatureTable, StoreError, feature_key

__all__ = ["ClipDataset", "ClipLoader", "FeatureStore", "FeatureTable", "StoreError", "feature_key"]


def __getattr__(name: str):
    if name in ("ClipDataset", "ClipLoader"):
        from stages.core import clip_dataset

        return getattr(clip_dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # `python -m stages.store [ROOT]`: the catalog, as `xmodal store ls --root ROOT`
    from stages.core.store import main

    raise SystemExit(main())
