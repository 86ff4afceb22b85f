"""Per-shard cached features: the contract and driver (base), and every registered feature.

Importing the package imports each feature module, so ``stages.features.base.FEATURES`` lists
them all (the asset factory, the CLI and Dask workers look features up there by name).
"""

from stages.features import frames, latents, mel, towers  # noqa: F401  (registration)
from stages.embeddings import heads, pretrained_clap  # noqa: F401  (registration: the embedding features)
