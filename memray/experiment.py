"""The trial: train from a config (resuming from a saved state), run its analyses through any
map-like executor, and write its table rows and figures. Everything a trial is lives here; the
Ray Tune trainable (`trainables.trial`) only adapts it: it restores from Tune's checkpoint,
reports each epoch, and hands the analyses to the trial's actors when it has any.

    trial = Trial(cfg, store)            # store: memray.tables.TrialStore (None: keep rows in memory)
    trial.restore(state_file)            # optional: continue a saved trial
    for metrics in trial.epochs():       # one epoch each; weight snapshots go to the store once each
        trial.save(state_file)           # a resume state after every epoch
    final = trial.finish(executor)       # analyses, tables, figures; the final metrics

Analyses are independent work items (`("rewind", group, epoch)`, `("retrain", group)`,
`("flip", method, start, stop)` over the trial's flip targets). An executor takes an
`AnalysisJob` (the config, the trained weights, the snapshots and the items) and returns every
item's `(table, rows)`: `run_here` builds one `AnalysisRunner` in this process and maps it over
the items (a sweep's trial with one CPU does this); a trial with more spreads the same items over
a pool of actors that each build a runner. Rows are put in one order before they are written,
whatever order the executor returns them in, so every executor writes the same tables.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import streams
from .config import ExperimentConfig
from .data import Data, load_data
from .dropout import ExampleTiedDropout
from .models import build_model
from .objectives import objective_metrics
from .probes import Subject
from .probes.flips import flip_rows, select_targets
from .probes.localize import localization_rows
from .probes.retraining import retrain_item
from .probes.rewinding import Prefix, rewind_item
from .summary import epoch_metrics, final_metrics, flip_summary, layer_summary, localization_summary
from .tables import TrialStore, check_memscores
from .train import (Diverged, Trainer, example_correctness, keep_freed_memory, load_state, pick_device, predict,
                    save_state)

WorkItem = tuple
Rows = list[dict[str, Any]]
# analysis name -> its table (ARCHITECTURE.md), and each table's row order
ANALYSIS_TABLES = {"rewind": "rewinding", "retrain": "retraining", "flip": "flips", "localize": "localization"}
ROW_ORDER: dict[str, Callable[[dict], tuple]] = {
    "rewinding": lambda r: (r["layer_index"], r["rewind_epoch"], r["subset"]),
    "retraining": lambda r: (r["layer_index"], r["rewind_epoch"], r["subset"]),
    "flips": lambda r: (r["method"], not r["is_noisy"], r["example_id"]),
    "localization": lambda r: (r["track"], r["method"], r["target_kind"], r["example_id"], r["k"]),
}


def analysis_items(cfg: ExperimentConfig, n_groups: int, snapshot_epochs: list[int], has_noise: bool) -> list[WorkItem]:
    run = cfg.analyses.run
    items: list[WorkItem] = []
    if "rewind" in run:
        items += [("rewind", g, e) for g in range(n_groups) for e in sorted(snapshot_epochs)]
    if "retrain" in run and has_noise and cfg.analyses.retrain_epoch in snapshot_epochs:
        items += [("retrain", g) for g in range(n_groups)]
    if "flip" in run:
        a = cfg.analyses
        n = a.flip_targets * (1 + has_noise + (a.memscores is not None))  # noisy, clean, rare
        for method in ("greedy", "random"):
            items += [("flip", method, start, min(start + a.flip_targets_per_batch, n))
                      for start in range(0, n, a.flip_targets_per_batch)]
    if "localize" in run:  # one item per (track, method), every target batched (the slow methods first)
        etd = cfg.dropout.kind == "example_tied"
        tracks = cfg.analyses.localize_tracks if etd else ("none",)  # plain models: every unit, no truth
        methods = [m for m in cfg.analyses.localize_methods if etd or m not in NEEDS_ETD]
        items += [("localize", t, m) for m in sorted(methods, key=lambda m: -LOCALIZE_COST.get(m, 1)) for t in tracks]
    return items


# relative cost of the localization methods (measured on the default mlp): the slowest start first
LOCALIZE_COST = {"greedy": 8, "slimming": 6, "zero_out": 5, "integrated_gradients": 4, "activation": 1,
                 "grad_x_act": 1, "class_mean": 1, "random": 0, "mask_only": 0, "oracle": 0}
NEEDS_ETD = ("mask_only", "oracle")  # read ETD's masks: nothing to say about a model without them


def rare_ids(results: str, cfg: ExperimentConfig, data: Data) -> list[int]:
    """The rare examples of the scores the config names (EXPERIMENTS.md section 8): clean, with a
    score at or above `analyses.rare_threshold` (examples without a score are not rare)."""
    name, threshold = cfg.analyses.memscores, cfg.analyses.rare_threshold
    t = check_memscores(results, name, cfg.data, data.n_train, ("example_id", "is_noisy", "score"),
                        digest=data.digest()).to_pydict()
    return sorted(i for i, noisy, s in zip(t["example_id"], t["is_noisy"], t["score"])
                  if not noisy and s is not None and s >= threshold)


def skipped_analyses(cfg: ExperimentConfig, data: Data) -> dict[str, str]:
    """Analyses that cannot run for this trial, with the reason."""
    out = {}
    if not data.noise_mask.any():
        for a in ("gradients", "retrain"):
            if a in cfg.analyses.run:
                out[a] = "noise_rate is 0: there are no noisy examples to account for or forget"
    return out


# ----------------------------------------------------------------------------- analyses
class AnalysisRunner:
    """One subject (trained model, data, ETD) and its weight snapshots: runs work items, returning rows."""

    def __init__(self, cfg: ExperimentConfig, model_state: dict[str, torch.Tensor],
                 snapshots: dict[int, dict[str, torch.Tensor]], data: Data | None = None,
                 device: torch.device | str | None = None, data_dir=None, rare: list[int] | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else pick_device()
        keep_freed_memory()
        data = (data if data is not None else load_data(cfg.data, data_dir)).to(self.device)
        if rare is not None:
            data = data.with_rare(rare)
        model = build_model(cfg.model.arch, cfg.model.resolved_width, data.in_shape,
                            data.num_classes).to(self.device)
        model.load_state_dict(model_state)
        model.eval()
        self.final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.snapshots = snapshots
        etd = (ExampleTiedDropout(cfg.dropout, model.site_units, data.n_train, self.device)
               if cfg.dropout.kind == "example_tied" else None)
        self.subject = Subject(model, data, etd)
        self._flip_targets: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefix: Prefix | None = None
        self._localize: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def run(self, item: WorkItem) -> tuple[str, Rows]:
        kind = item[0]
        if kind not in ("rewind", "retrain"):
            self._prefix = None  # only rewinding and retraining read it
        if kind == "rewind":
            _, g, e = item
            return "rewinding", rewind_item(self.subject, self.final, self.snapshots[e], g, e, self.prefix(g))
        if kind == "retrain":
            _, g = item
            a = self.cfg.analyses
            e = a.retrain_epoch
            return "retraining", retrain_item(self.subject, g, self.snapshots[e], e, prefix=self.prefix(g),
                                              lr=a.retrain_lr, weight_decay=a.retrain_weight_decay,
                                              max_epochs=a.retrain_max_epochs,
                                              patience=a.retrain_patience,
                                              batch_size=self.cfg.optim.batch_size, seed=self.cfg.seed)
        if kind == "flip":
            _, method, start, stop = item
            a = self.cfg.analyses
            targets, ref = self.flip_targets()
            part = targets[start:stop]
            if part.numel() == 0:
                return "flips", []
            return "flips", flip_rows(self.subject, part, ref, method=method, budget=a.flip_budget,
                                      targets_per_batch=a.flip_targets_per_batch,
                                      sites=list(a.flip_sites) if a.flip_sites is not None else None,
                                      eval_samples=a.eval_samples, seed=self.cfg.seed)
        if kind == "localize":
            _, track, method = item
            a = self.cfg.analyses
            targets, ref, test_ids = self.localize_targets()
            if targets.numel() == 0:
                return "localization", []
            return "localization", localization_rows(self.subject, targets, ref, test_ids, [method],
                                                     list(a.localize_k), budget=a.localize_budget, track=track,
                                                     seed=self.cfg.seed, ig_steps=a.ig_steps)
        raise ValueError(f"unknown work item {item!r}")

    def prefix(self, group: int) -> Prefix | None:
        """The trained model's activations before layer group `group`'s first stage (the
        stages a rewound or retrained group leaves as they are), or None. One prefix is kept at
        a time: the items come group by group."""
        start = self.subject.model.stages_before(group)
        if self._prefix is None or self._prefix.start != start:
            self._prefix = None  # freed before the next is built
            self._prefix = Prefix.of(self.subject, start)
        return self._prefix

    def localize_targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, reference ids, test sample) for localization (section 7): seeded samples of the
        noisy and clean examples the model predicts with their given label in mode `own` (as
        trained; with scores named, typical clean ones, then as many rare ones), a clean reference
        batch disjoint from them, and a fixed test sample."""
        if self._localize is None:
            a, data, etd = self.cfg.analyses, self.subject.data, self.subject.etd
            own = (lambda i: etd.example_masks(i)) if etd is not None else None
            ok = (predict(self.subject.model, data.x_train, own).argmax(1) == data.y_train).cpu()
            noisy = data.noise_mask.cpu()
            g = streams.torch_generator("localize.targets", self.cfg.seed)
            rare = (data.rare_mask.cpu() if data.rare_mask is not None
                    else torch.zeros_like(noisy))
            groups = [torch.nonzero(ok & noisy).flatten(), torch.nonzero(ok & ~noisy & ~rare).flatten()]
            pick = [ids[torch.randperm(len(ids), generator=g)][:a.localize_targets] for ids in groups]
            if data.rare_mask is not None:  # drawn after the others: their draws are unchanged
                ids = torch.nonzero(ok & rare).flatten()
                pick.append(ids[torch.randperm(len(ids), generator=g)][:a.localize_targets])
            targets = torch.cat(pick)
            clean = torch.nonzero(~noisy).flatten()
            pool = clean[~torch.isin(clean, targets)]
            ref = pool[torch.randperm(len(pool), generator=g)][:a.localize_reference].sort().values
            test = torch.randperm(data.x_test.shape[0], generator=g)[:a.eval_samples]
            self._localize = (targets, ref, test)
        return self._localize

    def flip_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, reference ids), drawn once per runner from the final model (deterministic)."""
        if self._flip_targets is None:
            a = self.cfg.analyses
            n_noisy = a.flip_targets if self.subject.data.noise_mask.any() else 0
            self._flip_targets = select_targets(self.subject, n_noisy, a.flip_targets, a.flip_reference,
                                                self.cfg.seed)
        return self._flip_targets


@dataclass
class AnalysisJob:
    """What an executor needs to run a trial's analyses anywhere: the config, tensors, work items."""

    cfg: ExperimentConfig  # the trial's typed config, built once (a frozen dataclass: pickles as it is)
    model_state: dict[str, torch.Tensor]
    snapshots: dict[int, dict[str, torch.Tensor]]
    items: list[WorkItem] = field(default_factory=list)
    rare: list[int] | None = None  # rare example ids, when the config names memorization scores


Executor = Callable[[AnalysisJob], Iterable[tuple[str, Rows]]]


def run_here(job: AnalysisJob, data: Data | None = None, device=None) -> list[tuple[str, Rows]]:
    """The in-process executor: one runner, the items in order."""
    runner = AnalysisRunner(job.cfg, job.model_state, job.snapshots, data, device, rare=job.rare)
    return list(map(runner.run, job.items))


# ----------------------------------------------------------------------------- the trial
def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(b: bytes) -> Any:
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


class Trial:
    """One trial of a sweep: `epochs()` trains, `finish()` analyses and writes (see the module doc).

    `objective` (a search's, memray.objectives) is added to every epoch's metrics; a search trial
    also keeps its `evals` fragment current every epoch (an early-stopping scheduler may end it at
    any report), and its last epoch's metrics come only with `finish()`'s, after the analyses."""

    def __init__(self, cfg: ExperimentConfig, store: TrialStore | None = None, data: Data | None = None,
                 device: torch.device | str | None = None, data_dir=None, objective: str | None = None):
        self.t0 = time.time()
        self.timings: dict[str, float] = {}  # seconds per phase: setup, train, analyses, write
        self.cfg, self.store, self.objective = cfg, store, objective
        self.device = torch.device(device) if device is not None else pick_device()
        self.data = data if data is not None else load_data(cfg.data, data_dir, device=self.device)
        self.rare: list[int] | None = None
        if cfg.analyses.memscores is not None:
            if store is None:
                raise ValueError(f"analyses.memscores={cfg.analyses.memscores!r} needs a results store to read "
                                 f"the scores from")
            self.rare = rare_ids(store.results, cfg, self.data)
            self.data = self.data.with_rare(self.rare)
        self.trainer = Trainer(cfg, self.data, self.device)
        self.restored_from = 0
        self._stored: set[int] = set()  # snapshot epochs already in the store
        self.tables: dict[str, Rows] = {}  # after finish(): every table the trial wrote
        self.timings["setup"] = time.time() - self.t0

    def timed(self, phase: str, t_start: float) -> None:
        """Add the seconds since `t_start` (time.perf_counter()) to `phase`."""
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t_start

    @property
    def key(self) -> str:
        return self.cfg.trial_key

    @property
    def epoch(self) -> int:
        return self.trainer.epoch

    @property
    def wall_s(self) -> float:
        return time.time() - self.t0

    # -- resume -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """The resume state (model, optimiser, schedule, RNG, history; snapshots by reference)."""
        state = self.trainer.state_dict()
        state["wall_s"] = self.wall_s
        save_state(state, path)

    def restore(self, path: str | Path) -> None:
        """Continue from a state `save` wrote; its snapshots are read back from the store."""
        state = load_state(path)
        snaps = {e: _from_bytes(self.store.read_snapshot(e)) for e in state["snapshot_epochs"]}
        self.trainer.load_state_dict(state, snaps)
        self._stored = set(snaps)
        self.t0 -= float(state.get("wall_s", 0.0))
        self.restored_from = self.trainer.epoch

    def _store_snapshots(self) -> None:
        if self.store is None:
            return
        for e in sorted(set(self.trainer.snapshots) - self._stored):
            self.store.write_snapshot(e, _to_bytes(self.trainer.snapshots[e]))
            self._stored.add(e)

    # -- training ---------------------------------------------------------------------------
    def epochs(self) -> Iterator[dict[str, float]]:
        """Train to the last epoch, yielding each epoch's accuracy metrics (and objective)."""
        tr, last = self.trainer, self.cfg.optim.epochs
        self._store_snapshots()
        while tr.epoch < last:
            t = time.perf_counter()
            try:
                out = tr.run_epoch()
            except Diverged as e:
                # a builtin error: Tune sends it to the driver, which does not import memray.train
                raise RuntimeError(str(e)) from None
            self._store_snapshots()
            metrics = epoch_metrics(out["evals"])
            if self.objective is not None:
                metrics.update(objective_metrics(self.objective, metrics))
                self._write("evals", tr.history)
            self.timed("train", t)
            if self.objective is not None and tr.epoch == last:
                return
            yield metrics

    # -- analyses and tables ----------------------------------------------------------------
    def analysis_job(self) -> AnalysisJob:
        tr = self.trainer
        items = analysis_items(self.cfg, len(tr.model.layer_groups), sorted(tr.snapshots),
                               bool(self.data.noise_mask.any()))
        state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()} if items else {}
        return AnalysisJob(self.cfg, state, tr.snapshots if items else {}, items, self.rare)

    def analyse(self, executor: Executor | None = None) -> dict[str, Rows]:
        """Every analysis table of this trial's config, rows in their one order."""
        run = self.cfg.analyses.run
        out: dict[str, Rows] = {"evals": list(self.trainer.history)}
        if "gradients" in run:
            out["gradients"] = list(self.trainer.grad_rows)
        produced: dict[str, Rows] = {t: [] for a, t in ANALYSIS_TABLES.items() if a in run}
        job = self.analysis_job()
        if job.items:
            results = (executor(job) if executor is not None
                       else run_here(job, self.trainer.data, self.device))
            for table, rows in results:
                produced[table] += rows
        for table, rows in produced.items():
            out[table] = sorted(rows, key=ROW_ORDER[table])
        tr = self.trainer
        if tr.etd is not None:
            out["etd_examples"] = example_correctness(tr.subject)
        out["example_stats"] = tr.example_stats()
        return out

    def forgotten_examples(self, n: int = 8) -> dict[str, tuple[Any, list[str]]] | None:
        """The clean examples `drop` forgets (right under `own`, wrong under `drop`) beside as many
        randomly chosen clean examples it keeps (EXPERIMENTS.md finding 5b): the groups of
        `plots.examples_figure`, or None without ETD rows."""
        rows = [r for r in self.tables.get("etd_examples", []) if not r["is_noisy"] and r["own_correct"]]
        if not rows:
            return None
        g = streams.torch_generator("forgotten.sample", self.cfg.seed)
        groups = {}
        for label, want in (("forgotten by drop", False), ("kept by drop", True)):
            ids = torch.tensor([r["example_id"] for r in rows if r["drop_correct"] == want], dtype=torch.long)
            ids = ids[torch.randperm(len(ids), generator=g)[:n]].sort().values
            y = self.data.y_train[ids.to(self.data.device)].tolist()
            groups[f"{label}\n({len(ids)} shown)"] = (self.data.x_train[ids.to(self.data.device)].cpu().numpy(),
                                                      [f"#{i} y={c}" for i, c in zip(ids.tolist(), y)])
        return groups

    def _write(self, table: str, rows: Rows) -> None:
        if self.store is not None:
            self.store.write(table, rows)

    def finish(self, executor: Executor | None = None) -> dict[str, Any]:
        """Analyse, write every table and figure, and return the final metrics (with the flip
        summary, the objective, and the analyses skipped and why)."""
        t = time.perf_counter()
        self.tables = self.analyse(executor)
        self.timed("analyses", t)
        t = time.perf_counter()
        for table, rows in self.tables.items():
            self._write(table, rows)
        if self.store is not None:
            c = self.cfg
            title = f"{c.data.dataset} / {c.model.arch} / {c.dropout.kind} (trial {self.key})"
            # matplotlib is imported only where a trial writes its figures (not in analysis workers)
            from . import plots

            figures = plots.trial_figures(self.tables, title)
            forgotten = self.forgotten_examples()
            if forgotten is not None:
                figures["forgotten"] = plots.png(plots.examples_figure(forgotten, f"{title}: clean examples forgotten vs kept"))
            for name, png in figures.items():
                self.store.write_figure(name, png)
        self.timed("write", t)
        final = {**self.trainer.final(), **flip_summary(self.tables.get("flips", [])),
                 **localization_summary(self.tables.get("localization", [])), **layer_summary(self.tables),
                 "data_digest": self.data.digest()}
        if self.objective is not None:
            final.update(objective_metrics(self.objective, self.trainer.final()))
        final["skipped"] = "; ".join(f"{k}: {v}" for k, v in skipped_analyses(self.cfg, self.data).items())
        final.update({f"time/{k}": round(v, 3) for k, v in self.timings.items()})
        return final


def finished_result(store: TrialStore, row: dict[str, Any], objective: str | None = None) -> dict[str, Any]:
    """The final metrics of a trial that its `trials` row says is done, from its tables (a resumed
    sweep reports these instead of running it again), with a search's objective."""
    evals = store.read("evals")
    search = objective_metrics(objective, final_metrics(evals)) if objective is not None else {}
    tabs = {t: store.read(t) for t in ("flips", "localization", "rewinding", "retraining", "gradients")}
    return {"epoch": max((r["epoch"] for r in evals), default=0), "wall_s": row["wall_s"],
            "data_digest": row.get("data_digest"), **final_metrics(evals), **flip_summary(tabs["flips"]),
            **localization_summary(tabs["localization"]), **layer_summary(tabs), **search}


def run_trial(cfg: ExperimentConfig, data: Data | None = None, device=None, data_dir=None,
              store: TrialStore | None = None) -> dict[str, Any]:
    """Train and analyse in this process. Returns {'tables': {table: rows}, 'final': {...}, ...}."""
    trial = Trial(cfg, store, data, device, data_dir)
    for _ in trial.epochs():
        pass
    final = trial.finish()
    return {"tables": trial.tables, "final": final, "wall_s": trial.wall_s, "device": str(trial.device)}
