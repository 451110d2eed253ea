"""A sweep's cells and each trial's data, as the findings read them.

A **cell** is a trial config minus its seed (EXPERIMENTS.md, "Vocabulary"): its trials' table
rows by seed, for an ETD cell its plain twin (same config, no dropout), and for a label-noise cell
its **placebo twin** (same config, `noise_kind: placebo`) when the sweep holds one. Per-trial
helpers derive what several findings share: the train_noisy curve, the memorization window, e*
and the rewinding classes.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .store import Store

Rows = list[dict[str, Any]]
WINDOW = (0.1, 0.9)  # memorization window: train_noisy between these fractions of its final value
TABLES = ("evals", "gradients", "rewinding", "retraining", "flips", "etd_examples", "localization", "example_stats")


@dataclass
class Cell:
    """One cell of a sweep: its trials (one per seed) and their table rows."""

    sweep: str
    name: str
    protocol: int
    dropout: str  # none | standard | example_tied
    noise_kind: str
    seeds: dict[int, dict[str, Rows]] = field(default_factory=dict)  # seed -> {table: rows}
    keys: dict[int, str] = field(default_factory=dict)  # seed -> trial_key
    twin: Cell | None = None  # an ETD cell's plain twin
    placebo: Cell | None = None  # a label cell's placebo twin (same config, noise_kind placebo)
    memscores: str | None = None  # the scoring sweep the cell's config names (EXPERIMENTS.md section 8)
    rare_threshold: float = 0.25  # the score from which its clean examples are rare
    scores: dict[int, dict[str, Any]] | None = None  # its memscores rows by example_id
    window_from: Cell | None = None  # a placebo twin is judged over its label twin's window
    arch: str | None = None  # the cell's model architecture (8c compares it with the scores')

    @property
    def kind(self) -> str:
        return {"none": "plain", "example_tied": "etd"}.get(self.dropout, self.dropout)

    def rows(self, table: str) -> dict[int, Rows]:
        return {s: t.get(table, []) for s, t in self.seeds.items()}

    def all_rows(self, table: str) -> Rows:
        return [r for t in self.seeds.values() for r in t.get(table, [])]

    def window(self, seed: int) -> list[int]:
        """The seed's memorization window: its own, or for a placebo twin its label twin's."""
        src = self.window_from if self.window_from is not None else self
        t = src.seeds.get(seed)
        return memorization_window(t["evals"]) if t else []


# ----------------------------------------------------------------------------- per-trial helpers
def noisy_curve(evals: Rows) -> dict[int, float]:
    """{epoch: train_noisy} in mode `own` for ETD trials, `plain` otherwise."""
    modes = {r["mode"] for r in evals}
    mode = "own" if "own" in modes else "plain"
    return {r["epoch"]: r["accuracy"] for r in evals if r["mode"] == mode and r["subset"] == "train_noisy"}


def final(evals: Rows, mode: str, subset: str) -> float:
    sel = [r for r in evals if r["mode"] == mode and r["subset"] == subset]
    return max(sel, key=lambda r: r["epoch"])["accuracy"] if sel else math.nan


def memorization_window(evals: Rows) -> list[int]:
    """Epochs whose train_noisy (evaluated every epoch) is between 10% and 90% of its final value."""
    curve = noisy_curve(evals)
    if not curve:
        return []
    last = curve[max(curve)]
    if not last > 0:  # nothing memorized: no window
        return []
    return [e for e, a in sorted(curve.items()) if WINDOW[0] * last <= a <= WINDOW[1] * last]


def e_star(evals: Rows, snapshot_epochs: list[int]) -> int | None:
    """The latest snapshot at which the whole model's train_noisy was at most half its final value
    (snapshots without an evaluation are skipped; epoch 0 counts as at most half)."""
    curve = noisy_curve(evals)
    if not curve:
        return None
    last = curve[max(curve)]
    ok = [e for e in snapshot_epochs if e == 0 or (e in curve and curve[e] <= 0.5 * last)]
    return max(ok) if ok else None


def rewinding_classes(rewinding: Rows, evals: Rows, at: int | None = None) -> dict[str, str] | None:
    """{group: redundant | critical | damaged | partial} at e* (or at snapshot `at`), in group
    order (input side first), or None without e*."""
    epochs = sorted({r["rewind_epoch"] for r in rewinding})
    e = e_star(evals, epochs) if at is None else at
    if e is None:
        return None
    mode = "own" if any(r["mode"] == "own" for r in evals) else "plain"
    final_noisy, final_clean = final(evals, mode, "train_noisy"), final(evals, mode, "train_clean")
    acc: dict[tuple[int, str], dict[str, float]] = defaultdict(dict)
    for r in rewinding:
        if r["rewind_epoch"] == e:
            acc[(r["layer_index"], r["layer_name"])][r["subset"]] = r["accuracy"]
    out = {}
    for (_, name), a in sorted(acc.items()):
        noisy, true, clean = a.get("train_noisy", math.nan), a.get("train_noisy_true", math.nan), a["train_clean"]
        if noisy >= 0.8 * final_noisy and noisy > true:
            out[name] = "redundant"
        elif clean < 0.9 * final_clean:
            out[name] = "damaged"
        elif noisy < 0.5 * final_noisy:
            out[name] = "critical"
        else:
            out[name] = "partial"
    return out


# ----------------------------------------------------------------------------- loading
def cell_name(t: dict[str, Any]) -> str:
    d = {"none": "plain", "example_tied": "etd", "standard": "dropout"}.get(t["dropout"], t["dropout"])
    if t["dropout"] != "none":
        d += f" pg{t['p_gen']:g} pm{t['p_mem']:g}"
    noise = f"n{t['noise_rate']:g}" + ("placebo" if t.get("noise_kind") == "placebo" else "")
    return f"{t['dataset']}-{t['arch']}{t['width']}-{d}-{noise}"


def _order(table: str):
    return {"evals": lambda r: (r["epoch"], r["mode"], r["subset"]),
            "gradients": lambda r: (r["epoch"], r["layer_index"]),
            "etd_examples": lambda r: r["example_id"],
            "example_stats": lambda r: r["example_id"],
            "localization": lambda r: (r.get("track") or "", r["method"], r["target_kind"], r["example_id"], r["k"])
            }.get(table, lambda r: 0)


def _without(cfg: dict, *path: str) -> str:
    """The config's canonical text with one field removed (a twin differs only there)."""
    d = json.loads(json.dumps(cfg))
    node = d
    for p in path[:-1]:
        node = node.get(p, {})
    node.pop(path[-1], None)
    if path == ("data", "noise_kind"):  # placebo twins name their own scores (--memscores label=A,placebo=B)
        d.get("analyses", {}).pop("memscores", None)
    return json.dumps(d, sort_keys=True)


def load_cells(store: Store, sweep: str) -> list[Cell]:
    """The sweep's finished trials grouped into cells (config minus seed), ETD cells with their
    plain twins and label cells with their placebo twins."""
    trials = store.rows("select * from trials where sweep = ? and status = 'done' order by trial_key", [sweep])
    tables = {name: defaultdict(list) for name in TABLES}
    for name in TABLES:
        for r in store.rows(f"select * from {name} where sweep = ?", [sweep]):
            tables[name][r["trial_key"]].append(r)
    cells: dict[str, Cell] = {}
    configs: dict[str, dict] = {}
    scores: dict[str, dict[int, dict[str, Any]]] = {}
    for t in trials:
        cfg = json.loads(t["config_json"])
        key_cfg = {k: v for k, v in cfg.items() if k != "seed"}
        key = json.dumps(key_cfg, sort_keys=True)
        configs[key] = key_cfg
        cell = cells.setdefault(key, Cell(sweep, cell_name(t), int(t.get("protocol") or 1), t["dropout"],
                                          t.get("noise_kind") or "label", arch=t.get("arch")))
        cell.seeds[int(t["seed"])] = {name: sorted(tables[name][t["trial_key"]], key=_order(name))
                                      for name in TABLES}
        name = cfg.get("analyses", {}).get("memscores")
        if name is not None and cell.scores is None:
            if name not in scores:
                scores[name] = {r["example_id"]: r for r in store.rows(
                    "select example_id, is_noisy, score, arch from memscores where sweep = ?", [name])}
            cell.memscores, cell.scores = name, scores[name] or None
            cell.rare_threshold = cfg["analyses"].get("rare_threshold", 0.25)
        cell.keys[int(t["seed"])] = t["trial_key"]
    # twins: the cell whose config differs only in the dropout section / in data.noise_kind
    plain = {_without(configs[k], "dropout"): c for k, c in cells.items() if c.dropout == "none"}
    placebo = {_without(configs[k], "data", "noise_kind"): c for k, c in cells.items() if c.noise_kind == "placebo"}
    for key, cell in cells.items():
        if cell.dropout != "none":
            cell.twin = plain.get(_without(configs[key], "dropout"))
        if cell.noise_kind == "label":
            cell.placebo = placebo.get(_without(configs[key], "data", "noise_kind"))
            if cell.placebo is not None:
                cell.placebo.window_from = cell
    return sorted(cells.values(), key=lambda c: c.name)
