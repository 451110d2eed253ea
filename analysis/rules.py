"""The paper's findings as verdict rules, one function each (EXPERIMENTS.md, the findings table).

Each function takes a `Cell` and returns a `Verdict` (7a and 7c: one per method and track).
Every threshold is a constant defined once, next to its finding, and the criterion text a
reader sees is built from it. The three verdicts (protocol 3):
- **agree**: the evidence lies wholly on the paper's side: the interval above the threshold, or
  the one-sided test in the paper's direction significant with the minimum effect met;
- **differ**: it lies wholly on the other side: the interval below the threshold, or the
  one-sided test in the opposite direction significant, or the effect's 95% interval wholly
  short of the stated minimum;
- **inconclusive**: anything else (underpowered: the interval is in `reason`), too few seeds or
  examples, a missing column or scores.
Rank tests use one value per example (`stats.per_example`: the median over the seeds in which it
was a target); paired values are paired within (example, seed) first. Holm's correction and the
placebo twins are applied when a sweep is judged (`analysis.judge`), not here.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

from memray.summary import target_kind

from . import stats as S
from .cells import Cell, Rows, final, rewinding_classes

VERDICTS = ("agree", "differ", "inconclusive")
MIN_SEEDS = 3
MIN_EXAMPLES = 8
ALPHA = S.ALPHA
CONTROLS = ("mask_only", "class_mean", "random")  # localization leak controls (section 7)
NOT_METHODS = (*CONTROLS, "oracle")  # rows 7a-7d do not judge as methods


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
    p: float = math.nan  # the one-sided p in the paper's direction (Holm's family, placebo twins)
    reason: str = ""  # why (too few seeds, no scores, placebo twin agrees, leak): `verdict` is one word
    method: str | None = None  # the localization method of a 7a-7d row; else None
    track: str | None = None  # the localization track of a 7a-7d row (decoy, all); else None
    placebo_twin: str | None = None  # the placebo twin's verdict; None when the sweep has none

    def row(self) -> dict[str, Any]:
        """The verdict as data (ARCHITECTURE.md, "Verdicts as data")."""
        assert self.verdict in VERDICTS, self.verdict
        d = asdict(self)
        d["p"] = None if math.isnan(self.p) else self.p
        return d

    @property
    def shown(self) -> str:
        """The verdict as a person reads it: 'inconclusive (why)'."""
        return self.verdict + (f" ({self.reason})" if self.reason and self.verdict == "inconclusive" else "")


def verdict(fid: str, cell: Cell, **kw) -> Verdict:
    spec = FINDINGS[fid]
    base = {"id": fid, "finding": spec.text, "cell": cell.name, "protocol": cell.protocol,
            "noise_kind": cell.noise_kind, "gated": spec.gated, "criterion": spec.criterion,
            "seeds": len(cell.seeds), "n": len(cell.seeds), "value": "", "control": "", "interval_or_p": ""}
    return Verdict(**{**base, **kw})


def inconclusive(fid: str, cell: Cell, reason: str, **kw) -> Verdict:
    return verdict(fid, cell, verdict="inconclusive", reason=reason, **kw)


def decide(paper: bool, other: bool, why: str) -> tuple[str, str]:
    """(verdict, reason) from whether the evidence lies wholly on the paper's side, wholly on the
    other side, or neither (underpowered: `why` names the interval or test)."""
    if paper:
        return "agree", ""
    if other:
        return "differ", ""
    return "inconclusive", f"underpowered: {why}"


def needs(cell: Cell, table: str, column: str) -> str | None:
    """A reason to be inconclusive when a table or column a verdict needs is absent."""
    rows = cell.all_rows(table)
    if not rows:
        return f"no {table} rows"
    if all(r.get(column) is None for r in rows):
        return f"column {column} absent"
    return None


# ----------------------------------------------------------------------------- over seeds
def seed_values(fid: str, cell: Cell, per_seed: Callable[[int, dict[str, Rows]], float | None], threshold: float,
                above: bool, value_fmt: Callable[[float], str], control: str = "") -> Verdict:
    """A finding judged on one number per seed against a threshold: the t-interval over seeds
    above it agrees, below it differs, across it is underpowered."""
    vals = [v for s, t in cell.seeds.items() if (v := per_seed(s, t)) is not None and math.isfinite(v)]
    if len(vals) < MIN_SEEDS:
        return inconclusive(fid, cell, f"{len(vals)} usable seeds, need {MIN_SEEDS}", n=len(vals), control=control)
    m, lo, hi = S.t_interval(vals)
    p = S.t_p_above(vals, threshold) if above else S.t_p_above([-v for v in vals], -threshold)
    iv = f"[{S.fmt(lo)}, {S.fmt(hi)}]"
    v, reason = decide(lo > threshold if above else hi < threshold, hi < threshold if above else lo > threshold,
                       f"interval {iv} includes {S.fmt(threshold)}")
    return verdict(fid, cell, verdict=v, reason=reason, n=len(vals), value=value_fmt(m), control=control,
                   interval_or_p=f"{iv} (p={S.fmt(p, 2)})", p=p)


def window_rows(cell: Cell, seed: int, t: dict[str, Rows], keep: Callable[[dict], bool]) -> dict[int, Rows] | None:
    """A trial's gradient rows inside its memorization window (a placebo twin: its label twin's),
    per layer group; None when the window has fewer than 2 epochs."""
    w = set(cell.window(seed))
    if len(w) < 2:
        return None
    by_group: dict[int, Rows] = defaultdict(list)
    for r in t["gradients"]:
        if r["epoch"] in w and keep(r):
            by_group[r["layer_index"]].append(r)
    return by_group


GRAD_NOISY_OVER_CLEAN = 0.5
GRAD_NOISY_OVER_CONTROL = 2.0


def finding_1a(cell: Cell) -> Verdict:
    """Per seed: over the window, per group, mean log(noisy/clean) - log 0.5 and mean
    log(noisy/control) - log 2; the seed's value is the smallest over groups and both (> 0 agrees)."""
    reason = needs(cell, "gradients", "control_norm")
    if reason:
        return inconclusive("1a", cell, reason)

    def per_seed(s, t):
        by_group = window_rows(cell, s, t, lambda r: r["noisy_norm"] > 0 and r["clean_norm"] > 0 and r["control_norm"] > 0)
        if not by_group:
            return None
        worst = math.inf
        for rows in by_group.values():
            a = statistics.fmean(math.log(r["noisy_norm"] / r["clean_norm"]) for r in rows) - math.log(GRAD_NOISY_OVER_CLEAN)
            b = statistics.fmean(math.log(r["noisy_norm"] / r["control_norm"]) for r in rows) - math.log(GRAD_NOISY_OVER_CONTROL)
            worst = min(worst, a, b)
        return worst

    ctrl = [r["noisy_norm"] / r["control_norm"] for r in cell.all_rows("gradients") if r["control_norm"]]
    return seed_values("1a", cell, per_seed, 0.0, True, lambda m: f"worst group log-margin {m:.3g}",
                       control=f"median noisy/control norm {S.fmt(S.median(ctrl))}")


def finding_1b(cell: Cell) -> Verdict:
    """Per seed: over the window, per group, the mean cosine and the mean cosine minus the mean
    control cosine; the seed's value is the largest over groups and both (< 0 agrees)."""
    reason = needs(cell, "gradients", "control_cosine")
    if reason:
        return inconclusive("1b", cell, reason)

    def per_seed(s, t):
        by_group = window_rows(cell, s, t, lambda r: True)
        if not by_group:
            return None
        worst = -math.inf
        for rows in by_group.values():
            c = statistics.fmean(r["cosine"] for r in rows)
            k = statistics.fmean(r["control_cosine"] for r in rows)
            worst = max(worst, c, c - k)
        return worst

    ctrl = [r["control_cosine"] for r in cell.all_rows("gradients") if r["control_cosine"] is not None]
    return seed_values("1b", cell, per_seed, 0.0, False, lambda m: f"worst group cosine margin {m:.3g}",
                       control=f"median control cosine {S.fmt(S.median(ctrl))}")


MOST = 0.5  # "most": more than half, with the interval over seeds above it


def classes_per_seed(cell: Cell) -> dict[int, dict[str, str] | None]:
    return {s: (rewinding_classes(t["rewinding"], t["evals"]) if t.get("rewinding") else None)
            for s, t in cell.seeds.items()}


def finding_2a(cell: Cell) -> Verdict:
    reason = needs(cell, "rewinding", "accuracy")
    if reason:
        return inconclusive("2a", cell, reason)
    classes = classes_per_seed(cell)

    def per_seed(s, t):
        c = classes[s]
        return None if not c else sum(v == "redundant" for v in c.values()) / len(c)

    return seed_values("2a", cell, per_seed, MOST, True, lambda m: f"{m:.0%} of groups redundant at e*",
                       control="redundant needs train_noisy above train_noisy_true"
                               + ("" if any(classes.values()) else " (no e*)"))


def finding_2b(cell: Cell) -> Verdict:
    """Per seed that has a critical group: 1 if the final group is not critical and some earlier
    group is, else 0; "most" of those seeds (t-interval above 0.5)."""
    reason = needs(cell, "rewinding", "accuracy")
    if reason:
        return inconclusive("2b", cell, reason)
    classes = {s: c for s, c in classes_per_seed(cell).items() if c}
    if len(classes) < MIN_SEEDS:
        return inconclusive("2b", cell, f"{len(classes)} seeds with rewinding classes, need {MIN_SEEDS}", n=len(classes))
    critical = {s: [g for g, k in c.items() if k == "critical"] for s, c in classes.items()}
    critical = {s: g for s, g in critical.items() if g}
    if len(critical) < 2:
        return inconclusive("2b", cell, f"a critical group in {len(critical)} seed(s), need 2", n=len(critical))
    final_group = {s: list(c)[-1] for s, c in classes.items()}
    ok = [float(final_group[s] not in g) for s, g in critical.items()]  # critical, and not the final group
    m, lo, hi = S.t_interval(ok)
    iv = f"[{S.fmt(lo)}, {S.fmt(hi)}]"
    v, why = decide(lo > MOST, hi < MOST, f"interval {iv} includes {MOST}")
    crit = sorted({g for gs in critical.values() for g in gs})
    return verdict("2b", cell, verdict=v, reason=why, n=len(critical),
                   value=f"critical groups {crit}; only before the final group in {int(sum(ok))}/{len(ok)} seeds",
                   control="none", interval_or_p=f"{m:.2f} of seeds with a critical group, {iv}")


def finding_3(cell: Cell) -> Verdict:
    reason = needs(cell, "retraining", "converged")
    if reason:
        return inconclusive("3", cell, reason)

    def per_seed(s, t):
        acc: dict[str, dict[str, Any]] = defaultdict(dict)
        for r in t["retraining"]:
            acc[r["layer_name"]][r["subset"]] = r["accuracy"]
            acc[r["layer_name"]]["converged"] = r["converged"]
        conv = [a for a in acc.values() if a.get("converged")]
        if not conv:
            return None
        return sum(a["train_noisy"] - a["train_noisy_true"] > 0 for a in conv) / len(conv)

    rows = [r for r in cell.all_rows("retraining") if r["subset"] == "test"]
    return seed_values("3", cell, per_seed, MOST, True,
                       lambda m: f"{m:.0%} of converged groups predict given over true labels",
                       control=f"train_noisy_true; {sum(r['converged'] for r in rows)}/{len(rows)} (group, seed) converged")


# ----------------------------------------------------------------------------- flips (section 4)
FEWER_RATIO = 0.75  # 4a, 8b: median units of the kind / of clean targets at most this
GREEDY_OVER_RANDOM = 0.5  # 4b: greedy needs at most half the units random order needs
EDIT_COST_GAP = 0.01  # 4d: clean edits cost at least 1 point more test accuracy


def flip_counts(cell: Cell, method: str, kind: str) -> dict[tuple[int, int], float]:
    """{(seed, example): units to flip} of one method and target kind (not flipped: inf)."""
    return {(s, r["example_id"]): (r["n_units"] if r["flipped"] else math.inf)
            for s, t in cell.seeds.items() for r in t.get("flips", [])
            if r["method"] == method and target_kind(r) == kind}


def greedy_random_ratio(cell: Cell, kind: str) -> dict[int, float]:
    """{example: median over seeds of greedy / random units}, over (example, seed) pairs that
    both orders flipped (paired within the pair first)."""
    g, r = flip_counts(cell, "greedy", kind), flip_counts(cell, "random", kind)
    return S.per_example({k: g[k] / r[k] for k in g if k in r and math.isfinite(g[k]) and math.isfinite(r[k])})


def fewer_units(fid: str, cell: Cell, kind: str, versus: str) -> Verdict:
    """Targets of `kind` flip with fewer units than clean ones (named `versus`), beyond random
    order: median ratio <= 0.75 (Mann-Whitney over examples), and the per-target greedy/random
    ratio lower for `kind` than for clean (Mann-Whitney); >= 8 targets of each kind flipped by
    both orders."""
    gk = S.per_example(flip_counts(cell, "greedy", kind))
    gc = S.per_example(flip_counts(cell, "greedy", "clean"))
    rk, rc = greedy_random_ratio(cell, kind), greedy_random_ratio(cell, "clean")
    n = len(gk) + len(gc)
    if min(len(gk), len(gc)) < MIN_EXAMPLES:
        return inconclusive(fid, cell, f"{len(gk)} {kind} / {len(gc)} {versus} targets, need {MIN_EXAMPLES}", n=n)
    if min(len(rk), len(rc)) < MIN_EXAMPLES:
        return inconclusive(fid, cell, f"random order's control: {len(rk)} {kind} / {len(rc)} {versus} targets "
                                       f"flipped by both orders, need {MIN_EXAMPLES}", n=n)
    a, b = list(gk.values()), list(gc.values())
    ratio = S.ratio(S.median(a), S.median(b))
    lo, hi = S.bootstrap(S.median_ratio, a, b)
    p1, p2 = S.mann_whitney(a, b, "less"), S.mann_whitney(list(rk.values()), list(rc.values()), "less")
    q1, q2 = S.mann_whitney(a, b, "greater"), S.mann_whitney(list(rk.values()), list(rc.values()), "greater")
    p = max(p1, p2)  # both must hold: the intersection-union test's p
    v, why = decide(p < ALPHA and ratio <= FEWER_RATIO, q1 < ALPHA or q2 < ALPHA or lo > FEWER_RATIO,
                    f"median ratio {S.fmt(ratio)} [{S.fmt(lo)}, {S.fmt(hi)}], p={S.fmt(p1, 2)} and {S.fmt(p2, 2)}")
    return verdict(fid, cell, verdict=v, reason=why, n=n, p=p,
                   value=f"median units {kind} {S.fmt(S.median(a))} vs {versus} {S.fmt(S.median(b))} "
                         f"(ratio {S.fmt(ratio)}, 95% [{S.fmt(lo)}, {S.fmt(hi)}])",
                   control=f"greedy/random per target: {kind} {S.fmt(S.median(list(rk.values())))} vs "
                           f"{versus} {S.fmt(S.median(list(rc.values())))}",
                   interval_or_p=f"Mann-Whitney p={S.fmt(p1, 2)} (units), p={S.fmt(p2, 2)} (greedy/random)")


def finding_4a(cell: Cell) -> Verdict:
    return fewer_units("4a", cell, "noisy", "clean")


def finding_4b(cell: Cell) -> Verdict:
    """Greedy vs random order on the same targets (paired within (example, seed), every kind):
    per example the median over seeds of greedy - random and of greedy / random; one-sided
    Wilcoxon, and the median ratio <= 0.5."""
    diffs, ratios = {}, {}
    for kind in ("noisy", "clean", "rare"):
        g, r = flip_counts(cell, "greedy", kind), flip_counts(cell, "random", kind)
        for k in g.keys() & r.keys():
            a, b = g[k], r[k]
            if math.isinf(a) and math.isinf(b):
                continue  # neither flipped: no comparison
            diffs[k] = -math.inf if math.isinf(b) else (math.inf if math.isinf(a) else a - b)
            ratios[k] = S.ratio(a, b)
    d, q = S.per_example(diffs), S.per_example(ratios)
    if len(d) < MIN_EXAMPLES:
        return inconclusive("4b", cell, f"{len(d)} targets with both orders, need {MIN_EXAMPLES}", n=len(d))
    vals = list(q.values())
    ratio = S.median(vals)
    lo, hi = S.bootstrap(S.medians, vals)
    p, p_other = S.wilcoxon(list(d.values()), "less"), S.wilcoxon(list(d.values()), "greater")
    v, why = decide(p < ALPHA and ratio <= GREEDY_OVER_RANDOM, p_other < ALPHA or lo > GREEDY_OVER_RANDOM,
                    f"median ratio {S.fmt(ratio)} [{S.fmt(lo)}, {S.fmt(hi)}], Wilcoxon p={S.fmt(p, 2)}")
    return verdict("4b", cell, verdict=v, reason=why, n=len(d), p=p,
                   value=f"median greedy/random per target {S.fmt(ratio)} (95% [{S.fmt(lo)}, {S.fmt(hi)}])",
                   control="random order, same targets", interval_or_p=f"Wilcoxon p={S.fmt(p, 2)}")


def finding_4c(cell: Cell) -> Verdict:
    """Noisy greedy targets flipped with >= 2 units, one value per example: spread if its units
    used >= 2 sites in most of its seeds; its share of units at the final site minus that site's
    share of all units (median over seeds). Agree: Wilson lower bound of the spread fraction above
    0.5, and the share difference not above 0 (one-sided Wilcoxon not significant, median <= 0);
    differ: Wilson upper bound below 0.5, or that Wilcoxon significant."""
    reason = needs(cell, "flips", "site_units")
    if reason:
        return inconclusive("4c", cell, reason)
    spread: dict[int, list[bool]] = defaultdict(list)
    excess: dict[tuple[int, int], float] = {}
    site_share = None
    for s, t in cell.seeds.items():
        for r in t.get("flips", []):
            if r["method"] != "greedy" or target_kind(r) != "noisy" or not r["flipped"] or r["n_units"] < 2:
                continue
            units = list(r["site_units"])
            last = max(i for i, u in enumerate(units) if u > 0)
            site_share = units[last] / sum(units)
            sites = [u["site"] for u in r["units"]]
            spread[r["example_id"]].append(len(set(sites)) >= 2)
            excess[(s, r["example_id"])] = sum(x == last for x in sites) / len(sites) - site_share
    if len(spread) < MIN_EXAMPLES:
        return inconclusive("4c", cell, f"{len(spread)} flipped noisy targets with >= 2 units, need {MIN_EXAMPLES}",
                            n=len(spread))
    k = sum(2 * sum(v) > len(v) for v in spread.values())
    n = len(spread)
    lo, hi = S.wilson(k, n)
    d = list(S.per_example(excess).values())
    p = S.wilcoxon(d, "greater")
    md = S.median(d)
    v, why = decide(lo > MOST and not p < ALPHA and md <= 0, hi < MOST or p < ALPHA,
                    f"Wilson [{lo:.2f}, {hi:.2f}] includes {MOST}" if lo <= MOST else "final-site share above its "
                    f"site's (median {md:+.3f}) but not significantly")
    return verdict("4c", cell, verdict=v, reason=why, n=n,
                   value=f"{k}/{n} noisy targets' units on >= 2 sites; final site's share minus its site share "
                         f"median {md:+.3f}",
                   control=f"the final site holds {site_share:.0%} of the units",
                   interval_or_p=f"Wilson 95% [{lo:.2f}, {hi:.2f}]; Wilcoxon (share above site share) p={S.fmt(p, 2)}")


def finding_4d(cell: Cell) -> Verdict:
    reason = needs(cell, "flips", "pre_test_acc")
    if reason:
        return inconclusive("4d", cell, reason)

    def costs(kind):
        return S.per_example({(s, r["example_id"]): r["pre_test_acc"] - r["post_test_acc"]
                              for s, t in cell.seeds.items() for r in t.get("flips", [])
                              if r["method"] == "greedy" and target_kind(r) == kind and r["flipped"]})

    noisy, clean = list(costs("noisy").values()), list(costs("clean").values())
    n = len(noisy) + len(clean)
    if min(len(noisy), len(clean)) < MIN_EXAMPLES:
        return inconclusive("4d", cell, f"{len(noisy)} noisy / {len(clean)} clean flipped targets, need {MIN_EXAMPLES}",
                            n=n)
    p, p_other = S.mann_whitney(noisy, clean, "less"), S.mann_whitney(noisy, clean, "greater")
    gap = S.median(clean) - S.median(noisy)
    lo, hi = S.bootstrap(S.median_gap, noisy, clean)
    v, why = decide(p < ALPHA and gap >= EDIT_COST_GAP, p_other < ALPHA or hi < EDIT_COST_GAP,
                    f"gap {100 * gap:.2g} points [{100 * lo:.2g}, {100 * hi:.2g}], p={S.fmt(p, 2)}")
    return verdict("4d", cell, verdict=v, reason=why, n=n, p=p,
                   value=f"median test cost of a noisy edit {100 * S.median(noisy):.2g} points",
                   control=f"clean edits {100 * S.median(clean):.2g} points (gap 95% [{100 * lo:.2g}, {100 * hi:.2g}])",
                   interval_or_p=f"Mann-Whitney p={S.fmt(p, 2)}")


# ----------------------------------------------------------------------------- ETD (section 5)
OWN_NOISY = 0.9
DROP_NOISY = 0.10
DROP_CLEAN_OF_OWN = 0.9
TEST_GAP = -0.01


def finding_5a(cell: Cell) -> Verdict:
    if cell.twin is None:
        return inconclusive("5a", cell, "no plain twin in the sweep")
    twin_test = {s: final(t["evals"], "plain", "test") for s, t in cell.twin.seeds.items()}
    seeds = sorted(s for s in cell.seeds if s in twin_test)
    if len(seeds) < MIN_SEEDS:
        return inconclusive("5a", cell, f"{len(seeds)} seeds paired with the twin, need {MIN_SEEDS}", n=len(seeds))
    ev = {s: cell.seeds[s]["evals"] for s in seeds}
    own = [final(ev[s], "own", "train_noisy") for s in seeds]
    drop = [final(ev[s], "drop", "train_noisy") for s in seeds]
    clean = [final(ev[s], "drop", "train_clean") - DROP_CLEAN_OF_OWN * final(ev[s], "own", "train_clean") for s in seeds]
    gap = [final(ev[s], "drop", "test") - twin_test[s] for s in seeds]
    if any(math.isnan(v) for v in (*own, *drop, *clean, *gap)):
        return inconclusive("5a", cell, "a final own/drop evaluation or the twin's test is missing", n=len(seeds))
    parts = [(own, OWN_NOISY, True), (drop, DROP_NOISY, False), (clean, 0.0, True), (gap, TEST_GAP, True)]
    paper, other, ps = [], [], []
    for vals, thr, above in parts:
        m, lo, hi = S.t_interval(vals)
        paper.append(lo >= thr if above else hi <= thr)
        other.append(hi < thr if above else lo > thr)
        ps.append(S.t_p_above(vals, thr) if above else S.t_p_above([-v for v in vals], -thr))
    p = max(ps)  # all four must hold: the intersection-union test's p
    _, glo, ghi = S.t_interval(gap)
    v, why = decide(all(paper), any(other), "an interval includes its bound: "
                    + ", ".join(n for n, ok, o in zip(("own noisy", "drop noisy", "drop clean", "test gap"), paper, other)
                                if not ok and not o))
    return verdict("5a", cell, verdict=v, reason=why, n=len(seeds), p=p,
                   value=f"own train_noisy {statistics.fmean(own):.2f} -> drop {statistics.fmean(drop):.3f}; "
                         f"drop test - twin {statistics.fmean(gap):+.3f}",
                   control=f"twin test {statistics.fmean(twin_test[s] for s in seeds):.3f}",
                   interval_or_p=f"test gap [{glo:+.3f}, {ghi:+.3f}] (p={S.fmt(p, 2)})")


def scored(cell: Cell, ids: list[int]) -> list[float]:
    return [s for s in ((cell.scores.get(i) or {}).get("score") for i in ids) if s is not None]


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


NO_SCORES = "no memorization scores (run the grid with --memscores SWEEP)"


def finding_5b(cell: Cell) -> Verdict:
    """Clean examples right under `own` in at least one seed, each counted once: forgotten if
    `drop` forgets it in more than half of the seeds where `own` had it right, else kept. Their
    memorization scores: one-sided Mann-Whitney, and the AUC of the score as a predictor of
    being forgotten."""
    if cell.scores is None:
        return inconclusive("5b", cell, NO_SCORES)
    forgotten, kept = forgotten_and_kept(cell)
    a, b = scored(cell, forgotten), scored(cell, kept)
    if min(len(a), len(b)) < MIN_EXAMPLES:
        return inconclusive("5b", cell, f"{len(a)} forgotten / {len(b)} kept scored clean examples, need "
                                        f"{MIN_EXAMPLES}", n=len(a) + len(b))
    p, p_other = S.mann_whitney(a, b, "greater"), S.mann_whitney(a, b, "less")
    au = S.auc(a, b)
    v, why = decide(p < ALPHA and au > 0.5, p_other < ALPHA, f"Mann-Whitney p={S.fmt(p, 2)}")
    return verdict("5b", cell, verdict=v, reason=why, n=len(a) + len(b), p=p,
                   value=f"median score forgotten {S.fmt(S.median(a))} (n={len(a)}) vs kept {S.fmt(S.median(b))} "
                         f"(n={len(b)}); AUC {au:.3f}",
                   control="clean examples drop keeps", interval_or_p=f"Mann-Whitney p={S.fmt(p, 2)}")


# ----------------------------------------------------------------------------- localization (section 7)
PRECISION_FLOOR = 0.6  # 7a, 7d: median precision@|truth| on noisy (rare) targets; 7c: median AUROC
NEAR_BEST = 0.05  # 7b: within this of the best median noisy precision
LEAK_MEDIAN = 0.05  # a control leaks if its median is further than this from chance (or Wilcoxon p < 0.05)


def loc_values(cell: Cell, track: str, metric: str, raw: bool = False) -> dict[str, dict[str, dict[tuple, float]]]:
    """{method: {kind: {(seed, example): metric - chance}}} at k = |truth| in one track (AUROC:
    minus 0.5; `raw`: the metric itself, e.g. lift)."""
    out: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for s, t in cell.seeds.items():
        for r in t.get("localization", []):
            if (r.get("track") or "own") != track or not r["n_truth"] or r["k"] != r["n_truth"]:
                continue
            v = r.get(metric)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            chance = 0.0 if raw else 0.5 if metric == "auroc" else r["chance"]
            out[r["method"]][r["target_kind"]][(s, r["example_id"])] = v - chance
    return out


def leaks(cell: Cell, track: str, metric: str) -> list[str]:
    """The leak controls whose per-example metric (every target kind) is not at chance: two-sided
    Wilcoxon p < 0.05 against it, or the median further than 0.05 from it (no Holm)."""
    out = []
    vals = loc_values(cell, track, metric)
    for c in CONTROLS:
        by_kind = vals.get(c, {})
        d = list(S.per_example({k: v for kind in by_kind.values() for k, v in kind.items()}).values())
        if len(d) >= MIN_EXAMPLES and (S.wilcoxon_two_sided(d) < ALPHA or abs(S.median(d)) > LEAK_MEDIAN):
            out.append(c)
    return out


def localizes(fid: str, cell: Cell, track: str, metric: str, kind: str, versus: str) -> list[Verdict]:
    """Per method: on `kind` targets its metric above chance (Wilcoxon signed-rank) with median
    >= 0.6, and above its own on `versus` targets (Mann-Whitney); >= 8 examples a kind. A cell and
    track where a leak control is not at chance is inconclusive for every method."""
    vals = loc_values(cell, track, metric)
    if not vals:
        return [inconclusive(fid, cell, f"no localization rows in track {track}", track=track)]
    leaked = leaks(cell, track, metric)
    out = []
    for method in sorted(m for m in vals if m not in NOT_METHODS):
        a = list(S.per_example(vals[method].get(kind, {})).values())
        b = list(S.per_example(vals[method].get("clean", {})).values())
        text = f"{method} localizes memorization ({metric} vs ETD's truth, track {track})"
        kw = {"finding": text, "method": method, "track": track, "n": len(a) + len(b)}
        if min(len(a), len(b)) < MIN_EXAMPLES:
            out.append(inconclusive(fid, cell, f"{len(a)} {kind} / {len(b)} {versus} targets, need {MIN_EXAMPLES}", **kw))
            continue
        chance_of = 0.5 if metric == "auroc" else None
        med = S.median(a) + (chance_of if chance_of is not None else _chance(cell, track, method, kind))
        lo, hi = S.bootstrap(S.medians, a)
        shift = med - S.median(a)
        p1, p2 = S.wilcoxon(a, "greater"), S.mann_whitney(a, b, "greater")
        q1, q2 = S.wilcoxon(a, "less"), S.mann_whitney(a, b, "less")
        p = max(p1, p2)
        v, why = decide(p < ALPHA and med >= PRECISION_FLOOR, q1 < ALPHA or q2 < ALPHA or hi + shift < PRECISION_FLOOR,
                        f"median {med:.3f} [{lo + shift:.3f}, {hi + shift:.3f}], p={S.fmt(p1, 2)} and {S.fmt(p2, 2)}")
        if leaked:
            v, why = "inconclusive", f"leak: {', '.join(leaked)}"
        out.append(verdict(fid, cell, verdict=v, reason=why, p=p, **kw,
                           value=f"median {metric} {kind} {med:.3f} ({chance_text(metric, med, shift)}), "
                                 f"{versus} {S.median(b) + shift:.3f}",
                           control=("controls at chance" if not leaked else f"leaking: {', '.join(leaked)}"),
                           interval_or_p=f"Wilcoxon vs chance p={S.fmt(p1, 2)}, Mann-Whitney vs {versus} "
                                         f"p={S.fmt(p2, 2)}"))
    return out


def chance_text(metric: str, med: float, chance: float) -> str:
    """Chance beside a median; for precision also its lift (precision / chance, EXPERIMENTS.md 7)."""
    return f"chance {chance:.3f}" + (f", lift {med / chance:.2f}" if metric == "precision" and chance > 0 else "")


def _chance(cell: Cell, track: str, method: str, kind: str) -> float:
    c = [r["chance"] for t in cell.seeds.values() for r in t.get("localization", [])
         if r.get("track") == track and r["method"] == method and r["target_kind"] == kind and r["chance"] is not None]
    return S.median(c) if c else math.nan


def finding_7a(cell: Cell) -> list[Verdict]:
    return localizes("7a", cell, "decoy", "precision", "noisy", "clean")


def finding_7c(cell: Cell) -> list[Verdict]:
    return localizes("7c", cell, "all", "auroc", "noisy", "clean")


def finding_7d(cell: Cell) -> list[Verdict]:
    if cell.scores is None:
        return [inconclusive("7d", cell, NO_SCORES, track="decoy")]
    return localizes("7d", cell, "decoy", "precision", "rare", "typical clean")


def finding_7b(cell: Cell) -> Verdict:
    """Among the methods (controls excluded), the cheapest (median seconds per target) within 0.05
    of the best median noisy precision@|truth| in `decoy` also passes 7a; inconclusive when no
    method passes 7a."""
    vals = loc_values(cell, "decoy", "precision")
    secs: dict[str, list[float]] = defaultdict(list)
    for r in cell.all_rows("localization"):
        if r.get("track") == "decoy":
            secs[r["method"]].append(r["seconds"])
    med = {m: S.median(list(S.per_example(v["noisy"]).values())) for m, v in vals.items()
           if m not in NOT_METHODS and v.get("noisy")}
    if not med:
        return inconclusive("7b", cell, "no localization rows in track decoy", track="decoy")
    a7 = {v.method: v for v in finding_7a(cell)}
    passed = [m for m, v in a7.items() if v.verdict == "agree"]
    best = max(med, key=med.get)
    near = [m for m in med if med[m] >= med[best] - NEAR_BEST]
    cheapest = min(near, key=lambda m: S.median(secs[m]))
    kw = {"method": cheapest, "track": "decoy", "n": len(vals.get(cheapest, {}).get("noisy", {})),
          "value": f"best {best} ({med[best]:+.3f} over chance); cheapest within {NEAR_BEST}: {cheapest} "
                   f"({med[cheapest]:+.3f}, {1000 * S.median(secs[cheapest]):.0f} ms/target)",
          "control": f"{best}: {1000 * S.median(secs[best]):.0f} ms/target"}
    if not passed:
        return inconclusive("7b", cell, "no method passes 7a", **kw)
    return verdict("7b", cell, verdict="agree" if cheapest in passed else "differ", **kw,
                   interval_or_p=f"7a: {cheapest} {a7[cheapest].verdict}")


# ----------------------------------------------------------------------------- scores (section 8)
SCORE_AUC = 0.7  # 8a: minimum AUC of the score for noisy vs clean


def finding_8a(cell: Cell) -> Verdict:
    """The scores' own check: noisy examples score higher than clean ones (one-sided
    Mann-Whitney, AUC >= 0.7). Under placebo the "noisy" examples keep their labels."""
    if cell.scores is None:
        return inconclusive("8a", cell, NO_SCORES)
    noisy = [r["score"] for r in cell.scores.values() if r["is_noisy"] and r["score"] is not None]
    clean = [r["score"] for r in cell.scores.values() if not r["is_noisy"] and r["score"] is not None]
    if min(len(noisy), len(clean)) < MIN_EXAMPLES:
        return inconclusive("8a", cell, f"{len(noisy)} noisy / {len(clean)} clean scored examples, need "
                                        f"{MIN_EXAMPLES}", n=len(noisy) + len(clean))
    p, p_other = S.mann_whitney(noisy, clean, "greater"), S.mann_whitney(noisy, clean, "less")
    au = S.auc(noisy, clean)
    lo, hi = S.bootstrap(S.aucs, noisy, clean)
    v, why = decide(p < ALPHA and au >= SCORE_AUC, p_other < ALPHA or hi < SCORE_AUC,
                    f"AUC {au:.3f} [{lo:.3f}, {hi:.3f}], p={S.fmt(p, 2)}")
    return verdict("8a", cell, verdict=v, reason=why, n=len(noisy) + len(clean), p=p,
                   value=f"median score noisy {S.fmt(S.median(noisy))} (n={len(noisy)}); AUC {au:.3f} "
                         f"[{lo:.3f}, {hi:.3f}]",
                   control=f"clean {S.fmt(S.median(clean))} (n={len(clean)}); scores of sweep {cell.memscores}",
                   interval_or_p=f"Mann-Whitney p={S.fmt(p, 2)}")


def finding_8b(cell: Cell) -> Verdict:
    """4a's rule with rare targets in the place of noisy ones."""
    if cell.scores is None:
        return inconclusive("8b", cell, NO_SCORES)
    return fewer_units("8b", cell, "rare", "typical clean")


PROXY_RHO = 0.5  # 8c: Spearman rho of cumulative training loss with the score at least this
PROXY_RHO_LOW = 0.4  # 8c: and its Fisher-z 95% lower bound at least this


def proxy_values(cell: Cell, column: str, none_as: float | None = None) -> dict[int, float]:
    """{example_id: the median over the cell's seeds of its example_stats column} (None: `none_as`,
    or dropped)."""
    vals: dict[tuple[int, int], float] = {}
    for s, t in cell.seeds.items():
        for r in t.get("example_stats", []):
            v = r.get(column)
            if v is not None or none_as is not None:
                vals[(s, r["example_id"])] = float(v if v is not None else none_as)
    return S.per_example(vals)


def finding_8c(cell: Cell) -> Verdict:
    """The free proxy (EXPERIMENTS.md section 8): an example's cumulative training loss (median
    over the cell's seeds) against its memorization score, Spearman rho over all training
    examples with a Fisher-z 95% interval; judged only where the scores come from the cell's arch.
    Beside it: rho on clean examples alone, and the learning epoch's rho."""
    if cell.scores is None:
        return inconclusive("8c", cell, NO_SCORES)
    missing = needs(cell, "example_stats", "cum_loss")
    if missing:
        return inconclusive("8c", cell, missing)
    arch = next((r.get("arch") for r in cell.scores.values() if r.get("arch")), None)
    if arch != cell.arch:
        return inconclusive("8c", cell, f"the scores come from {arch} models, the cell is {cell.arch}")
    loss = proxy_values(cell, "cum_loss")
    ids = sorted(i for i in loss if i in cell.scores and cell.scores[i]["score"] is not None)
    if len(ids) < MIN_EXAMPLES:
        return inconclusive("8c", cell, f"{len(ids)} examples with both a score and a loss, need {MIN_EXAMPLES}")
    score = [cell.scores[i]["score"] for i in ids]
    rho, lo, hi = S.spearman_fisher([loss[i] for i in ids], score)
    if math.isnan(rho):
        return inconclusive("8c", cell, "rho undefined: the cumulative losses or the scores are all equal", n=len(ids))
    clean = [i for i in ids if not cell.scores[i]["is_noisy"]]
    rho_clean = S.spearman_fisher([loss[i] for i in clean], [cell.scores[i]["score"] for i in clean])[0] \
        if len(clean) >= MIN_EXAMPLES else math.nan
    epochs = max((r["epoch"] for r in cell.all_rows("evals")), default=0)
    learn = proxy_values(cell, "learn_epoch", none_as=epochs + 1)  # never learned: after the last epoch
    rho_learn = S.spearman_fisher([learn[i] for i in ids], score)[0]
    v, why = decide(rho >= PROXY_RHO and lo >= PROXY_RHO_LOW, hi < PROXY_RHO,
                    f"rho {rho:.3f} [{lo:.3f}, {hi:.3f}]")
    return verdict("8c", cell, verdict=v, reason=why, n=len(ids),
                   value=f"Spearman rho {rho:.3f} (95% [{lo:.3f}, {hi:.3f}]) of cumulative loss with the score",
                   control=f"clean examples alone rho {S.fmt(rho_clean)}; learning epoch rho {S.fmt(rho_learn)}; "
                           f"scores of sweep {cell.memscores}",
                   interval_or_p=f"Fisher-z [{lo:.3f}, {hi:.3f}]")


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Finding:
    text: str
    cells: tuple[str, ...]  # cell kinds judged: plain, etd, standard
    gated: bool  # placebo-gated: Holm's family, and its placebo twin must not agree
    criterion: str
    judge: Callable[[Cell], Verdict | list[Verdict]]
    vacuous_under_placebo: bool = False  # cannot agree under placebo by construction


FINDINGS: dict[str, Finding] = {
    "1a": Finding("noisy examples' aggregate gradient norm is comparable to the clean 90%'s, far above a control's",
                  ("plain", "etd"), True,
                  f"every group, over the window: noisy/clean >= {GRAD_NOISY_OVER_CLEAN} and noisy/control >= "
                  f"{GRAD_NOISY_OVER_CONTROL:g} (log scale, t-interval over seeds above 0)", finding_1a),
    "1b": Finding("clean and noisy gradients point in opposing directions while memorization happens",
                  ("plain", "etd"), True,
                  "every group, over the window: cosine < 0 and below the control cosine (t-interval over seeds "
                  "below 0)", finding_1b),
    "2a": Finding("rewinding one group leaves memorization largely intact: most groups are redundant",
                  ("plain",), True,
                  f"more than {MOST:.0%} of the groups redundant at e* (train_noisy >= 80% of final and above "
                  f"train_noisy_true), t-interval over seeds above {MOST}", finding_2a, vacuous_under_placebo=True),
    "2b": Finding("critical groups lie before the final group", ("plain",), False,
                  f"in most seeds that have a critical group (t-interval above {MOST}), the final group is not "
                  f"critical and some earlier group is; >= {MIN_SEEDS} seeds, >= 2 with a critical group", finding_2b),
    "3": Finding("memorization survives retraining a group on clean data", ("plain",), True,
                 f"in most converged groups train_noisy > train_noisy_true after retraining (t-interval over seeds "
                 f"above {MOST})", finding_3, vacuous_under_placebo=True),
    "4a": Finding("noisy targets flip with fewer units than clean ones, beyond what random order shows",
                  ("plain",), True,
                  f"median units noisy/clean <= {FEWER_RATIO} (Mann-Whitney over examples) and greedy/random per "
                  f"target lower for noisy (Mann-Whitney); >= {MIN_EXAMPLES} targets a kind flipped by both orders",
                  finding_4a),
    "4b": Finding("greedy needs at most half the units random order needs", ("plain", "etd", "standard"), False,
                  f"median greedy/random per target <= {GREEDY_OVER_RANDOM} (paired within (example, seed)); "
                  f"one-sided Wilcoxon, >= {MIN_EXAMPLES} targets", finding_4b),
    "4c": Finding("a noisy target's units are spread over sites, and the final site holds no more than its share",
                  ("plain",), False,
                  f"Wilson 95% lower bound of the fraction of noisy targets on >= 2 sites above {MOST}, and the "
                  f"per-target share of units at the final site not above that site's share of all units "
                  f"(one-sided Wilcoxon not significant, median <= 0); >= {MIN_EXAMPLES} flipped targets with >= 2 "
                  f"units", finding_4c),
    "4d": Finding("noisy edits cost less accuracy elsewhere than clean edits", ("plain",), True,
                  f"median test-accuracy cost (same fixed samples before/after) lower by >= {100 * EDIT_COST_GAP:g} "
                  f"point; Mann-Whitney over examples", finding_4d),
    "5a": Finding("ETD: own train_noisy -> drop forgets it, clean accuracy holds, test at least the twin's",
                  ("etd",), True,
                  f"own train_noisy >= {OWN_NOISY}; drop train_noisy <= {DROP_NOISY}; drop train_clean >= "
                  f"{DROP_CLEAN_OF_OWN} x own's; drop test - twin test >= {TEST_GAP} (t-intervals, paired by seed)",
                  finding_5a, vacuous_under_placebo=True),
    "5b": Finding("the clean examples drop forgets are atypical (higher memorization scores)", ("etd",), False,
                  f"scores of clean examples right under own: forgotten by drop (in most seeds) above kept (one-sided "
                  f"Mann-Whitney over examples, >= {MIN_EXAMPLES} each) and AUC > 0.5", finding_5b),
    "7a": Finding("a localization method finds the units that hold a memorized label (decoy track)", ("etd",), True,
                  f"precision@|truth| on noisy targets above chance (Wilcoxon) with median >= {PRECISION_FLOOR}, and "
                  f"above its own on clean targets (Mann-Whitney); >= {MIN_EXAMPLES} examples a kind; Holm over "
                  f"methods and the sweep's gated tests; a leak control off chance makes it inconclusive",
                  finding_7a),
    "7b": Finding("the cheapest method near the best also localizes memorization", ("etd",), False,
                  f"among methods (controls excluded) within {NEAR_BEST} of the best median noisy precision@|truth| "
                  f"in decoy, the one with the fewest seconds per target passes 7a (none passes: inconclusive)",
                  finding_7b),
    "7c": Finding("a localization method ranks a memorized label's units first in deployment mode (all track)",
                  ("etd",), True,
                  f"7a's rule with AUROC: above 0.5 (Wilcoxon), median >= {PRECISION_FLOOR}, above its own on clean "
                  f"targets (Mann-Whitney)", finding_7c),
    "7d": Finding("a localization method finds rare examples' units (decoy track)", ("etd",), False,
                  "7a's rule with rare targets against typical clean ones", finding_7d),
    "8a": Finding("noisy examples have higher memorization scores than clean ones", ("plain",), True,
                  f"scores of the named scoring sweep: noisy above clean (one-sided Mann-Whitney), AUC >= {SCORE_AUC}; "
                  f"judged once per scoring sweep, in the first plain cell naming it", finding_8a),
    # not placebo-gated: rare examples are defined by their scores, not by the label noise a
    # placebo removes (under placebo they are still the clean examples only memorizing fits)
    "8b": Finding("rare examples flip with fewer units than typical clean ones", ("plain",), False,
                  "4a's rule for rare vs typical clean targets", finding_8b),
    "8c": Finding("an example's cumulative training loss predicts its memorization score", ("plain",), False,
                  f"Spearman rho of cumulative loss (median over seeds) with the score over all training examples "
                  f">= {PROXY_RHO}, Fisher-z 95% lower bound >= {PROXY_RHO_LOW}; scores from the cell's arch",
                  finding_8c),
}
