"""`xmodal`: the project's one command line (the feature store, datasets, quarantine, features, generation).

    xmodal store ls [--dataset D] [--feature F]            the catalog as a table
    xmodal store verify [--dataset D] [--feature F] [--full] [--repair]
                                                           check shards against their manifests
    xmodal store gc [--dataset D] [--grace-seconds S]      remove files of attempts that never committed
    xmodal dataset add NAME --kind KIND --path PATH [...]  register a source (+ its Dagster partition)
    xmodal dataset ls                                      registered datasets
    xmodal quarantine DATASET [--feature F] [--key K]      quarantined clips with their reasons
    xmodal features                                        the registered per-shard features
    xmodal plan [-j JOB] [--dataset D] [--no-listing]      dry run: shards, clips, time and bytes a run would compute
    xmodal generate --clip-id ID / --text "..." [...]      text/video-to-audio, with and without DiffGAP

Every subcommand takes ``--root`` (default: ``$XMODAL_STORE_ROOT``, else ``<data dir>/features``;
S3 options as the jobs build them, endpoint from ``$XMODAL_S3_ENDPOINT_URL``). Choices (source
kinds, spaces) come from the registries. Heavy modules (torch, dagster) are imported only by the
subcommand that needs them, so ``--help`` stays fast. An error the user can fix
(``XmodalError``) prints one line on stderr and exits 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Iterable, Sequence


class _RegistryChoices:
    """argparse choices read from a registry on first use (membership test, error and help text),
    so building the parser imports nothing heavy. Pair it with an explicit ``metavar``: argparse
    would otherwise list the choices, and so load the registry, when the option is added."""

    def __init__(self, load: Callable[[], Iterable[str]], extra: Sequence[str] = ()):
        self._load, self._extra, self._names = load, tuple(extra), None

    def _all(self) -> list[str]:
        if self._names is None:
            self._names = [*self._load(), *self._extra]
        return self._names

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __iter__(self):
        return iter(self._all())


def _source_kinds() -> Iterable[str]:
    from stages.ingest.sources import SOURCE_KINDS

    return SOURCE_KINDS


def _space_names() -> Iterable[str]:
    from stages.embeddings.spaces import SPACES

    return SPACES


# ---- shared helpers ------------------------------------------------------------------------------


def open_store(root: str | None):
    """The feature store at ``root`` (default root and S3 options exactly as the jobs build them);
    on S3, its endpoint and bucket are checked first (one line naming the fix)."""
    from stages.core.settings import check_bucket
    from stages.core.settings import open_store as open_configured_store

    store = open_configured_store(root)
    check_bucket(store)
    return store


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[str] = ()) -> str:
    """A plain-text table: columns as wide as their widest cell; ``right`` columns right-aligned."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells):
        parts = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, headers)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _check_names(**values: str | None) -> None:
    from stages.core.ids import check_name

    for what, value in values.items():
        if value is not None:
            check_name(value, what.replace("_", " "))


# ---- store ---------------------------------------------------------------------------------------


def cmd_store_ls(args: argparse.Namespace) -> int:
    from stages.core.store import catalog_table

    _check_names(dataset=args.dataset, feature=args.feature)
    print(catalog_table(open_store(args.root).catalog(dataset=args.dataset, feature=args.feature)))
    return 0


def _feature_keys_in_store(store, dataset: str | None, feature: str | None) -> list[tuple[str, str, str]]:
    """Stored keys of per-shard features (other folders hold checkpoints, not shards)."""
    from stages.features.base import all_features

    shard_features = {f.name for f in all_features().values()}
    return [k for k in store.stored_keys(dataset, feature) if k[1] in shard_features]


def cmd_store_verify(args: argparse.Namespace) -> int:
    from stages.features.base import recompute_key

    _check_names(dataset=args.dataset, feature=args.feature)
    store = open_store(args.root)
    checked = damaged = retired = 0
    for dataset, feature, key in _feature_keys_in_store(store, args.dataset, args.feature):
        checks = store.verify_shards(dataset, feature, key, full=args.full, repair=args.repair)
        checked += len(checks)
        for check in checks:
            if not check.ok:
                damaged += 1
                retired += check.retired
                print(check.line())
        if args.repair and any(c.retired for c in checks):
            run = recompute_key(store, dataset, feature, key)
            print(f"recomputed {dataset}/{feature}/{key}: {run.shards_new} shards")
    verb = "verified" if args.full else "verified (unchanged shards skipped; --full reads all)"
    print(f"{checked} shards {verb}: {damaged} damaged" + (f", {retired} retired and recomputed" if args.repair else ""))
    return 1 if damaged and not args.repair else 0


def cmd_store_gc(args: argparse.Namespace) -> int:
    _check_names(dataset=args.dataset)
    store = open_store(args.root)
    removed = []
    for dataset, feature, key in _feature_keys_in_store(store, args.dataset, None):
        removed += store.collect_garbage(dataset, feature, key, grace_seconds=args.grace_seconds)
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} files of uncommitted attempts removed")
    return 0


# ---- datasets ------------------------------------------------------------------------------------


def cmd_dataset_add(args: argparse.Namespace) -> int:
    from stages.ingest.datasets import register_source
    from stages.ingest.sources import SourceConfig

    _check_names(dataset=args.name)
    store = open_store(args.root)
    store.check_writable()
    config = SourceConfig(kind=args.kind, path=args.path, media_dir=args.media_dir,
                          default_split=args.default_split, demo_clips=args.demo_clips)
    register_source(store, args.name, config)
    print(f"dataset {args.name!r}: {args.kind} source {args.path} registered in {store.url_root}")
    _add_dagster_partition(args.name)
    return 0


def _add_dagster_partition(dataset: str) -> None:
    """Add ``dataset`` to the "dataset" dynamic partitions of the Dagster instance, when there is one."""
    import importlib.util

    if importlib.util.find_spec("dagster") is None:
        print("note: dagster is not installed; the Dagster partition is added by the dataset's first run")
        return
    if not os.environ.get("DAGSTER_HOME"):
        print("note: DAGSTER_HOME is not set; no Dagster instance to add the partition to "
              "(set DAGSTER_HOME and run this again, or add it in the UI)")
        return
    from dagster import DagsterError, DagsterInstance

    from assets.datasets import DATASETS

    try:
        instance = DagsterInstance.get()
    except DagsterError as exc:
        from stages.core.errors import ConfigError

        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"dataset {dataset!r} is registered in the store, but the Dagster instance at "
                          f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} cannot be opened: {first_line}") from exc
    try:
        if instance.has_dynamic_partition(DATASETS.name, dataset):
            print(f"Dagster partition {dataset!r} of {DATASETS.name!r} already exists")
        else:
            instance.add_dynamic_partitions(DATASETS.name, [dataset])
            print(f"Dagster partition {dataset!r} added to {DATASETS.name!r}")
    finally:
        instance.dispose()


def cmd_dataset_ls(args: argparse.Namespace) -> int:
    from stages.ingest.datasets import registered_datasets, registered_source

    store = open_store(args.root)
    rows = []
    for name in registered_datasets(store):
        source = registered_source(store, name)
        rows.append([name, source.kind, source.path or "-", source.media_dir or "-", source.default_split or "assigned"])
    print(_table(["dataset", "kind", "path", "media_dir", "default_split"], rows))
    return 0


# ---- quarantine ----------------------------------------------------------------------------------


def cmd_quarantine(args: argparse.Namespace) -> int:
    from collections import Counter

    from stages.core.errors import DatasetError
    from stages.core.store import StoreError
    from stages.ingest.datasets import registered_datasets
    from stages.ingest.manifest import load_manifest

    _check_names(dataset=args.dataset, feature=args.feature, feature_key=args.key)
    store = open_store(args.root)
    dataset = args.dataset
    manifest = load_manifest(store, dataset)
    catalog = store.catalog(dataset=dataset)
    registered = registered_datasets(store)
    if manifest is None and not catalog and dataset not in registered:
        known = sorted(set(registered) | {e["dataset"] for e in store.catalog()})
        raise DatasetError(f"dataset {dataset!r} is unknown in {store.url_root}: "
                           + (f"known datasets: {', '.join(known)}" if known else "the store holds no dataset"))

    features = [args.feature] if args.feature else sorted({e["feature"] for e in catalog})
    found: list[tuple[str, str, str]] = []  # (where, clip id or else its source, reason)
    if manifest is not None and not args.feature and not args.key:
        for q in manifest.quarantined:
            found.append(("clip_manifest", q.get("id") or q.get("source") or "-", q.get("reason", "")))
    matched_key = False
    for feature in features:
        keys = store.feature_keys(dataset, feature)
        if args.key:
            keys = [k for k in keys if k == args.key]
        matched_key = matched_key or bool(keys)
        for key in keys:
            for shard in store.committed_shards(dataset, feature, key):
                for q in store.shard_manifest(dataset, feature, key, shard).get("quarantined", []):
                    found.append((f"{feature}/{key}/{shard}", q.get("id") or q.get("source") or "-", q.get("reason", "")))
    if (args.feature or args.key) and not matched_key:
        what = " ".join(filter(None, [args.feature and f"feature {args.feature!r}", args.key and f"key {args.key!r}"]))
        raise StoreError(f"no committed shards of {what} for dataset {dataset!r} in {store.url_root}: "
                         f"see `xmodal store ls --dataset {dataset}`")

    counts = Counter(reason for _, _, reason in found)
    print(f"dataset {dataset!r}: {len(found)} quarantined")
    if found:
        print(_table(["count", "reason"], [(n, reason) for reason, n in counts.most_common()], right=["count"]))
        print()
        print(_table(["where", "clip", "reason"], found))
    return 0


# ---- features ------------------------------------------------------------------------------------


def cmd_features(args: argparse.Namespace) -> int:
    from stages.features.base import all_features

    rows = [
        [name, f.group, f.code_version, ", ".join(f.inputs) or "-", " ".join(str(f.description).split()) or "-"]
        for name, f in all_features().items()
    ]
    print(_table(["feature", "group", "code_version", "inputs", "description"], rows))
    return 0


# ---- plan (dry run) ------------------------------------------------------------------------------

PLAN_DESCRIPTION = """\
A dry run of JOB on DATASET: per per-shard feature, the shards in total, cached and to compute,
the clips to compute, and the estimated seconds (one worker) and bytes, from the rates measured
in the store's shard manifests (else a BENCHMARKS.md default, marked 'guess'). Nothing is decoded
or computed: it reads the clip manifest, the source's listing (names, sizes, mtimes: new clips go
into new shards) and the store's listings. The key planned per feature is the one the dataset's
last run wrote; a changed run config makes new keys, so plan it as a dataset without keys."""


def _plan_listing(store, clip_source, dataset: str):
    """The source's listing for ``dataset`` as clip_manifest would read it, or (None, why not)."""
    from pathlib import Path

    from stages.ingest.demo import SPEC_FILE
    from stages.ingest.sources import read_source

    from dagster import Failure

    from stages.core.errors import ConfigError

    try:
        config = clip_source.config() if dataset == clip_source.dataset else clip_source.source_for(dataset, store)
    except Failure as exc:  # a bad XMODAL_SOURCE_* setting: its one line
        raise ConfigError(exc.description or str(exc)) from None
    if config.kind == "demo" and not (Path(config.path) / SPEC_FILE).exists():
        return None, f"source not listed: the demo is generated by the run's first step ({config.demo_clips} clips)"
    return read_source(config), ""


def cmd_plan(args: argparse.Namespace) -> int:
    from stages.core.errors import ConfigError
    from stages.core.plan import plan_run
    from stages.features.base import all_features

    _check_names(dataset=args.dataset)
    from assets.resources import ClipSourceResource, resolved_env_settings
    from pipelines.definitions import defs

    jobs = sorted(job.name for job in defs.jobs if not job.name.startswith("__"))
    if args.job not in jobs:
        raise ConfigError(f"unknown job {args.job!r}: choose one of {', '.join(jobs)}")
    assets = {key.path[-1] for key in defs.get_job_def(args.job).asset_layer.executable_asset_keys}
    features = [f.name for f in all_features().values() if f.name in assets]
    clip_source = ClipSourceResource(**resolved_env_settings("clip_source"))  # as the jobs see it, values resolved
    store = open_store(args.root)
    dataset = args.dataset or clip_source.dataset
    listing, why = (None, "source not listed (--no-listing)") if args.no_listing else _plan_listing(store, clip_source, dataset)
    plan = plan_run(store, dataset, features, listing=listing, shard_size=clip_source.shard_size)
    print(f"xmodal plan -j {args.job}: {len(features)} per-shard features; checkpoints and result tables are reused "
          "when their keys are stored (not estimated here)")
    print(plan.table())
    if why:
        print(why)
    return 0


# ---- generate ------------------------------------------------------------------------------------


def _newest(store, dataset: str, name: str, key: str | None) -> str:
    from stages.core.checkpoints import list_checkpoints
    from stages.core.store import StoreError

    if key:
        return key
    found = list_checkpoints(store, dataset, name)
    if not found:
        raise StoreError(f"no {name} checkpoint for dataset {dataset!r} in {store.url_root}: materialize it first")
    return found[0]["checkpoint_key"]


GENERATE_DESCRIPTION = """\
Text-to-audio from a clip's caption embedding (CLAP) or a free-text prompt (text tower + CLAP
head), video-to-audio from its video embedding (CAVP), each without and with DiffGAP, with the
trained generators of a feature store (the newest checkpoints unless keys are given). Writes
<out>/<name>__<T2A|V2A>__<baseline|diffgap>.wav (22.05 kHz) and a spectrogram preview PNG per
request; prints what it wrote."""


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.clip_id and not args.text:
        args.parser.error("give at least one --clip-id or --text")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import soundfile as sf

    from stages.core.errors import DatasetError
    from stages.core.preview import preview_png
    from stages.diffgap.train import load_model
    from stages.embeddings.spaces import SPACES, get_space
    from stages.generation import sample as generation_sample
    from stages.generation import train as generation_train
    from stages.ingest.manifest import load_manifest

    store = open_store(args.root)
    gen_keys = dict(k.split("=", 1) for k in args.generator_key)
    gap_keys = dict(k.split("=", 1) for k in args.diffgap_key)
    sample = generation_sample.SampleConfig(steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                                            vocoder=args.vocoder, threads=args.threads)
    spaces = list(SPACES) if args.space == "both" else [args.space]
    if args.text and "clap" not in spaces:
        spaces.insert(0, "clap")
    manifest = load_manifest(store, args.dataset) if args.clip_id else None
    if args.clip_id and manifest is None:
        raise DatasetError(f"no clip manifest for dataset {args.dataset!r} in {store.url_root}")
    os.makedirs(args.out, exist_ok=True)
    written = []
    for space in spaces:
        model, sidecar = generation_train.load_generator(
            store, args.dataset, space,
            _newest(store, args.dataset, generation_train.model_name(space), gen_keys.get(space)))
        diffgap = None
        if args.diffgap != "without":
            diffgap, _ = load_model(store, args.dataset, space,
                                    _newest(store, args.dataset, f"diffgap_{space}", gap_keys.get(space)))
        decoder = generation_sample.make_decoder(store, args.dataset, sidecar["audio_vae"], sample)
        requests = []
        if args.clip_id and (args.space in ("both", space)):
            pairs = generation_train.load_latent_pairs(store, manifest, space, sidecar["latent_key"],
                                                       sidecar["embedding_key"])
            chosen = pairs.subset(clip_ids=args.clip_id)
            missing = sorted(set(args.clip_id) - set(chosen.clip_ids))
            if missing:
                print(f"{space}: no latents/embeddings for {missing}; skipped", file=sys.stderr)
            if len(chosen):
                requests.append((chosen.clip_ids, chosen.other))
        if args.text and space == "clap":
            cond = generation_sample.text_condition(store, args.dataset, sidecar["embedding_key"], args.text)
            requests.append(([f"text{i:02d}" for i in range(len(args.text))], cond))
        task = get_space(space).task
        for names, cond in requests:
            mels = []
            for label, gap in (("baseline", None), ("diffgap", diffgap)):
                if (label == "baseline" and args.diffgap == "with") or (label == "diffgap" and args.diffgap == "without"):
                    continue
                out = generation_sample.generate(model, decoder, cond, sample, gap)
                mels.append(out["mels"])
                for name, wave in zip(names, out["audio"]):
                    path = os.path.join(args.out, f"{name}__{task}__{label}.wav")
                    sf.write(path, wave, 22050, subtype="PCM_16")
                    written.append(path)
            png = os.path.join(args.out, f"{names[0]}__{task}__preview.png")
            with open(png, "wb") as handle:
                handle.write(preview_png(mels=np.concatenate(mels)))
            written.append(png)
    for i, text in enumerate(args.text):
        print(f"text{i:02d}: {text}")
    for path in written:
        print(path)
    return 0


# ---- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--root", default=None, metavar="ROOT",
                      help="feature store: local path or s3://bucket/prefix "
                           "(default: $XMODAL_STORE_ROOT, else <data dir>/features)")

    parser = argparse.ArgumentParser(
        prog="xmodal", description="The cross-modal feature store from the command line.",
        epilog="Run `xmodal COMMAND --help` for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    store = commands.add_parser("store", help="what the feature store holds")
    store_commands = store.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    ls = store_commands.add_parser("ls", parents=[root], help="the catalog as a table",
                                   description="The catalog: one row per feature key (shards, rows, size, params).")
    ls.add_argument("--dataset", default=None, help="only this dataset")
    ls.add_argument("--feature", default=None, help="only this feature")
    ls.set_defaults(handler=cmd_store_ls)
    verify = store_commands.add_parser(
        "verify", parents=[root], help="check shards against their manifests; --repair retires and recomputes",
        description="Read every shard whose files changed since they last verified (all with --full) and check "
                    "each array and tar against the manifest's sha256. --repair retires a damaged shard and "
                    "recomputes it with the params its catalog entry records. Exit 1 when damage is left.")
    verify.add_argument("--dataset", default=None, help="only this dataset")
    verify.add_argument("--feature", default=None, help="only this feature")
    verify.add_argument("--full", action="store_true", help="read every shard, changed or not")
    verify.add_argument("--repair", action="store_true", help="retire damaged shards and recompute them")
    verify.set_defaults(handler=cmd_store_verify)
    gc = store_commands.add_parser("gc", parents=[root], help="remove files of attempts that never committed",
                                   description="Remove the tar/zarr files of writers that died or lost a race, "
                                               "once older than the grace period. Committed shards are never touched.")
    gc.add_argument("--dataset", default=None, help="only this dataset")
    gc.add_argument("--grace-seconds", type=float, default=3600.0,
                    help="leave attempts younger than this (a writer may still be running); default 3600")
    gc.set_defaults(handler=cmd_store_gc)

    dataset = commands.add_parser("dataset", help="register and list datasets")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND", required=True)
    add = dataset_commands.add_parser(
        "add", parents=[root], help="register a dataset's source (and its Dagster partition)",
        description="Record NAME's source in the store (<root>/NAME/source.json) so any run or machine can use "
                    "it by name; with DAGSTER_HOME set, also add NAME to the Dagster instance's dataset partitions.")
    add.add_argument("name", metavar="NAME", help="dataset name (letters, digits, '_', '-', '.')")
    add.add_argument("--kind", required=True, metavar="KIND", choices=_RegistryChoices(_source_kinds),
                     help="source kind: one of %(choices)s")
    add.add_argument("--path", required=True, help="media folder, CSV or JSONL (local or s3://); the demo's output folder")
    add.add_argument("--media-dir", default="", help="CSV sources: where the media files live (default: next to the CSV)")
    add.add_argument("--default-split", default="",
                     help="split of clips whose source names none (default: assigned train/val/test 80/10/10 "
                          "by group, stable under additions)")
    add.add_argument("--demo-clips", type=int, default=300, help="demo only: clips to generate (default: %(default)s)")
    add.set_defaults(handler=cmd_dataset_add)
    dls = dataset_commands.add_parser("ls", parents=[root], help="registered datasets with their kind and path")
    dls.set_defaults(handler=cmd_dataset_ls)

    quarantine = commands.add_parser(
        "quarantine", parents=[root], help="quarantined clips with their reasons",
        description="Every quarantined clip of DATASET with its one-line reason, from the clip manifest and "
                    "from the committed shards of each feature key; a count by reason first.")
    quarantine.add_argument("dataset", metavar="DATASET")
    quarantine.add_argument("--feature", default=None, help="only this feature's shards (skips the clip manifest)")
    quarantine.add_argument("--key", default=None, help="only this feature key's shards (skips the clip manifest)")
    quarantine.set_defaults(handler=cmd_quarantine)

    features = commands.add_parser("features", parents=[root], help="the registered per-shard features")
    features.set_defaults(handler=cmd_features)

    plan = commands.add_parser("plan", parents=[root], help="dry run: what a job would compute, with time and bytes",
                               description=PLAN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("-j", "--job", default="train_diffgap", help="the Dagster job (default: %(default)s)")
    plan.add_argument("--dataset", default=None, help="dataset (default: $XMODAL_DATASET, else demo)")
    plan.add_argument("--no-listing", action="store_true", help="do not list the source: plan the clip manifest as it is")
    plan.set_defaults(handler=cmd_plan)

    generate = commands.add_parser(
        "generate", help="text/video-to-audio with and without DiffGAP",
        description=GENERATE_DESCRIPTION,
        epilog='xmodal generate --clip-id demo_000123 --clip-id demo_000200\n'
               'xmodal generate --text "a dog barks" --steps 20 --out /tmp/gen',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("--root", "--store", dest="root", default=None, metavar="ROOT",
                          help="feature store (default: $XMODAL_STORE_ROOT, else <data dir>/features)")
    generate.add_argument("--dataset", default="demo")
    generate.add_argument("--clip-id", action="append", default=[], help="clip whose caption / video conditions the audio (repeatable)")
    generate.add_argument("--text", action="append", default=[], help="free-text prompt (repeatable)")
    generate.add_argument("--space", default="both", metavar="SPACE", choices=_RegistryChoices(_space_names, extra=["both"]),
                          help="for clip ids: one conditioning space or both (one of %(choices)s; default: %(default)s)")
    generate.add_argument("--diffgap", choices=["with", "without", "both"], default="both")
    generate.add_argument("--steps", type=int, default=50, help="DDIM steps (50, 20, 5)")
    generate.add_argument("--guidance-scale", type=float, default=3.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--vocoder", choices=["hifigan", "griffinlim"], default="hifigan")
    generate.add_argument("--generator-key", action="append", default=[], metavar="SPACE=KEY", help="checkpoint key per space")
    generate.add_argument("--diffgap-key", action="append", default=[], metavar="SPACE=KEY", help="DiffGAP checkpoint key per space")
    generate.add_argument("--threads", type=int, default=2)
    generate.add_argument("--out", default="generated", help="local output folder")
    generate.set_defaults(handler=cmd_generate, parser=generate)
    return parser


def _is_expected(exc: BaseException) -> bool:
    """A failure the user can fix: an XmodalError, or (once torch is loaded, so the check costs
    nothing) one of the model layer's own expected errors."""
    from stages.core.errors import XmodalError

    if isinstance(exc, XmodalError):
        return True
    if "torch" in sys.modules:
        from stages.core.errors import expected_errors

        return isinstance(exc, expected_errors())
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as exc:
        if _is_expected(exc):
            message = " ".join(str(exc).split()) or type(exc).__name__
        else:  # an S3 endpoint or credentials problem mid-command is one line too
            from stages.core.settings import s3_problem

            message = s3_problem(exc)
            if message is None:
                raise
        print(f"xmodal: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
