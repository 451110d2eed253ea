"""The MLflow view of the results store (ARCHITECTURE.md, "MLflow").

Experiment = sweep name, tagged so MLflow's UI opens on its training runs. One parent run per
sweep (tag `memray.role=sweep`, the sweep command and source tags), reused by every invocation of
that sweep; one child run per trial, nested under it (`mlflow.parentRunId`), named so a person
can scan it (`ExperimentConfig.run_name`), tagged `trial_key`, likewise reused: a run is never
duplicated. Params: the flattened trial config (up to MLflow's own length limit). Metrics:
`<mode>/<subset>/accuracy` with step = epoch, `final/...`, and the analyses' summary numbers.
Inputs: the trial's dataset (name, digest of its labels and noise mask, noise config). Artifacts:
the trial's figures from the results store, kept in `mlartifacts/` beside a SQLite store's
database; on the parent, the sweep's verdict table.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

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


class LockedClient:
    """An MlflowClient for a SQLite store: every call holds a file lock beside the database and
    retries "database is locked" (another process reading or writing it), so sweeps started at the
    same time on one store serialise its creation and their writes (ARCHITECTURE.md, MLflow)."""

    RETRIES = 6

    def __init__(self, client: MlflowClient, lock_path: str):
        from filelock import FileLock

        self._client, self._lock = client, FileLock(lock_path)

    def __getattr__(self, name: str):
        fn = getattr(self._client, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            for attempt in range(self.RETRIES):
                try:
                    with self._lock:
                        return fn(*args, **kwargs)
                except Exception as e:  # sqlalchemy's OperationalError arrives wrapped by MLflow
                    if "database is locked" not in str(e) or attempt == self.RETRIES - 1:
                        raise
                    time.sleep(0.1 * 2 ** attempt)
        return call


def tracking_client(uri: str) -> MlflowClient | LockedClient:
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    db = os.path.abspath(uri[len("sqlite:///"):])
    os.makedirs(os.path.dirname(db), exist_ok=True)
    with FileLock(f"{db}.lock"):  # a new store's tables are created here: one process at a time
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return LockedClient(client, f"{db}.lock")


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the experiment is model training

# MLflow 3.17's UI does not pick its page from the experiment: its workspace switch (GenAI / Model
# training) is a per-browser setting (localStorage `mlflow.workflowType`, default GenAI) that the
# URL parameter `workflowType` overrides. Its runs list nests children under their parent,
# collapsed, whenever it sorts by creation time (it then fetches the parents of matching runs,
# even under a filter), and expanded rows are not part of a view it can share. The link a sweep
# prints therefore names the model-training workspace, filters the runs to the sweep's trials and
# sorts them by name: a flat list of every trial.
TRIALS_FILTER = "tags.`memray.role` = 'trial'"
BY_NAME = "tags.`mlflow.runName`"  # the UI's own "Run Name" sort key
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui --host 127.0.0.1 --port 5000` serves


def ui_base(uri: str) -> str:
    """The MLflow UI's address for a tracking URI: an http(s) server serves it itself; a local
    store is served by `mlflow ui` on 127.0.0.1:5000."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def runs_link(uri: str, experiment_id: str, trials: bool = True) -> str:
    """The link that opens a sweep's training runs, its trials listed, in a browser that has never
    opened MLflow: `<ui>/#/experiments/<id>/runs?workflowType=machine_learning&searchFilter=...&orderByKey=...`.
    `trials=False` (a scoring sweep: one run, no trials): the runs page unfiltered."""
    facets = {"searchFilter": TRIALS_FILTER, "orderByKey": BY_NAME, "orderByAsc": "true"} if trials else {}
    query = urlencode({"workflowType": "machine_learning", **facets}, quote_via=quote)
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{query}"


class MlflowView:
    MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, uri: str, sweep: str, source_tags: dict[str, str] | None = None):
        self.client = tracking_client(uri)
        self.sweep = sweep
        self.source_tags = dict(source_tags or {})  # mlflow.source.*, the sweep command
        exp = self.client.get_experiment_by_name(sweep)
        root = artifact_root(uri)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                sweep, artifact_location=f"{root}/{sweep}" if root else None, tags=EXPERIMENT_KIND)
        else:
            self.experiment_id = exp.experiment_id
            for k, v in EXPERIMENT_KIND.items():
                self.client.set_experiment_tag(self.experiment_id, k, v)
        found = self.client.search_runs([self.experiment_id], "tags.`memray.role` = 'sweep'", max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")  # this invocation runs it again
            for k, v in self.source_tags.items():
                self.client.set_tag(self.parent_id, k, v)
        else:
            self.parent_id = self.client.create_run(self.experiment_id, run_name=sweep,
                                                    tags={"memray.role": "sweep", **self.source_tags}).info.run_id
        self._children: dict[str, str] = {}

    def child(self, trial_key: str, cfg: ExperimentConfig) -> str:
        if trial_key in self._children:
            return self._children[trial_key]
        found = self.client.search_runs([self.experiment_id], f"tags.trial_key = '{trial_key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            source = {k: v for k, v in self.source_tags.items() if k.startswith("mlflow.source.")}
            run_id = self.client.create_run(
                self.experiment_id, run_name=cfg.run_name,
                tags={"trial_key": trial_key, "mlflow.parentRunId": self.parent_id, "memray.role": "trial",
                      **source}).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)[:MAX_PARAM_VAL_LENGTH])
                                                  for k, v in sorted(cfg.flat().items())])
        self._children[trial_key] = run_id
        return run_id

    def log_dataset(self, run_id: str, cfg: ExperimentConfig, digest: str | None) -> None:
        """The trial's dataset as an MLflow dataset input: name, digest, noise config."""
        if not digest:
            return
        d = cfg.data
        noise = {"noise_rate": d.noise_rate, "noise_kind": d.noise_kind, "data_seed": d.data_seed,
                 "train_limit": d.train_limit}
        ds = Dataset(name=d.dataset, digest=digest, source_type="memray",
                     source=json.dumps({"dataset": d.dataset}), profile=json.dumps(noise))
        self.client.log_inputs(run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", "training")])])

    def log_files(self, run_id: str, files: dict[str, str]) -> None:
        """Text artifacts {file name: text} on a run (the parent's verdict table)."""
        for name, text in files.items():
            self.client.log_text(run_id, text, name)

    def close(self, status: str) -> None:
        """End the sweep's parent run: FINISHED, or FAILED when a trial failed."""
        self.client.set_terminated(self.parent_id, status)

    def log_memscores(self, params: dict, summary: dict[str, float], figures: dict[str, bytes]) -> None:
        """A scoring sweep's view, on its parent run: the recipe as params (logged once), the
        summary (memray.summary.memscore_summary) as metrics, its figures, and the run finished."""
        self.client.set_tag(self.parent_id, "memray.kind", "memscores")
        existing = self.client.get_run(self.parent_id).data.params
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)[:MAX_PARAM_VAL_LENGTH])
                                                      for k, v in sorted(params.items()) if k not in existing])
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in sorted(summary.items())
                                                       if not math.isnan(v)])
        if figures:
            with tempfile.TemporaryDirectory() as d:
                for name, png in figures.items():
                    Path(d, f"{name}.png").write_bytes(png)
                self.client.log_artifacts(self.parent_id, d, artifact_path="figures")
        self.log_files(self.parent_id, {"memscores_summary.json": json.dumps(summary, indent=1, sort_keys=True)})
        self.close("FINISHED")

    def log_metrics(self, run_id: str, by_step: dict[int, dict[str, float]], synchronous: bool = True) -> list:
        """Log {step: {name: value}} in as few log_batch calls as MLflow allows (one store write
        costs about the same for one step's metrics as for ten). `synchronous=False`: through
        MLflow's asynchronous queue; returns its RunOperations (wait() raises a failed write)."""
        rows = [Metric(k, float(v), 0, int(step)) for step, metrics in sorted(by_step.items())
                for k, v in sorted(metrics.items())]
        ops = [self.client.log_batch(run_id, metrics=rows[i:i + self.MAX_BATCH], synchronous=synchronous)
               for i in range(0, len(rows), self.MAX_BATCH)]
        return [op for op in ops if op is not None]

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
