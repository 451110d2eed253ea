"""The MLflow view of the results store (ARCHITECTURE.md, "MLflow").

Experiment = sweep name. One parent run per sweep (tag `memray.role=sweep`), reused by every
invocation of that sweep; one child run per trial, nested under it (`mlflow.parentRunId`), tagged
`trial_key`, likewise reused: a run is never duplicated. Params: the flattened trial config.
Metrics: `<mode>/<subset>/accuracy` with step = epoch, plus `final/...`. Artifacts: the trial's
figures from the results store, kept in `mlartifacts/` beside a SQLite store's database.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from . import tables
from .config import ExperimentConfig


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: for a SQLite store, `mlartifacts/` beside its database
    file (for the default store, `<results>/mlartifacts/`), whatever the working directory (MLflow's
    own default there is `./mlruns` in it). Other stores (a tracking server) decide themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):]  # "/abs/mlflow.db" (sqlite:////abs/...) or "rel/mlflow.db"
    return Path(os.path.abspath(os.path.dirname(db) or "."), "mlartifacts").as_uri()


class MlflowView:
    MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, uri: str, sweep: str):
        self.client = MlflowClient(tracking_uri=uri)
        self.sweep = sweep
        exp = self.client.get_experiment_by_name(sweep)
        root = artifact_root(uri)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            sweep, artifact_location=f"{root}/{sweep}" if root else None)
        found = self.client.search_runs([self.experiment_id], "tags.`memray.role` = 'sweep'", max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")  # this invocation runs it again
        else:
            self.parent_id = self.client.create_run(self.experiment_id, run_name=sweep,
                                                    tags={"memray.role": "sweep"}).info.run_id
        self._children: dict[str, str] = {}

    def child(self, trial_key: str, exp: dict) -> str:
        if trial_key in self._children:
            return self._children[trial_key]
        found = self.client.search_runs([self.experiment_id], f"tags.trial_key = '{trial_key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self.client.create_run(
                self.experiment_id, run_name=trial_key,
                tags={"trial_key": trial_key, "mlflow.parentRunId": self.parent_id, "memray.role": "trial"}).info.run_id
            flat = ExperimentConfig.from_dict(exp).flat()
            self.client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in sorted(flat.items())])
        self._children[trial_key] = run_id
        return run_id

    def close(self, status: str) -> None:
        """End the sweep's parent run: FINISHED, or FAILED when a trial failed."""
        self.client.set_terminated(self.parent_id, status)

    def log_metrics(self, run_id: str, by_step: dict[int, dict[str, float]]) -> None:
        """Log {step: {name: value}} in as few log_batch calls as MLflow allows (one store write
        costs about the same for one step's metrics as for ten)."""
        rows = [Metric(k, float(v), 0, int(step)) for step, metrics in sorted(by_step.items())
                for k, v in sorted(metrics.items())]
        for i in range(0, len(rows), self.MAX_BATCH):
            self.client.log_batch(run_id, metrics=rows[i:i + self.MAX_BATCH])

    def log_figures(self, run_id: str, results: str, trial_key: str) -> int:
        fs, base = tables.filesystem(results)
        from pyarrow.fs import FileSelector, FileType

        folder = f"{base}/figures/sweep={self.sweep}/{trial_key}"
        if fs.get_file_info(folder).type == FileType.NotFound:
            return 0
        n = 0
        with tempfile.TemporaryDirectory() as d:
            for info in fs.get_file_info(FileSelector(folder)):
                if info.base_name.endswith(".png"):
                    with fs.open_input_stream(info.path) as src, open(os.path.join(d, info.base_name), "wb") as dst:
                        dst.write(src.read())
                    n += 1
            if n:
                self.client.log_artifacts(run_id, d, artifact_path="figures")
        return n
