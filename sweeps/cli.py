"""What both sweep CLIs share before anything starts: runtime flags, their validation, and the
resume check. Invalid input is a `UsageError` (exit 2, before Ray starts, before anything is
written).
"""
from __future__ import annotations

import argparse
import json
import math
import os

from memray import tables
from memray.config import LOCALIZE_METHODS, LOCALIZE_TRACKS, PROTOCOL, ExperimentConfig


class UsageError(Exception):
    pass


def auto_analysis_workers(cpus_per_trial: float) -> int:
    """`--analysis-workers` when not given: one actor per whole CPU of the trial when it has two or
    more (the analyses then run in parallel), else none. A trial with one CPU gains nothing from an
    actor (it would run on the CPU the waiting trainable holds) and pays its process, torch import,
    data load and the hand-off of weights and snapshots: its analyses run in the trainable."""
    return int(cpus_per_trial) if cpus_per_trial >= 2 else 0


def split_list(flag: str, text: str, cast) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(cast(part))
        except ValueError:
            raise UsageError(f"{flag}={text!r} is invalid: {part!r} is not a {cast.__name__}") from None
    if not out:
        raise UsageError(f"{flag}={text!r} is invalid: give a comma-separated list")
    return out


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", default="results", help="local path or URI (s3://...) [results]")
    p.add_argument("--data-dir", default=None, help="where torchvision datasets live")
    p.add_argument("--download", action="store_true", help="fetch missing torchvision datasets first")
    p.add_argument("--name", default=None, help="sweep name (experiment in MLflow)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this name")
    p.add_argument("--max-failures", type=int, default=2, help="retries per trial [2]")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--analysis-workers", type=int, default=None,
                   help="analysis actors per trial; 0 runs the analyses in the trainable's process "
                        "[one per whole CPU of the trial when it has 2 or more, else 0]")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI [sqlite:///<results>/mlflow.db]")
    p.add_argument("--checkpoint-s", type=float, default=30.0,
                   help="seconds between a trial's checkpoints; its last training epoch is always "
                        "checkpointed, and 0 checkpoints every report [30]")
    p.add_argument("--dry-run", action="store_true", help="print the trials and exit")


def add_localize_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--localize-methods", default=None,
                   help=f"localization methods to score, comma-separated from {list(LOCALIZE_METHODS)} [all]")
    p.add_argument("--localize-k", default=None, help="fixed k for precision@k, e.g. 8,32 [8,32]")
    p.add_argument("--localize-tracks", default=None,
                   help=f"localization tracks (EXPERIMENTS.md section 7), comma-separated from {list(LOCALIZE_TRACKS)} "
                        f"[decoy,all]")


def localize_overrides(args) -> dict:
    """The `analyses` fields the localization flags set ({} when none is given)."""
    out: dict = {}
    if args.localize_methods is not None:
        names = split_list("--localize-methods", args.localize_methods, str)
        bad = [n for n in names if n not in LOCALIZE_METHODS]
        if bad or len(set(names)) != len(names):
            raise UsageError(f"--localize-methods={args.localize_methods!r} is invalid: "
                             + (f"{bad[0]!r} is not one of {list(LOCALIZE_METHODS)}" if bad else "a name is repeated"))
        out["localize_methods"] = names
    if args.localize_k is not None:
        ks = split_list("--localize-k", args.localize_k, int)
        if any(k < 1 for k in ks):
            raise UsageError(f"--localize-k={args.localize_k!r} is invalid: integers >= 1")
        out["localize_k"] = ks
    if args.localize_tracks is not None:
        tracks = split_list("--localize-tracks", args.localize_tracks, str)
        bad = [t for t in tracks if t not in LOCALIZE_TRACKS]
        if bad or len(set(tracks)) != len(tracks):
            raise UsageError(f"--localize-tracks={args.localize_tracks!r} is invalid: "
                             + (f"{bad[0]!r} is not one of {list(LOCALIZE_TRACKS)}" if bad else "a name is repeated"))
        out["localize_tracks"] = tracks
    return out


def check_runtime(args) -> None:
    tables.check_name("sweep", args.name)
    # Trials run in Ray worker processes with their own working directories: local paths are made
    # absolute here, or the trials would write their tables somewhere else.
    if "://" not in args.results_dir:
        args.results_dir = os.path.abspath(args.results_dir)
    if args.data_dir is not None and "://" not in args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    args.mlflow_uri = args.mlflow_uri or tables.default_mlflow_uri(args.results_dir)
    if args.max_failures < 0:
        raise UsageError(f"--max-failures={args.max_failures} is invalid: an integer >= 0")
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial={args.cpus_per_trial} is invalid: a number > 0")
    if args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial={args.gpus_per_trial} is invalid: a number >= 0")
    if not args.checkpoint_s >= 0 or math.isinf(args.checkpoint_s):
        raise UsageError(f"--checkpoint-s={args.checkpoint_s} is invalid: a finite number >= 0")
    if args.analysis_workers is None:
        args.analysis_workers = auto_analysis_workers(args.cpus_per_trial)
    elif args.analysis_workers < 0:
        raise UsageError(f"--analysis-workers={args.analysis_workers} is invalid: an integer >= 0")


def check_memscores(args, configs: list[ExperimentConfig]) -> None:
    """The scores a grid names (--memscores) exist and are of every trial's data (dataset, noise
    rate and kind, data seed, training-set size)."""
    # each (scores, data) pair once: the cells and seeds of a grid share them
    pairs = {(c.analyses.memscores, c.data) for c in configs if c.analyses.memscores is not None}
    if not pairs:  # the common case: no torch in the driver (3 s of its start-up)
        return
    from memray.data import load_data

    from .plan import TRAIN_SIZE

    for name, data in sorted(pairs, key=repr):
        try:
            tables.check_name("sweep", name)
            size = TRAIN_SIZE[data.dataset]
            tables.check_memscores(args.results_dir, name, data, min(data.train_limit or size, size))
            # the data digest (given labels, noise mask) needs the data: loaded once the rest matches
            tables.check_memscores(args.results_dir, name, data, digest=load_data(data, args.data_dir).digest())
        except ValueError as e:
            raise UsageError(f"--{e}") from None


def grid_file(sweep: str) -> str:
    return f"sweeps/{sweep}.grid.json"


def check_resume(args, configs: list[ExperimentConfig] | None = None, spec: dict | None = None) -> str | None:
    """--resume needs a known sweep launched with the same grid (or search spec); a fresh run of a
    known name needs the same too (re-running is idempotent), else a new --name. Returns the
    stored run id when resuming (a resumed invocation keeps it), else None."""
    rel = grid_file(args.name)
    known = tables.exists(args.results_dir, rel)
    if args.resume and not known:
        raise UsageError(f"--resume: no sweep named {args.name!r} under {args.results_dir}; "
                         f"run it without --resume first")
    if not known:
        return None
    stored = json.loads(tables.read_bytes(args.results_dir, rel))
    if stored.get("protocol", 1) != PROTOCOL:
        raise UsageError(f"sweep {args.name!r} under {args.results_dir} was run under protocol "
                         f"{stored.get('protocol', 1)}; this code runs protocol {PROTOCOL} (EXPERIMENTS.md), "
                         f"whose numbers are not comparable: give a new --name (its tables stay readable, and "
                         f"findings never pool across protocols)")
    if configs is not None and sorted(stored.get("trial_keys") or []) != sorted(c.trial_key for c in configs):
        n = len(stored.get("trial_keys") or [])
        raise UsageError(f"sweep {args.name!r} under {args.results_dir} was run with a different grid "
                         f"({n} trials, this command gives {len(configs)}); use the same flags to resume or "
                         f"re-run it, or a new --name")
    if spec is not None and stored.get("spec") != spec:
        changed = sorted(k for k in set(spec) | set(stored.get("spec") or {})
                         if spec.get(k) != (stored.get("spec") or {}).get(k))
        raise UsageError(f"sweep {args.name!r} under {args.results_dir} was run with a different search "
                         f"(differs in: {', '.join(changed)}); use the same flags to resume, or a new --name")
    uri = args.mlflow_uri  # resolved by check_runtime
    if args.resume and stored.get("mlflow_uri") not in (None, uri):
        raise UsageError(f"--mlflow-uri={uri!r} is invalid with --resume: sweep {args.name!r} logs to "
                         f"{stored['mlflow_uri']!r} (a resumed sweep keeps its tracking store; "
                         f"`python -m analysis.sync_mlflow --mlflow-uri ...` copies it elsewhere)")
    return stored.get("run_id") if args.resume else None


def print_dry_run(configs: list[ExperimentConfig], args, pgf_bundles) -> None:
    print(f"{len(configs)} trials for sweep {args.name!r}; resources per trial: {pgf_bundles}")
    for c in configs:
        print(f"  {c.trial_key}  {c.canonical_json()}")
