"""Driver-side Tune callbacks: the `trials` table and the MLflow view.

Both run in the driver only (one writer: a local SQLite MLflow store is safe, and workers need no
route to a tracking server). MLflow failures never fail a trial: they warn, and
`python -m analysis.sync_mlflow` can rebuild MLflow from the Parquet tables later.
"""
from __future__ import annotations

import re
import warnings

from ray import tune

from memray import tables
from memray.config import ExperimentConfig

_ACC = re.compile(r"^(plain|own|all|drop)/(train_clean|train_noisy|train_noisy_true|test)/accuracy$")


def trial_row(sweep: str, exp: dict, status: str, attempts: int, result: dict, error: str | None) -> dict:
    c = ExperimentConfig.from_dict(exp)
    return {"sweep": sweep, "trial_key": c.trial_key, "dataset": c.data.dataset, "arch": c.model.arch,
            "width": c.model.resolved_width, "noise_rate": c.data.noise_rate, "dropout": c.dropout.kind,
            "p_gen": c.dropout.p_gen, "p_mem": c.dropout.p_mem, "seed": c.seed, "epochs": c.optim.epochs,
            "status": status, "attempts": attempts, "wall_s": result.get("wall_s"),
            "device": result.get("device"), "node_id": result.get("node_id"),
            "config_json": c.canonical_json(), "error": error}


class TrialsTable(tune.Callback):
    def __init__(self, results: str, sweep: str):
        self.results, self.sweep = results, sweep

    def _write(self, trial, status: str, error: str | None) -> None:
        row = trial_row(self.sweep, trial.config["exp"], status, trial.num_failures + (status == "done"),
                        trial.last_result or {}, error)
        tables.write_fragment(self.results, "trials", self.sweep, row["trial_key"], [row])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, "done", None)

    def on_trial_error(self, iteration, trials, trial, **info):
        err = None
        try:
            e = trial.get_error()
            err = str(e).strip().splitlines()[-1] if e is not None else "error"
        except Exception as exc:  # the error file may be gone on remote storage
            err = f"error (details unavailable: {exc})"
        self._write(trial, "failed", err)


class MlflowLogger(tune.Callback):
    """Experiment = sweep; one parent run per sweep name, one child per trial (tag trial_key)."""

    def __init__(self, uri: str, sweep: str, results: str):
        self.uri, self.sweep, self.results = uri, sweep, results
        self.client = None
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}

    def _safe(self, fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # MLflow is a view: never fail a trial over it
            warnings.warn(f"MLflow logging failed ({type(e).__name__}: {e}); the Parquet tables are "
                          f"complete: `python -m analysis.sync_mlflow --results-dir {self.results}` rebuilds it")
            return None

    def setup(self, **info):
        self._safe(self._setup)

    def _setup(self):
        from memray.mlflow_view import MlflowView

        self.view = MlflowView(self.uri, self.sweep)
        self.client = self.view.client

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.client is None:
            return
        self._safe(self._log, trial, result)

    def _log(self, trial, result):
        key = result.get("trial_key") or ExperimentConfig.from_dict(trial.config["exp"]).trial_key
        run_id = self.view.child(key, trial.config["exp"])
        if result.get("phase") == "train":
            metrics = {k: v for k, v in result.items() if _ACC.match(k) and isinstance(v, float)}
            self.view.log_metrics(run_id, metrics, step=int(result["epoch"]))
        elif result.get("phase") == "done":
            metrics = {f"final/{k}": v for k, v in result.items() if _ACC.match(k) and isinstance(v, float)}
            self.view.log_metrics(run_id, metrics, step=int(result["epoch"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.client is None:
            return
        self._safe(self._finish, trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.client is None:
            return
        self._safe(self._finish, trial, "FAILED")

    def _finish(self, trial, status):
        key = ExperimentConfig.from_dict(trial.config["exp"]).trial_key
        run_id = self.view.child(key, trial.config["exp"])
        self.view.log_figures(run_id, self.results, key)
        self.view.client.set_terminated(run_id, status)
