"""The reader API's stable import path for code outside this project.

    from stages.store import FeatureStore

The store itself lives in stages.core.store; this module only names it, so notebooks written
against the README keep working whatever the package layout.
"""

from stages.core.store import FeatureStore, FeatureTable, StoreError, feature_key

__all__ = ["FeatureStore", "FeatureTable", "StoreError", "feature_key"]

if __name__ == "__main__":  # `python -m stages.store [ROOT]`: the catalog, as `xmodal store ls --root ROOT`
    from stages.core.store import main

    raise SystemExit(main())
