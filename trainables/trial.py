"""The Ray Tune function trainable: one trial = train with memray, then analyse over an actor pool.

Resources (see `resources()`): a trial's placement group has bundle 0 for this trainable and one
bundle per analysis worker. The workers run only after training ends, so the trial's CPUs are
split between the bundles and each phase uses all of them: on a 2-core laptop with
`--cpus-per-trial 1` two trials run at once, each training on one core and then analysing on it.

Fault tolerance is Tune's: each epoch reports a checkpoint (model, optimiser, schedule, RNG,
history, gradient rows; keep the latest few), weight snapshots are written once each to the
results store and referenced by epoch, and `FailureConfig` restarts a killed trial from its last
checkpoint. Table fragments are named by trial_key, so a retried trial overwrites its own.
"""
from __future__ import annotations

import io
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
from memray.probes.flips import flip_summary
from memray.train import Diverged, Trainer, load_state, save_state


def resources(cpus_per_trial: float, gpus_per_trial: float, analysis_workers: int) -> tune.PlacementGroupFactory:
    parts = analysis_workers + 1 if analysis_workers > 0 else 1
    share = {"CPU": cpus_per_trial / parts}
    if gpus_per_trial > 0:
        share["GPU"] = gpus_per_trial / parts
    return tune.PlacementGroupFactory([dict(share) for _ in range(parts)])


def _threads(cpus: float) -> int:
    return max(1, int(round(cpus)))


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
    """Loads the data, the trained model and its snapshots once; runs many work items."""

    def __init__(self, exp: dict, model_state: dict, snapshots: dict, data_dir: str | None, threads: int):
        torch.set_num_threads(threads)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.runner = AnalysisRunner(ExperimentConfig.from_dict(exp), model_state, snapshots,
                                     device=device, data_dir=data_dir)

    def run(self, item):
        return self.runner.run(item)


def _epoch_metrics(rows: list[dict]) -> dict[str, float]:
    return {f"{r['mode']}/{r['subset']}/accuracy": r["accuracy"] for r in rows}


def train_trial(config: dict[str, Any]) -> None:
    exp = ExperimentConfig.from_dict(config["exp"])
    sweep, results = config["sweep"], config["results_dir"]
    key = exp.trial_key
    cpus, workers = float(config["cpus_per_trial"]), int(config["analysis_workers"])
    torch.set_num_threads(_threads(cpus))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    node_id = ray.get_runtime_context().get_node_id()
    t0 = time.time()
    data = load_data(exp.data, config.get("data_dir"), device=device)
    tr = Trainer(exp, data, device)

    ck = tune.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            state = load_state(Path(d) / "state.pt")
        snaps = {e: _from_bytes(tables.read_bytes(results, _snapshot_rel(sweep, key, e)))
                 for e in state["snapshot_epochs"]}
        tr.load_state_dict(state, snaps)
        t0 -= float(state.get("wall_s", 0.0))
    written = set(tr.snapshots) if ck is not None else set()

    def store_snapshots():
        for e in sorted(set(tr.snapshots) - written):
            tables.write_bytes(results, _snapshot_rel(sweep, key, e), _to_bytes(tr.snapshots[e]))
            written.add(e)

    base = {"trial_key": key, "node_id": node_id, "device": str(device)}
    if tr.epoch == 0:
        store_snapshots()
    while tr.epoch < exp.optim.epochs:
        try:
            out = tr.run_epoch()
        except Diverged as e:
            raise RuntimeError(str(e)) from None
        store_snapshots()
        state = tr.state_dict()
        state["wall_s"] = time.time() - t0
        with tempfile.TemporaryDirectory() as d:
            save_state(state, Path(d) / "state.pt")
            tune.report({**base, "epoch": tr.epoch, "phase": "train", "wall_s": time.time() - t0,
                         **_epoch_metrics(out["evals"])},
                        checkpoint=tune.Checkpoint.from_directory(d))

    tag = {"sweep": sweep, "trial_key": key}
    tables.write_fragment(results, "evals", sweep, key, [{**tag, **r} for r in tr.history])
    if "gradients" in exp.analyses.run:
        tables.write_fragment(results, "gradients", sweep, key, [{**tag, **r} for r in tr.grad_rows])

    items = analysis_items(exp, len(tr.model.layer_groups), sorted(tr.snapshots), bool(data.noise_mask.any()))
    produced: dict[str, list[dict]] = {"rewinding": [], "retraining": [], "flips": []}
    if items:
        model_state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
        if workers > 0:
            state_ref, snaps_ref = ray.put(model_state), ray.put(tr.snapshots)
            threads = _threads(cpus / workers)
            pool = ray.util.ActorPool([
                AnalysisWorker.options(num_cpus=cpus / (workers + 1)).remote(
                    config["exp"], state_ref, snaps_ref, config.get("data_dir"), threads)
                for _ in range(workers)])
            for table, rows in pool.map_unordered(lambda a, it: a.run.remote(it), items):
                produced[table] += rows
        else:
            runner = AnalysisRunner(exp, model_state, tr.snapshots, tr.data, device)
            for it in items:
                table, rows = runner.run(it)
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
    tune.report({**base, "epoch": tr.epoch, "phase": "done", "wall_s": time.time() - t0, **final,
                 "skipped": "; ".join(f"{k}: {v}" for k, v in skipped_analyses(exp, data).items())})
