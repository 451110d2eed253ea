"""python -m analysis.findings: the paper's findings as verdicts, with controls, pooled over seeds.

    python -m analysis.findings --results-dir results --sweep dropout_grid-default
    python -m analysis.findings --sweep A --sweep B --format json      # or csv; table by default

EXPERIMENTS.md, "Verdicts and statistics", fixes every rule here before any run. One function per
finding id (1a ... 5b) takes a `Cell` (a trial config minus its seed: every seed's table rows, and
for an ETD cell its plain twin) and returns a `Verdict`: agree, differ or inconclusive, with its
value, its control, n (seeds, targets), the interval or p behind it and the criterion in words.

- Across seeds: a t-interval (n - 1 df, 95%) of per-seed values; "agree" needs the whole interval
  on the paper's side of the threshold; fewer than 3 usable seeds: inconclusive.
- Across examples: Mann-Whitney U (one-sided) for independent groups, Wilcoxon signed-rank for the
  same targets under two methods, p < 0.05, at least 8 targets per group (else inconclusive), and
  the finding's minimum effect.
- Placebo-gated findings get a one-sided p (the t-test behind the interval, or the rank test), and
  Holm's correction runs over every placebo-gated test of a sweep (findings x cells): "agree" also
  needs the adjusted p < 0.05.
- "differ": enough data, and the criterion does not hold. Nothing is pooled across protocols; a
  sweep whose tables lack a column a verdict needs gets "inconclusive (column X absent)".

Arithmetic on table rows (numpy, scipy); no torch. Exit codes: 0 written; 1 the store cannot be read;
2 bad input (unknown sweep or format), before anything is printed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import stats

from memray.summary import target_kind, units_to_flip

from .store import Store, open_for_cli, store_parser

Rows = list[dict[str, Any]]
MIN_SEEDS = 3
MIN_TARGETS = 8
ALPHA = 0.05
VERDICTS = ("agree", "differ", "inconclusive")
WINDOW = (0.1, 0.9)  # memorization window: train_noisy between these fractions of its final value


# ----------------------------------------------------------------------------- cells and verdicts
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
    memscores: str | None = None  # the scoring sweep the cell's config names (EXPERIMENTS.md section 8)
    rare_threshold: float = 0.25  # the score from which its clean examples are rare
    scores: dict[int, dict[str, Any]] | None = None  # its memscores rows by example_id

    @property
    def kind(self) -> str:
        return {"none": "plain", "example_tied": "etd"}.get(self.dropout, self.dropout)

    def rows(self, table: str) -> dict[int, Rows]:
        return {s: t.get(table, []) for s, t in self.seeds.items()}


@dataclass
class Verdict:
    id: str
    finding: str
    cell: str
    protocol: int
    noise_kind: str
    seeds: int
    n: int
    verdict: str
    value: str
    control: str
    interval_or_p: str
    criterion: str
    gated: bool
    p: float = math.nan  # the one-sided p a placebo-gated verdict is Holm-corrected on
    reason: str = ""  # why (too few seeds, no scores, ...): its own field; `verdict` is one word
    method: str | None = None  # the localization method a 7a/7b row judges; else None
    track: str | None = None  # the localization track (section 7); None before protocol 3
    placebo_twin: str | None = None  # the placebo twin's verdict, None when the sweep has none

    def row(self) -> dict[str, Any]:
        """The verdict as data (ARCHITECTURE.md, "Verdicts as data")."""
        assert self.verdict in VERDICTS, self.verdict
        return asdict(self)

    @property
    def shown(self) -> str:
        """The verdict as a person reads it: 'inconclusive (why)'."""
        return self.verdict + (f" ({self.reason})" if self.reason and self.verdict == "inconclusive" else "")


def _verdict(fid: str, cell: Cell, **kw) -> Verdict:
    spec = FINDINGS[fid]
    base = {"id": fid, "finding": spec.text, "cell": cell.name, "protocol": cell.protocol,
            "noise_kind": cell.noise_kind, "gated": spec.gated, "criterion": spec.criterion,
            "seeds": len(cell.seeds), "n": len(cell.seeds), "value": "", "control": "", "interval_or_p": ""}
    return Verdict(**{**base, **kw})


def inconclusive(fid: str, cell: Cell, reason: str, **kw) -> Verdict:
    return _verdict(fid, cell, verdict="inconclusive", reason=reason, **kw)


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return "inf" if v == math.inf else f"{v:.{digits}g}"


# ----------------------------------------------------------------------------- statistics
def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided 95% t-interval of the mean (n - 1 df)."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, -math.inf, math.inf
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def t_p_above(values: list[float], threshold: float) -> float:
    """One-sided p of a t-test that the mean exceeds `threshold`."""
    x = np.asarray(values, dtype=float) - threshold
    if len(x) < 2:
        return math.nan
    if x.std(ddof=1) == 0:
        return 0.0 if x.mean() > 0 else 1.0
    return float(stats.ttest_1samp(x, 0.0, alternative="greater").pvalue)


def mann_whitney_less(a: list[float], b: list[float]) -> float:
    """One-sided p that values in `a` tend to be smaller than in `b` (inf allowed)."""
    return float(stats.mannwhitneyu(_finite(a, b)[0], _finite(a, b)[1], alternative="less").pvalue)


def wilcoxon_less(a: list[float], b: list[float]) -> float:
    """One-sided signed-rank p that paired a_i < b_i tend to hold (inf allowed; ties dropped). inf
    becomes a value beyond 2 x max - min, so a pair with one side not flipped always has the
    largest difference."""
    fin = [v for v in (*a, *b) if math.isfinite(v)]
    big = (2 * max(fin) - min(fin) + 1) if fin else 1.0
    x, y = ([v if math.isfinite(v) else big for v in s] for s in (a, b))
    d = np.asarray(x) - np.asarray(y)
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d, alternative="less", zero_method="wilcox").pvalue)


def _finite(a: list[float], b: list[float]) -> tuple[list[float], list[float]]:
    """inf (not flipped within the budget) as one more than the largest finite value: ranks hold."""
    fin = [v for v in (*a, *b) if math.isfinite(v)]
    big = (max(fin) if fin else 0.0) + 1.0
    return [v if math.isfinite(v) else big for v in a], [v if math.isfinite(v) else big for v in b]


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (NaN stays NaN and takes no part)."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _median(v: list[float]) -> float:
    return statistics.median(v) if v else math.nan


def _ratio(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return math.nan
    return a / b if b not in (0, math.inf) else (0.0 if b == math.inf else math.nan)


# ----------------------------------------------------------------------------- per-trial helpers
def _noisy_curve(evals: Rows) -> dict[int, float]:
    """{epoch: train_noisy} in mode `own` for ETD trials, `plain` otherwise."""
    modes = {r["mode"] for r in evals}
    mode = "own" if "own" in modes else "plain"
    return {r["epoch"]: r["accuracy"] for r in evals if r["mode"] == mode and r["subset"] == "train_noisy"}


def _final(evals: Rows, mode: str, subset: str) -> float:
    sel = [r for r in evals if r["mode"] == mode and r["subset"] == subset]
    return max(sel, key=lambda r: r["epoch"])["accuracy"] if sel else math.nan


def memorization_window(evals: Rows) -> list[int]:
    """Epochs whose train_noisy is between 10% and 90% of its final value."""
    curve = _noisy_curve(evals)
    if not curve:
        return []
    final = curve[max(curve)]
    if not final > 0:  # nothing memorized: no window
        return []
    return [e for e, a in sorted(curve.items()) if WINDOW[0] * final <= a <= WINDOW[1] * final]


def e_star(evals: Rows, snapshot_epochs: list[int]) -> int | None:
    """The latest snapshot at which the whole model's train_noisy was at most half its final value
    (snapshots without an evaluation are skipped; epoch 0 counts as at most half)."""
    curve = _noisy_curve(evals)
    if not curve:
        return None
    final = curve[max(curve)]
    ok = [e for e in snapshot_epochs if e == 0 or (e in curve and curve[e] <= 0.5 * final)]
    return max(ok) if ok else None


def rewinding_classes(rewinding: Rows, evals: Rows, at: int | None = None) -> dict[str, str] | None:
    """{group: redundant | critical | damaged | partial} at e* (or at snapshot `at`), or None
    without e*."""
    epochs = sorted({r["rewind_epoch"] for r in rewinding})
    e = e_star(evals, epochs) if at is None else at
    if e is None:
        return None
    mode = "own" if any(r["mode"] == "own" for r in evals) else "plain"
    final_noisy, final_clean = _final(evals, mode, "train_noisy"), _final(evals, mode, "train_clean")
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


def _needs(cell: Cell, table: str, column: str) -> str | None:
    """A reason to be inconclusive when a table or column a verdict needs is absent."""
    rows = [r for rs in cell.rows(table).values() for r in rs]
    if not rows:
        return f"no {table} rows"
    if all(r.get(column) is None for r in rows):
        return f"column {column} absent"
    return None


def _seed_values(fid: str, cell: Cell, per_seed: Callable[[dict[str, Rows]], float | None],
                 threshold: float, above: bool, value_fmt: Callable[[float], str], control: str = "") -> Verdict:
    """A finding judged on one number per seed against a threshold (t-interval over seeds)."""
    vals = [v for t in cell.seeds.values() if (v := per_seed(t)) is not None and math.isfinite(v)]
    if len(vals) < MIN_SEEDS:
        return inconclusive(fid, cell, f"{len(vals)} usable seeds, need {MIN_SEEDS}", n=len(vals), control=control)
    m, lo, hi = t_interval(vals)
    p = t_p_above(vals, threshold) if above else t_p_above([-v for v in vals], -threshold)
    ok = lo > threshold if above else hi < threshold
    return _verdict(fid, cell, verdict="agree" if ok else "differ", n=len(vals), value=value_fmt(m),
                    control=control, interval_or_p=f"[{_fmt(lo)}, {_fmt(hi)}] (p={_fmt(p, 2)})", p=p)


# ----------------------------------------------------------------------------- the findings
def _window_rows(t: dict[str, Rows], keep: Callable[[dict], bool]) -> dict[int, Rows] | None:
    """A trial's gradient rows inside its memorization window, per layer group; None when the
    window has fewer than 2 epochs."""
    w = set(memorization_window(t["evals"]))
    if len(w) < 2:
        return None
    by_group: dict[int, Rows] = defaultdict(list)
    for r in t["gradients"]:
        if r["epoch"] in w and keep(r):
            by_group[r["layer_index"]].append(r)
    return by_group


def finding_1a(cell: Cell) -> Verdict:
    """Per seed: over the window, per group, mean log(noisy/clean) - log 0.5 and mean
    log(noisy/control) - log 2; the seed's value is the smallest over groups and both (> 0 agrees)."""
    reason = _needs(cell, "gradients", "control_norm")
    if reason:
        return inconclusive("1a", cell, reason)

    def per_seed(t):
        by_group = _window_rows(t, lambda r: r["noisy_norm"] > 0 and r["clean_norm"] > 0 and r["control_norm"] > 0)
        if not by_group:
            return None
        worst = math.inf
        for rows in by_group.values():
            a = statistics.fmean(math.log(r["noisy_norm"] / r["clean_norm"]) for r in rows) - math.log(0.5)
            b = statistics.fmean(math.log(r["noisy_norm"] / r["control_norm"]) for r in rows) - math.log(2)
            worst = min(worst, a, b)
        return worst

    ctrl = [r["noisy_norm"] / r["control_norm"] for t in cell.seeds.values() for r in t["gradients"]
            if r["control_norm"]]
    return _seed_values("1a", cell, per_seed, 0.0, True, lambda m: f"worst group log-margin {m:.3g}",
                        control=f"median noisy/control norm {_fmt(_median(ctrl))}")


def finding_1b(cell: Cell) -> Verdict:
    """Per seed: over the window, per group, the mean cosine and the mean cosine minus the mean
    control cosine; the seed's value is the largest over groups and both (< 0 agrees)."""
    reason = _needs(cell, "gradients", "control_cosine")
    if reason:
        return inconclusive("1b", cell, reason)

    def per_seed(t):
        by_group = _window_rows(t, lambda r: True)
        if not by_group:
            return None
        worst = -math.inf
        for rows in by_group.values():
            c = statistics.fmean(r["cosine"] for r in rows)
            k = statistics.fmean(r["control_cosine"] for r in rows)
            worst = max(worst, c, c - k)
        return worst

    ctrl = [r["control_cosine"] for t in cell.seeds.values() for r in t["gradients"] if r["control_cosine"] is not None]
    return _seed_values("1b", cell, per_seed, 0.0, False, lambda m: f"worst group cosine margin {m:.3g}",
                        control=f"median control cosine {_fmt(_median(ctrl))}")


def _classes_per_seed(cell: Cell) -> dict[int, dict[str, str] | None]:
    return {s: (rewinding_classes(t["rewinding"], t["evals"]) if t.get("rewinding") else None)
            for s, t in cell.seeds.items()}


def finding_2a(cell: Cell) -> Verdict:
    reason = _needs(cell, "rewinding", "accuracy")
    if reason:
        return inconclusive("2a", cell, reason)
    classes = _classes_per_seed(cell)
    by_tables = {id(t): classes[s] for s, t in cell.seeds.items()}  # each seed's classes, computed once

    def per_seed(t):
        c = by_tables[id(t)]
        return None if not c else sum(v == "redundant" for v in c.values()) / len(c)

    return _seed_values("2a", cell, per_seed, 0.5, True, lambda m: f"{m:.0%} of groups redundant at e*",
                        control="redundant needs train_noisy above train_noisy_true"
                                + ("" if any(classes.values()) else " (no e*)"))


def finding_2b(cell: Cell) -> Verdict:
    reason = _needs(cell, "rewinding", "accuracy")
    if reason:
        return inconclusive("2b", cell, reason)
    classes = {s: c for s, c in _classes_per_seed(cell).items() if c}
    with_critical = {s: [g for g, k in c.items() if k == "critical"] for s, c in classes.items()}
    with_critical = {s: g for s, g in with_critical.items() if g}
    if len(with_critical) < 2:
        return inconclusive("2b", cell, f"a critical group in {len(with_critical)} seed(s), need 2",
                            n=len(with_critical))
    final_group = {s: list(c)[-1] for s, c in classes.items()}
    not_final = [s for s, g in with_critical.items() if any(x != final_group[s] for x in g)]
    frac = len(not_final) / len(with_critical)
    crit = sorted({g for gs in with_critical.values() for g in gs})
    return _verdict("2b", cell, verdict="agree" if frac > 0.5 else "differ", n=len(with_critical),
                    value=f"critical groups {crit}; a non-final one in {len(not_final)}/{len(with_critical)} seeds",
                    control="none", interval_or_p=f"{frac:.2f} of seeds with a critical group")


def finding_3(cell: Cell) -> Verdict:
    reason = _needs(cell, "retraining", "converged")
    if reason:
        return inconclusive("3", cell, reason)

    def per_seed(t):
        acc: dict[str, dict[str, Any]] = defaultdict(dict)
        for r in t["retraining"]:
            acc[r["layer_name"]][r["subset"]] = r["accuracy"]
            acc[r["layer_name"]]["converged"] = r["converged"]
        conv = [a for a in acc.values() if a.get("converged")]
        if not conv:
            return None
        return sum(a["train_noisy"] - a["train_noisy_true"] > 0 for a in conv) / len(conv)

    n_conv = sum(r["converged"] for t in cell.seeds.values() for r in t["retraining"] if r["subset"] == "test")
    n_all = sum(1 for t in cell.seeds.values() for r in t["retraining"] if r["subset"] == "test")
    return _seed_values("3", cell, per_seed, 0.5, True,
                        lambda m: f"{m:.0%} of converged groups predict given over true labels",
                        control=f"train_noisy_true; {n_conv}/{n_all} (group, seed) converged")


def _flip_rows(cell: Cell, method: str, kind: str) -> Rows:
    return [r for t in cell.seeds.values() for r in t.get("flips", [])
            if r["method"] == method and target_kind(r) == kind]


def _fewer_units(fid: str, cell: Cell, kind: str, versus: str) -> Verdict:
    """Targets of `kind` flip with fewer units than clean ones (named `versus`), beyond what random
    order shows: greedy median ratio <= 0.75 and below random order's, Mann-Whitney p < 0.05."""
    rows = [r for t in cell.seeds.values() for r in t.get("flips", [])]
    g_kind, g_clean = units_to_flip(rows, "greedy", kind), units_to_flip(rows, "greedy", "clean")
    n = len(g_kind) + len(g_clean)
    if min(len(g_kind), len(g_clean)) < MIN_TARGETS:
        return inconclusive(fid, cell, f"{len(g_kind)} {kind} / {len(g_clean)} {versus} targets, need {MIN_TARGETS}",
                            n=n)
    r_kind, r_clean = units_to_flip(rows, "random", kind), units_to_flip(rows, "random", "clean")
    ratio = _ratio(_median(g_kind), _median(g_clean))
    ratio_random = _ratio(_median(r_kind), _median(r_clean))
    if math.isnan(ratio_random):
        return inconclusive(fid, cell, "random order flipped too few targets for its control ratio", n=n)
    p = mann_whitney_less(g_kind, g_clean)
    ok = p < ALPHA and ratio <= 0.75 and ratio < ratio_random
    return _verdict(fid, cell, verdict="agree" if ok else "differ", n=n, p=p,
                    value=f"median units {kind} {_fmt(_median(g_kind))} vs {versus} {_fmt(_median(g_clean))} "
                          f"(ratio {_fmt(ratio)})",
                    control=f"random order: {kind} {_fmt(_median(r_kind))} vs clean {_fmt(_median(r_clean))} "
                            f"(ratio {_fmt(ratio_random)})",
                    interval_or_p=f"Mann-Whitney p={_fmt(p, 2)}")


def finding_4a(cell: Cell) -> Verdict:
    return _fewer_units("4a", cell, "noisy", "clean")


def finding_4b(cell: Cell) -> Verdict:
    rows = [r for t in cell.seeds.values() for r in t.get("flips", [])]
    pairs: dict[tuple, dict[str, float]] = defaultdict(dict)
    for s, t in cell.seeds.items():
        for r in t.get("flips", []):
            pairs[(s, r["example_id"])][r["method"]] = r["n_units"] if r["flipped"] else math.inf
    both = [(v["greedy"], v["random"]) for v in pairs.values() if "greedy" in v and "random" in v]
    if len(both) < MIN_TARGETS or not rows:
        return inconclusive("4b", cell, f"{len(both)} targets with both methods, need {MIN_TARGETS}", n=len(both))
    g, r = [a for a, _ in both], [b for _, b in both]
    ratio = _ratio(_median(g), _median(r))
    p = wilcoxon_less(g, r)
    ok = p < ALPHA and ratio <= 0.5
    return _verdict("4b", cell, verdict="agree" if ok else "differ", n=len(both), p=p,
                    value=f"median units greedy {_fmt(_median(g))} vs random {_fmt(_median(r))} (ratio {_fmt(ratio)})",
                    control="random order, same targets", interval_or_p=f"Wilcoxon p={_fmt(p, 2)}")


def finding_4c(cell: Cell) -> Verdict:
    rows = [r for r in _flip_rows(cell, "greedy", "noisy") if r["flipped"] and r["n_units"] >= 2]
    if len(rows) < MIN_TARGETS:
        return inconclusive("4c", cell, f"{len(rows)} flipped noisy targets with >= 2 units, need {MIN_TARGETS}",
                            n=len(rows))
    sites = defaultdict(int)  # every unit zeroed by any greedy search: each site's share
    for t in cell.seeds.values():
        for r in t.get("flips", []):
            if r["method"] == "greedy":
                for u in r["units"]:
                    sites[u["site"]] += 1
    share = np.array(list(sites.values()), dtype=float) / max(1, sum(sites.values()))
    spread = [len({u["site"] for u in r["units"]}) >= 2 for r in rows]
    expected = statistics.fmean(1 - float((share ** r["n_units"]).sum()) for r in rows)
    k, n = sum(spread), len(spread)
    lo = stats.binomtest(k, n).proportion_ci(0.95, method="wilson").low
    p = stats.binomtest(k, n, p=min(expected, 1 - 1e-12), alternative="greater").pvalue  # beyond chance
    return _verdict("4c", cell, verdict="agree" if lo > 0.5 and p < ALPHA else "differ", n=n,
                    value=f"{k}/{n} noisy targets' units on >= 2 sites",
                    control=f"{expected:.0%} expected if units fell on sites by their share of all zeroed units",
                    interval_or_p=f"Wilson 95% low {lo:.2f}; above chance p={_fmt(p, 2)}")


def finding_4d(cell: Cell) -> Verdict:
    reason = _needs(cell, "flips", "pre_test_acc")
    if reason:
        return inconclusive("4d", cell, reason)

    def costs(kind):
        return [r["pre_test_acc"] - r["post_test_acc"] for r in _flip_rows(cell, "greedy", kind) if r["flipped"]]

    noisy, clean = costs("noisy"), costs("clean")
    if min(len(noisy), len(clean)) < MIN_TARGETS:
        return inconclusive("4d", cell, f"{len(noisy)} noisy / {len(clean)} clean flipped targets, need {MIN_TARGETS}",
                            n=len(noisy) + len(clean))
    p = mann_whitney_less(noisy, clean)
    gap = _median(clean) - _median(noisy)
    ok = p < ALPHA and gap >= 0.01
    return _verdict("4d", cell, verdict="agree" if ok else "differ", n=len(noisy) + len(clean), p=p,
                    value=f"median test cost of a noisy edit {100 * _median(noisy):.2g} points",
                    control=f"clean edits {100 * _median(clean):.2g} points", interval_or_p=f"Mann-Whitney p={_fmt(p, 2)}")


def finding_5a(cell: Cell) -> Verdict:
    if cell.twin is None:
        return inconclusive("5a", cell, "no plain twin in the sweep")
    twin_test = {s: _final(t["evals"], "plain", "test") for s, t in cell.twin.seeds.items()}
    seeds = sorted(s for s in cell.seeds if s in twin_test)
    if len(seeds) < MIN_SEEDS:
        return inconclusive("5a", cell, f"{len(seeds)} seeds paired with the twin, need {MIN_SEEDS}", n=len(seeds))
    ev = {s: cell.seeds[s]["evals"] for s in seeds}
    own = [_final(ev[s], "own", "train_noisy") for s in seeds]
    drop = [_final(ev[s], "drop", "train_noisy") for s in seeds]
    clean = [_final(ev[s], "drop", "train_clean") - 0.9 * _final(ev[s], "own", "train_clean") for s in seeds]
    gap = [_final(ev[s], "drop", "test") - twin_test[s] for s in seeds]
    if any(math.isnan(v) for v in (*own, *drop, *clean, *gap)):
        return inconclusive("5a", cell, "a final own/drop evaluation or the twin's test is missing", n=len(seeds))
    parts = [(own, 0.9, True), (drop, 0.10, False), (clean, 0.0, True), (gap, -0.01, True)]
    oks, ps = [], []
    for vals, thr, above in parts:
        m, lo, hi = t_interval(vals)
        oks.append(lo >= thr if above else hi <= thr)
        ps.append(t_p_above(vals, thr) if above else t_p_above([-v for v in vals], -thr))
    p = max(ps)  # all four must hold: the intersection-union test's p
    _, glo, ghi = t_interval(gap)
    return _verdict("5a", cell, verdict="agree" if all(oks) else "differ", n=len(seeds), p=p,
                    value=f"own train_noisy {statistics.fmean(own):.2f} -> drop {statistics.fmean(drop):.3f}; "
                          f"drop test - twin {statistics.fmean(gap):+.3f}",
                    control=f"twin test {statistics.fmean(twin_test[s] for s in seeds):.3f}",
                    interval_or_p=f"test gap [{glo:+.3f}, {ghi:+.3f}] (p={_fmt(p, 2)})")


def _scored(cell: Cell, ids: list[int]) -> list[float]:
    return [s for s in ((cell.scores.get(i) or {}).get("score") for i in ids) if s is not None]


def _auc(a: list[float], b: list[float]) -> float:
    """P(a score from `a` exceeds one from `b`), ties counted half: the AUC of the score as a
    predictor of being in `a` (Mann-Whitney's U / (n_a n_b))."""
    return float(stats.mannwhitneyu(a, b).statistic) / (len(a) * len(b))


def forgotten_and_kept(cell: Cell) -> tuple[list[int], list[int]]:
    """An ETD cell's clean examples right under `own` in at least one seed, each once: (those
    `drop` forgets in more than half of the seeds where `own` had them right, the rest)."""
    right, lost = defaultdict(int), defaultdict(int)  # example -> seeds own right, of those drop wrong
    for t in cell.seeds.values():
        for r in t.get("etd_examples", []):
            if not r["is_noisy"] and r["own_correct"]:
                right[r["example_id"]] += 1
                lost[r["example_id"]] += not r["drop_correct"]
    return (sorted(i for i in right if 2 * lost[i] > right[i]), sorted(i for i in right if 2 * lost[i] <= right[i]))


def finding_5b(cell: Cell) -> Verdict:
    """Clean examples right under `own` in at least one seed, each counted once (its score is one
    value, so pooling (seed, example) pairs would count it once per seed): forgotten if `drop`
    forgets it in more than half of the seeds where `own` had it right, else kept. Their
    memorization scores: one-sided Mann-Whitney, and the AUC of the score as a predictor of
    being forgotten."""
    if cell.scores is None:
        return inconclusive("5b", cell, "no memorization scores (run the grid with --memscores SWEEP)")
    forgotten, kept = forgotten_and_kept(cell)
    a, b = _scored(cell, forgotten), _scored(cell, kept)
    if min(len(a), len(b)) < MIN_TARGETS:
        return inconclusive("5b", cell, f"{len(a)} forgotten / {len(b)} kept scored clean examples, need "
                                        f"{MIN_TARGETS}", n=len(a) + len(b))
    p = float(stats.mannwhitneyu(a, b, alternative="greater").pvalue)
    auc = _auc(a, b)
    return _verdict("5b", cell, verdict="agree" if p < ALPHA and auc > 0.5 else "differ", n=len(a) + len(b), p=p,
                    value=f"median score forgotten {_fmt(_median(a))} (n={len(a)}) vs kept {_fmt(_median(b))} "
                          f"(n={len(b)}); AUC {auc:.3f}",
                    control="clean examples drop keeps", interval_or_p=f"Mann-Whitney p={_fmt(p, 2)}")


def finding_8a(cell: Cell) -> Verdict:
    """The scores' own check: noisy examples score higher than clean ones (one-sided
    Mann-Whitney). Under placebo the "noisy" examples keep their labels: it must not agree."""
    if cell.scores is None:
        return inconclusive("8a", cell, "no memorization scores (run the grid with --memscores SWEEP)")
    noisy = [r["score"] for r in cell.scores.values() if r["is_noisy"] and r["score"] is not None]
    clean = [r["score"] for r in cell.scores.values() if not r["is_noisy"] and r["score"] is not None]
    if min(len(noisy), len(clean)) < MIN_TARGETS:
        return inconclusive("8a", cell, f"{len(noisy)} noisy / {len(clean)} clean scored examples, need "
                                        f"{MIN_TARGETS}", n=len(noisy) + len(clean))
    p = float(stats.mannwhitneyu(noisy, clean, alternative="greater").pvalue)
    ok = p < ALPHA and _median(noisy) > _median(clean)
    return _verdict("8a", cell, verdict="agree" if ok else "differ", n=len(noisy) + len(clean), p=p,
                    value=f"median score noisy {_fmt(_median(noisy))} (n={len(noisy)}); AUC {_auc(noisy, clean):.3f}",
                    control=f"clean {_fmt(_median(clean))} (n={len(clean)}); scores of sweep {cell.memscores}",
                    interval_or_p=f"Mann-Whitney p={_fmt(p, 2)}")


def finding_8b(cell: Cell) -> Verdict:
    """4a's rule with rare targets in the place of noisy ones: rare examples (clean, score >= the
    rare threshold) flip with fewer units than typical clean ones, beyond random order's ratio."""
    if cell.scores is None:
        return inconclusive("8b", cell, "no memorization scores (run the grid with --memscores SWEEP)")
    return _fewer_units("8b", cell, "rare", "typical clean")


def _precision_at_truth(cell: Cell) -> dict[str, dict[str, dict[tuple, float]]]:
    """{method: {kind: {(seed, example_id): precision@|truth|}}} of an ETD cell's localization rows."""
    out: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for s, t in cell.seeds.items():
        for r in t.get("localization", []):
            if r["n_truth"] and r["k"] == r["n_truth"] and r["precision"] is not None:
                out[r["method"]][r["target_kind"]][(s, r["example_id"])] = r["precision"]
    return out


def finding_7a(cell: Cell) -> list[Verdict]:
    """Per method: precision@|truth| on noisy targets above mask_only's on the same targets
    (Wilcoxon) and above its own on clean targets (Mann-Whitney); Holm over the methods."""
    prec = _precision_at_truth(cell)
    if not prec:
        return [inconclusive("7a", cell, "no localization rows with ETD's truth")]
    base = prec.get("mask_only", {}).get("noisy", {})
    out, ps = [], []
    for method in sorted(m for m in prec if m != "mask_only"):
        noisy, clean = prec[method].get("noisy", {}), prec[method].get("clean", {})
        paired = [(v, base[k]) for k, v in noisy.items() if k in base]
        text = f"{method} localizes memorization (precision@|truth| vs ETD's truth)"
        if min(len(paired), len(clean)) < MIN_TARGETS:
            out.append(inconclusive("7a", cell, f"{len(paired)} noisy / {len(clean)} clean targets, need {MIN_TARGETS}",
                                    finding=text, method=method, n=len(paired) + len(clean)))
            ps.append(math.nan)
            continue
        p1 = wilcoxon_less([b for _, b in paired], [a for a, _ in paired])  # mask_only < method
        p2 = mann_whitney_less(list(clean.values()), [a for a, _ in paired])  # clean < noisy
        p = max(p1, p2)
        ps.append(p)
        out.append(_verdict("7a", cell, finding=text, method=method, verdict="agree" if p < ALPHA else "differ", p=p,
                            n=len(paired) + len(clean),
                            value=f"median noisy {_median([a for a, _ in paired]):.3f}, clean "
                                  f"{_median(list(clean.values())):.3f}",
                            control=f"mask_only on the same noisy targets {_median([b for _, b in paired]):.3f}",
                            interval_or_p=f"Wilcoxon p={_fmt(p1, 2)}, Mann-Whitney p={_fmt(p2, 2)}"))
    for v, adj in zip(out, holm(ps)):  # Holm over the methods of this cell
        if not math.isnan(adj):
            v.interval_or_p += f"; Holm over methods p={_fmt(adj, 2)}"
            if v.verdict == "agree" and not adj < ALPHA:
                v.verdict = "differ"
    return out


def finding_7b(cell: Cell) -> Verdict:
    """The cheapest method (seconds per target) within 0.05 of the best median noisy
    precision@|truth|; agrees when that method also localizes memorization (7a)."""
    prec = _precision_at_truth(cell)
    secs: dict[str, list[float]] = defaultdict(list)
    for t in cell.seeds.values():
        for r in t.get("localization", []):
            secs[r["method"]].append(r["seconds"])
    med = {m: _median(list(v.get("noisy", {}).values())) for m, v in prec.items() if v.get("noisy")}
    med = {m: v for m, v in med.items() if m not in ("mask_only", "random")}
    if not med:
        return inconclusive("7b", cell, "no localization rows with ETD's truth")
    best = max(med, key=med.get)
    near = [m for m in med if med[m] >= med[best] - 0.05]
    cheapest = min(near, key=lambda m: _median(secs[m]))
    passed = {v.method for v in finding_7a(cell) if v.verdict == "agree"}
    return _verdict("7b", cell, method=cheapest, verdict="agree" if cheapest in passed else "differ",
                    n=sum(len(v.get("noisy", {})) for v in prec.values()),
                    value=f"best {best} ({med[best]:.3f}); cheapest within 0.05: {cheapest} ({med[cheapest]:.3f}, "
                          f"{1000 * _median(secs[cheapest]):.0f} ms/target)",
                    control=f"{best}: {1000 * _median(secs[best]):.0f} ms/target", interval_or_p="")


@dataclass(frozen=True)
class Finding:
    text: str
    cells: tuple[str, ...]  # cell kinds judged: plain, etd, standard
    gated: bool
    criterion: str
    judge: Callable[[Cell], Verdict]


FINDINGS: dict[str, Finding] = {
    "1a": Finding("noisy examples' aggregate gradient norm is comparable to the clean 90%'s, far above a control's",
                  ("plain", "etd"), True,
                  "every group, over the window: noisy/clean >= 0.5 and noisy/control >= 2 (log scale, t-interval "
                  "over seeds above 0)", finding_1a),
    "1b": Finding("clean and noisy gradients point in opposing directions while memorization happens",
                  ("plain", "etd"), True,
                  "every group, over the window: cosine < 0 and below the control cosine (t-interval over seeds "
                  "below 0)", finding_1b),
    "2a": Finding("rewinding one group leaves memorization largely intact: most groups are redundant",
                  ("plain",), True,
                  "more than half the groups redundant at e* (train_noisy >= 80% of final and above "
                  "train_noisy_true), t-interval over seeds above 0.5", finding_2a),
    "2b": Finding("critical groups are in general not the final group", ("plain",), False,
                  "in more than half the seeds with a critical group, one is not the final group; a critical "
                  "group in >= 2 seeds", finding_2b),
    "3": Finding("memorization survives retraining a group on clean data", ("plain",), True,
                 "in most converged groups train_noisy > train_noisy_true after retraining (t-interval over seeds "
                 "above 0.5)", finding_3),
    "4a": Finding("noisy targets flip with fewer units than clean ones, beyond what random order shows",
                  ("plain",), True,
                  "greedy median ratio noisy/clean <= 0.75 and below random order's; Mann-Whitney p < 0.05, "
                  ">= 8 targets each", finding_4a),
    "4b": Finding("greedy needs at most half the units random order needs", ("plain", "etd", "standard"), False,
                  "median greedy/random <= 0.5 on the same targets; Wilcoxon p < 0.05", finding_4b),
    "4c": Finding("noisy targets' units spread over sites", ("plain",), False,
                  "Wilson 95% lower bound of the share of noisy targets with units on >= 2 sites above 0.5, and "
                  "that share above chance (binomial p < 0.05 against the share expected if units fell on sites "
                  "by each site's share of all zeroed units; site sizes are not in the tables)",
                  finding_4c),
    "4d": Finding("noisy edits cost less accuracy elsewhere than clean edits", ("plain",), True,
                  "median test-accuracy cost (same fixed samples before/after) lower by >= 1 point; Mann-Whitney "
                  "p < 0.05", finding_4d),
    "5a": Finding("ETD: own train_noisy -> drop forgets it, clean accuracy holds, test at least the twin's",
                  ("etd",), True,
                  "own train_noisy >= 0.9; drop train_noisy <= 0.10; drop train_clean >= 0.9 x own's; drop test "
                  "- twin test >= -0.01 (t-intervals, paired by seed)", finding_5a),
    "5b": Finding("the clean examples drop forgets are atypical (higher memorization scores)", ("etd",), False,
                  "scores of clean examples right under own: forgotten by drop (in most seeds) above kept (one-sided "
                  "Mann-Whitney p < 0.05 over examples, >= 8 each) and AUC > 0.5", finding_5b),
    "7a": Finding("a localization method finds the units that hold a memorized label", ("etd",), False,
                  "precision@|truth| on noisy targets above mask_only's on the same targets (Wilcoxon) and above "
                  "its own on clean targets (Mann-Whitney); p (the larger) < 0.05 after Holm over methods",
                  finding_7a),
    "7b": Finding("the cheapest method within 5 points of the best also localizes memorization", ("etd",), False,
                  "among methods within 0.05 of the best median noisy precision@|truth| (not mask_only or random), "
                  "the one with the fewest seconds per target passes 7a", finding_7b),
    "8a": Finding("noisy examples have higher memorization scores than clean ones", ("plain",), True,
                  "scores of the named scoring sweep: noisy above clean (one-sided Mann-Whitney p < 0.05, median "
                  "noisy > median clean); judged once per scoring sweep, in the first plain cell naming it",
                  finding_8a),
    # not placebo-gated: rare examples are defined by their scores, not by the label noise a
    # placebo removes (under placebo they are still the clean examples only memorizing fits)
    "8b": Finding("rare examples flip with fewer units than typical clean ones", ("plain",), False,
                  "4a's rule for rare vs typical clean targets: greedy median ratio <= 0.75 and below random "
                  "order's; Mann-Whitney p < 0.05, >= 8 targets each", finding_8b),
}


def judge_sweep(cells: list[Cell]) -> list[Verdict]:
    """Every finding for every cell it judges, Holm-corrected over the placebo-gated tests."""
    out = []
    scored: set[str] = set()  # 8a is a property of the scores: one test per scoring sweep
    for c in cells:
        for fid, spec in FINDINGS.items():
            if c.kind in spec.cells:
                if fid == "8a" and c.memscores is not None:
                    if c.memscores in scored:
                        continue
                    scored.add(c.memscores)
                v = spec.judge(c)
                out += v if isinstance(v, list) else [v]
    gated = [v for v in out if v.gated and v.verdict != "inconclusive"]
    for v, adj in zip(gated, holm([v.p for v in gated])):
        if v.verdict == "agree" and not adj < ALPHA:
            v.verdict = "differ"
            v.interval_or_p += f"; Holm-adjusted p={_fmt(adj, 2)} >= {ALPHA}"
        elif not math.isnan(adj):
            v.interval_or_p += f"; Holm p={_fmt(adj, 2)}"
    return out


# ----------------------------------------------------------------------------- loading
TABLES = ("evals", "gradients", "rewinding", "retraining", "flips", "etd_examples", "localization")


def cell_name(t: dict[str, Any]) -> str:
    d = {"none": "plain", "example_tied": "etd", "standard": "dropout"}.get(t["dropout"], t["dropout"])
    if t["dropout"] != "none":
        d += f" pg{t['p_gen']:g} pm{t['p_mem']:g}"
    noise = f"n{t['noise_rate']:g}" + ("placebo" if t.get("noise_kind") == "placebo" else "")
    return f"{t['dataset']}-{t['arch']}{t['width']}-{d}-{noise}"


def load_cells(store: Store, sweep: str) -> list[Cell]:
    """The sweep's finished trials grouped into cells (config minus seed), ETD cells with their twins."""
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
                                          t.get("noise_kind") or "label"))
        cell.seeds[int(t["seed"])] = {name: sorted(tables[name][t["trial_key"]], key=_order(name))
                                      for name in TABLES}
        name = cfg.get("analyses", {}).get("memscores")
        if name is not None and cell.scores is None:
            if name not in scores:
                scores[name] = {r["example_id"]: r for r in store.rows(
                    "select example_id, is_noisy, score from memscores where sweep = ?", [name])}
            cell.memscores, cell.scores = name, scores[name] or None
            cell.rare_threshold = cfg["analyses"].get("rare_threshold", 0.25)
        cell.keys[int(t["seed"])] = t["trial_key"]
    # an ETD cell's twin: the plain cell with the same config but for the dropout section
    plain = {json.dumps({k: v for k, v in configs[key].items() if k != "dropout"}, sort_keys=True): c
             for key, c in cells.items() if c.dropout == "none"}
    for key, cell in cells.items():
        if cell.dropout != "none":
            cell.twin = plain.get(json.dumps({k: v for k, v in configs[key].items() if k != "dropout"}, sort_keys=True))
    return sorted(cells.values(), key=lambda c: c.name)


def _order(table: str):
    return {"evals": lambda r: (r["epoch"], r["mode"], r["subset"]),
            "gradients": lambda r: (r["epoch"], r["layer_index"]),
            "etd_examples": lambda r: r["example_id"],
            "localization": lambda r: (r["method"], r["target_kind"], r["example_id"], r["k"])}.get(table, lambda r: 0)


def sweep_verdicts(store: Store, sweeps: list[str]) -> list[Verdict]:
    """Verdicts of each sweep on its own (Holm within a sweep; protocols never pooled: a sweep's
    cells hold one protocol each, and cells of different protocols are different cells)."""
    out = []
    for sweep in sweeps:
        for v in judge_sweep(load_cells(store, sweep)):
            out.append(v)
    return out


# ----------------------------------------------------------------------------- the CLI
COLUMNS = ("id", "finding", "cell", "method", "track", "protocol", "seeds", "n", "verdict", "reason", "value",
           "control", "interval_or_p", "criterion", "placebo_twin")


def summary_lines(verdicts: list[Verdict]) -> list[str]:
    """One line per finding: e.g. '4a: agree in 2/2 plain cells'."""
    by_id: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_id[v.id].append(v)
    lines = []
    for fid in FINDINGS:
        vs = by_id.get(fid, [])
        if not vs:
            continue
        counts = defaultdict(int)
        for v in vs:
            counts[v.verdict] += 1
        kinds = "/".join(sorted({FINDINGS[fid].cells and _kind_word(v) for v in vs}))
        parts = [f"{counts[k]} {k}" for k in ("agree", "differ", "inconclusive") if counts[k]]
        placebo = [v for v in vs if v.noise_kind == "placebo"]
        lines.append(f"{fid}: agree in {counts['agree']}/{len(vs)} {kinds} cells ({', '.join(parts)})"
                     + (f"; placebo cells: {sum(v.verdict == 'agree' for v in placebo)}/{len(placebo)} agree"
                        if placebo else ""))
    return lines


def _kind_word(v: Verdict) -> str:
    return "etd" if "-etd " in v.cell else ("plain" if "-plain-" in v.cell else "dropout")


def html_table(verdicts: list[Verdict]) -> str:
    """The verdicts as an HTML table, each verdict cell classed agree/differ/inconclusive."""
    import html

    cols = [c for c in COLUMNS if c not in ("reason", "track", "placebo_twin")]  # the reason shows in the verdict
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    body = []
    for v in verdicts:
        r = {**v.row(), "verdict": v.shown, "method": v.method or ""}
        body.append("<tr>" + "".join(f"<td class='{v.verdict if c == 'verdict' else ''}'>{html.escape(str(r[c]))}</td>"
                                     for c in cols) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def html_page(verdicts: list[Verdict], title: str) -> str:
    """A page a person can open: the summary lines, then the verdict table."""
    import html

    lines = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(verdicts))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:85%} "
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top} .agree{background:#e6f4e6} "
            ".differ{background:#fbe3e3} .inconclusive{background:#f4f0dc}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><ul>{lines}</ul>{html_table(verdicts)}</body></html>")


def verdict_files(store: Store, sweep: str) -> dict[str, str]:
    """A sweep's verdict table as files for its MLflow parent run: a page a person can open, and CSV."""
    verdicts = sweep_verdicts(store, [sweep])
    return {"verdicts.html": html_page(verdicts, f"Sweep {sweep}: findings"), "verdicts.csv": render(verdicts, "csv")}


def render(verdicts: list[Verdict], fmt: str) -> str:
    rows = [{k: v.row()[k] for k in COLUMNS} for v in verdicts]
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    width = {"id": 3, "cell": 34, "method": 20, "seeds": 5, "n": 4, "verdict": 12}
    lines = summary_lines(verdicts) + [""]
    lines.append("  ".join(f"{c:{width.get(c, 0)}}" for c in ("id", "cell", "method", "seeds", "n", "verdict"))
                 + "  value | control | interval or p")
    for v, r in zip(verdicts, rows):
        lines.append(f"{r['id']:3}  {r['cell']:34}  {r['method'] or '':20}  {r['seeds']:5}  {r['n']:4}  "
                     f"{v.shown:12}  {r['value']} | {r['control']} | {r['interval_or_p']}")
    return "\n".join(lines)


def parser():
    p = store_parser("python -m analysis.findings", __doc__)
    p.add_argument("--format", default="table", help="table, json or csv [table]")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.format not in ("table", "json", "csv"):
        print(f"error: --format={args.format!r} is invalid: one of ['csv', 'json', 'table']", file=sys.stderr)
        return 2
    store = open_for_cli(args.results_dir, args.skip_corrupt)
    if store is None:
        return 1
    known = [r["sweep"] for r in store.rows("select distinct sweep from trials order by sweep")]
    unknown = [s for s in (args.sweep or []) if s not in known]
    if unknown:
        print(f"error: --sweep={unknown[0]!r} is invalid: sweeps with trials under {args.results_dir}: {known}",
              file=sys.stderr)
        return 2
    print(render(sweep_verdicts(store, args.sweep or known), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
