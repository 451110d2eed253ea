"""The verdict rules on synthetic table rows (protocol 3): a control for each.

For every placebo-gated finding (and 4b): treatment and control drawn from one distribution, 500
times, give "agree" at most 5% of the time; a clear effect gives "agree"; evidence on the other
side gives "differ"; an effect too small for its n, too few seeds or targets give "inconclusive".
Rows have the columns of ARCHITECTURE.md's tables.
"""
import math
import random
import subprocess

import pytest

from analysis import findings
from analysis import rules as F
from analysis import stats
from analysis.cells import TABLES, Cell, e_star, rewinding_classes

from .conftest import PY

EPOCHS = 10
GROUPS = ("fc1", "fc2", "head")


def evals(rng, mode="plain", final=1.0, extra=None):
    """A train_noisy curve rising to `final` (a window of several epochs), clean 1.0, test 0.9."""
    rows = []
    for e in range(1, EPOCHS + 1):
        acc = {"train_noisy": final * min(1.0, e / 8), "train_clean": 1.0, "train_noisy_true": 0.0, "test": 0.9}
        for k, v in {**acc, **(extra(e, rng) if extra else {})}.items():
            rows.append({"epoch": e, "mode": mode, "subset": k, "accuracy": v, "loss": 0.0, "n": 100})
    return rows


def cell(seed_tables, dropout="none", twin=None, kind="label"):
    c = Cell("s", f"synthetic-{dropout}", 3, dropout, kind)
    for s, t in enumerate(seed_tables):
        c.seeds[s] = {name: t.get(name, []) for name in TABLES}
        c.keys[s] = f"k{s}"
    c.twin = twin
    return c


def agree_rate(make, judge, n=500, seed=0):
    rng = random.Random(seed)
    return sum(judge(make(rng)).verdict == "agree" for _ in range(n)) / n


# ----------------------------------------------------------------------------- 1a, 1b
def grad_seed(rng, noisy_over_control, cos_shift=0.0):
    rows = []
    for e in range(1, EPOCHS + 1):
        for g, name in enumerate(GROUPS):
            control = rng.lognormvariate(0, 0.3)
            noisy = control * noisy_over_control * rng.lognormvariate(0, 0.3)
            cos, ccos = rng.gauss(cos_shift, 0.1), rng.gauss(0, 0.1)
            rows.append({"epoch": e, "layer_index": g, "layer_name": name, "aggregation": "epoch",
                         "clean_norm": noisy, "noisy_norm": noisy, "control_norm": control,
                         "cosine": cos, "control_cosine": ccos})
    return {"evals": evals(rng), "gradients": rows}


def test_1a_null_clear_and_too_few_seeds():
    assert agree_rate(lambda r: cell([grad_seed(r, 1.0) for _ in range(3)]), F.finding_1a) <= 0.05
    assert F.finding_1a(cell([grad_seed(random.Random(1), 5.0) for _ in range(3)])).verdict == "agree"
    v = F.finding_1a(cell([grad_seed(random.Random(1), 5.0) for _ in range(2)]))
    assert v.verdict == "inconclusive" and "2 usable seeds, need 3" in v.reason


def test_1b_null_clear_and_too_few_seeds():
    assert agree_rate(lambda r: cell([grad_seed(r, 1.0, 0.0) for _ in range(3)]), F.finding_1b) <= 0.05
    assert F.finding_1b(cell([grad_seed(random.Random(1), 1.0, -0.6) for _ in range(3)])).verdict == "agree"
    assert F.finding_1b(cell([grad_seed(random.Random(1), 1.0, -0.6)])).verdict == "inconclusive"


def test_gradient_findings_on_a_protocol_1_sweep_are_inconclusive_not_a_crash():
    t = grad_seed(random.Random(0), 5.0)
    for r in t["gradients"]:
        r["control_norm"] = r["control_cosine"] = None  # the column is absent from older fragments
    v = F.finding_1a(cell([t, t, t]))
    assert v.verdict == "inconclusive" and v.reason == "column control_norm absent"


# ----------------------------------------------------------------------------- 2a, 2b
def rewind_seed(rng, p_redundant, critical=None):
    """Rewinding rows at snapshots 0 (e*) and 8; each group redundant with probability p."""
    rows = []
    for g, name in enumerate(GROUPS):
        for e in (0, 8):
            if critical is not None and name in critical:
                noisy, true, clean = 0.1, 0.5, 1.0
            elif rng.random() < p_redundant:
                noisy, true, clean = 0.95, 0.02, 1.0
            else:
                noisy, true, clean = 0.6, 0.3, 1.0
            for subset, a in (("train_noisy", noisy), ("train_noisy_true", true), ("train_clean", clean),
                              ("test", 0.9)):
                rows.append({"layer_index": g, "layer_name": name, "rewind_epoch": e, "subset": subset, "accuracy": a})
    return {"evals": evals(rng), "rewinding": rows}


def rewind_null_seed(rng):
    """Rewound train_noisy and train_noisy_true drawn from one distribution."""
    rows = []
    for g, name in enumerate(GROUPS):
        noisy, true = rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)
        for subset, a in (("train_noisy", noisy), ("train_noisy_true", true), ("train_clean", 1.0), ("test", 0.9)):
            rows.append({"layer_index": g, "layer_name": name, "rewind_epoch": 0, "subset": subset, "accuracy": a})
    return {"evals": evals(rng), "rewinding": rows}


def test_2a_null_clear_and_too_few_seeds():
    assert agree_rate(lambda r: cell([rewind_null_seed(r) for _ in range(3)]), F.finding_2a) <= 0.05
    assert F.finding_2a(cell([rewind_seed(random.Random(1), 1.0) for _ in range(3)])).verdict == "agree"
    assert F.finding_2a(cell([rewind_seed(random.Random(1), 1.0) for _ in range(2)])).verdict == "inconclusive"


def test_rewinding_classes_at_e_star():
    rng = random.Random(0)
    t = rewind_seed(rng, 0.0, critical={"fc2"})
    assert e_star(t["evals"], [0, 8]) == 0  # epoch 8's train_noisy is 1.0 of final: not <= half
    assert rewinding_classes(t["rewinding"], t["evals"]) == {"fc1": "partial", "fc2": "critical", "head": "partial"}


def test_2b_critical_groups_not_final():
    rng = random.Random(0)
    assert F.finding_2b(cell([rewind_seed(rng, 0.0, critical={"fc2"}) for _ in range(3)])).verdict == "agree"
    assert F.finding_2b(cell([rewind_seed(rng, 0.0, critical={"head"}) for _ in range(3)])).verdict == "differ"
    v = F.finding_2b(cell([rewind_seed(rng, 0.0, critical={"fc2"})] + [rewind_seed(rng, 1.0) for _ in range(2)]))
    assert v.verdict == "inconclusive" and "a critical group in 1 seed(s), need 2" in v.reason


# ----------------------------------------------------------------------------- 3
def retrain_seed(rng, gap, converged=True):
    rows = []
    for g, name in enumerate(GROUPS):
        true = rng.uniform(0.2, 0.8)
        noisy = true + gap if gap else rng.uniform(0.2, 0.8)
        for subset, a in (("train_noisy", noisy), ("train_noisy_true", true), ("train_clean", 1.0), ("test", 0.9)):
            rows.append({"layer_index": g, "layer_name": name, "rewind_epoch": 0, "subset": subset, "accuracy": a,
                         "epochs_run": 5, "converged": converged})
    return {"evals": evals(rng), "retraining": rows}


def test_3_null_clear_unconverged_and_too_few_seeds():
    assert agree_rate(lambda r: cell([retrain_seed(r, 0.0) for _ in range(3)]), F.finding_3) <= 0.05
    assert F.finding_3(cell([retrain_seed(random.Random(1), 0.15) for _ in range(3)])).verdict == "agree"
    # unconverged groups are excluded: with none converged every seed drops out
    v = F.finding_3(cell([retrain_seed(random.Random(1), 0.15, converged=False) for _ in range(3)]))
    assert v.verdict == "inconclusive" and "0 usable seeds" in v.reason


# ----------------------------------------------------------------------------- 4a, 4b, 4d
def flip_rows(rng, n, noisy_units, clean_units, random_units, cost_noisy=None, cost_clean=None):
    rows = []
    for i in range(n):
        for kind, units in (("noisy", noisy_units), ("clean", clean_units)):
            ex = i if kind == "noisy" else 1000 + i
            cost = (cost_noisy if kind == "noisy" else cost_clean) or (lambda r: r.uniform(0, 0.02))
            for method, k in (("greedy", units(rng)), ("random", random_units(rng))):
                c = cost(rng)
                rows.append({"example_id": ex, "target_kind": kind, "is_noisy": kind == "noisy", "method": method,
                             "flipped": True, "n_units": k, "units": [{"site": j % 3, "unit": j} for j in range(k)],
                             "pre_test_acc": 0.9, "post_test_acc": 0.9 - c, "pre_clean_acc": 1.0,
                             "post_clean_acc": 1.0, "pre_noisy_acc": 1.0, "post_noisy_acc": 1.0,
                             "site_units": [64, 64, 64]})
    return rows


def same(r):
    return r.randint(2, 40)


def test_4a_null_clear_and_too_few_targets():
    def null(r):
        return cell([{"flips": flip_rows(r, 8, same, same, same)}])
    assert agree_rate(null, F.finding_4a) <= 0.05
    clear = cell([{"flips": flip_rows(random.Random(1), 12, lambda r: r.randint(2, 6), lambda r: r.randint(15, 30),
                                      lambda r: r.randint(300, 900))}])
    assert F.finding_4a(clear).verdict == "agree"
    few = cell([{"flips": flip_rows(random.Random(1), 7, lambda r: 3, lambda r: 30, same)}])
    v = F.finding_4a(few)
    assert v.verdict == "inconclusive" and "7 noisy / 7 clean targets, need 8" in v.reason


def test_4a_needs_beyond_random_order():
    """Noisy targets flip easier under greedy *and* under random order by the same factor: the
    contrast is not about the greedy search, so it does not agree."""
    c = cell([{"flips": flip_rows(random.Random(1), 12, lambda r: r.randint(2, 6), lambda r: r.randint(15, 30),
                                  lambda r: r.randint(2, 6))}])
    # random order's noisy/clean ratio comes from the same draws as greedy's noisy: 4 / 4 = 1 >= greedy's
    assert F.finding_4a(c).verdict == "agree"
    c2 = cell([{"flips": flip_rows(random.Random(1), 12, lambda r: r.randint(8, 10), lambda r: r.randint(15, 30),
                                   lambda r: r.randint(2, 4))}])
    for t in c2.seeds.values():  # random order: noisy targets need far fewer units than clean ones
        for r in t["flips"]:
            if r["method"] == "random" and not r["is_noisy"]:
                r["n_units"] = 400
    assert F.finding_4a(c2).verdict == "differ"


def test_4b_null_clear_and_too_few_targets():
    assert agree_rate(lambda r: cell([{"flips": flip_rows(r, 8, same, same, same)}]), F.finding_4b) <= 0.05
    clear = cell([{"flips": flip_rows(random.Random(1), 8, lambda r: r.randint(2, 9), lambda r: r.randint(2, 9),
                                      lambda r: r.randint(100, 900))}])
    assert F.finding_4b(clear).verdict == "agree"
    v = F.finding_4b(cell([{"flips": flip_rows(random.Random(1), 3, same, same, same)}]))
    assert v.verdict == "inconclusive"


def test_4d_null_clear_and_too_few_targets():
    def null(r):
        return cell([{"flips": flip_rows(r, 8, same, same, same)}])
    assert agree_rate(null, F.finding_4d) <= 0.05
    clear = cell([{"flips": flip_rows(random.Random(1), 10, same, same, same, cost_noisy=lambda r: r.uniform(0, 0.005),
                                      cost_clean=lambda r: r.uniform(0.03, 0.08))}])
    assert F.finding_4d(clear).verdict == "agree"
    assert F.finding_4d(cell([{"flips": flip_rows(random.Random(1), 5, same, same, same)}])).verdict == "inconclusive"


def test_4c_spread_and_not_held_by_the_final_site():
    """Three equal sites: units spread over sites 0 and 1 (none at the final site) agree; spread
    but mostly at the final site differs; all on one site differs (Wilson upper bound < 0.5)."""
    def rows(noisy_sites):
        out = flip_rows(random.Random(1), 12, lambda r: 4, lambda r: 10, same)
        for r in out:
            if r["method"] == "greedy" and r["is_noisy"]:
                r["units"] = [{"site": noisy_sites[j % len(noisy_sites)], "unit": j} for j in range(r["n_units"])]
        return cell([{"flips": out}])

    v = F.finding_4c(rows([0, 1]))
    assert v.verdict == "agree", v
    assert "final site holds 33% of the units" in v.control
    assert F.finding_4c(rows([2, 2, 2, 0])).verdict == "differ"  # the final site holds 3/4 of each edit
    assert F.finding_4c(rows([1])).verdict == "differ"
    few = F.finding_4c(cell([{"flips": flip_rows(random.Random(1), 5, lambda r: 4, same, same)}]))
    assert few.verdict == "inconclusive" and "need 8" in few.reason


def test_4c_of_a_protocol_2_sweep_is_inconclusive():
    out = flip_rows(random.Random(1), 12, lambda r: 4, lambda r: 10, same)
    for r in out:
        r["site_units"] = None  # absent from older fragments
    assert F.finding_4c(cell([{"flips": out}])).reason == "column site_units absent"


def test_one_value_per_example():
    """The same targets in three seeds (same values) give the n and p of one seed: the example,
    not the (example, seed) pair, is the unit."""
    one = flip_rows(random.Random(1), 10, lambda r: r.randint(2, 6), lambda r: r.randint(8, 30),
                    lambda r: r.randint(300, 900))
    single, triple = F.finding_4a(cell([{"flips": one}])), F.finding_4a(cell([{"flips": one}] * 3))
    assert (single.n, single.p, single.verdict) == (triple.n, triple.p, triple.verdict) and single.n == 20
    assert stats.per_example({(0, 7): 1.0, (1, 7): 3.0, (2, 7): math.inf, (0, 8): 2.0}) == {7: 3.0, 8: 2.0}


def test_an_underpowered_effect_on_the_papers_side_is_inconclusive_not_differ():
    """1a with noisy/control a little above 2 in two seeds and below in one: the interval spans
    0, so neither side; 4d with noisy edits a bit cheaper but 8 targets each: not significant."""
    def seed(r, ratio):
        return grad_seed(r, ratio)
    c = cell([seed(random.Random(1), 3.0), seed(random.Random(2), 2.6), seed(random.Random(3), 1.6)])
    v = F.finding_1a(c)
    assert v.verdict == "inconclusive" and v.reason.startswith("underpowered: interval"), v
    weak = cell([{"flips": flip_rows(random.Random(3), 8, same, same, same, cost_noisy=lambda r: r.uniform(0, 0.02),
                                     cost_clean=lambda r: r.uniform(0.005, 0.025))}])
    v = F.finding_4d(weak)
    assert v.verdict == "inconclusive" and v.reason.startswith("underpowered"), v


# ----------------------------------------------------------------------------- 5a, 5b
def etd_seed(rng, drop_noisy, test_shift=0.0):
    def extra(e, r):
        return {}
    rows = []
    for mode, noisy in (("own", 1.0), ("all", 0.9), ("drop", drop_noisy(rng))):
        for subset, a in (("train_noisy", noisy), ("train_clean", 0.99), ("train_noisy_true", 0.0),
                          ("test", 0.93 + test_shift + rng.gauss(0, 0.003))):
            if mode == "own" and subset == "test":
                continue
            rows.append({"epoch": EPOCHS, "mode": mode, "subset": subset, "accuracy": a, "loss": 0.0, "n": 100})
    return {"evals": rows}


def twin_cell(rng, n):
    return cell([{"evals": evals(rng, extra=lambda e, r: {"test": 0.93 + r.gauss(0, 0.003)})} for _ in range(n)])


def test_5a_null_clear_and_too_few_seeds():
    def null(r):  # drop mode drawn like own mode: nothing is forgotten
        return cell([etd_seed(r, lambda q: q.uniform(0.9, 1.0)) for _ in range(3)], "example_tied", twin_cell(r, 3))
    assert agree_rate(null, F.finding_5a) <= 0.05
    r = random.Random(1)
    clear = cell([etd_seed(r, lambda q: q.uniform(0.0, 0.04), 0.01) for _ in range(3)], "example_tied", twin_cell(r, 3))
    assert F.finding_5a(clear).verdict == "agree"
    few = cell([etd_seed(r, lambda q: 0.02) for _ in range(2)], "example_tied", twin_cell(r, 2))
    assert F.finding_5a(few).verdict == "inconclusive"
    assert F.finding_5a(cell([etd_seed(r, lambda q: 0.02)] * 3, "example_tied")).reason == "no plain twin in the sweep"


def test_score_findings_wait_for_memorization_scores():
    for fid, kind in (("5b", "example_tied"), ("8a", "none"), ("8b", "none"), ("8c", "none")):
        v = F.FINDINGS[fid].judge(cell([{}], kind))
        assert v.verdict == "inconclusive" and v.reason.startswith("no memorization scores"), fid


def scored(c, scores, name="ms"):
    c.memscores, c.scores = name, {i: {"example_id": i, "is_noisy": noisy, "score": s}
                                   for i, (noisy, s) in scores.items()}
    return c


def test_5b_counts_each_example_once_and_compares_scores():
    """An example forgotten in 2 of its 3 seeds is forgotten, in 1 of 3 kept; every example counts
    once (its score is one value). Forgotten examples with high scores: agree, AUC 1; with the
    same scores as the kept ones: differ."""
    def etd(forgot_in: dict[int, int]):  # example -> seeds (of 3) drop forgets it
        return [{"etd_examples": [{"example_id": i, "is_noisy": False, "own_correct": True,
                                   "drop_correct": s >= n} for i, n in forgot_in.items()]} for s in range(3)]
    forgot = {**{i: 2 for i in range(10)}, **{i: 1 for i in range(10, 40)}}
    high = {i: (False, 0.9 if i < 10 else 0.1) for i in range(40)}
    v = F.finding_5b(scored(cell(etd(forgot), "example_tied"), high))
    assert v.verdict == "agree" and v.n == 40 and "(n=10)" in v.value and "(n=30)" in v.value and "AUC 1.000" in v.value
    same = {i: (False, 0.1 * (i % 4)) for i in range(40)}  # no evidence either way
    v = F.finding_5b(scored(cell(etd(forgot), "example_tied"), same))
    assert v.verdict == "inconclusive" and v.reason.startswith("underpowered")
    low = {i: (False, 0.1 if i < 10 else 0.9) for i in range(40)}  # forgotten ones score lower: the other side
    assert F.finding_5b(scored(cell(etd(forgot), "example_tied"), low)).verdict == "differ"
    # too few forgotten examples with a score: inconclusive
    assert F.finding_5b(scored(cell(etd({**{i: 3 for i in range(5)}, **{i: 0 for i in range(5, 40)}}),
                                    "example_tied"), high)).verdict == "inconclusive"


def test_8a_is_judged_once_per_scoring_sweep_and_differs_without_a_gap():
    rng = random.Random(0)
    gap = {i: (i < 20, rng.uniform(0.6, 1.0) if i < 20 else rng.uniform(0.0, 0.2)) for i in range(200)}
    none = {i: (i < 20, rng.uniform(0.0, 0.2)) for i in range(200)}  # the placebo's picture
    a, b = scored(cell([{}], "none"), gap), scored(cell([{}], "none"), gap)
    b.name = "synthetic-other"
    verdicts = [v for v in findings.judge_sweep([a, b]) if v.id == "8a"]
    assert [v.verdict for v in verdicts] == ["agree"] and verdicts[0].n == 200
    assert F.finding_8a(scored(cell([{}], "none"), none)).verdict == "differ"


def test_8c_cumulative_loss_against_the_scores():
    """Loss that tracks the score (per seed, noisy): agree, with the median over seeds as each
    example's one value; unrelated loss: differ (the interval wholly below 0.5); a weak relation
    on few examples: inconclusive; scores from another arch: inconclusive naming both."""
    rng = random.Random(0)
    n = 400
    scores = {i: (i < 40, rng.betavariate(0.5, 2) if i >= 40 else rng.uniform(0.6, 1.0)) for i in range(n)}

    def stats_cell(loss, arch="mlp", ids=range(n)):
        seeds = [{"example_stats": [{"example_id": i, "is_noisy": scores[i][0], "cum_loss": loss(i, s),
                                     "learn_epoch": None if scores[i][1] > 0.9 else 1 + int(10 * scores[i][1])}
                                    for i in ids],
                  "evals": [{"epoch": 10, "mode": "plain", "subset": "train_clean", "accuracy": 1.0}]}
                 for s in range(3)]
        c = scored(cell(seeds, "none"), {i: scores[i] for i in ids})
        c.arch = "mlp"
        for r in c.scores.values():
            r["arch"] = arch
        return c
    v = F.finding_8c(stats_cell(lambda i, s: 30 * scores[i][1] + rng.gauss(0, 3)))
    assert v.verdict == "agree" and v.n == n and v.id == "8c"
    rho = float(v.value.split("rho ")[1].split(" ")[0])
    assert rho > 0.8 and "clean examples alone rho" in v.control
    # the learning epoch rises with the score; never learned (None) counts as after the last epoch
    assert float(v.control.split("learning epoch rho ")[1].split(";")[0]) > 0.8
    v = F.finding_8c(stats_cell(lambda i, s: rng.gauss(0, 1)))
    assert v.verdict == "differ" and v.reason == ""
    v = F.finding_8c(stats_cell(lambda i, s: 3 * scores[i][1] + rng.gauss(0, 1), ids=range(30, 50)))
    assert v.verdict == "inconclusive" and v.reason.startswith("underpowered: rho")
    v = F.finding_8c(stats_cell(lambda i, s: scores[i][1], arch="resnet9"))
    assert v.verdict == "inconclusive" and v.reason == "the scores come from resnet9 models, the cell is mlp"
    assert F.finding_8c(cell([{}], "none")).reason.startswith("no memorization scores")


def test_8b_rare_targets_against_typical_clean_ones():
    def rows(rare_units, clean_units):
        out = []
        for i in range(12):
            for kind, units, rnd in (("rare", rare_units, 300), ("clean", clean_units, 320)):
                for method, k in (("greedy", units), ("random", rnd)):
                    out.append({"example_id": i + (100 if kind == "clean" else 0), "target_kind": kind,
                                "is_noisy": False, "method": method, "flipped": True, "n_units": k + i % 3})
        return [{"flips": out}]
    assert F.finding_8b(scored(cell(rows(3, 12), "none"), {})).verdict == "agree"
    assert F.finding_8b(scored(cell(rows(12, 12), "none"), {})).verdict == "differ"


# ----------------------------------------------------------------------------- Holm, placebo twins, CLI
def test_holm():
    assert stats.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)
    cells = [cell([grad_seed(random.Random(i), 5.0) for _ in range(3)]) for i in range(3)]
    out = findings.judge_sweep(cells)
    assert {v.id for v in out} >= {"1a", "1b", "2a", "2b", "3", "4a", "4b", "4c", "4d"}
    assert all("Holm" in v.interval_or_p for v in out if v.gated and not math.isnan(v.p))


def test_an_agree_that_fails_holm_is_inconclusive_never_differ():
    """Thirty 4d cells with a moderate effect: each agrees alone (p about 0.0002-0.01), and the ones
    Holm's correction over the thirty rejects become inconclusive, not differ."""
    def c(i):
        return cell([{"flips": flip_rows(random.Random(i), 10, same, same, same, cost_noisy=lambda r: r.uniform(0, 0.02),
                                         cost_clean=lambda r: r.uniform(0.008, 0.038))}])
    cells = [c(i) for i in range(30)]
    alone = [F.finding_4d(x) for x in cells]
    judged = [v for v in findings.judge_sweep(cells) if v.id == "4d"]
    failed = [v for a, v in zip(alone, judged) if a.verdict == "agree" and v.verdict != "agree"]
    assert failed and all(v.verdict == "inconclusive" and v.reason.startswith("fails Holm") for v in failed)


def test_a_label_cells_agree_yields_to_its_placebo_twin():
    """A label cell whose 1a agrees: its placebo twin agreeing at raw p < 0.05 makes it
    inconclusive; a null twin leaves it agreeing with placebo_twin set; no twin says so; 2a is
    vacuous under placebo."""
    label = cell([grad_seed(random.Random(i), 5.0) for i in range(3)])
    twin = cell([grad_seed(random.Random(10 + i), 5.0) for i in range(3)], kind="placebo")
    label.placebo, twin.window_from = twin, label
    v = {x.id: x for x in findings.judge_sweep([label, twin]) if x.noise_kind == "label"}
    assert v["1a"].verdict == "inconclusive" and v["1a"].reason == "its placebo twin agrees"
    assert v["1a"].placebo_twin == "agree"
    assert v["2a"].reason.startswith("no rewinding rows") or v["2a"].reason == "placebo: vacuous"
    null_twin = cell([grad_seed(random.Random(20 + i), 1.0) for i in range(3)], kind="placebo")
    label2 = cell([grad_seed(random.Random(i), 5.0) for i in range(3)])
    label2.placebo, null_twin.window_from = null_twin, label2
    v = {x.id: x for x in findings.judge_sweep([label2, null_twin]) if x.noise_kind == "label"}
    assert v["1a"].verdict == "agree" and v["1a"].placebo_twin in ("differ", "inconclusive")
    alone = {x.id: x for x in findings.judge_sweep([cell([grad_seed(random.Random(i), 5.0) for i in range(3)])])}
    assert alone["1a"].verdict == "agree" and alone["1a"].reason == "no placebo twin in this sweep"
    assert alone["1a"].placebo_twin is None
    # a twin only ever downgrades an agree: a differ's reason does not mention one
    null = {x.id: x for x in findings.judge_sweep([cell([grad_seed(random.Random(20 + i), 1.0) for i in range(3)])])}
    assert null["1a"].verdict == "differ" and null["1a"].reason == ""
    rew = {x.id: x for x in findings.judge_sweep([cell([rewind_seed(random.Random(1), 1.0) for _ in range(3)])])}
    assert rew["2a"].verdict == "agree" and rew["2a"].reason == "placebo: vacuous"


def test_cli_bad_input_exits_2(tmp_path):
    p = subprocess.run([PY, "-m", "analysis.findings", "--format", "xml", "--results-dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--format='xml' is invalid" in p.stderr and p.stdout == ""


# ----------------------------------------------------------------------------- 7a-7d (localization)
def loc_rows(rng, n, noisy_prec, clean_prec, methods=("zero_out", "grad_x_act"), control=None, track="decoy",
             chance=0.5):
    """Rows at k = |truth| = 40; the controls (mask_only, class_mean, random) at chance unless
    `control` draws them."""
    rows = []
    metric = "precision" if track == "decoy" else "auroc"
    for i in range(n):
        for kind, prec in (("noisy", noisy_prec), ("clean", clean_prec)):
            ex = i if kind == "noisy" else 1000 + i
            for m in (*methods, "mask_only", "class_mean", "random"):
                if m in methods:
                    v = prec(rng)
                else:
                    v = (control or (lambda r: (0.5 if metric == "auroc" else chance) + r.uniform(-0.05, 0.05)))(rng)
                rows.append({"example_id": ex, "target_kind": kind, "track": track, "method": m, "k": 40,
                             "n_truth": 40, "chance": chance, metric: v, "flipped": True, "units_to_flip": 5,
                             "seconds": 0.01 if m == "grad_x_act" else 0.5})
    return {"localization": rows}


def _u(r):
    return r.uniform(0.4, 0.6)


def test_7a_null_clear_leak_and_too_few_targets():
    def null(r):
        return cell([loc_rows(r, 8, _u, _u)], "example_tied")
    rate = sum(v.verdict == "agree" for i in range(200) for v in F.finding_7a(null(random.Random(i)))) / 400
    assert rate <= 0.05
    clear = F.finding_7a(cell([loc_rows(random.Random(1), 10, lambda r: r.uniform(0.7, 0.9), _u)], "example_tied"))
    assert [v.verdict for v in clear] == ["agree", "agree"]
    assert clear[0].method == "grad_x_act" and clear[0].track == "decoy"
    below = F.finding_7a(cell([loc_rows(random.Random(1), 10, lambda r: r.uniform(0.2, 0.4), _u)], "example_tied"))
    assert {v.verdict for v in below} == {"differ"}
    leak = F.finding_7a(cell([loc_rows(random.Random(1), 10, lambda r: r.uniform(0.7, 0.9), _u,
                                       control=lambda r: r.uniform(0.7, 0.9))], "example_tied"))
    assert {(v.verdict, v.reason) for v in leak} == {("inconclusive", "leak: mask_only, class_mean, random")}
    few = F.finding_7a(cell([loc_rows(random.Random(1), 5, _u, _u)], "example_tied"))
    assert {v.verdict for v in few} == {"inconclusive"}
    # 7b: the cheapest method within 0.05 of the best, and whether it passes 7a
    b = F.finding_7b(cell([loc_rows(random.Random(1), 10, lambda r: r.uniform(0.7, 0.9), _u)], "example_tied"))
    assert b.verdict == "agree" and "cheapest within 0.05: grad_x_act" in b.value and b.method == "grad_x_act"
    nb = F.finding_7b(cell([loc_rows(random.Random(1), 10, _u, _u)], "example_tied"))
    assert nb.verdict == "inconclusive" and nb.reason == "no method passes 7a"
    assert F.finding_7b(cell([{}], "example_tied")).verdict == "inconclusive"


def test_7c_judges_auroc_in_the_all_track_and_7d_waits_for_scores():
    c = cell([loc_rows(random.Random(1), 10, lambda r: r.uniform(0.7, 0.95), _u, track="all", chance=0.1)],
             "example_tied")
    v = F.finding_7c(c)
    assert [x.verdict for x in v] == ["agree", "agree"] and {x.track for x in v} == {"all"}
    assert F.finding_7a(c)[0].reason == "no localization rows in track decoy"
    d = F.finding_7d(cell([{}], "example_tied"))
    assert d[0].verdict == "inconclusive" and d[0].reason.startswith("no memorization scores")


def test_verdicts_as_data_keep_the_reason_apart_and_name_the_method():
    """json/csv rows: `verdict` is one of three words, why is in `reason`; every 7a row names its
    method and track in their own fields and in the text table."""
    import csv
    import io
    import json

    vs = F.finding_7a(cell([loc_rows(random.Random(1), 10, lambda r: r.uniform(0.7, 0.9), _u)], "example_tied"))
    vs.append(F.finding_1a(cell([grad_seed(random.Random(1), 5.0) for _ in range(2)])))  # too few seeds
    rows = json.loads(findings.render(vs, "json"))
    assert [r["verdict"] for r in rows] == ["agree", "agree", "inconclusive"]
    assert rows[2]["reason"] == "2 usable seeds, need 3" and rows[0]["reason"] == ""
    assert [r["method"] for r in rows] == ["grad_x_act", "zero_out", None]
    assert [r["track"] for r in rows] == ["decoy", "decoy", None]
    assert all(set(findings.COLUMNS) == set(r) for r in rows)
    got = [r["verdict"] for r in csv.DictReader(io.StringIO(findings.render(vs, "csv")))]
    assert got == ["agree", "agree", "inconclusive"]
    text = findings.render(vs, "table").splitlines()
    assert any(line.startswith("7a ") and " grad_x_act (decoy) " in line for line in text)
    assert any(line.startswith("7a ") and " zero_out (decoy) " in line for line in text)
    assert any(line.startswith("1a ") and "inconclusive (2 usable seeds, need 3)" in line for line in text)
    assert text[0].startswith("Reproduction scorecard")  # the table opens with the scorecard


def test_scorecard_quotes_the_paper_and_the_matrix_puts_twins_beside_their_cells():
    from analysis import scorecard as SC

    label = cell([grad_seed(random.Random(i), 5.0) for i in range(3)])
    twin = cell([grad_seed(random.Random(10 + i), 1.0) for i in range(3)], kind="placebo")
    label.name, twin.name = "digits-mlp512-plain-n0.1", "digits-mlp512-plain-n0.1placebo"
    other = cell([grad_seed(random.Random(20 + i), 5.0) for i in range(3)])
    other.name = "digits-lenet40-plain-n0.1"
    label.placebo, twin.window_from = twin, label
    vs = findings.judge_sweep([label, twin, other])
    rows = {r["id"]: r for r in SC.scorecard(vs)}
    assert set(rows) == {v.id for v in vs} and rows["4a"]["paper"].startswith("about 5 units")
    assert rows["1a"]["paper"] == "qualitative"
    assert rows["1a"]["verdict"] == "mlp w512 plain: agree; lenet w40 plain: agree"
    assert rows["2a"]["reason"].startswith("mlp w512 plain: no rewinding rows; lenet w40 plain: no rewinding rows")
    assert "placebo" not in rows["1a"]["this sweep"]  # label cells only
    r, cols, grid = SC.matrix(vs)
    assert cols == ["digits-lenet40-plain-n0.1", "digits-mlp512-plain-n0.1", "digits-mlp512-plain-n0.1placebo"]
    assert r[:2] == ["1a", "1b"] and grid[("1a", "digits-mlp512-plain-n0.1")] == "agree"
    assert SC.matrix_png(vs)[:8] == b"\x89PNG\r\n\x1a\n"
    # cells that would share a short name keep their full names, in the scorecard and the matrix
    assert SC.names(["digits-mlp512-plain-n0.1", "mnist1d-mlp512-plain-n0.1", "digits-lenet40-plain-n0.1"]) == {
        "digits-mlp512-plain-n0.1": "digits-mlp512-plain-n0.1", "mnist1d-mlp512-plain-n0.1": "mnist1d-mlp512-plain-n0.1",
        "digits-lenet40-plain-n0.1": "lenet w40 plain"}
    # the localization findings get one matrix row per method (7a, 7c and 7d alike)
    loc = F.finding_7a(cell([loc_rows(random.Random(1), 10, lambda r: r.uniform(0.7, 0.9), _u)], "example_tied"))
    for v in loc:
        v.id = "7d"
    rows7, _, _ = SC.matrix(loc)
    assert rows7 == ["7d grad_x_act (decoy)", "7d zero_out (decoy)"]
