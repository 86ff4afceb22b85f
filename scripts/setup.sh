#!/usr/bin/env bash
# Idempotent set-up: the virtualenv with pinned dependencies, the project installed editable,
# DAGSTER_HOME, and (with --test) the system services the tests use. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT_DIR="$(pwd)"
VENV="$PROJECT_DIR/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

want_test=0
want_bench=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --bench) want_bench=1 ;;
    *) echo "setup.sh: unknown option $arg (use --test or --bench)" >&2; exit 2 ;;
  esac
done

apt_install() {  # apt packages, only when missing; needs root or sudo
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Re-install only when the pinned files changed since the last successful install.
stamp="$VENV/.xmodal-installed"
extras="test"
fingerprint="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$fingerprint" ]; then
  echo "setup: installing pinned dependencies (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$extras]"
  # aisfx pins numpy 1.23 and librosa 0.9.2, which would break everything else; its code runs
  # fine on our versions, so it goes in without its declared dependencies.
  "$VENV/bin/python" -m pip install -q --no-deps "aisfx==0.1.2"
  echo "$fingerprint" > "$stamp"
fi

# `dagster job execute -j <job>` reads its module from DAGSTER_CLI_JOB_EXECUTE_MODULE_NAME, not
# from pyproject.toml; a .pth file sets it (and DAGSTER_HOME) for every process of this venv,
# activated or not. Variables already set by the user win.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$site/xmodal_env.pth" <<PTH
import os; [os.environ.setdefault(k, v) for k, v in (("DAGSTER_HOME", "$PROJECT_DIR/.dagster_home"), ("DAGSTER_CLI_JOB_EXECUTE_MODULE_NAME", "pipelines.definitions"), ("DAGSTER_CLI_JOB_LIST_MODULE_NAME", "pipelines.definitions"), ("DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME", "pipelines.definitions"), ("DAGSTER_CLI_ASSET_LIST_MODULE_NAME", "pipelines.definitions"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"))]
PTH

mkdir -p .dagster_home
ln -sf ../dagster.yaml .dagster_home/dagster.yaml
# Create the SQLite instance now (once): two runs started together on a fresh instance would race
# in Dagster's schema setup. Skipped when DAGSTER_HOME points elsewhere (e.g. a shared Postgres).
if [ ! -e .dagster_home/history/runs.db ] && [ -z "${DAGSTER_PG_URL:-}" ]; then
  DAGSTER_HOME="$PROJECT_DIR/.dagster_home" "$VENV/bin/python" -c "from dagster import DagsterInstance; DagsterInstance.get().dispose()"
fi

if [ "$want_test" -eq 1 ]; then
  # A real PostgreSQL server for the instance-storage test (the test starts its own).
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
  # espeak-ng synthesises the speech collection (stages/ingest/speech.py) its tests build.
  command -v espeak-ng >/dev/null 2>&1 || apt_install espeak-ng
fi
if [ "$want_bench" -eq 1 ]; then
  # The naive baseline (librosa.load on mp4) decodes through audioread, which runs ffmpeg.
  command -v ffmpeg >/dev/null 2>&1 || apt_install ffmpeg
fi
