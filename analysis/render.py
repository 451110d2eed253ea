"""Verdicts for people and for scripts: the summary lines, the text table, JSON, CSV and HTML.

`json`/`csv` rows are the contract of ARCHITECTURE.md, "Verdicts as data": `verdict` is exactly
agree, differ or inconclusive, and why is in `reason`. The text table and the HTML show a
verdict with its reason in parentheses and name the method (and track) of every 7a-7d row.
"""
from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict

from .rules import FINDINGS, Verdict
from .scorecard import scorecard_text

COLUMNS = ("id", "finding", "cell", "method", "track", "protocol", "seeds", "n", "verdict", "reason", "value",
           "control", "interval_or_p", "criterion", "placebo_twin")


def shown(v: Verdict) -> str:
    return v.verdict + (f" ({v.reason})" if v.reason else "")


def _kind_word(v: Verdict) -> str:
    return "etd" if "-etd " in v.cell else ("plain" if "-plain-" in v.cell else "dropout")


def summary_lines(verdicts: list[Verdict]) -> list[str]:
    """One line per finding: e.g. '4a: agree in 2/2 plain cells (2 agree); placebo cells: 0/2 agree'."""
    by_id: dict[str, list[Verdict]] = defaultdict(list)
    for v in verdicts:
        by_id[v.id].append(v)
    lines = []
    for fid in FINDINGS:
        vs = by_id.get(fid, [])
        if not vs:
            continue
        label = [v for v in vs if v.noise_kind != "placebo"]
        placebo = [v for v in vs if v.noise_kind == "placebo"]
        counts: dict[str, int] = defaultdict(int)
        for v in label:
            counts[v.verdict] += 1
        kinds = "/".join(sorted({_kind_word(v) for v in label}))
        what = "tests" if fid in ("7a", "7c", "7d") else "cells"
        parts = [f"{counts[k]} {k}" for k in ("agree", "differ", "inconclusive") if counts[k]]
        line = f"{fid}: agree in {counts['agree']}/{len(label)} {kinds} {what} ({', '.join(parts)})"
        downgraded = sum(v.reason == "its placebo twin agrees" for v in label)
        if downgraded:
            line += f"; {downgraded} downgraded by their placebo twin"
        leaked = sum(v.reason.startswith("leak:") for v in label)
        if leaked:
            line += f"; {leaked} with a leaking control"
        if placebo:
            line += f"; placebo cells: {sum(v.verdict == 'agree' for v in placebo)}/{len(placebo)} agree"
        lines.append(line)
    return lines


def html_table(verdicts: list[Verdict]) -> str:
    """The verdicts as an HTML table, each verdict cell classed agree/differ/inconclusive."""
    cols = [c for c in COLUMNS if c not in ("reason", "placebo_twin")]  # the reason shows in the verdict
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    body = []
    for v in verdicts:
        r = {**v.row(), "verdict": shown(v), "method": v.method or "", "track": v.track or ""}
        body.append("<tr>" + "".join(f"<td class='{v.verdict if c == 'verdict' else ''}'>{html.escape(str(r[c]))}</td>"
                                     for c in cols) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def html_page(verdicts: list[Verdict], title: str) -> str:
    """A page a person can open: the summary lines, then the verdict table."""
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(verdicts))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:85%} "
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top} .agree{background:#e6f4e6} "
            ".differ{background:#fbe3e3} .inconclusive{background:#f4f0dc}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><ul>{lines}</ul>{html_table(verdicts)}</body></html>")


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
    lines = scorecard_text(verdicts) + [""] + summary_lines(verdicts) + [""]
    lines.append(f"{'id':3}  {'cell':34}  {'method (track)':30}  {'seeds':5}  {'n':4}  {'verdict':12}"
                 "  value | control | interval or p")
    for v, r in zip(verdicts, rows):
        m = f"{v.method} ({v.track})" if v.method and v.track else (v.method or v.track or "")
        lines.append(f"{r['id']:3}  {r['cell']:34}  {m:30}  {r['seeds']:5}  {r['n']:4}  "
                     f"{shown(v):12}  {r['value']} | {r['control']} | {r['interval_or_p']}")
    return "\n".join(lines)
