"""The reproduction scorecard and the verdict matrix: what reproduced, at a glance.

The scorecard has one line per finding: the paper's number and its setting (EXPERIMENTS.md quotes
them; "qualitative" where the paper states the finding without a number), this sweep's value in
each label cell, the verdicts and the reasons behind those that are not "agree". The verdict
matrix is a figure: findings (7a and 7c one row per method) x cells, each square coloured by its
verdict, every placebo twin beside its label cell.
"""
from __future__ import annotations

import html
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from memray import plots
from memray.config import ARCHS  # noqa: E402

from .rules import FINDINGS, Verdict  # noqa: E402

# The paper's numbers, with their setting, where it gives one (Maini et al., ICML 2023; EXPERIMENTS.md)
PAPER = {
    "4a": "about 5 units flip a memorized example, far fewer than a clean one (abstract; their units are "
          "parameters, ours channels: compare the contrast)",
    "5a": "memorized accuracy 100% -> 3% with the memorization units dropped, smaller generalization gap "
          "(ETD p_gen 0.2, p_mem 0.1, 10% label noise)",
    "7a": "the project's own benchmark: no paper number",
    "7b": "the project's own benchmark: no paper number",
    "7c": "the project's own benchmark: no paper number",
    "7d": "the project's own benchmark: no paper number",
    "8c": "Ravikumar et al. (ICML 2025): cumulative sample loss tracks memorization scores; qualitative here",
}
QUALITATIVE = "qualitative"
COLOURS = {"agree": "#4daf4a", "differ": "#e41a1c", "inconclusive": "#f2d65c", "": "#ffffff"}
PER_METHOD = ("7a", "7c", "7d")  # one verdict per localization method


def short(cell: str) -> str:
    """'digits-resnet916-etd pg0.5 pm0.1-n0.1placebo' -> 'resnet9 w16 etd placebo'."""
    parts = cell.split("-")
    model = parts[1] if len(parts) > 1 else cell
    arch = max((a for a in ARCHS if model.startswith(a)), key=len, default="")
    if arch and model[len(arch):].isdigit():
        model = f"{arch} w{model[len(arch):]}"
    kind = parts[2].split()[0] if len(parts) > 2 else ""
    return " ".join(p for p in (model, kind, "placebo" if cell.endswith("placebo") else "") if p)


def names(cells: list[str]) -> dict[str, str]:
    """{cell: its short name}, the full name wherever two cells would share a short one (cells of
    other datasets, p_gen, p_mem or noise rates)."""
    by_short: dict[str, list[str]] = defaultdict(list)
    for c in dict.fromkeys(cells):
        by_short[short(c)].append(c)
    return {c: (sh if len(cs) == 1 else c) for sh, cs in by_short.items() for c in cs}


def _head(value: str, n: int = 56) -> str:
    v = value.split(";")[0].strip()
    return v if len(v) <= n else v[: n - 1] + "..."


def scorecard(verdicts: list[Verdict]) -> list[dict[str, str]]:
    """One row per finding judged in the sweep: id, finding, paper, this sweep, verdict, reason
    (label cells only: placebo cells are the control, summarised in the summary lines)."""
    by_id: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        if v.noise_kind != "placebo":
            by_id[v.id].append(v)
    name = names([v.cell for vs in by_id.values() for v in vs])
    rows = []
    for fid, spec in FINDINGS.items():
        vs = by_id.get(fid)
        if not vs:
            continue
        cells: dict[str, list[Verdict]] = defaultdict(list)
        for v in vs:
            cells[name[v.cell]].append(v)
        if fid in PER_METHOD:
            value = "; ".join(f"{c}: {sum(v.verdict == 'agree' for v in cv)}/{len(cv)} methods agree"
                              for c, cv in cells.items())
        else:
            value = "; ".join(f"{c}: {_head(cv[0].value) or '-'}" for c, cv in cells.items())
        verdict = "; ".join(f"{c}: " + (cv[0].verdict if len(cv) == 1 else
                                        ", ".join(f"{sum(v.verdict == k for v in cv)} {k}"
                                                  for k in ("agree", "differ", "inconclusive")
                                                  if any(v.verdict == k for v in cv)))
                            for c, cv in cells.items())
        reason = "; ".join(f"{c}: {r}" for c, cv in cells.items()
                           for r in sorted({v.reason for v in cv if v.verdict != "agree" and v.reason}))
        rows.append({"id": fid, "finding": spec.text, "paper": PAPER.get(fid, QUALITATIVE), "this sweep": value,
                     "verdict": verdict, "reason": reason})
    return rows


def scorecard_html(verdicts: list[Verdict]) -> str:
    """The scorecard as a compact HTML table (the report's first screen)."""
    head = "".join(f"<th>{c}</th>" for c in ("id", "paper", "this sweep", "verdict", "why not agree"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(r[c])}</td>" for c in ("id", "paper", "this sweep", "verdict", "reason"))
        + "</tr>" for r in scorecard(verdicts))
    return f"<table class='scorecard'><tr>{head}</tr>{body}</table>"


def scorecard_text(verdicts: list[Verdict]) -> list[str]:
    lines = ["Reproduction scorecard (label cells; paper | this sweep | verdict | why not agree)"]
    for r in scorecard(verdicts):
        lines.append(f"{r['id']:3} {r['finding']}")
        lines.append(f"    paper: {r['paper']}")
        lines.append(f"    this sweep: {r['this sweep']}")
        lines.append(f"    verdict: {r['verdict']}")
        if r["reason"]:
            lines.append(f"    why: {r['reason']}")
    return lines


def matrix(verdicts: list[Verdict]) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """(row labels, column labels, {(row, column): verdict}): columns are cells, each placebo twin
    right after its label cell; rows are findings, 7a and 7c one per method."""
    label = sorted({v.cell for v in verdicts if v.noise_kind != "placebo"})
    placebo = {v.cell for v in verdicts if v.noise_kind == "placebo"}
    cols = []
    for c in label:
        cols.append(c)
        if f"{c}placebo" in placebo:
            cols.append(f"{c}placebo")
    cols += sorted(placebo - set(cols))
    rows: list[str] = []
    grid: dict[tuple[str, str], str] = {}
    for fid in FINDINGS:
        for v in verdicts:
            if v.id != fid:
                continue
            row = f"{fid} {v.method} ({v.track})" if fid in PER_METHOD and v.method else fid
            if row not in rows:
                rows.append(row)
            grid[(row, v.cell)] = v.verdict
    return rows, cols, grid


def matrix_png(verdicts: list[Verdict], title: str = "") -> bytes:
    rows, cols, grid = matrix(verdicts)
    keys = list(COLOURS)
    data = [[keys.index(grid.get((r, c), "")) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(2.2 + 1.05 * len(cols), 1.2 + 0.27 * len(rows)))
    ax.imshow(data, cmap=ListedColormap([COLOURS[k] for k in keys]), vmin=-0.5, vmax=len(keys) - 0.5,
              aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = grid.get((r, c), "")
            ax.text(j, i, {"agree": "A", "differ": "D", "inconclusive": "?"}.get(v, ""), ha="center",
                    va="center", fontsize=7, color="white" if v in ("agree", "differ") else "black")
    name = names(cols)
    ax.set_xticks(range(len(cols)), [name[c].replace(" ", "\n") for c in cols], fontsize=8)
    for tick, c in zip(ax.get_xticklabels(), cols):
        if c.endswith("placebo"):
            tick.set_color("#777777")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xticks([j - 0.5 for j in range(1, len(cols))], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(rows))], minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    ax.xaxis.tick_top()
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in ("agree", "differ", "inconclusive")]
    ax.legend(handles, ["agree (A)", "differ (D)", "inconclusive (?)"], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or "Verdicts: findings x cells (placebo twins beside their label cells)", fontsize=10, pad=28)
    fig.tight_layout()
    return plots.png(fig)
