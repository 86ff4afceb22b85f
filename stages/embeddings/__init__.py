"""Contrastive embedding spaces: trained projection heads, a local pretrained CLAP, the space registry."""

from stages.embeddings import heads, pretrained_clap, spaces  # noqa: F401  (feature and space registration)
