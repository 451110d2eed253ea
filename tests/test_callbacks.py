"""The driver's MLflow logger against a real (SQLite) MLflow store: per-epoch metrics are batched
into one store write per trial per flush window, and a trial's run is complete when it closes."""
import time
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from trainables.callbacks import MlflowLogger

from .conftest import small_cfg


def test_mlflow_logger_batches_epochs_and_flushes_before_closing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = MlflowLogger(uri, "b", str(tmp_path), flush_s=2.0)
    log.setup()
    log.ready.result(timeout=60)  # the store is opened in the background
    writes = []
    log_batch = log.view.client.log_batch

    def counting(run_id, **kw):
        if kw.get("metrics"):
            writes.append((len(kw["metrics"]), kw.get("synchronous")))
        return log_batch(run_id, **kw)
    log.view.client.log_batch = counting

    cfg = small_cfg(**{"dropout.kind": "example_tied"})
    trial = SimpleNamespace(config={"exp": cfg.to_dict()}, last_result={})
    key = cfg.trial_key

    def result(epoch, phase="train"):
        return {"trial_key": key, "phase": phase, "epoch": epoch, "own/test/accuracy": 0.1 * epoch,
                "drop/train_noisy/accuracy": 0.01 * epoch, "wall_s": 1.0}

    for epoch in range(1, 6):
        log.on_trial_result(0, [], trial, result(epoch))
    log.on_step_end(0, [])
    assert writes == []  # due 2 s after the first of them
    time.sleep(2.5)
    log.on_step_end(0, [])  # Tune's loop checks every step
    assert writes == [(10, False)]  # five epochs x two metrics, one asynchronous store write

    for epoch in (6, 7):
        log.on_trial_result(0, [], trial, result(epoch))
    log.on_trial_result(0, [], trial, result(7, phase="done"))
    log.on_trial_complete(0, [], trial)
    assert writes == [(10, False), (6, False)]  # sent before the run was closed, not at the next flush
    log.drain()  # every asynchronous write has landed
    assert not log.failed and log.ops == []

    c = MlflowClient(tracking_uri=uri)
    (run,) = [r for r in c.search_runs([c.get_experiment_by_name("b").experiment_id])
              if r.data.tags.get("trial_key") == key]
    assert run.info.status == "FINISHED"
    hist = c.get_metric_history(run.info.run_id, "own/test/accuracy")
    assert [(m.step, round(m.value, 6)) for m in sorted(hist, key=lambda m: m.step)] == \
        [(e, round(0.1 * e, 6)) for e in range(1, 8)]
    assert run.data.metrics["final/drop/train_noisy/accuracy"] == 0.07


def test_artifacts_go_beside_a_sqlite_store_whatever_the_working_directory(tmp_path, monkeypatch):
    from memray.mlflow_view import artifact_root
    from memray.tables import default_mlflow_uri

    monkeypatch.chdir(tmp_path)
    assert artifact_root(default_mlflow_uri("/data/results")) == "file:///data/results/mlartifacts"
    assert artifact_root("sqlite:///mlflow.db") == f"file://{tmp_path}/mlartifacts"
    assert artifact_root("sqlite:///sub/m.db") == f"file://{tmp_path}/sub/mlartifacts"
    assert artifact_root("http://127.0.0.1:5000") is None
