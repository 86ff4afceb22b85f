"""Project-local defaults derived from the environment, in one place (assets, CLI and notebooks).

models/towers.py derives the weights folder the same way on its own, because models/ must not
import stages/; keep the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """$XMODAL_DATA_DIR, else <project>/.data: demo media and the default store."""
    return Path(os.environ.get("XMODAL_DATA_DIR", PROJECT_DIR / ".data"))


def default_store_root() -> str:
    """$XMODAL_STORE_ROOT, else <data dir>/features."""
    return os.environ.get("XMODAL_STORE_ROOT", str(data_dir() / "features"))


def default_demo_dir() -> str:
    return str(data_dir() / "demo")


def s3_options(endpoint_url: str = "", anon: bool = False) -> dict:
    """fsspec/s3fs storage options for an S3-compatible endpoint (the same for jobs and the CLI)."""
    options: dict = {}
    if endpoint_url:
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    if anon:
        options["anon"] = True
    return options


def storage_options_for(url: str, endpoint_url: str | None = None, anon: bool = False) -> dict:
    """Options for a store or source URL: S3 options for s3:// (endpoint from $XMODAL_S3_ENDPOINT_URL
    when not given), none for local paths."""
    if not url.startswith("s3://"):
        return {}
    if endpoint_url is None:
        endpoint_url = os.environ.get("XMODAL_S3_ENDPOINT_URL", "")
    return s3_options(endpoint_url, anon)
