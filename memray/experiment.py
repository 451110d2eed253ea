"""A whole trial without Ray: train, then run the configured analyses as independent work items.

`AnalysisRunner` holds one trained model, its data and weight snapshots, and runs work items
(`("rewind", group, epoch)`, `("retrain", group)`, `("flip", method, start, stop)` over the
trial's flip targets) returning rows for their table. The Ray layer
spreads the same items over a pool of actors that each build one runner; `run_trial` runs them in
order in this process (the sequential baseline, and what tests use).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .config import ExperimentConfig
from .data import Data, load_data
from .dropout import ExampleTiedDropout
from .models import build_model
from .probes.flips import flip_rows, select_targets
from .probes.retraining import retrain_item
from .probes.rewinding import rewind_item
from .train import Trainer, pick_device

WorkItem = tuple


def analysis_items(cfg: ExperimentConfig, n_groups: int, snapshot_epochs: list[int], has_noise: bool) -> list[WorkItem]:
    run = cfg.analyses.run
    items: list[WorkItem] = []
    if "rewind" in run:
        items += [("rewind", g, e) for g in range(n_groups) for e in sorted(snapshot_epochs)]
    if "retrain" in run and has_noise and cfg.analyses.retrain_epoch in snapshot_epochs:
        items += [("retrain", g) for g in range(n_groups)]
    if "flip" in run:
        a = cfg.analyses
        n = 2 * a.flip_targets if has_noise else a.flip_targets
        for method in ("greedy", "random"):
            items += [("flip", method, start, min(start + a.flip_targets_per_batch, n))
                      for start in range(0, n, a.flip_targets_per_batch)]
    return items


def skipped_analyses(cfg: ExperimentConfig, data: Data) -> dict[str, str]:
    """Analyses that cannot run for this trial, with the reason."""
    out = {}
    if not data.noise_mask.any():
        for a in ("gradients", "retrain"):
            if a in cfg.analyses.run:
                out[a] = "noise_rate is 0: there are no noisy examples to account for or forget"
    return out


class AnalysisRunner:
    def __init__(self, cfg: ExperimentConfig, model_state: dict[str, torch.Tensor],
                 snapshots: dict[int, dict[str, torch.Tensor]], data: Data | None = None,
                 device: torch.device | str | None = None, data_dir=None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else pick_device()
        self.data = (data if data is not None else load_data(cfg.data, data_dir)).to(self.device)
        self.model = build_model(cfg.model.arch, cfg.model.resolved_width, self.data.in_shape,
                                 self.data.num_classes).to(self.device)
        self.model.load_state_dict(model_state)
        self.model.eval()
        self.final = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.snapshots = snapshots
        self.etd = (ExampleTiedDropout(cfg.dropout, self.model.site_units, self.data.n_train, self.device)
                    if cfg.dropout.kind == "example_tied" else None)
        self._flip_targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def run(self, item: WorkItem) -> tuple[str, list[dict[str, Any]]]:
        kind = item[0]
        if kind == "rewind":
            _, g, e = item
            return "rewinding", rewind_item(self.model, self.final, self.snapshots[e], g, e, self.data, self.etd)
        if kind == "retrain":
            _, g = item
            a = self.cfg.analyses
            e = a.retrain_epoch
            return "retraining", retrain_item(self.model, g, self.snapshots[e], e, self.data, self.etd,
                                              lr=a.retrain_lr, max_epochs=a.retrain_max_epochs,
                                              patience=a.retrain_patience,
                                              batch_size=self.cfg.optim.batch_size, seed=self.cfg.seed)
        if kind == "flip":
            _, method, start, stop = item
            a = self.cfg.analyses
            targets, ref = self.flip_targets()
            part = targets[start:stop]
            if part.numel() == 0:
                return "flips", []
            return "flips", flip_rows(self.model, self.data, part, ref, method=method, budget=a.flip_budget,
                                      targets_per_batch=a.flip_targets_per_batch,
                                      sites=list(a.flip_sites) if a.flip_sites is not None else None,
                                      etd=self.etd, eval_samples=a.eval_samples, seed=self.cfg.seed)
        raise ValueError(f"unknown work item {item!r}")

    def flip_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, reference ids), drawn once per runner from the final model (deterministic)."""
        if self._flip_targets is None:
            a = self.cfg.analyses
            n_noisy = a.flip_targets if self.data.noise_mask.any() else 0
            self._flip_targets = select_targets(self.model, self.data, n_noisy, a.flip_targets,
                                                a.flip_reference, self.cfg.seed, self.etd)
        return self._flip_targets


def run_trial(cfg: ExperimentConfig, data: Data | None = None, device=None, data_dir=None,
              on_epoch: Callable | None = None) -> dict[str, Any]:
    """Train and analyse in this process. Returns {'tables': {table: rows}, 'final': {...}, ...}."""
    t0 = time.time()
    data = data if data is not None else load_data(cfg.data, data_dir)
    tr = Trainer(cfg, data, device)
    tr.fit(on_epoch)
    tables: dict[str, list[dict[str, Any]]] = {"evals": list(tr.history), "gradients": list(tr.grad_rows),
                                               "rewinding": [], "retraining": [], "flips": []}
    model_state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
    runner = AnalysisRunner(cfg, model_state, tr.snapshots, tr.data, tr.device)
    for item in analysis_items(cfg, len(tr.model.layer_groups), sorted(tr.snapshots), bool(data.noise_mask.any())):
        table, rows = runner.run(item)
        tables[table] += rows
    return {"tables": tables, "final": tr.final(), "wall_s": time.time() - t0, "device": str(tr.device),
            "skipped": skipped_analyses(cfg, data)}
