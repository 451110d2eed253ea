"""python -m sweeps.dropout_search: tune example-tied dropout with Optuna (TPE) and early stopping.

Searches p_gen, p_mem, the peak learning rate and the width over declared ranges with Ray Tune's
OptunaSearch (TPE sampler, seeded) and an ASHA scheduler that stops unpromising trials early. Every
trial reports its objective every epoch (its own/all/drop evaluations are computed each epoch).
Results land in the same tables and MLflow layout as dropout_grid; `--resume` continues the study.

    python -m sweeps.dropout_search                                  # digits, mlp, 16 samples
    python -m sweeps.dropout_search --dataset mnist1d --num-samples 32 --objective drop_test
    python -m sweeps.dropout_search --p-mem 0.05,0.3 --lr 0.01,0.1 --width 256,1024

`--objective pareto` searches two objectives at once (drop-mode test accuracy up, drop-mode
train_noisy down) with NSGA-II and no early stopping; the report plots its Pareto front.

Objectives (memray.objectives): `etd_tradeoff` (default; `localization` is an alias) = drop-mode test accuracy minus
drop-mode train_noisy accuracy, subject to own-mode train_noisy >= 0.9 (a graded penalty, the
shortfall below 0.9); `drop_test`; `forgetting` = own train_noisy - drop train_noisy.
"""
from __future__ import annotations

import argparse
import os
import sys

from memray.config import ANALYSES, ARCHS, DATASETS, NOISE_KINDS, ConfigError, ExperimentConfig
from memray.exiting import exiting
from memray.objectives import ALIASES, MULTI, OBJECTIVES
from memray.sources import DatasetMissing, default_data_dir, prepare

from . import cli
from .cli import UsageError, split_list
from .launch import launch
from .plan import Plan

# name -> (flag default, scale); ranges are [low, high]
RANGES = {"p_gen": ("0.05,0.5", "uniform"), "p_mem": ("0.02,0.5", "uniform"),
          "lr": ("0.01,0.2", "log"), "width": ("128,1024", "log-int")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.dropout_search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help=f"one of {list(DATASETS)} [digits]")
    p.add_argument("--arch", default="mlp", help=f"one of {list(ARCHS)} [mlp]")
    p.add_argument("--noise", type=float, default=0.1, help="label-noise rate [0.1]")
    p.add_argument("--noise-kind", default="label", help=f"one of {list(NOISE_KINDS)} [label]")
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial [0]")
    p.add_argument("--epochs", type=int, default=30, help="epochs of a trial that is not stopped [30]")
    p.add_argument("--num-samples", type=int, default=16, help="trials in the study [16]")
    p.add_argument("--objective", default="etd_tradeoff", help=f"one of {sorted(OBJECTIVES)} [etd_tradeoff]")
    p.add_argument("--storage", default=None, help="the Optuna study's database URL "
                                                   "[sqlite:///<results-dir>/optuna.db; required for a URI results dir]")
    for name, (default, scale) in RANGES.items():
        p.add_argument(f"--{name.replace('_', '-')}", default=default, help=f"LOW,HIGH ({scale}) [{default}]")
    p.add_argument("--grace-period", type=int, default=None, help="epochs before ASHA may stop a trial "
                                                                   "[a sixth of --epochs, at least 1]")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA's reduction factor [2]")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once [2]")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler [0]")
    p.add_argument("--analyses", default="none", help=f"run after training: comma-separated from "
                                                      f"{list(ANALYSES)}, or 'none' [none]")
    cli.add_localize_flags(p)
    cli.add_runtime_flags(p)
    return p


def parse_range(flag: str, text: str, cast) -> tuple:
    vals = split_list(flag, text, cast)
    if len(vals) != 2 or not vals[0] < vals[1]:
        raise UsageError(f"{flag}={text!r} is invalid: give LOW,HIGH with LOW < HIGH")
    return tuple(vals)


def build(args) -> tuple[dict, dict, dict]:
    """(base experiment dict, ranges, spec); validates everything, including the ranges' corners."""
    for flag, v, lo in (("--num-samples", args.num_samples, 1), ("--epochs", args.epochs, 1),
                        ("--reduction-factor", args.reduction_factor, 2), ("--max-concurrent", args.max_concurrent, 1)):
        if v < lo:
            raise UsageError(f"{flag}={v} is invalid: an integer >= {lo}")
    args.objective = ALIASES.get(args.objective, args.objective)
    if args.objective not in OBJECTIVES:
        raise UsageError(f"--objective={args.objective!r} is invalid: one of {sorted(OBJECTIVES)}")
    grace = args.grace_period if args.grace_period is not None else max(1, args.epochs // 6)
    if not 1 <= grace <= args.epochs:
        raise UsageError(f"--grace-period={grace} is invalid: an integer in [1, --epochs={args.epochs}]")
    ranges = {"p_gen": parse_range("--p-gen", args.p_gen, float), "p_mem": parse_range("--p-mem", args.p_mem, float),
              "lr": parse_range("--lr", args.lr, float), "width": parse_range("--width", args.width, int)}
    analyses = [] if args.analyses == "none" else split_list("--analyses", args.analyses, str)
    base = {"data": {"dataset": args.dataset, "noise_rate": args.noise, "noise_kind": args.noise_kind}, "model": {"arch": args.arch},
            "dropout": {"kind": "example_tied"}, "optim": {"epochs": args.epochs},
            "analyses": {"run": analyses, **cli.localize_overrides(args)}, "seed": args.seed}
    ExperimentConfig.from_dict(base)
    for corner in (0, 1):  # every value in the ranges must be a valid config
        d = {**base, "dropout": {"kind": "example_tied", "p_gen": ranges["p_gen"][corner],
                                 "p_mem": ranges["p_mem"][corner]},
             "optim": {"epochs": args.epochs, "lr": ranges["lr"][corner]},
             "model": {"arch": args.arch, "width": ranges["width"][corner]}}
        ExperimentConfig.from_dict(d)
    spec = {"base": base, "ranges": {k: list(v) for k, v in ranges.items()}, "num_samples": args.num_samples,
            "objective": args.objective, "grace_period": grace, "reduction_factor": args.reduction_factor,
            "max_concurrent": args.max_concurrent, "search_seed": args.search_seed, "storage": args.storage}
    return base, ranges, spec


def search_space(base: dict, ranges: dict) -> dict:
    """The experiment config with Tune's search domains where the ranges are (a nested space:
    OptunaSearch samples each path, and Tune fills the trial's config in)."""
    from ray import tune

    return {**base,
            "dropout": {**base["dropout"], "p_gen": tune.uniform(*ranges["p_gen"]),
                        "p_mem": tune.uniform(*ranges["p_mem"])},
            "optim": {**base["optim"], "lr": tune.loguniform(*ranges["lr"])},
            "model": {**base["model"], "width": tune.lograndint(ranges["width"][0], ranges["width"][1] + 1)}}


def study_storage(args) -> str:
    """The Optuna study's database: --storage, else `sqlite:///<results-dir>/optuna.db` for a local
    results dir (`optuna-dashboard` opens it); a URI results dir needs --storage."""
    if args.storage is not None:
        return args.storage
    if "://" in args.results_dir:
        raise UsageError(f"--storage is required with --results-dir={args.results_dir!r}: the Optuna study needs "
                         f"a database, e.g. --storage postgresql://user@host/optuna or sqlite:///optuna.db")
    return f"sqlite:///{args.results_dir}/optuna.db"


def make_searcher(objective: str, study_name: str, storage: str, seed: int, num_samples: int, max_concurrent: int):
    """Tune's searcher for `objective`: OptunaSearch over the study in `storage`, TPE for one
    objective, NSGA-II (its Pareto front) for several, at most `max_concurrent` trials at once.
    It survives pickle and cloudpickle round trips (Tune pickles it; see sweeps.samplers)."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from .samplers import NSGAIISampler

    multi = MULTI.get(objective)
    if multi:  # several objectives: NSGA-II and its Pareto front; no early stopping (ASHA ranks one metric)
        sampler = NSGAIISampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, num_samples // 3)))
    kw = {"metric": [f"objective/{n}" for n, _ in multi], "mode": [d for _, d in multi]} if multi else {}
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler, study_name=study_name,
                                           storage=optuna.storages.RDBStorage(storage), **kw),
                              max_concurrent=max_concurrent)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.name is None:
            args.name = f"dropout_search-{args.dataset}-{args.arch}"
        cli.check_runtime(args)
        args.storage = study_storage(args)
        base, ranges, spec = build(args)
        if args.dry_run:
            from trainables.trial import resources

            print(f"{args.num_samples} trials for sweep {args.name!r} (Optuna TPE, ASHA grace period "
                  f"{spec['grace_period']}, objective {args.objective}); resources per trial: "
                  f"{resources(args.cpus_per_trial, args.gpus_per_trial, args.analysis_workers).bundles}")
            print(f"  ranges: {spec['ranges']}")
            print(f"  base: {ExperimentConfig.from_dict(base).canonical_json()}")
            return 0
        run_id = cli.check_resume(args, spec=spec)
        prepare(args.dataset, args.data_dir or default_data_dir(), download=args.download)
    except (UsageError, ConfigError, ValueError, DatasetMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    if "://" not in args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)  # the default study database lives there
    if run_id is None:  # a fresh run of this sweep name starts its study afresh: one trial per Tune trial
        try:
            optuna.delete_study(study_name=args.name, storage=args.storage)
        except KeyError:
            pass
    multi = MULTI.get(args.objective)
    searcher = make_searcher(args.objective, args.name, args.storage, args.search_seed, args.num_samples,
                             args.max_concurrent)
    # max_t one past the last epoch: a trial that trains to the end still reports and runs its analyses
    scheduler = None if multi else ASHAScheduler(time_attr="epoch", max_t=args.epochs + 1,
                                                 grace_period=spec["grace_period"],
                                                 reduction_factor=args.reduction_factor)
    return launch(args, Plan("search", exp_space=search_space(base, ranges), num_samples=args.num_samples,
                             search_alg=searcher, scheduler=scheduler, objective=args.objective, spec=spec,
                             resume_run_id=run_id))


if __name__ == "__main__":
    sys.exit(exiting(main()))
