"""Driver-side Tune callbacks: the `trials` table and the MLflow view.

Both run in the driver only (one writer: a local SQLite MLflow store is safe, and workers need no
route to a tracking server). MLflow failures never fail a trial: they warn, and
`python -m analysis.sync_mlflow` can rebuild MLflow from the Parquet tables later.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, ClassVar

from ray import tune

from memray import tables
from memray.config import ExperimentConfig, parse_metric_key

# prefixes of the summary metrics a finished trial reports (memray.summary)
ANALYSIS_METRICS = ("flip/", "localize/", "rewind/", "retrain/", "gradients/")


def config_of(trial) -> ExperimentConfig:
    """The trial's typed config, built once per trial in the driver (Tune hands its callbacks the
    same Trial object for every event) and kept on it."""
    cfg = getattr(trial, "_memray_cfg", None)
    if cfg is None:
        cfg = ExperimentConfig.from_dict(trial.config["exp"])
        trial._memray_cfg = cfg
    return cfg


def trial_row(sweep: str, c: ExperimentConfig, status: str, attempts: int, result: dict, error: str | None,
              run_id: str | None = None) -> dict:
    return {"sweep": sweep, "trial_key": c.trial_key, "protocol": c.protocol, "dataset": c.data.dataset,
            "arch": c.model.arch, "width": c.model.resolved_width, "noise_rate": c.data.noise_rate,
            "noise_kind": c.data.noise_kind, "data_seed": c.data.data_seed, "dropout": c.dropout.kind,
            "p_gen": c.dropout.p_gen, "p_mem": c.dropout.p_mem, "seed": c.seed, "epochs": c.optim.epochs,
            "status": status, "attempts": attempts, "wall_s": result.get("wall_s"),
            "device": result.get("device"), "node_id": result.get("node_id"),
            "config_json": c.canonical_json(), "error": error, "epochs_done": result.get("epoch"),
            "restored_from": result.get("restored_from"), "run_id": run_id, "data_digest": result.get("data_digest")}


class TrialsTable(tune.Callback):
    """One `trials` row per trial, written when it ends: status `done`, `stopped` (ended early by
    the scheduler) or `failed` (after its retries, with the error)."""

    def __init__(self, results: str, sweep: str):
        self.results, self.sweep = results, sweep

    def _write(self, trial, status: str, error: str | None) -> None:
        result = trial.last_result or {}
        attempts = result.get("attempts") or trial.num_failures + (status != "failed")  # carried if reused
        row = trial_row(self.sweep, config_of(trial), status, attempts, result, error,
                        trial.config.get("run_id"))
        tables.write_fragment(self.results, "trials", self.sweep, row["trial_key"], [row])

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("phase") == "done"
        self._write(trial, "done" if done else "stopped", None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, "failed", error_line(trial))


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 -- only a head start: the real call reports its own errors
        pass


def error_line(trial) -> str:
    """The trial's error, its last line (e.g. 'RuntimeError: diverged at epoch 1: ...'). Tune writes
    the error file to the trial's local folder first; the results store gets it later."""
    text = None
    try:
        path = trial.error_file  # local copy: present when the error callback runs
        if path and os.path.exists(path):
            with open(path) as f:
                text = f.read()
        if not text:
            text = trial.get_error()
    except Exception as exc:  # noqa: BLE001 -- an unreadable error must not hide the failure
        return f"error (details unavailable: {exc})"
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "error (no details recorded)"


class MlflowLogger(tune.Callback):
    """Experiment = sweep; one parent run per sweep name, one child per trial (tag trial_key).

    The store is opened (created, for a new SQLite database: seconds) in the background while Tune
    starts the trials; every later call waits for it. Per-epoch metrics go out through MLflow's own
    asynchronous logging (`log_batch(..., synchronous=False)`: its queue writes them on its own
    thread), batched per trial: a trial's metrics are sent at most `flush_s` after they arrive (a
    store write costs about the same for one epoch's metrics as for ten), checked at every step
    of Tune's loop, and before its run is closed. Runs are created and closed synchronously (a
    few ms each, with MLflow's buffered asynchronous logging: see `sweeps.launch.tune_environment`).
    At the end every asynchronous write is waited for. After the first failure it stops logging
    (one warning) and the sweep goes on."""

    live: ClassVar[list["MlflowLogger"]] = []  # every logger in this process (a restored Tuner
    # unpickles its own copy: `drain_all` reaches it too)

    def __init__(self, uri: str, sweep: str, results: str, flush_s: float = 5.0,
                 source_tags: dict[str, str] | None = None, verdicts: Callable[[], dict[str, str]] | None = None,
                 warm: Callable[[], None] | None = None):
        self.uri, self.sweep, self.results, self.flush_s = uri, sweep, results, flush_s
        self.source_tags = dict(source_tags or {})  # the parent's source tags and sweep command
        self.verdicts = verdicts  # files {name: text} for the parent when the sweep ends
        self.warm = warm  # run on a thread when the first trial ends: the imports `verdicts` needs
        self.warmed = False
        MlflowLogger.live.append(self)
        self.view = None
        self.failed = False
        self.ready: Future | None = None  # the store opened, the experiment and parent run found
        # trial_key -> (config, {epoch: metrics}) not yet sent, and when they are due
        self.pending: dict[str, tuple[ExperimentConfig, dict[int, dict[str, float]]]] = {}
        self.due: dict[str, float] = {}
        self.ops: list = []  # MLflow's RunOperations of the writes in flight

    def __getstate__(self):  # Tune pickles callbacks with the experiment: leave the store out
        return {"uri": self.uri, "sweep": self.sweep, "results": self.results, "flush_s": self.flush_s,
                "source_tags": self.source_tags, "verdicts": self.verdicts,  # a module function's partial
                "warm": self.warm}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["sweep"], state["results"], state.get("flush_s", 5.0),
                      state.get("source_tags"), state.get("verdicts"), state.get("warm"))

    def _fail(self, e: BaseException) -> None:
        if not self.failed:
            warnings.warn(f"MLflow logging failed ({type(e).__name__}: {e}); the Parquet tables are "
                          f"complete: `python -m analysis.sync_mlflow --results-dir {self.results}` "
                          f"rebuilds it", stacklevel=2)
        self.failed = True

    def _guard(self, fn, *args):
        """fn(*args) once the store is open; MLflow is a view: never fail a trial over it."""
        if self.failed or self.ready is None:
            return
        try:
            self.ready.result()
            fn(*args)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def setup(self, **info):
        pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-open")
        self.ready = pool.submit(self._setup)
        pool.shutdown(wait=False)

    def _setup(self):
        from memray.mlflow_view import MlflowView

        self.view = MlflowView(self.uri, self.sweep, self.source_tags)

    def on_experiment_end(self, trials, **info):
        self._guard(self._flush, None)
        self._guard(self._close, "FAILED" if any(t.status == t.ERROR for t in trials) else "FINISHED")
        self.drain()

    @classmethod
    def drain_all(cls):
        for logger in list(cls.live):
            logger.drain()

    def drain(self):
        """Send what is pending and wait for every asynchronous write."""
        self._guard(self._flush, None)
        ops, self.ops = self.ops, []
        for op in ops:
            try:
                op.wait()
            except Exception as e:  # noqa: BLE001
                self._fail(e)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._collect(config_of(trial), dict(result))

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        for key in [k for k, t in self.due.items() if t <= now]:
            self._guard(self._flush, key)

    def _collect(self, cfg: ExperimentConfig, result):
        key = cfg.trial_key
        accs = {k: v for k, v in result.items()
                if (parse_metric_key(k) or k.split("/")[0] == "objective") and isinstance(v, float)}
        metrics = {}
        if result.get("phase") == "train":
            metrics = accs
        elif result.get("phase") == "done":
            metrics = {f"final/{k}": v for k, v in accs.items()}
            if any(k.split("/")[0] == "objective" for k in accs):  # a search trial's last epoch came only here
                metrics.update(accs)
            # the analyses' summary numbers (memray.summary): flip medians, localization precision
            metrics.update({k: float(v) for k, v in result.items() if k.startswith(ANALYSIS_METRICS)
                            and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v})
        by_step = self.pending.setdefault(key, (cfg, {}))[1]
        by_step.setdefault(int(result["epoch"]), {}).update(metrics)
        self.due.setdefault(key, time.monotonic() + self.flush_s)

    def _flush(self, key: str | None):
        """Send the pending metrics of one trial (key) or of all, asynchronously."""
        for k in [key] if key is not None else list(self.pending):
            self.due.pop(k, None)
            if k in self.pending:
                cfg, by_step = self.pending.pop(k)
                self.ops += self.view.log_metrics(self.view.child(k, cfg), by_step, synchronous=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard(self._finish, config_of(trial), "FINISHED", (trial.last_result or {}).get("data_digest"))
        if self.warm is not None and not self.warmed:  # off Tune's loop, while other trials run
            self.warmed = True
            threading.Thread(target=_quietly, args=(self.warm,), name="mlflow-warm", daemon=True).start()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard(self._finish, config_of(trial), "FAILED", None)

    def _close(self, status):
        if self.verdicts is not None:
            try:
                self.view.log_files(self.view.parent_id, self.verdicts())
            except Exception as e:  # noqa: BLE001 -- a verdict table that cannot be built must not hide the runs
                warnings.warn(f"the sweep's verdict table was not logged ({type(e).__name__}: {e})", stacklevel=1)
        self.view.close(status)

    def _finish(self, cfg: ExperimentConfig, status, digest):
        key = cfg.trial_key
        self._flush(key)
        run_id = self.view.child(key, cfg)
        self.view.log_dataset(run_id, cfg, digest)
        self.view.log_figures(run_id, self.results, key)
        self.view.client.set_terminated(run_id, status)
