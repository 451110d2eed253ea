"""python -m analysis.report: one self-contained HTML page of the paper's figures and findings.

    python -m analysis.report                                   # every sweep under ./results
    python -m analysis.report --results-dir results --sweep dropout_grid-default --out report
    python -m analysis.report --sweep sweepA --sweep sweepB     # two sweeps side by side

Writes `<out>/index.html` (default `report/`) with PNG figures embedded, rebuilt from the Parquet
tables alone: per plain trial (no ETD) the gradient-accounting, rewinding, retraining and flip
figures; per ETD trial its accuracy per mode and subset beside its plain twin; and a findings
table: each of the paper's findings (EXPERIMENTS.md), the value measured in each sweep, the
paper's, and whether they agree, with the criterion used.

Exit codes: 0 written; 1 the store cannot be read (missing, or a corrupt fragment, named); 2 bad
input (unknown sweep).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from collections import defaultdict
from typing import Any

from memray import plots
from memray.config import ExperimentConfig
from memray.tables import write_local

from . import findings
from .store import Store, open_for_cli

Entry = dict[str, Any]  # finding, cell, paper, measured, verdict, criterion


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results", help="local path or URI [results]")
    p.add_argument("--sweep", action="append", default=None, help="a sweep to include (repeat for several) [all]")
    p.add_argument("--out", default="report", help="output folder [report]")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out unreadable fragments (named in the output) instead of failing")
    return p


def _rows(store: Store, table: str, sweep: str, key: str) -> list[dict]:
    return store.rows(f"select * from {table} where sweep = ? and trial_key = ?", [sweep, key])


def twin_key(config_json: str) -> str:
    """trial_key of the plain twin: the same recipe with dropout none (as the grid builds it)."""
    d = json.loads(config_json)
    d["dropout"] = {"kind": "none"}
    return ExperimentConfig.from_dict(d).trial_key


def _final(evals: list[dict], mode: str, subset: str) -> float:
    sel = [r for r in evals if r["mode"] == mode and r["subset"] == subset]
    if not sel:
        return math.nan
    last = max(r["epoch"] for r in sel)
    return next(r["accuracy"] for r in sel if r["epoch"] == last)


def _fmt(v: float, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("agree" if ok else "differ")


def plain_findings(store: Store, sweep: str, t: dict) -> tuple[list[Entry], dict[str, list[dict]]]:
    """Findings 1-4 for one plain trial; also returns its analysis rows for the figures."""
    key, cell = t["trial_key"], f"{t['dataset']}/{t['arch']} noise {t['noise_rate']:g} seed {t['seed']}"
    tabs = {name: _rows(store, name, sweep, key) for name in ("gradients", "rewinding", "retraining", "flips")}
    evals = _rows(store, "evals", sweep, key)
    out: list[Entry] = []
    if tabs["gradients"]:
        g = findings.gradient_findings(tabs["gradients"], t["noise_rate"])
        share = g["noisy_grad_norm_share"]
        low = min(share.values()) if share else math.nan
        out.append({"finding": "1. Noisy examples' gradient norm is of the same order as clean examples'",
                    "cell": cell, "paper": "noisy share of gradient norm >> noisy share of data, every group",
                    "measured": f"min over groups {_fmt(low, True)} vs data {_fmt(t['noise_rate'], True)}",
                    "verdict": _verdict(None if math.isnan(low) else low > t["noise_rate"]),
                    "criterion": "every group's noisy / (clean + noisy) norm share > noise rate"})
        pts = [r for r in tabs["gradients"] if not math.isnan(r["cosine"])]
        neg = sum(r["cosine"] < 0 for r in pts) / len(pts) if pts else math.nan
        out.append({"finding": "1. Clean and noisy gradients point in opposing directions",
                    "cell": cell, "paper": "negative cosine through much of training",
                    "measured": f"{_fmt(neg, True)} of (group, epoch) cosines < 0",
                    "verdict": _verdict(None if math.isnan(neg) else neg >= 0.5),
                    "criterion": ">= 50% of (group, epoch) points have cosine < 0"})
    final_noisy = _final(evals, "plain", "train_noisy")
    if tabs["rewinding"]:
        r = findings.rewinding_findings(tabs["rewinding"], final_noisy)
        out.append({"finding": "2. Rewinding one group leaves memorization largely intact",
                    "cell": cell, "paper": "most groups keep train_noisy accuracy",
                    "measured": f"{r['n_groups_keeping']}/{r['n_groups']} groups keep >= 80% of "
                                f"train_noisy {_fmt(final_noisy)} after rewinding to epoch 0",
                    "verdict": _verdict(r["n_groups_keeping"] > r["n_groups"] / 2 if r["n_groups"] else None),
                    "criterion": "more than half of the groups keep >= 80% of final train_noisy accuracy"})
    if tabs["retraining"]:
        r = findings.retraining_findings(tabs["retraining"])
        out.append({"finding": "3. Retraining one group on clean data keeps memorization",
                    "cell": cell, "paper": "for most groups, noisy given labels still predicted",
                    "measured": f"{r['n_groups_still_memorizing']}/{r['n_groups']} groups still predict "
                                f"> 50% of noisy labels",
                    "verdict": _verdict(r["n_groups_still_memorizing"] > r["n_groups"] / 2 if r["n_groups"] else None),
                    "criterion": "more than half of the groups still predict > 50% of noisy given labels"})
    if tabs["flips"]:
        f = findings.flip_findings(tabs["flips"], _final(evals, "plain", "test"))
        gn, gc, rn = f["greedy_noisy_median"], f["greedy_clean_median"], f["random_noisy_median"]
        out.append({"finding": "4. Noisy examples flip after far fewer units than clean ones",
                    "cell": cell, "paper": "about 5 units for noisy examples, many more for clean",
                    "measured": f"median greedy units: noisy {_fmt(gn)}, clean {_fmt(gc)} (random: noisy {_fmt(rn)})",
                    "verdict": _verdict(None if math.isnan(gn) or math.isnan(gc) else gn < gc),
                    "criterion": "greedy median for noisy targets < for clean targets"})
        drop = f.get("median_test_drop_noisy_targets", math.nan)
        out.append({"finding": "4. The flipping units are spread over sites; the edit costs little",
                    "cell": cell, "paper": "several sites; small accuracy cost elsewhere",
                    "measured": f"sites {f['greedy_sites']}; median test drop {_fmt(100 * drop)} points",
                    "verdict": _verdict(None if math.isnan(drop) else len(f["greedy_sites"]) >= 2 and drop <= 0.02),
                    "criterion": "greedy units on >= 2 sites and median post-edit test drop <= 2 points"})
    return out, tabs


def etd_findings(store: Store, sweep: str, t: dict, twin: dict | None) -> tuple[list[Entry], list[dict]]:
    key = t["trial_key"]
    cell = f"{t['dataset']}/{t['arch']} p_gen {t['p_gen']:g} p_mem {t['p_mem']:g} noise {t['noise_rate']:g}"
    evals = _rows(store, "evals", sweep, key)
    twin_evals = _rows(store, "evals", sweep, twin["trial_key"]) if twin else []
    own, drop = _final(evals, "own", "train_noisy"), _final(evals, "drop", "train_noisy")
    clean, test = _final(evals, "drop", "train_clean"), _final(evals, "drop", "test")
    plain_test = _final(twin_evals, "plain", "test")
    out = [{"finding": "5. ETD: dropping memorization units forgets the memorized examples",
            "cell": cell, "paper": "train_noisy 100% (own) -> 3% (drop)",
            "measured": f"own {_fmt(own, True)} -> drop {_fmt(drop, True)} (true labels under drop: "
                        f"{_fmt(_final(evals, 'drop', 'train_noisy_true'), True)})",
            "verdict": _verdict(None if math.isnan(own) or math.isnan(drop) else own >= 0.95 and drop <= 0.05),
            "criterion": "own train_noisy >= 95% and drop train_noisy <= 5%"},
           {"finding": "5. ETD: clean accuracy holds and the generalization gap shrinks",
            "cell": cell, "paper": "train_clean stays high; drop test >= plain twin's test",
            "measured": f"drop train_clean {_fmt(clean, True)}, drop test {_fmt(test, True)} vs plain twin "
                        f"{_fmt(plain_test, True)}",
            "verdict": _verdict(None if math.isnan(plain_test) or math.isnan(clean) else
                                clean >= 0.95 and test >= plain_test - 0.01),
            "criterion": "drop train_clean >= 95% and drop test >= twin test - 1 point"}]
    return out, evals + [r for r in twin_evals if r["mode"] == "plain"]


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def build(store: Store, sweeps: list[str]) -> tuple[str, dict[str, list[Entry]], int]:
    """(html, {sweep: findings}, number of figures)."""
    entries: dict[str, list[Entry]] = {}
    sections, n_fig = [], 0
    for sweep in sweeps:
        trials = store.rows("select * from trials where sweep = ? and status = 'done' order by dataset, arch, "
                            "dropout, p_gen, p_mem, seed, trial_key", [sweep])
        by_key = {t["trial_key"]: t for t in trials}
        entries[sweep] = []
        figs = []
        for t in trials:
            title = f"{sweep}: {t['dataset']} / {t['arch']} / {t['dropout']} (trial {t['trial_key']})"
            if t["dropout"] == "none":
                found, tabs = plain_findings(store, sweep, t)
                entries[sweep] += found
                for name, fn in plots.FIGURES.items():
                    if tabs[name]:
                        figs.append(_img(plots.png(fn(tabs[name], title)), f"{name} {t['trial_key']}"))
            elif t["dropout"] == "example_tied":
                found, rows = etd_findings(store, sweep, t, by_key.get(twin_key(t["config_json"])))
                entries[sweep] += found
                if rows:
                    figs.append(_img(plots.png(plots.etd_figure(rows, title)), f"etd {t['trial_key']}"))
        n_fig += len(figs)
        failed = store.rows("select trial_key, error from trials where sweep = ? and status = 'failed'", [sweep])
        sections.append(f"<h2>Sweep {html.escape(sweep)}</h2><p>{len(trials)} finished trials"
                        + (f"; {len(failed)} failed: " + ", ".join(html.escape(f"{r['trial_key']} ({r['error']})")
                                                                 for r in failed) if failed else "")
                        + "</p><div class='figs'>" + "\n".join(figs) + "</div>")
    return _page(sweeps, entries, sections, store), entries, n_fig


def _page(sweeps: list[str], entries: dict[str, list[Entry]], sections: list[str], store: Store) -> str:
    keys: dict[tuple[str, str], dict] = {}
    for sweep in sweeps:
        for e in entries[sweep]:
            keys.setdefault((e["finding"], e["cell"]), {"paper": e["paper"], "criterion": e["criterion"]})[sweep] = e
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sweeps)
    body = []
    for (finding, cell), row in sorted(keys.items()):
        cols = "".join(
            f"<td class='{row[s]['verdict']}'>{html.escape(row[s]['measured'])}<br><b>{row[s]['verdict']}</b></td>"
            if s in row else "<td>-</td>" for s in sweeps)
        body.append(f"<tr><td>{html.escape(finding)}</td><td>{html.escape(cell)}</td>"
                    f"<td>{html.escape(row['paper'])}</td>{cols}<td>{html.escape(row['criterion'])}</td></tr>")
    counts = {s: defaultdict(int) for s in sweeps}
    for s in sweeps:
        for e in entries[s]:
            counts[s][e["verdict"]] += 1
    tally = "; ".join(f"{html.escape(s)}: {c['agree']} agree, {c['differ']} differ" for s, c in counts.items())
    skipped = "".join(f"<li>skipped corrupt fragment {html.escape(p)}: {html.escape(r)}</li>" for p, r in store.skipped)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Memorization localization report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}} .agree{{background:#e6f4e6}}
.differ{{background:#fbe3e3}} .figs img{{max-width:48%;margin:4px;border:1px solid #eee}}</style></head><body>
<h1>Where is memorization stored? Findings vs Maini et al. (ICML 2023)</h1>
<p>Results: {html.escape(store.results)}; sweeps: {html.escape(", ".join(sweeps))}. {tally}.</p>
{"<ul>" + skipped + "</ul>" if skipped else ""}
<h2>Findings</h2><table><tr><th>finding</th><th>cell</th><th>paper</th>{head}<th>criterion</th></tr>
{"".join(body)}</table>
{"".join(sections)}
</body></html>
"""


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    store = open_for_cli(args.results_dir, args.skip_corrupt)
    if store is None:
        return 1
    known = [r["sweep"] for r in store.rows("select distinct sweep from trials order by sweep")]
    sweeps = args.sweep or known
    unknown = [s for s in sweeps if s not in known]
    if not known:
        print(f"error: no sweep under {args.results_dir} has finished a trial yet: nothing to report",
              file=sys.stderr)
        return 1
    if unknown:
        print(f"error: --sweep={unknown[0]!r} is invalid: sweeps with trials under "
              f"{args.results_dir}: {known}", file=sys.stderr)
        return 2
    page, entries, n_fig = build(store, sweeps)
    write_local(os.path.join(args.out, "index.html"), page.encode())
    agree = sum(e["verdict"] == "agree" for v in entries.values() for e in v)
    total = sum(len(v) for v in entries.values())
    print(f"wrote {os.path.join(args.out, 'index.html')}: {len(sweeps)} sweep(s), {n_fig} figures, "
          f"{total} findings ({agree} agree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
