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
import uuid

from memray import tables
from memray.config import DEFAULT_WIDTH, ExperimentConfig


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
    if args.analysis_workers < 0:
        raise UsageError(f"--analysis-workers={args.analysis_workers} is invalid: an integer >= 0")


def grid_file(results: str, sweep: str) -> str:
    return f"sweeps/{sweep}.grid.json"


def check_resume(args, configs: list[ExperimentConfig] | None = None, spec: dict | None = None) -> str | None:
    """--resume needs a known sweep launched with the same grid (or search spec); a fresh run of a
    known name needs the same too (re-running is idempotent), else a new --name. Returns the
    stored run id when resuming (a resumed invocation keeps it), else None."""
    rel = grid_file(args.results_dir, args.name)
    known = tables.exists(args.results_dir, rel)
    if args.resume and not known:
        raise UsageError(f"--resume: no sweep named {args.name!r} under {args.results_dir}; "
                         f"run it without --resume first")
    if not known:
        return None
    stored = json.loads(tables.read_bytes(args.results_dir, rel))
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


# Training-set sizes and rough relative per-example costs (measured on a CPU for mlp and resnet9;
# the rest by their FLOPs): enough to order trials, not to predict their time.
TRAIN_SIZE = {"digits": 1400, "mnist1d": 4000, "mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000,
              "cifar100": 50000, "svhn": 73257}
ARCH_COST = {"mlp": 1.0, "lenet": 2.0, "resnet9": 6.0, "resnet50": 40.0, "vit_small": 20.0}


def estimated_cost(c: ExperimentConfig) -> float:
    n = c.data.train_limit or TRAIN_SIZE[c.data.dataset]
    return c.optim.epochs * n * ARCH_COST[c.model.arch] * (c.model.resolved_width / DEFAULT_WIDTH[c.model.arch])


def longest_first(configs: list[ExperimentConfig]) -> list[ExperimentConfig]:
    """Trials in decreasing estimated cost: the last to start are short, so no core idles for long
    at the end of a sweep while one long trial finishes (longest-processing-time-first order)."""
    return sorted(configs, key=estimated_cost, reverse=True)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:
        return ""


def print_dry_run(configs: list[ExperimentConfig], args, pgf_bundles) -> None:
    print(f"{len(configs)} trials for sweep {args.name!r}; resources per trial: {pgf_bundles}")
    for c in configs:
        print(f"  {c.trial_key}  {c.canonical_json()}")


def launch(args, configs: list[ExperimentConfig] | None, preset: str, scheduler=None, search_alg=None,
           num_samples: int | None = None, search_space: dict | None = None, base_exp: dict | None = None,
           spec: dict | None = None, objective: str | None = None, metric=None, mode=None,
           resume_run_id: str | None = None) -> int:
    """Run the trials through Ray Tune; write the sweeps/trials tables; print the summary.

    A grid passes `configs`; a search passes `base_exp`, `search_space` (flat names, see
    trainables.trial.SEARCH_FIELDS), `num_samples` and its searcher/scheduler."""
    # Tune's classic progress table honours our columns (the newer output engine picks its own).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Per-epoch checkpoints with num_to_keep force frequent experiment-state snapshots; they are
    # cheap here (a few ms of driver time each), so Tune's warning about them is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's JSON and CSV result logs stay (each trial's folder under <results>/ray); its TensorBoard
    # logger does not: MLflow is the UI here, and TensorBoard events took about 5 s of the driver's
    # CPU in a default sweep (2 s of it in the result callbacks every per-epoch report waits on).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from trainables.callbacks import MlflowLogger, TrialsTable
    from trainables.trial import exp_dict, resources, train_trial

    started = dt.datetime.now(dt.UTC)
    fs, base = tables.filesystem(args.results_dir)
    storage = f"{base}/ray"
    if "://" not in args.results_dir:
        os.makedirs(storage, exist_ok=True)
    run_id = resume_run_id or uuid.uuid4().hex[:12]
    n_trials = len(configs) if configs is not None else int(num_samples or 1)
    tables.write_bytes(args.results_dir, grid_file(args.results_dir, args.name), json.dumps(
        {"trial_keys": [c.trial_key for c in configs] if configs is not None else None, "spec": spec,
         "preset": preset, "run_id": run_id,
         "mlflow_uri": args.mlflow_uri}).encode())
    sweep_row = {"sweep": args.name, "started_at": started, "finished_at": None, "command": " ".join(sys.argv),
                 "preset": preset, "n_trials": n_trials, "git_sha": git_sha(), "ray_address": args.address or "local"}
    tables.write_fragment(args.results_dir, "sweeps", args.name, args.name, [sweep_row])

    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    pgf = resources(args.cpus_per_trial, args.gpus_per_trial, args.analysis_workers)
    trainable = tune.with_resources(train_trial, pgf)
    space = ({"exp": tune.grid_search([c.to_dict() for c in configs])} if configs is not None
             else {"exp": base_exp, "search": search_space})
    space = {**space, "sweep": args.name, "results_dir": args.results_dir, "data_dir": args.data_dir,
             "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
             "analysis_workers": args.analysis_workers, "run_id": run_id, "objective": objective}
    callbacks = [TrialsTable(args.results_dir, args.name),
                 MlflowLogger(args.mlflow_uri, args.name, args.results_dir),
                 JsonLoggerCallback(), CSVLoggerCallback()]
    columns = {"epoch": "ep", "own/train_noisy/accuracy": "own_noisy", "drop/train_noisy/accuracy": "drop_noisy",
               "drop/test/accuracy": "drop_test", "plain/train_noisy/accuracy": "plain_noisy",
               "plain/test/accuracy": "plain_test"}
    if objective is not None:
        columns["objective"] = "objective"
    params = ({"exp/data/dataset": "dataset", "exp/model/arch": "arch", "exp/dropout/kind": "dropout",
               "exp/dropout/p_mem": "p_mem"} if configs is not None else
              {"search/p_gen": "p_gen", "search/p_mem": "p_mem", "search/lr": "lr", "search/width": "width"})
    reporter = tune.CLIReporter(metric_columns=columns, parameter_columns=params, max_report_frequency=15)
    run_config = tune.RunConfig(name=args.name, storage_path=storage,
                                storage_filesystem=None if "://" not in args.results_dir else fs,
                                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
                                callbacks=callbacks, progress_reporter=reporter, verbose=1)
    exp_path = f"{storage}/{args.name}"
    remote_fs = None if "://" not in args.results_dir else fs
    if args.resume and tune.Tuner.can_restore(exp_path, storage_filesystem=remote_fs):
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=remote_fs)
    else:
        # Trainable actors are reused between trials (no process start and torch import per trial);
        # so are their analysis actors (trainables.run).
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                           tune_config=tune.TuneConfig(scheduler=scheduler, search_alg=search_alg,
                                                       num_samples=num_samples or 1, metric=metric, mode=mode,
                                                       reuse_actors=True))
    grid = tuner.fit()
    # also after an interruption, when Tune may skip on_experiment_end; a restored Tuner runs its
    # own (unpickled) logger, which drain_all reaches too
    MlflowLogger.drain_all()
    sweep_row["finished_at"] = dt.datetime.now(dt.UTC)
    tables.write_fragment(args.results_dir, "sweeps", args.name, args.name, [sweep_row])
    started = [r for r in grid if r.config]  # after an interruption, unstarted trials have no config
    keys = ([c.trial_key for c in configs] if configs is not None else
            [ExperimentConfig.from_dict(exp_dict(r.config)).trial_key for r in started])
    rows = trial_rows(args.results_dir, args.name, keys, run_id)
    status = {k: (r["status"] if r else None) for k, r in rows.items()}
    print_summary(args, started, status, {k: r["error"] for k, r in rows.items() if r and r["error"]})
    unfinished = [k for k, v in status.items() if v is None]
    if unfinished or len(status) < n_trials:
        print(f"\nInterrupted: {n_trials - sum(v is not None for v in status.values())} of {n_trials} trial(s) "
              f"unfinished. Continue with the same command plus --resume.", file=sys.stderr)
        return 130
    return 1 if any(v == "failed" for v in status.values()) else 0


def trial_rows(results: str, sweep: str, keys: list[str], run_id: str) -> dict[str, dict | None]:
    """trial_key -> its `trials` row written by this sweep invocation (run_id), or None: the trial
    never ended in it (a row left by an earlier run of the same name does not count)."""
    out: dict[str, dict | None] = {}
    for key in keys:
        out[key] = None
        if tables.exists(results, tables.fragment_rel("trials", sweep, key)):
            row = tables.read_fragment(results, "trials", sweep, key)[0]
            out[key] = row if row.get("run_id") == run_id else None
    return out


def print_summary(args, grid, status: dict[str, str | None], errors: dict[str, str]) -> None:
    """Per trial: status, the config axes that vary, own/drop noisy accuracy, drop test accuracy,
    the plain twin's, flip medians (and the objective for a search); failures with their error."""
    from trainables.trial import exp_dict

    search = any(r.config.get("objective") for r in grid)
    head = (f"{'trial_key':12}  {'status':8} {'dataset':8} {'arch':8} {'width':>5} {'dropout':12} "
            f"{'p_gen':>6} {'p_mem':>6} " + (f"{'lr':>7} " if search else "") +
            f"{'own_noisy':>9} {'drop_noisy':>10} {'drop_test':>9} {'plain_noisy':>11} {'plain_test':>10} "
            f"{'flip_noisy':>10} {'flip_clean':>10}" + (f" {'objective':>9}" if search else ""))
    print(f"\nSweep {args.name!r}: {len(grid)} trials")
    print(head)
    failures = []
    for r in sorted(grid, key=lambda r: ExperimentConfig.from_dict(exp_dict(r.config)).canonical_json()):
        c = ExperimentConfig.from_dict(exp_dict(r.config))
        m = r.metrics or {}

        def f(k, w):
            v = m.get(k)
            return f"{v:>{w}.3f}" if isinstance(v, float) and v == v else f"{'-':>{w}}"
        st = status.get(c.trial_key) or "unfinished"
        etd = c.dropout.kind != "none"
        print(f"{c.trial_key:12}  {st:8} {c.data.dataset:8} {c.model.arch:8} {c.model.resolved_width:>5} "
              f"{c.dropout.kind:12} {(f'{c.dropout.p_gen:.3g}' if etd else '-'):>6} "
              f"{(f'{c.dropout.p_mem:.3g}' if etd else '-'):>6} " + (f"{c.optim.lr:>7.4f} " if search else "") +
              f"{f('own/train_noisy/accuracy', 9)} {f('drop/train_noisy/accuracy', 10)} "
              f"{f('drop/test/accuracy', 9)} {f('plain/train_noisy/accuracy', 11)} {f('plain/test/accuracy', 10)} "
              f"{f('flip/greedy/noisy/median_units', 10)} {f('flip/greedy/clean/median_units', 10)}"
              + (f" {f('objective', 9)}" if search else ""))
        if st == "failed":
            failures.append((c.trial_key, errors.get(c.trial_key, "error (no details recorded)")))
    for key, err in failures:
        print(f"FAILED {key}: {err}")
    uri = args.mlflow_uri  # resolved by check_runtime
    print(f"\nTables:     {args.results_dir}/tables/<table>/sweep={args.name}/")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print(f"Query:      python -m analysis.query --results-dir {args.results_dir} "
          f"\"select * from trials where sweep = '{args.name}'\"")
    print(f"Report:     python -m analysis.report --results-dir {args.results_dir} --sweep {args.name}")
