"""Per-shard cached features: the contract and driver (base) and the features computed from media.

Registering a feature: decorate its class with ``@register_feature`` and import its module below
(the embedding features register from stages/embeddings/__init__.py). ``base.all_features()``
imports both packages, so the asset factory, the CLI and Dask workers find every feature by name.
"""

from stages.features import frames, latents, mel, mel_latent, towers  # noqa: F401  (registration)
