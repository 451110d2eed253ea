"""python -m analysis.findings: the paper's findings as verdicts, with controls, pooled over seeds.

    python -m analysis.findings --results-dir results --sweep dropout_grid-default
    python -m analysis.findings --sweep A --sweep B --format json      # or csv; table by default

EXPERIMENTS.md, "Verdicts and statistics", fixes every rule before any run (protocol 3). The code
is split by idea, and this module is the command line over it:

    analysis/stats.py    the statistics (t-intervals, rank tests, Wilson, Holm, bootstrap)
    analysis/cells.py    a sweep's cells (config minus seed), their twins, per-trial helpers
    analysis/rules.py    the findings, one function each; thresholds defined once, criteria from them
    analysis/judge.py    judging a sweep: Holm's correction and the placebo twins
    analysis/render.py   summary lines, the text table, JSON, CSV and HTML

Arithmetic on table rows (numpy, scipy); no torch. Exit codes: 0 written; 1 the store cannot be read;
2 bad input (unknown sweep or format), before anything is printed.
"""
from __future__ import annotations

import sys

from memray.exiting import exiting

from .cells import TABLES, Cell, load_cells, memorization_window, rewinding_classes
from .judge import judge_sweep, sweep_verdicts
from .render import COLUMNS, html_page, html_table, render, summary_lines
from .rules import FINDINGS, MIN_EXAMPLES, MIN_SEEDS, VERDICTS, Verdict, forgotten_and_kept, proxy_values
from .store import Store, open_for_cli, store_parser

__all__ = ["COLUMNS", "FINDINGS", "MIN_EXAMPLES", "MIN_SEEDS", "TABLES", "VERDICTS", "Cell", "Verdict",
           "forgotten_and_kept", "html_page", "html_table", "judge_sweep", "load_cells", "memorization_window",
           "proxy_values", "render", "rewinding_classes", "summary_lines", "sweep_verdicts", "verdict_files"]


def verdict_files(store: Store, sweep: str) -> dict[str, str]:
    """A sweep's verdict table as files for its MLflow parent run: a page a person can open, and CSV."""
    verdicts = sweep_verdicts(store, [sweep])
    return {"verdicts.html": html_page(verdicts, f"Sweep {sweep}: findings"), "verdicts.csv": render(verdicts, "csv")}


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
    sys.exit(exiting(main()))
