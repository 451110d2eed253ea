"""Judging a sweep: every finding for every cell it judges, Holm's correction, placebo twins.

EXPERIMENTS.md, "Verdicts and statistics":
- **Holm** runs over every placebo-gated test of the sweep's label-noise cells (findings x cells,
  and methods for 7a/7c), on each test's one-sided p in the paper's direction. An agree whose
  adjusted p is not below 0.05 becomes inconclusive (failing Holm is never a reason to differ).
- **Placebo twins** (the same config with `noise_kind: placebo`, judged by the same rule over the
  label twin's memorization window, outside Holm's family at raw p < 0.05): if the twin agrees,
  the label cell's agree becomes inconclusive ("its placebo twin agrees"); an inconclusive twin
  is named in `reason`; without a twin the verdict stands and `reason` says "no placebo twin in
  this sweep". 2a, 3 and 5a cannot agree under placebo by construction: "placebo: vacuous".
- Nothing is pooled across sweeps or protocols: a sweep's cells hold one protocol each.
"""
from __future__ import annotations

import math

from . import stats as S
from .cells import Cell, load_cells
from .rules import ALPHA, FINDINGS, Verdict, loc_values
from .store import Store

NO_TWIN = "no placebo twin in this sweep"
VACUOUS = "placebo: vacuous"
TWIN_AGREES = "its placebo twin agrees"


def judge_cells(cells: list[Cell]) -> dict[int, list[Verdict]]:
    """{id(cell): its verdicts}, each finding judged on its own (no Holm, no twins yet); 8a once
    per scoring sweep, in the first cell naming it."""
    out: dict[int, list[Verdict]] = {}
    scored: set[str] = set()
    for c in cells:
        vs: list[Verdict] = []
        for fid, spec in FINDINGS.items():
            if c.kind not in spec.cells:
                continue
            if fid == "8a" and c.memscores is not None:
                if c.memscores in scored:
                    continue
                scored.add(c.memscores)
            v = spec.judge(c)
            vs += v if isinstance(v, list) else [v]
        out[id(c)] = vs
    return out


def _key(v: Verdict) -> tuple:
    return v.id, v.method, v.track


def judge_sweep(cells: list[Cell]) -> list[Verdict]:
    by_cell = judge_cells(cells)
    verdicts = [v for c in cells for v in by_cell[id(c)]]
    # Holm over the gated tests of label cells (placebo cells are controls: raw p, outside it)
    family = [v for v in verdicts if v.gated and v.noise_kind == "label" and not math.isnan(v.p)]
    for v, adj in zip(family, S.holm([v.p for v in family])):
        v.interval_or_p += f"; Holm p={S.fmt(adj, 2)}"
        if v.verdict == "agree" and not adj < ALPHA:
            v.verdict, v.reason = "inconclusive", f"fails Holm's correction over the sweep's gated tests (p={S.fmt(adj, 2)})"
    eight_a = {c.memscores: v for c in cells for v in by_cell[id(c)] if v.id == "8a" and c.memscores}
    for c in cells:
        if c.noise_kind != "label":
            continue
        twin = {_key(v): v for v in by_cell[id(c.placebo)]} if c.placebo is not None else {}
        for v in by_cell[id(c)]:
            spec = FINDINGS[v.id]
            if not spec.gated:
                continue
            agree = v.verdict == "agree"  # a twin can only downgrade an agree: the reasons say so there
            if spec.vacuous_under_placebo:
                v.reason = v.reason or (VACUOUS if agree else "")
                continue
            tw = twin.get(_key(v))
            if tw is None and v.id == "8a" and c.placebo is not None:  # 8a is judged once per scoring sweep
                tw = eight_a.get(c.placebo.memscores)
            if tw is None:
                v.reason = v.reason or (NO_TWIN if agree else "")
                continue
            v.placebo_twin = tw.verdict
            if v.id in ("7a", "7c"):  # reported beside them: the method's label-minus-placebo lift
                v.control += "; " + lift_over_placebo(c, c.placebo, v)
            if tw.verdict == "agree" and v.verdict == "agree":
                v.verdict, v.reason = "inconclusive", TWIN_AGREES
            elif tw.verdict == "inconclusive" and agree:
                v.reason = v.reason or f"placebo twin inconclusive ({tw.reason})"
    return verdicts


def lift_over_placebo(label: Cell, placebo: Cell, v: Verdict) -> str:
    """The method's median lift (precision@|truth| / chance, in the verdict's track) on noisy
    targets in the label cell minus in its placebo twin (different models: unpaired), with a
    bootstrap 95% interval."""
    a, b = (list(S.per_example(loc_values(c, v.track, "lift", raw=True).get(v.method, {}).get("noisy", {})).values())
            for c in (label, placebo))
    if not a or not b:
        return "label - placebo lift n/a"
    lo, hi = S.bootstrap(S.median_gap, b, a)
    return f"label - placebo lift {S.median(a) - S.median(b):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def sweep_verdicts(store: Store, sweeps: list[str]) -> list[Verdict]:
    """Verdicts of each sweep on its own (Holm within a sweep; protocols never pooled: a sweep's
    cells hold one protocol each, and cells of different protocols are different cells)."""
    return [v for sweep in sweeps for v in judge_sweep(load_cells(store, sweep))]
