"""What both sweep CLIs share: flags, validation before anything starts, the Tune launch, summary.

Exit codes: 0 all trials done; 1 some trials failed after retries (the others are kept and the
summary names the failures); 2 invalid input (before Ray starts, before anything is written).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys

from memray import tables
from memray.config import ExperimentConfig


class UsageError(Exception):
    pass


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
    p.add_argument("--analysis-workers", type=int, default=1)
    p.add_argument("--mlflow-uri", default=None, help="tracking URI [sqlite:///<results>/mlflow.db]")
    p.add_argument("--dry-run", action="store_true", help="print the trials and exit")


def check_runtime(args) -> None:
    tables.check_name("sweep", args.name)
    if args.max_failures < 0:
        raise UsageError(f"--max-failures={args.max_failures} is invalid: an integer >= 0")
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial={args.cpus_per_trial} is invalid: a number > 0")
    if args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial={args.gpus_per_trial} is invalid: a number >= 0")
    if args.analysis_workers < 0:
        raise UsageError(f"--analysis-workers={args.analysis_workers} is invalid: an integer >= 0")


def grid_file(results: str, sweep: str) -> str:
    return f"sweeps/{sweep}.grid.json"


def check_resume(args, configs: list[ExperimentConfig]) -> None:
    """--resume needs a known sweep with the same grid; a fresh run of a known name needs the same
    grid too (re-running is idempotent), else a new --name."""
    rel = grid_file(args.results_dir, args.name)
    known = tables.exists(args.results_dir, rel)
    if args.resume and not known:
        raise UsageError(f"--resume: no sweep named {args.name!r} under {args.results_dir}; "
                         f"run it without --resume first")
    if known:
        stored = json.loads(tables.read_bytes(args.results_dir, rel))
        if sorted(stored["trial_keys"]) != sorted(c.trial_key for c in configs):
            raise UsageError(f"sweep {args.name!r} under {args.results_dir} was run with a different grid "
                             f"({len(stored['trial_keys'])} trials); use the same flags to resume or re-run it, "
                             f"or a new --name")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:
        return ""


def default_mlflow_uri(results: str) -> str:
    if "://" in results:
        return "sqlite:///mlflow.db"
    return f"sqlite:///{os.path.abspath(results)}/mlflow.db"


def print_dry_run(configs: list[ExperimentConfig], args, pgf_bundles) -> None:
    print(f"{len(configs)} trials for sweep {args.name!r}; resources per trial: {pgf_bundles}")
    for c in configs:
        print(f"  {c.trial_key}  {c.canonical_json()}")


def launch(args, configs: list[ExperimentConfig], preset: str, scheduler=None, search_alg=None,
           num_samples: int | None = None, param_space: dict | None = None, metric=None, mode=None) -> int:
    """Run the trials through Ray Tune; write the sweeps/trials tables; print the summary."""
    import ray
    from ray import tune

    from trainables.callbacks import MlflowLogger, TrialsTable
    from trainables.trial import resources, train_trial

    started = dt.datetime.now(dt.timezone.utc)
    fs, base = tables.filesystem(args.results_dir)
    storage = f"{base}/ray"
    if "://" not in args.results_dir:
        os.makedirs(storage, exist_ok=True)
    tables.write_bytes(args.results_dir, grid_file(args.results_dir, args.name), json.dumps(
        {"trial_keys": [c.trial_key for c in configs], "preset": preset}).encode())
    sweep_row = {"sweep": args.name, "started_at": started, "finished_at": None, "command": " ".join(sys.argv),
                 "preset": preset, "n_trials": len(configs), "git_sha": git_sha(), "ray_address": args.address or "local"}
    tables.write_fragment(args.results_dir, "sweeps", args.name, args.name, [sweep_row])

    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    pgf = resources(args.cpus_per_trial, args.gpus_per_trial, args.analysis_workers)
    trainable = tune.with_resources(train_trial, pgf)
    space = param_space if param_space is not None else {"exp": tune.grid_search([c.to_dict() for c in configs])}
    space = {**space, "sweep": args.name, "results_dir": args.results_dir, "data_dir": args.data_dir,
             "cpus_per_trial": args.cpus_per_trial, "analysis_workers": args.analysis_workers}
    callbacks = [TrialsTable(args.results_dir, args.name),
                 MlflowLogger(args.mlflow_uri or default_mlflow_uri(args.results_dir), args.name, args.results_dir)]
    reporter = tune.CLIReporter(metric_columns={"epoch": "ep", "own/train_noisy/accuracy": "own_noisy",
                                                "drop/train_noisy/accuracy": "drop_noisy",
                                                "drop/test/accuracy": "drop_test",
                                                "plain/train_noisy/accuracy": "plain_noisy",
                                                "plain/test/accuracy": "plain_test"},
                                parameter_columns={}, max_report_frequency=15)
    run_config = tune.RunConfig(name=args.name, storage_path=storage,
                                storage_filesystem=None if "://" not in args.results_dir else fs,
                                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
                                callbacks=callbacks, progress_reporter=reporter, verbose=1)
    exp_path = f"{storage}/{args.name}"
    if args.resume and tune.Tuner.can_restore(exp_path if "://" not in args.results_dir else
                                              f"{args.results_dir.rstrip('/')}/ray/{args.name}"):
        tuner = tune.Tuner.restore(exp_path if "://" not in args.results_dir else
                                   f"{args.results_dir.rstrip('/')}/ray/{args.name}",
                                   trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=space)
    else:
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                           tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search_alg,
                                                       num_samples=num_samples or 1, metric=metric, mode=mode))
    grid = tuner.fit()
    sweep_row["finished_at"] = dt.datetime.now(dt.timezone.utc)
    tables.write_fragment(args.results_dir, "sweeps", args.name, args.name, [sweep_row])
    failed = [r for r in grid if r.error is not None]
    print_summary(args, grid)
    return 1 if failed else 0


def print_summary(args, grid) -> None:
    print(f"\nSweep {args.name!r}: {len(grid)} trials")
    print(f"{'trial_key':12}  {'dataset':8} {'arch':9} {'dropout':12} {'p_mem':>5}  "
          f"{'own_noisy':>9} {'drop_noisy':>10} {'drop_test':>9} {'plain_noisy':>11} {'plain_test':>10} "
          f"{'flip_noisy':>10} {'flip_clean':>10}")
    for r in grid:
        c = r.config["exp"]
        m = r.metrics or {}

        def f(k):
            v = m.get(k)
            return f"{v:.3f}" if isinstance(v, float) and v == v else "-"
        print(f"{m.get('trial_key', ExperimentConfig.from_dict(c).trial_key):12}  {c['data']['dataset']:8} "
              f"{c['model']['arch']:9} {c['dropout']['kind']:12} {c['dropout']['p_mem']:>5}  "
              f"{f('own/train_noisy/accuracy'):>9} {f('drop/train_noisy/accuracy'):>10} "
              f"{f('drop/test/accuracy'):>9} {f('plain/train_noisy/accuracy'):>11} {f('plain/test/accuracy'):>10} "
              f"{f('flip/greedy/noisy/median_units'):>10} {f('flip/greedy/clean/median_units'):>10}"
              + (f"  FAILED: {str(r.error).splitlines()[0][:120]}" if r.error else ""))
    uri = args.mlflow_uri or default_mlflow_uri(args.results_dir)
    print(f"\nTables: {args.results_dir}/tables/<table>/sweep={args.name}/")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print(f"Query:      duckdb: read_parquet('{args.results_dir}/tables/evals/*/*.parquet', hive_partitioning=true)")
