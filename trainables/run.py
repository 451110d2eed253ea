"""The trial itself: train with memray, then analyse over an actor pool (Ray Tune calls it through
`trainables.trial.train_trial`).

Resources (`trainables.trial.resources`): a trial's placement group has bundle 0 for this
trainable and one bundle per analysis worker, the trial's CPUs (and GPUs) split evenly. Training
and analysis are phases, so each uses all of them: on a 2-core laptop with `--cpus-per-trial 1`
two trials run at once, each training on one core and then analysing on it. The analysis actors
are started when the trial starts (their start-up overlaps training) and, like the trainable actor
itself (Tune's `reuse_actors`), are kept for the next trial this process runs.

Fault tolerance is Tune's: each epoch reports a checkpoint (model, optimiser, schedule, RNG,
history, gradient rows; the latest few are kept), weight snapshots are written once each to the
results store and referenced by epoch, and `FailureConfig` restarts a killed trial from its last
checkpoint. Table fragments are named by trial_key, so a retried trial overwrites its own. A
resumed sweep (same run id) does not train a trial whose `trials` row already says done.

Search trials (`config["search"]`, `config["objective"]`) take their sampled values from the
search algorithm, report the objective every epoch and keep their `evals` fragment current every
epoch, since an early-stopping scheduler may end them at any report.
"""
from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from memray import plots, tables
from memray.config import ExperimentConfig
from memray.data import load_data
from memray.experiment import AnalysisRunner, analysis_items, skipped_analyses
from memray.objectives import objective
from memray.probes.flips import flip_summary
from memray.train import Diverged, Trainer, final_metrics, load_state, save_state

from .trial import _share, _threads, exp_dict


def _snapshot_rel(sweep: str, key: str, epoch: int) -> str:
    return f"snapshots/sweep={sweep}/{key}/epoch={epoch}.pt"


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(b: bytes) -> Any:
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


@ray.remote
class AnalysisWorker:
    """Runs analysis work items. Started when its trial starts (its start-up overlaps training),
    loads the data once, and is kept for the next trial that this trainable process runs (Tune
    reuses trainable actors): `setup` hands it each trial's trained model and snapshots."""

    def __init__(self, data_dir: str | None, threads: int):
        torch.set_num_threads(threads)
        self.data_dir = data_dir
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.data: tuple[str, Any] | None = None
        self.runner: AnalysisRunner | None = None

    def setup(self, exp: dict, model_state: dict, snapshots: dict) -> None:
        cfg = ExperimentConfig.from_dict(exp)
        dkey = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
        if self.data is None or self.data[0] != dkey:
            self.data = (dkey, load_data(cfg.data, self.data_dir))
        self.runner = AnalysisRunner(cfg, model_state, snapshots, self.data[1], device=self.device)

    def run(self, item):
        return self.runner.run(item)


_WORKERS: dict[tuple, list] = {}  # per trainable process: analysis actors kept between trials


def _workers(n: int, cpus: float, gpus: float, data_dir: str | None) -> list:
    key = (n, cpus, gpus, data_dir)
    for k in [k for k in _WORKERS if k != key]:
        for a in _WORKERS.pop(k):
            ray.kill(a)
    if key not in _WORKERS:
        share = _share(cpus, gpus, n + 1)  # the bundle each worker has in resources()
        opts = {"num_cpus": share["CPU"], **({"num_gpus": share["GPU"]} if "GPU" in share else {})}
        _WORKERS[key] = [AnalysisWorker.options(**opts).remote(data_dir, _threads(cpus / n)) for _ in range(n)]
    return _WORKERS[key]


def _run_items(workers: list, exp: dict, model_state: dict, snapshots: dict, items: list) -> list:
    state_ref, snaps_ref = ray.put(model_state), ray.put(snapshots)
    ray.get([a.setup.remote(exp, state_ref, snaps_ref) for a in workers])
    pool = ray.util.ActorPool(workers)
    return list(pool.map_unordered(lambda a, it: a.run.remote(it), items))


def _epoch_metrics(rows: list[dict]) -> dict[str, float]:
    return {f"{r['mode']}/{r['subset']}/accuracy": r["accuracy"] for r in rows}


def _finished_before(results: str, sweep: str, key: str, run_id: str | None) -> dict | None:
    """The trial's `trials` row if this sweep invocation (same run_id: a --resume) already finished it."""
    if run_id is None or not tables.exists(results, tables.fragment_rel("trials", sweep, key)):
        return None
    rows = tables.read_fragment(results, "trials", sweep, key)
    return rows[0] if rows and rows[0]["status"] == "done" and rows[0].get("run_id") == run_id else None


def _report_finished(results: str, sweep: str, key: str, row: dict) -> None:
    """Report a finished trial's final metrics from its tables instead of running it again."""
    evals = tables.read_fragment(results, "evals", sweep, key)
    last = max((r["epoch"] for r in evals), default=0)
    final = final_metrics(evals)
    flips = (tables.read_fragment(results, "flips", sweep, key)
             if tables.exists(results, tables.fragment_rel("flips", sweep, key)) else [])
    tune.report({"trial_key": key, "node_id": row["node_id"], "device": row["device"], "epoch": last,
                 "phase": "done", "wall_s": row["wall_s"], "restored_from": row.get("restored_from") or 0,
                 "attempts": row["attempts"],
                 "already_done": True, **final, **flip_summary(flips)})


def train(config: dict[str, Any]) -> None:
    """The trainable's body (`trainables.trial.train_trial`)."""
    exp_d = exp_dict(config)
    exp = ExperimentConfig.from_dict(exp_d)
    sweep, results = config["sweep"], config["results_dir"]
    key = exp.trial_key
    done = _finished_before(results, sweep, key, config.get("run_id"))
    if done is not None:
        return _report_finished(results, sweep, key, done)
    cpus, workers = float(config["cpus_per_trial"]), int(config["analysis_workers"])
    gpus = float(config.get("gpus_per_trial") or 0.0)
    torch.set_num_threads(_threads(cpus))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    node_id = ray.get_runtime_context().get_node_id()
    objective_name = config.get("objective")
    t0 = time.time()
    # Analysis actors start now, so their start-up (torch import, data) overlaps training.
    pool = (_workers(workers, cpus, gpus, config.get("data_dir"))
            if workers > 0 and set(exp.analyses.run) & {"rewind", "retrain", "flip"} else None)
    data = load_data(exp.data, config.get("data_dir"), device=device)
    tr = Trainer(exp, data, device)

    ck = tune.get_checkpoint()
    restored_from = 0
    if ck is not None:
        with ck.as_directory() as d:
            state = load_state(Path(d) / "state.pt")
        snaps = {e: _from_bytes(tables.read_bytes(results, _snapshot_rel(sweep, key, e)))
                 for e in state["snapshot_epochs"]}
        tr.load_state_dict(state, snaps)
        t0 -= float(state.get("wall_s", 0.0))
        restored_from = tr.epoch
    written = set(tr.snapshots) if ck is not None else set()

    def store_snapshots():
        for e in sorted(set(tr.snapshots) - written):
            tables.write_bytes(results, _snapshot_rel(sweep, key, e), _to_bytes(tr.snapshots[e]))
            written.add(e)

    tag = {"sweep": sweep, "trial_key": key}
    base = {"trial_key": key, "node_id": node_id, "device": str(device), "restored_from": restored_from}
    if tr.epoch == 0:
        store_snapshots()
    while tr.epoch < exp.optim.epochs:
        try:
            out = tr.run_epoch()
        except Diverged as e:
            raise RuntimeError(str(e)) from None
        store_snapshots()
        metrics = _epoch_metrics(out["evals"])
        if objective_name is not None:
            metrics["objective"] = objective(objective_name, metrics)
            # an early-stopped trial ends without warning: its tables are current every epoch
            tables.write_fragment(results, "evals", sweep, key, [{**tag, **r} for r in tr.history])
            if tr.epoch == exp.optim.epochs:
                # The last epoch's metrics go out with the final report, after the analyses: a
                # scheduler acting on them here could stop the trial before its analyses ran.
                break
        state = tr.state_dict()
        state["wall_s"] = time.time() - t0
        with tempfile.TemporaryDirectory() as d:
            save_state(state, Path(d) / "state.pt")
            tune.report({**base, "epoch": tr.epoch, "phase": "train", "wall_s": time.time() - t0, **metrics},
                        checkpoint=tune.Checkpoint.from_directory(d))

    tables.write_fragment(results, "evals", sweep, key, [{**tag, **r} for r in tr.history])
    if "gradients" in exp.analyses.run:
        tables.write_fragment(results, "gradients", sweep, key, [{**tag, **r} for r in tr.grad_rows])

    items = analysis_items(exp, len(tr.model.layer_groups), sorted(tr.snapshots), bool(data.noise_mask.any()))
    produced: dict[str, list[dict]] = {"rewinding": [], "retraining": [], "flips": []}
    if items:
        model_state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
        if pool is not None:
            torch.set_num_threads(1)  # the workers hold the trial's CPUs now
            outputs = _run_items(pool, exp_d, model_state, tr.snapshots, items)
            torch.set_num_threads(_threads(cpus))
        else:
            runner = AnalysisRunner(exp, model_state, tr.snapshots, tr.data, device)
            outputs = [runner.run(it) for it in items]
        for table, rows in outputs:
            produced[table] += rows
    for name, table in (("rewind", "rewinding"), ("retrain", "retraining")):
        if name in exp.analyses.run:
            rows = sorted(produced[table], key=lambda r: (r["layer_index"], r["rewind_epoch"], r["subset"]))
            tables.write_fragment(results, table, sweep, key, [{**tag, **r} for r in rows])
    if "flip" in exp.analyses.run:
        produced["flips"].sort(key=lambda r: (r["method"], not r["is_noisy"], r["example_id"]))
        tables.write_fragment(results, "flips", sweep, key, [{**tag, **r} for r in produced["flips"]])
    title = f"{exp.data.dataset} / {exp.model.arch} / {exp.dropout.kind} (trial {key})"
    for name, png in plots.trial_figures({"gradients": tr.grad_rows, **produced}, title).items():
        tables.write_bytes(results, f"figures/sweep={sweep}/{key}/{name}.png", png)
    final = {**tr.final(), **flip_summary(produced["flips"])}
    if objective_name is not None:
        final["objective"] = objective(objective_name, tr.final())
    tune.report({**base, "epoch": tr.epoch, "phase": "done", "wall_s": time.time() - t0, **final,
                 "skipped": "; ".join(f"{k}: {v}" for k, v in skipped_analyses(exp, data).items())})
