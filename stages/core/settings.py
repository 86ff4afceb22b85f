"""Project-local defaults derived from the environment, in one place (assets, CLI and notebooks).

models/towers.py derives the weights folder the same way on its own, because models/ must not
import stages/; keep the two in step.

S3: every entry point (Dagster resources, ``xmodal``, ``python -m stages.store``, bench scripts,
``open_store`` in a notebook) builds its storage options with ``s3_options``, so all of them honour
``$XMODAL_S3_ENDPOINT_URL`` and retry the same way. ``FeatureStore`` itself reads no environment:
it uses the options it is given (they travel with its shard jobs to Dask workers on other
machines), and with none botocore's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` still apply.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from stages.core.errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """$XMODAL_DATA_DIR, else <project>/.data: demo media and the default store."""
    return Path(os.environ.get("XMODAL_DATA_DIR", PROJECT_DIR / ".data"))


def default_store_root() -> str:
    """$XMODAL_STORE_ROOT, else <data dir>/features."""
    return os.environ.get("XMODAL_STORE_ROOT", str(data_dir() / "features"))


def default_demo_dir() -> str:
    return str(data_dir() / "demo")


# botocore attempts per request, the first try included (botocore's ``total_max_attempts``; its
# ``max_attempts`` counts retries). Adaptive mode backs off exponentially and also slows this
# client down after throttling answers (SlowDown, 503), which matters when many Dask workers write
# to one bucket. 5 is botocore's legacy default; against a closed port a request then fails in
# about 5 s (6 attempts: 12 s, 11: 86 s; the backoff grows to 20 s), so a wrong endpoint is still
# reported quickly.
S3_MAX_ATTEMPTS = 5


def s3_max_attempts() -> int:
    """$XMODAL_S3_MAX_ATTEMPTS, else S3_MAX_ATTEMPTS."""
    raw = os.environ.get("XMODAL_S3_MAX_ATTEMPTS", "")
    if not raw:
        return S3_MAX_ATTEMPTS
    try:
        attempts = int(raw)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise ConfigError(f"XMODAL_S3_MAX_ATTEMPTS={raw!r} must be a whole number of at least 1")
    return attempts


def s3_options(endpoint_url: str = "", anon: bool = False, max_attempts: int | None = None) -> dict:
    """fsspec/s3fs storage options for an S3-compatible endpoint (the same for jobs and the CLI):
    botocore's adaptive retry mode, ``max_attempts`` attempts per request (default
    ``s3_max_attempts()``); s3fs passes ``config_kwargs`` to botocore's client Config (and retries
    timeouts and SlowDown answers itself on top, up to 5 times). No option here changes a feature
    key or anything recorded in the store (a dataset's source.json keeps no storage options)."""
    retries = {"mode": "adaptive", "total_max_attempts": max_attempts or s3_max_attempts()}
    options: dict = {"config_kwargs": {"retries": retries}}
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


def open_store(root: str | None = None):
    """The feature store at ``root`` (default ``default_store_root()``) with the storage options the
    jobs use: the way for a notebook or script to open an ``s3://`` store configured by the
    environment (``FeatureStore(root)`` alone takes no endpoint from it)."""
    from stages.core.store import FeatureStore

    root = root or default_store_root()
    return FeatureStore(root, storage_options_for(root))


def check_bucket(store) -> None:
    """For an s3:// store: fail with one line (a StoreError) when its endpoint cannot be reached or
    its bucket does not exist there. A wrong endpoint that answers HTTP (another service, another
    S3 server) otherwise looks like an empty store."""
    from stages.core.store import StoreError

    if not store.url_root.startswith("s3://"):
        return
    bucket = store.url_root[len("s3://"):].split("/", 1)[0]
    try:
        store.fs.info(bucket)  # a HEAD of the bucket (fs.exists would turn every error into False)
    except FileNotFoundError:
        endpoint = (store.storage_options.get("client_kwargs") or {}).get("endpoint_url") or "AWS"
        raise StoreError(f"bucket {bucket!r} of the feature store {store.url_root!r} does not exist at {endpoint}: "
                         "create it, or point XMODAL_S3_ENDPOINT_URL at the server that holds it") from None
    except Exception as exc:
        problem = s3_problem(exc)
        if problem is None:
            raise
        raise StoreError(problem) from None


# botocore error codes that mean the request was refused for its credentials.
_REFUSED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def s3_problem(exc: BaseException) -> str | None:
    """One line naming the fix when ``exc`` (anywhere in its chain) means the S3 endpoint or the
    credentials are wrong: unreachable, not a URL, no credentials, refused. None otherwise."""
    from stages.core.store import unreachable_reason

    reason = unreachable_reason(exc)
    if reason is not None:
        return (f"cannot reach the S3 endpoint {_endpoint_of(exc)} ({reason}): start the server, or set "
                "XMODAL_S3_ENDPOINT_URL to its URL (unset: AWS)")
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        if isinstance(seen, ValueError) and str(seen).startswith("Invalid endpoint"):
            return (f"{seen}: XMODAL_S3_ENDPOINT_URL must be a URL with its scheme, e.g. http://127.0.0.1:9000")
        code = (getattr(seen, "response", None) or {}).get("Error", {}).get("Code")
        if code in _REFUSED_CODES:
            return (f"S3 refused the request ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and "
                    "that XMODAL_S3_ENDPOINT_URL is the server these credentials belong to")
        seen = seen.__cause__ or seen.__context__
    return None


def _endpoint_of(exc: BaseException) -> str:
    """scheme://host:port of the request that failed, from botocore's EndpointConnectionError."""
    seen: BaseException | None = exc
    while seen is not None:
        url = (getattr(seen, "kwargs", None) or {}).get("endpoint_url")
        if url:
            parts = urlsplit(url)
            return f"{parts.scheme}://{parts.netloc}"
        seen = seen.__cause__ or seen.__context__
    return os.environ.get("XMODAL_S3_ENDPOINT_URL") or "(AWS)"
