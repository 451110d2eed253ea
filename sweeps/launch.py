"""Running a sweep's `Plan` through Ray Tune: the `sweeps` table, the trials, the summary.

Exit codes: 0 all trials done; 1 some trials failed after retries (the others are kept and the
summary names the failures); 130 interrupted (the same command plus --resume continues).
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import os
import subprocess
import sys
import uuid

from memray import tables
from memray.config import PROTOCOL, ExperimentConfig, metric_key

from memray.objectives import MULTI

from .cli import grid_file
from .plan import Plan

# accuracies in the progress table and the summary: metric name -> column (own_noisy, drop_test, ...)
SUMMARY_METRICS = {metric_key(m, s): f"{m}_{s.removeprefix('train_')}" for m, s in (
    ("own", "train_noisy"), ("drop", "train_noisy"), ("drop", "test"), ("plain", "train_noisy"), ("plain", "test"))}


def source_tags() -> dict[str, str]:
    """MLflow's source tags for the sweep's parent run: the entry point, the git commit when there
    is one, and the command as typed."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    entry = spec.name if spec is not None else os.path.basename(sys.argv[0])
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL", "memray.command": " ".join(sys.argv)}
    sha = git_sha(full=True)
    if sha:
        tags["mlflow.source.git.commit"] = sha
    return tags


def verdict_files(results: str, sweep: str) -> dict[str, str]:
    """The sweep's verdict table (analysis.findings) as files for its MLflow parent run."""
    from analysis import findings
    from analysis.store import open_store

    return findings.verdict_files(open_store(results, skip_corrupt=True), sweep)


def warm_verdicts() -> None:
    """Import what `verdict_files` needs (scipy, DuckDB: about 1.2 s), so the sweep's end does not
    wait for it."""
    from analysis import findings  # noqa: F401


def git_sha(full: bool = False) -> str:
    try:
        return subprocess.run(["git", "rev-parse", *([] if full else ["--short"]), "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:
        return ""


def tune_environment() -> None:
    """Environment for Tune in the driver; set before Ray is imported."""
    # Tune's classic progress table honours our columns (the newer output engine picks its own).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Frequent checkpoints (--checkpoint-s 0: every epoch) with num_to_keep force frequent
    # experiment-state snapshots; they are cheap here (a few ms of driver time each), so Tune's
    # warning about them is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's JSON and CSV result logs stay (each trial's folder under <results>/ray); its TensorBoard
    # logger does not: MLflow is the UI here, and TensorBoard events took about 5 s of the driver's
    # CPU in a default sweep (2 s of it in the result callbacks every per-epoch report waits on).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # MLflow is a view: when its server is unreachable the logger gives up after its first failed
    # call (the tables stay complete, sync_mlflow catches up), and that call should not retry for
    # minutes at the sweep's end (MLflow's default: 7 retries with exponential backoff)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # MLflow's asynchronous logging thread otherwise waits on its queue in 1 s polls, and every
    # `set_terminated` (each trial's end, in Tune's loop) joins that thread: 0.8 s a call, measured,
    # during which no trial's report is taken and no trial starts. With buffering its thread waits
    # on the stop event instead (set_terminated: 0.01 s); metrics reach the store within 1 s.
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")


def record_start(args, keys: list[str] | None, preset: str, run_id: str, n_trials: int,
                 spec: dict | None = None) -> dict:
    """The sweep's grid file (what --resume checks) and its `sweeps` row; returns the row."""
    tables.write_bytes(args.results_dir, grid_file(args.name), json.dumps(
        {"trial_keys": keys, "spec": spec, "preset": preset, "run_id": run_id, "protocol": PROTOCOL,
         "mlflow_uri": args.mlflow_uri}).encode())
    row = {"sweep": args.name, "started_at": dt.datetime.now(dt.UTC), "finished_at": None,
           "command": " ".join(sys.argv), "preset": preset, "n_trials": n_trials, "git_sha": git_sha(),
           "ray_address": args.address or "local"}
    tables.write_fragment(args.results_dir, "sweeps", args.name, args.name, [row])
    return row


def record_end(args, row: dict) -> None:
    row["finished_at"] = dt.datetime.now(dt.UTC)
    tables.write_fragment(args.results_dir, "sweeps", args.name, args.name, [row])


def fit(args, trainable, space: dict, callbacks: list, reporter, tune_config=None, checkpoints: int = 3):
    """Run (or, with --resume, restore and continue) the sweep's Tuner; returns its ResultGrid.
    Trials are retried --max-failures times from their last checkpoint."""
    import ray
    from ray import tune

    fs, base = tables.filesystem(args.results_dir)
    storage = f"{base}/ray"
    remote_fs = None if "://" not in args.results_dir else fs
    if remote_fs is None:
        os.makedirs(storage, exist_ok=True)
    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    run_config = tune.RunConfig(name=args.name, storage_path=storage, storage_filesystem=remote_fs,
                                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints),
                                callbacks=callbacks, progress_reporter=reporter, verbose=1)
    exp_path = f"{storage}/{args.name}"
    if args.resume and tune.Tuner.can_restore(exp_path, storage_filesystem=remote_fs):
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=remote_fs)
    else:
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config,
                           tune_config=tune_config or tune.TuneConfig(reuse_actors=True))
    return tuner.fit()


def launch(args, plan: Plan) -> int:
    """Run the plan's trials through Ray Tune; write the sweeps/trials tables; print the summary."""
    tune_environment()
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from trainables.callbacks import MlflowLogger, TrialsTable
    from trainables.trial import resources, train_trial

    configs = plan.configs
    single = plan.objective is not None and plan.objective not in MULTI
    run_id = plan.resume_run_id or uuid.uuid4().hex[:12]
    n_trials = plan.n_trials
    sweep_row = record_start(args, [c.trial_key for c in configs] if configs is not None else None, plan.preset,
                             run_id, n_trials, plan.spec)
    pgf = resources(args.cpus_per_trial, args.gpus_per_trial, args.analysis_workers)
    trainable = tune.with_resources(train_trial, pgf)
    space = ({"exp": tune.grid_search([c.to_dict() for c in configs])} if configs is not None
             else {"exp": plan.exp_space})
    space = {**space, "sweep": args.name, "results_dir": args.results_dir, "data_dir": args.data_dir,
             "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
             "run_id": run_id, "objective": plan.objective,  # no actor count: a trial reads its bundles
             "checkpoint_s": args.checkpoint_s}
    callbacks = [TrialsTable(args.results_dir, args.name),
                 MlflowLogger(args.mlflow_uri, args.name, args.results_dir, source_tags=source_tags(),
                              verdicts=functools.partial(verdict_files, args.results_dir, args.name),
                              warm=warm_verdicts),
                 JsonLoggerCallback(), CSVLoggerCallback()]
    columns = {"epoch": "ep", **SUMMARY_METRICS}
    if plan.objective in MULTI:
        columns.update({f"objective/{n}": n for n, _ in MULTI[plan.objective]})
    elif plan.objective is not None:
        columns["objective"] = "objective"
    params = ({"exp/data/dataset": "dataset", "exp/model/arch": "arch", "exp/dropout/kind": "dropout",
               "exp/dropout/p_mem": "p_mem"} if configs is not None else
              {"exp/dropout/p_gen": "p_gen", "exp/dropout/p_mem": "p_mem", "exp/optim/lr": "lr",
               "exp/model/width": "width"})
    reporter = tune.CLIReporter(metric_columns=columns, parameter_columns=params, max_report_frequency=15)
    # Trainable actors are reused between trials (no process start and torch import per trial);
    # so are their analysis actors (trainables.actors).
    grid = fit(args, trainable, space, callbacks, reporter,
               tune.TuneConfig(scheduler=plan.scheduler, search_alg=plan.search_alg, num_samples=plan.num_samples,
                               # a multi-objective searcher holds its metrics
                               metric="objective" if single else None, mode="max" if single else None,
                               reuse_actors=True))
    # also after an interruption, when Tune may skip on_experiment_end; a restored Tuner runs its
    # own (unpickled) logger, which drain_all reaches too
    MlflowLogger.drain_all()
    record_end(args, sweep_row)
    started = [r for r in grid if r.config]  # after an interruption, unstarted trials have no config
    typed = {id(r): ExperimentConfig.from_dict(r.config["exp"]) for r in started}  # once per trial
    keys = ([c.trial_key for c in configs] if configs is not None else [typed[id(r)].trial_key for r in started])
    rows = {k: tables.finished_row(args.results_dir, args.name, k, run_id) for k in keys}
    status = {k: (r["status"] if r else None) for k, r in rows.items()}
    print_summary(args, started, typed, status, {k: r["error"] for k, r in rows.items() if r and r["error"]})
    unfinished = [k for k, v in status.items() if v is None]
    if unfinished or len(status) < n_trials:
        print(f"\nInterrupted: {n_trials - sum(v is not None for v in status.values())} of {n_trials} trial(s) "
              f"unfinished. Continue with the same command plus --resume.", file=sys.stderr)
        return 130
    return 1 if any(v == "failed" for v in status.values()) else 0


def mlflow_lines(uri: str, sweep: str) -> list[str]:
    """How to open the sweep's training runs in MLflow's UI: the server (or `mlflow ui` for a local
    store) and the link that lands on the trials (memray.mlflow_view.runs_link)."""
    from memray.mlflow_view import runs_link
    from trainables.callbacks import MlflowLogger

    exp_id = next((lg.view.experiment_id for lg in MlflowLogger.live
                   if lg.sweep == sweep and lg.view is not None and not lg.failed), None)
    server = uri.startswith(("http://", "https://"))
    serve = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    if exp_id is None:  # logging failed (a warning said so): the tables are complete
        return [f"MLflow UI:  {uri if server else serve}",
                "            (MLflow logging failed: python -m analysis.sync_mlflow rebuilds it)"]
    if server:
        return [f"MLflow UI:  {runs_link(uri, exp_id)}"]
    return [f"MLflow UI:  {serve}, then open", f"            {runs_link(uri, exp_id)}"]


def print_summary(args, grid, typed: dict[int, ExperimentConfig], status: dict[str, str | None],
                  errors: dict[str, str]) -> None:
    """Per trial: status, the config axes that vary, own/drop noisy accuracy, drop test accuracy,
    the plain twin's, flip medians (and the objective for a search); failures with their error."""
    search = any(r.config.get("objective") for r in grid)
    head = (f"{'trial_key':12}  {'status':8} {'dataset':8} {'arch':8} {'width':>5} {'dropout':12} "
            f"{'p_gen':>6} {'p_mem':>6} " + (f"{'lr':>7} " if search else "") +
            "".join(f"{col} " for col in SUMMARY_METRICS.values()) +
            f"{'flip_noisy':>10} {'flip_clean':>10}" + (f" {'objective':>9}" if search else ""))
    print(f"\nSweep {args.name!r}: {len(grid)} trials")
    print(head)
    failures = []
    for r in sorted(grid, key=lambda r: typed[id(r)].canonical_json()):
        c = typed[id(r)]
        m = r.metrics or {}

        def f(k, w):
            v = m.get(k)
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
            return f"{float(v):>{w}.3f}" if number else f"{'-':>{w}}"
        st = status.get(c.trial_key) or "unfinished"
        etd = c.dropout.kind != "none"
        print(f"{c.trial_key:12}  {st:8} {c.data.dataset:8} {c.model.arch:8} {c.model.resolved_width:>5} "
              f"{c.dropout.kind:12} {(f'{c.dropout.p_gen:.3g}' if etd else '-'):>6} "
              f"{(f'{c.dropout.p_mem:.3g}' if etd else '-'):>6} " + (f"{c.optim.lr:>7.4f} " if search else "") +
              "".join(f"{f(k, len(col))} " for k, col in SUMMARY_METRICS.items()) +
              f"{f('flip/greedy/noisy/median_units', 10)} {f('flip/greedy/clean/median_units', 10)}"
              + (f" {f('objective', 9)}" if search else ""))
        if st == "failed":
            failures.append((c.trial_key, errors.get(c.trial_key, "error (no details recorded)")))
    for key, err in failures:
        print(f"FAILED {key}: {err}")
    uri = args.mlflow_uri  # resolved by check_runtime
    print(f"\nTables:     {args.results_dir}/tables/<table>/sweep={args.name}/")
    for line in mlflow_lines(uri, args.name):
        print(line)
    print(f"Query:      python -m analysis.query --results-dir {args.results_dir} "
          f"\"select * from trials where sweep = '{args.name}'\"")
    print(f"Report:     python -m analysis.report --results-dir {args.results_dir} --sweep {args.name}")
