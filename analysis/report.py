"""python -m analysis.report: one self-contained HTML page of the findings and their figures.

    python -m analysis.report                                   # every sweep under ./results
    python -m analysis.report --results-dir results --sweep dropout_grid-default --out report
    python -m analysis.report --sweep sweepA --sweep sweepB     # two sweeps, one after the other

Writes `<out>/index.html` (default `report/`), rebuilt from the results store alone. Per sweep: a
summary (one line per finding across cells, e.g. "4a: agree in 2/2 plain cells"), the per-cell
verdict table of `analysis.findings` (seeds pooled, controls, intervals, Holm), then per cell its
figures (gradient norms with the control; rewinding classes as a groups x snapshots map; the flip
edits' collateral, noisy vs clean targets; ETD accuracy over epochs per mode and subset; the clean
examples `drop` forgets beside kept ones, drawn by the trial), then per-trial detail.

Exit codes: 0 written; 1 the store cannot be read (missing, or a corrupt fragment, named); 2 bad
input (unknown sweep).
"""
from __future__ import annotations

import base64
import html
import os
import sys
from collections import defaultdict

from memray import plots, tables
from memray.exiting import exiting
from memray.tables import write_local

from .findings import (
    Cell,
    Verdict,
    forgotten_and_kept,
    html_table,
    judge_sweep,
    load_cells,
    proxy_values,
    rewinding_classes,
    summary_lines,
)
from .scorecard import matrix_png, scorecard_html
from .store import Store, open_for_cli, store_parser


def parser():
    p = store_parser("python -m analysis.report", __doc__)
    p.add_argument("--out", default="report", help="output folder [report]")
    return p


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def cell_figures(store: Store, cell: Cell) -> list[str]:
    """The cell's figures: pooled over its seeds, or the first seed's where one trial is shown."""
    figs = []
    first = min(cell.seeds)
    t = cell.seeds[first]
    grads = [r for tt in cell.seeds.values() for r in tt["gradients"] if r.get("control_norm") is not None]
    if grads:
        figs.append(_img(plots.png(plots.gradient_control_figure(grads, f"{cell.name}: gradient accounting "
                                                                        f"({len(cell.seeds)} seeds)")), "gradients"))
    if t["rewinding"]:
        epochs = sorted({r["rewind_epoch"] for r in t["rewinding"]})
        per_epoch = [rewinding_classes(t["rewinding"], t["evals"], at=e) or {} for e in epochs]
        groups = list(per_epoch[0])
        grid = [[pe.get(g, "") for pe in per_epoch] for g in groups]
        figs.append(_img(plots.png(plots.class_map_figure(groups, epochs, grid,
                                                          f"{cell.name} seed {first}: rewinding classes")), "classes"))
    flips = [r for tt in cell.seeds.values() for r in tt["flips"]
             if r["method"] == "greedy" and r["flipped"] and r.get("pre_test_acc") is not None]
    if flips:
        costs = defaultdict(list)
        for r in flips:
            costs[r.get("target_kind") or ("noisy" if r["is_noisy"] else "clean")].append(
                r["pre_test_acc"] - r["post_test_acc"])
        figs.append(_img(plots.png(plots.flip_cost_figure(dict(costs), f"{cell.name}: flip edits' collateral")),
                         "flip collateral"))
    loc = [r for tt in cell.seeds.values() for r in tt["localization"]]
    if loc:
        figs.append(_img(plots.png(plots.localization_figure(loc, f"{cell.name}: localization methods "
                                                                  f"({len(cell.seeds)} seeds)")), "localization"))
    if cell.kind == "etd":
        rows = [r for tt in cell.seeds.values() for r in tt["evals"]]
        if cell.twin is not None:
            rows += [r for tt in cell.twin.seeds.values() for r in tt["evals"]]
        figs.append(_img(plots.png(plots.etd_curves_figure(rows, f"{cell.name}: accuracy per mode "
                                                                 f"({len(cell.seeds)} seeds, mean)")), "etd curves"))
        rel = f"figures/sweep={cell.sweep}/{cell.keys[first]}/forgotten.png"
        if tables.exists(store.results, rel):
            figs.append(_img(tables.read_bytes(store.results, rel), "forgotten vs kept"))
        if cell.scores is not None:  # finding 5b: the forgotten clean examples' scores vs the kept ones'
            forgotten, kept = forgotten_and_kept(cell)
            groups = {label: [s for s in ((cell.scores.get(i) or {}).get("score") for i in ids) if s is not None]
                      for label, ids in (("forgotten by drop (most seeds)", forgotten), ("kept by drop", kept))}
            figs.append(_img(plots.png(plots.scores_figure(
                groups, f"{cell.name}: 5b, clean examples right under own ({cell.memscores})")), "5b scores"))
    score_arch = next((r.get("arch") for r in (cell.scores or {}).values()), None)
    if cell.kind == "plain" and score_arch == cell.arch and cell.all_rows("example_stats"):  # 8c: the free proxy
        loss = proxy_values(cell, "cum_loss")
        groups = {label: ([cell.scores[i]["score"] for i in ids], [loss[i] for i in ids])
                  for label, want in (("noisy", True), ("clean", False))
                  for ids in [[i for i in sorted(loss) if i in cell.scores and cell.scores[i]["score"] is not None
                               and bool(cell.scores[i]["is_noisy"]) == want]]}
        figs.append(_img(plots.png(plots.proxy_figure(
            groups, f"{cell.name}: 8c, cumulative training loss vs score ({cell.memscores})")), "8c proxy"))
    return figs


def scores_section(store: Store, cells: list[Cell]) -> tuple[str, int]:
    """The memorization scores the sweep's cells name: noisy vs clean distributions and the scoring
    sweep's top-scoring examples (drawn by its reduce step)."""
    out, n = [], 0
    for name in sorted({c.memscores for c in cells if c.scores is not None}):
        first = next(c for c in cells if c.memscores == name)
        rows = first.scores.values()
        meta = store.rows("select any_value(models) k, any_value(subset_fraction) r, any_value(arch) arch, "
                          "median(stderr) se, median(stderr) filter (stderr > 0) se_pos, "
                          "count(*) filter (stderr > 0) n_pos from memscores where sweep = ?", [name])[0]
        figs = [_img(plots.png(plots.scores_figure(
            {"noisy": [r["score"] for r in rows if r["is_noisy"] and r["score"] is not None],
             "clean": [r["score"] for r in rows if not r["is_noisy"] and r["score"] is not None]},
            f"{name}: K={meta['k']}, r={meta['r']:g}, {meta['arch']}", first.rare_threshold)), "scores")]
        rel = f"figures/sweep={name}/{name}/top_scoring.png"
        if tables.exists(store.results, rel):
            figs.append(_img(tables.read_bytes(store.results, rel), "top-scoring examples"))
        n += len(figs)
        se_pos = f"{meta['se_pos']:.3f}" if meta["se_pos"] is not None else "n/a"
        out.append(f"<h3>Memorization scores: {html.escape(name)} (median stderr {meta['se']:.3f}; "
                   f"{se_pos} over the {meta['n_pos']} examples whose models do not all agree)</h3>"
                   f"<div class='figs'>{''.join(figs)}</div>")
    return "".join(out), n


def search_pareto(store: Store, sweep: str) -> str:
    """A search sweep's trials by final drop train_noisy and drop test, its Pareto front ('' for a grid)."""
    if not store.rows("select 1 from sweeps where sweep = ? and preset = 'search'", [sweep]):
        return ""
    rows = store.rows("select e.trial_key, e.subset, e.accuracy from evals e join (select trial_key, max(epoch) m "
                      "from evals where sweep = ? group by trial_key) l on e.trial_key = l.trial_key and "
                      "e.epoch = l.m where e.sweep = ? and e.mode = 'drop'", [sweep, sweep])
    final: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        final[r["trial_key"]][r["subset"]] = r["accuracy"]
    keys = sorted(k for k, v in final.items() if "train_noisy" in v and "test" in v)
    if not keys:
        return ""
    points = [(final[k]["train_noisy"], final[k]["test"]) for k in keys]
    return _img(plots.png(plots.pareto_figure(points, keys, f"{sweep}: drop test vs drop train_noisy")), "pareto")


def build(store: Store, sweeps: list[str]) -> tuple[str, dict[str, list[Verdict]], int]:
    """(html, {sweep: verdicts}, number of figures)."""
    entries: dict[str, list[Verdict]] = {}
    sections, n_fig = [], 0
    for sweep in sweeps:
        cells = load_cells(store, sweep)
        verdicts = judge_sweep(cells)
        entries[sweep] = verdicts
        protocols = sorted({c.protocol for c in cells})
        trials = store.rows("select trial_key, seed, status, wall_s, error, config_json from trials where sweep = ? "
                            "order by trial_key", [sweep])
        summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(verdicts))
        figs_html = []
        for cell in cells:
            figs = cell_figures(store, cell)
            n_fig += len(figs)
            figs_html.append(f"<h3>{html.escape(cell.name)} (seeds {sorted(cell.seeds)})</h3>"
                             f"<div class='figs'>{''.join(figs)}</div>")
        scores_html, n = scores_section(store, cells)
        if scores_html:
            figs_html.insert(0, scores_html)
            n_fig += n
        pareto = search_pareto(store, sweep)
        if pareto:
            figs_html.insert(0, f"<h3>Search: Pareto front</h3><div class='figs'>{pareto}</div>")
            n_fig += 1
        name_of = {k: c.name for c in cells for k in c.keys.values()}
        detail = "".join(
            f"<tr><td>{html.escape(t['trial_key'])}</td><td>{html.escape(name_of.get(t['trial_key'], '-'))}</td>"
            f"<td>{t['seed']}</td><td>{html.escape(t['status'])}</td><td>{(t['wall_s'] or 0):.1f}</td>"
            f"<td>{html.escape(t['error'] or '')}</td></tr>" for t in trials)
        top = (f"<div class='top'><div class='matrix'>"
               f"{_img(matrix_png(verdicts, f'{sweep}: verdicts, findings x cells'), 'verdict matrix')}</div>"
               f"<div class='card'><h3>Reproduction scorecard</h3>{scorecard_html(verdicts)}</div></div>"
               ) if verdicts else ""
        n_fig += bool(verdicts)
        sections.append(
            f"<h2>Sweep {html.escape(sweep)} (protocol {', '.join(map(str, protocols)) or '-'})</h2>{top}"
            f"<h3>Summary</h3><ul>{summary}</ul>"
            f"<h3>Verdicts per cell (seeds pooled)</h3>{html_table(verdicts)}"
            f"<h3>Figures per cell</h3>{''.join(figs_html)}"
            f"<h3>Trials</h3><table><tr><th>trial_key</th><th>cell</th><th>seed</th><th>status</th>"
            f"<th>wall s</th><th>error</th></tr>{detail}</table>")
    return _page(sweeps, sections, store), entries, n_fig


def _page(sweeps: list[str], sections: list[str], store: Store) -> str:
    skipped = "".join(f"<li>skipped corrupt fragment {html.escape(p)}: {html.escape(r)}</li>" for p, r in store.skipped)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Memorization localization report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:85%}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}} .agree{{background:#e6f4e6}}
.differ{{background:#fbe3e3}} .inconclusive{{background:#f4f0dc}}
.figs img{{max-width:48%;margin:4px;border:1px solid #eee}}
.top{{display:flex;gap:1em;align-items:flex-start}} .card{{flex:1 1 48%}} .matrix{{flex:1 1 52%}}
.matrix img{{max-width:100%}} .scorecard{{font-size:70%}} .card h3{{margin-top:0}}</style></head><body>
<h1>Where is memorization stored? Findings vs Maini et al. (ICML 2023)</h1>
<p>Results: {html.escape(store.results)}; sweeps: {html.escape(", ".join(sweeps))}. Verdicts follow the rules of
EXPERIMENTS.md fixed before any run: seeds pooled per cell (t-intervals), rank tests on targets, Holm over the
placebo-gated tests of a sweep; sweeps and protocols are never pooled.</p>
{"<ul>" + skipped + "</ul>" if skipped else ""}
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
    agree = sum(e.verdict == "agree" for v in entries.values() for e in v)
    total = sum(len(v) for v in entries.values())
    print(f"wrote {os.path.join(args.out, 'index.html')}: {len(sweeps)} sweep(s), {n_fig} figures, "
          f"{total} findings ({agree} agree)")
    return 0


if __name__ == "__main__":
    sys.exit(exiting(main()))
