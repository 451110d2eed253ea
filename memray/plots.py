"""The paper's figures, drawn from table rows alone (lists of dicts with the columns of
ARCHITECTURE.md), so one trial's rows or rows pooled across sweeps give the same pictures.

Each function returns a matplotlib Figure (Agg backend; nothing is shown). `trial_figures`
draws every figure a trial's tables allow and returns {name: png bytes}.
"""
from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imsave

from .config import MODES, SUBSETS

Rows = list[dict[str, Any]]
CLEAN, NOISY, RARE = "tab:blue", "tab:red", "tab:olive"
KIND_COLORS = {"noisy": NOISY, "clean": CLEAN, "rare": RARE}  # flip and localization target kinds


def _kind(r: dict) -> str:
    return r.get("target_kind") or ("noisy" if r["is_noisy"] else "clean")


def _groups(rows: Rows) -> list[tuple[int, str]]:
    return sorted({(int(r["layer_index"]), str(r["layer_name"])) for r in rows})


def gradients_figure(rows: Rows, title: str = "") -> plt.Figure:
    """Per layer group over epochs: clean vs noisy gradient norm (norm / sqrt(#params)), and the
    clean/noisy cosine (EXPERIMENTS.md section 1)."""
    groups = _groups(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    for k, (gi, name) in enumerate(groups):
        sel = sorted((r for r in rows if r["layer_index"] == gi), key=lambda r: r["epoch"])
        ep = [r["epoch"] for r in sel]
        col = cmap(k / max(1, len(groups) - 1))
        ax1.plot(ep, [r["clean_norm"] for r in sel], color=col, ls="-")
        ax1.plot(ep, [r["noisy_norm"] for r in sel], color=col, ls="--")
        ax2.plot(ep, [r["cosine"] for r in sel], color=col, label=name)
    ax1.set(xlabel="epoch", ylabel="gradient norm / sqrt(params)", yscale="log",
            title="Gradient norm per layer group (solid clean, dashed noisy)")
    ax2.axhline(0, color="gray", lw=0.8)
    ax2.set(xlabel="epoch", ylabel="cosine(clean grad, noisy grad)", title="Clean vs noisy gradient cosine")
    ax2.legend(fontsize=7, title="layer group (both panels)", title_fontsize=7, loc="center left",
               bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title or "Gradient accounting")
    fig.tight_layout()
    return fig


def rewinding_figure(rows: Rows, title: str = "") -> plt.Figure:
    """Heatmaps layer group x rewind epoch of train_noisy (memorization kept) and train_clean
    accuracy (EXPERIMENTS.md section 2)."""
    groups = _groups(rows)
    epochs = sorted({int(r["rewind_epoch"]) for r in rows})
    subsets = [s for s in ("train_noisy", "train_clean") if any(r["subset"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(subsets), figsize=(5 * len(subsets) + 1, 0.45 * len(groups) + 2.2), squeeze=False)
    for ax, subset in zip(axes[0], subsets):
        acc = {(r["layer_index"], r["rewind_epoch"]): r["accuracy"] for r in rows if r["subset"] == subset}
        grid = [[acc.get((gi, e), math.nan) for e in epochs] for gi, _ in groups]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
        for i in range(len(groups)):
            for j in range(len(epochs)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i][j] < 0.5 else "black")
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_yticks(range(len(groups)), [n for _, n in groups])
        ax.set(xlabel="rewound to epoch", ylabel="layer group", title=f"{subset} accuracy after rewinding")
        fig.colorbar(im, ax=ax, label="accuracy")
    fig.suptitle(title or "Layer rewinding")
    fig.tight_layout()
    return fig


def retraining_figure(rows: Rows, title: str = "") -> plt.Figure:
    """Bars per layer group after retraining it on clean data: accuracy on each subset
    (EXPERIMENTS.md section 3); train_noisy = given labels still predicted."""
    groups = _groups(rows)
    subsets = [s for s in SUBSETS if any(r["subset"] == s for r in rows)]
    colors = {"train_clean": CLEAN, "train_noisy": NOISY, "train_noisy_true": "tab:orange", "test": "tab:green"}
    acc = {(r["layer_index"], r["subset"]): r["accuracy"] for r in rows}
    fig, ax = plt.subplots(figsize=(1.0 * len(groups) + 4, 4))
    w = 0.8 / max(1, len(subsets))
    for k, s in enumerate(subsets):
        xs = [i + (k - (len(subsets) - 1) / 2) * w for i in range(len(groups))]
        ax.bar(xs, [acc.get((gi, s), math.nan) for gi, _ in groups], w, label=s, color=colors[s])
    ax.set_xticks(range(len(groups)), [n for _, n in groups], rotation=30)
    ax.set(ylim=(0, 1.05), xlabel="layer group retrained on clean examples", ylabel="accuracy")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "Layer retraining")
    fig.tight_layout()
    return fig


def flips_figure(rows: Rows, title: str = "") -> plt.Figure:
    """Greedy units-to-flip histogram, noisy vs clean (and rare) targets (with the random
    baseline's medians), and the share of zeroed units per site (EXPERIMENTS.md section 4)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    greedy = [r for r in rows if r["method"] == "greedy"]
    kinds = [(k, c) for k, c in KIND_COLORS.items() if any(_kind(r) == k for r in greedy)]
    counts = {kind: [r["n_units"] for r in greedy if _kind(r) == kind and r["flipped"]] for kind, _ in kinds}
    top = max([1] + [max(v) for v in counts.values() if v])
    bins = range(0, top + 2, max(1, (top + 1) // 30))
    for kind, col in kinds:
        n_all = sum(1 for r in greedy if _kind(r) == kind)
        if n_all:
            ax1.hist(counts[kind], bins=bins, alpha=0.6, color=col,
                     label=f"{kind} ({len(counts[kind])}/{n_all} flipped)")
        rnd = sorted(r["n_units"] for r in rows if r["method"] == "random" and _kind(r) == kind and r["flipped"])
        if rnd:  # the random baseline usually needs far more units: its median goes in the legend
            ax1.plot([], [], color=col, ls=":", label=f"random {kind}: median {rnd[len(rnd) // 2]} units")
    ax1.set(xlabel="units zeroed to flip the prediction", ylabel="targets", title="Greedy minimum-unit flip")
    ax1.legend(fontsize=8)
    per_site: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in greedy:
        for u in r["units"]:
            per_site[int(u["site"])][_kind(r)] += 1
    sites = sorted(per_site)
    w = 0.8 / max(1, len(kinds))
    for k, (kind, col) in enumerate(kinds):
        tot = sum(per_site[s][kind] for s in sites) or 1
        ax2.bar([s + (k - (len(kinds) - 1) / 2) * w for s in sites], [per_site[s][kind] / tot for s in sites], w,
                color=col, label=f"{kind} targets")
    ax2.set_xticks(sites, [str(s) for s in sites])
    ax2.set(xlabel="site", ylabel="share of zeroed units", title="Where the zeroed units are")
    ax2.legend(fontsize=8)
    fig.suptitle(title or "Neuron-level localization")
    fig.tight_layout()
    return fig


def localization_figure(rows: Rows, title: str = "") -> plt.Figure:
    """Localization methods (EXPERIMENTS.md section 7), medians over targets: left, precision@|truth|
    minus chance in the `decoy` track; middle, AUROC minus 0.5 in the `all` track (bars: noisy
    targets, hatched: clean; the leak controls must sit at 0); right, the CDF of units to flip in
    each method's rank order (noisy targets, `decoy`, or every unit for a model without ETD)."""
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    methods = sorted({r["method"] for r in rows})
    color = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for ax, track, col, base, label in ((axes[0], "decoy", "precision", "chance", "precision@|truth| - chance"),
                                        (axes[1], "all", "auroc", None, "AUROC - 0.5")):
        sel = [r for r in rows if r.get("track") == track and r["n_truth"] and r["k"] == r["n_truth"]
               and r.get(col) is not None]
        ms = sorted({r["method"] for r in sel})
        for i, m in enumerate(ms):
            for j, (kind, hatch) in enumerate((("noisy", None), ("clean", "//"))):
                v = [r[col] - (r[base] if base else 0.5) for r in sel if r["method"] == m and r["target_kind"] == kind]
                if v:
                    ax.bar(i + 0.4 * j - 0.2, _median(v), width=0.38, color=color[m], hatch=hatch,
                           edgecolor="black", lw=0.5)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(ms)), ms, rotation=45, ha="right", fontsize=7)
        ax.set(xlabel="method", ylabel=label,
               title=f"track {track}: noisy (solid) vs clean (hatched)" if ms else f"no track {track} rows")
    ax = axes[2]
    for m in methods:
        sel = {r["example_id"]: r for r in rows if r["method"] == m and r["target_kind"] == "noisy"
               and r.get("track") in ("decoy", "none", None) and r["flipped"] is not None}
        units = sorted((r for r in sel.values() if r["flipped"]), key=lambda r: r["units_to_flip"])
        if units:
            ax.step([r["units_to_flip"] for r in units], [(j + 1) / len(sel) for j in range(len(units))], where="post",
                    color=color[m], label=m)
    ax.set(xlabel="units zeroed in rank order", ylabel="fraction of noisy targets flipped", xscale="log",
           title="units to flip (CDF)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(title or "Localization methods")
    fig.tight_layout()
    return fig


def _median(v: list[float]) -> float:
    v = sorted(v)
    return math.nan if not v else (v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)


MODE_COLORS = {"plain": "tab:gray", "own": "tab:orange", "all": "tab:green", "drop": "tab:purple"}


def etd_figure(rows: Rows, title: str = "") -> plt.Figure:
    """Final accuracy per evaluation mode and subset (EXPERIMENTS.md section 5): the ETD trial's
    own/all/drop rows and its plain twin's rows (mode `plain`), last epoch of each."""
    last: dict[str, int] = {}
    for r in rows:
        last[r["mode"]] = max(last.get(r["mode"], 0), int(r["epoch"]))
    acc = {(r["mode"], r["subset"]): r["accuracy"] for r in rows if int(r["epoch"]) == last[r["mode"]]}
    modes = [m for m in MODES if m in last]
    fig, ax = plt.subplots(figsize=(9.5, 4))
    w = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * w for j in range(len(SUBSETS))]
        vals = [acc.get((m, s), math.nan) for s in SUBSETS]
        label = "plain twin (no ETD)" if m == "plain" else m
        bars = ax.bar(xs, [0 if math.isnan(v) else v for v in vals], w, label=label, color=MODE_COLORS[m])
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if math.isnan(v) else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(SUBSETS)), SUBSETS)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("subset")
    ax.set_ylabel("accuracy (final epoch)")
    ax.legend(title="evaluation mode", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Example-tied dropout: accuracy per mode")
    fig.tight_layout()
    return fig


def examples_figure(groups: dict[str, tuple[Any, list[str]]], title: str = "") -> plt.Figure:
    """Rows of training examples, one row per group: {row label: (array (n, C, H, W) images or
    (n, C, L) signals, one caption per example)}. Images are drawn as pictures, signals as lines."""
    n_cols = max((len(x) for x, _ in groups.values()), default=1) or 1
    fig, axes = plt.subplots(len(groups), n_cols, figsize=(1.5 * n_cols + 1.5, 2.2 * len(groups)), squeeze=False)
    for r, (label, (x, captions)) in enumerate(groups.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(x):
                ax.axis("off")
                continue
            v = x[c]
            if v.ndim == 3:  # (C, H, W)
                ax.imshow(v[0] if v.shape[0] == 1 else v.transpose(1, 2, 0).clip(0, 1),
                          cmap="gray_r" if v.shape[0] == 1 else None)
            else:  # (C, L)
                for ch in v:
                    ax.plot(ch, lw=0.8)
            ax.set_title(captions[c], fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.suptitle(title or "Examples")
    fig.tight_layout()
    return fig


def gradient_control_figure(rows: Rows, title: str = "") -> plt.Figure:
    """Gradient accounting with its control (section 1): per layer group, over epochs, the noisy
    aggregate's norm over the clean one's and over the control subset's (mean over the rows of an
    epoch, e.g. over seeds), with the thresholds of finding 1a; and the cosines beside the control."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    groups = _groups(rows)
    cmap = plt.get_cmap("viridis", max(2, len(groups)))
    for gi, (idx, name) in enumerate(groups):
        by_epoch: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            if r["layer_index"] == idx:
                by_epoch[int(r["epoch"])].append(r)
        ep = sorted(by_epoch)

        def mean(key, f=lambda r, k: r[k]):
            return [sum(f(r, key) for r in by_epoch[e]) / len(by_epoch[e]) for e in ep]

        ratio = (lambda r, k: r["noisy_norm"] / r[k] if r[k] else math.nan)
        axes[0].plot(ep, mean("clean_norm", ratio), color=cmap(gi), label=name)
        axes[1].plot(ep, mean("control_norm", ratio), color=cmap(gi), label=name)
        axes[2].plot(ep, mean("cosine"), color=cmap(gi), label=name)
        axes[2].plot(ep, mean("control_cosine"), color=cmap(gi), ls=":")
    for ax, thr, t in ((axes[0], 0.5, "noisy / clean aggregate norm"), (axes[1], 2.0, "noisy / control norm")):
        ax.axhline(thr, color="k", ls="--", lw=0.8)
        ax.set(yscale="log", xlabel="epoch", title=t)
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set(xlabel="epoch", title="cosine clean/noisy (solid), control (dotted)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Gradient accounting with the control subset")
    fig.tight_layout()
    return fig


CLASS_COLORS = {"redundant": "#4c9a2a", "partial": "#bbbbbb", "critical": "#c0392b", "damaged": "#555555"}


def class_map_figure(groups: list[str], epochs: list[int], classes: list[list[str]], title: str = "") -> plt.Figure:
    """Rewinding classes (section 2) as a groups x snapshots map: classes[g][j] for group g
    rewound to snapshot epochs[j] ('' where unknown)."""
    from matplotlib.colors import ListedColormap

    names = list(CLASS_COLORS)
    grid = [[names.index(c) if c in names else math.nan for c in row] for row in classes]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * max(1, len(epochs)), 0.5 + 0.4 * max(1, len(groups))))
    ax.imshow(grid, cmap=ListedColormap([CLASS_COLORS[n] for n in names]), vmin=0, vmax=len(names) - 1,
              aspect="auto")
    for g, row in enumerate(classes):
        for j, c in enumerate(row):
            ax.text(j, g, c[:4], ha="center", va="center", fontsize=7, color="white" if c else "k")
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    ax.set_yticks(range(len(groups)), groups)
    ax.set(xlabel="rewound to epoch", title=title or "Rewinding classes")
    fig.tight_layout()
    return fig


def flip_cost_figure(costs: dict[str, list[float]], title: str = "") -> plt.Figure:
    """Collateral of the flip edits (finding 4d): each edit's drop in test accuracy on the fixed
    samples, per target kind."""
    fig, ax = plt.subplots(figsize=(10, 3.2))
    kinds = [k for k in costs if costs[k]]
    ax.boxplot([[100 * c for c in costs[k]] for k in kinds], tick_labels=kinds)
    ax.set(ylabel="test accuracy lost (points)", title=title or "Flip edits: accuracy lost elsewhere")
    fig.tight_layout()
    return fig


def etd_curves_figure(rows: Rows, title: str = "") -> plt.Figure:
    """ETD accuracy over epochs, one panel per subset, one line per mode (own, all, drop; plain for
    the twin's rows), mean over the rows of an epoch (e.g. over seeds)."""
    fig, axes = plt.subplots(1, len(SUBSETS), figsize=(15, 3.4), sharey=True)
    for ax, subset in zip(axes, SUBSETS):
        for mode in MODES:
            acc: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                if r["mode"] == mode and r["subset"] == subset:
                    acc[int(r["epoch"])].append(r["accuracy"])
            if acc:
                ep = sorted(acc)
                ax.plot(ep, [sum(acc[e]) / len(acc[e]) for e in ep], color=MODE_COLORS[mode],
                        label="plain twin" if mode == "plain" else mode)
        ax.set(title=subset, xlabel="epoch", ylim=(0, 1.02))
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title or "Example-tied dropout over training")
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (drop train_noisy down, drop test up) points."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)]


def pareto_figure(points: list[tuple[float, float]], labels: list[str], title: str = "") -> plt.Figure:
    """A search's trials by final drop-mode train_noisy (x, lower is better) and drop-mode test
    accuracy (y, higher is better), the Pareto front joined."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = sorted(pareto_front(points), key=lambda i: points[i][0])
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:gray", label="trials")
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", color="tab:red", label="Pareto front")
    for i in front:
        ax.annotate(labels[i], points[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="drop train_noisy accuracy (final, lower is better)",
           ylabel="drop test accuracy (final, higher is better)", title=title or "Search: Pareto front")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png(fig: plt.Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes at `dpi`, closed. One Agg draw: `savefig` on a figure that has run
    `tight_layout` draws it twice (a layout pass without rendering, then the real one) for the
    same pixels (tested), about 30% of a trial's figure time."""
    try:
        fig.set_dpi(dpi)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        buf = io.BytesIO()
        imsave(buf, np.asarray(canvas.buffer_rgba()), format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


FIGURES = {"gradients": gradients_figure, "rewinding": rewinding_figure, "retraining": retraining_figure,
           "flips": flips_figure, "localization": localization_figure}


def trial_figures(tables: dict[str, Rows], title: str = "") -> dict[str, bytes]:
    """{table name: PNG bytes} for every non-empty analysis table among `tables`."""
    return {name: png(fn(tables[name], title)) for name, fn in FIGURES.items() if tables.get(name)}


def proxy_figure(groups: dict[str, tuple[list[float], list[float]]], title: str = "") -> plt.Figure:
    """Finding 8c: each training example's cumulative training loss (median over seeds) against
    its memorization score, one colour per group (noisy, clean)."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for (label, (score, loss)), color in zip(groups.items(), (NOISY, CLEAN)):
        if score:
            ax.scatter(score, loss, s=5, alpha=0.5, color=color, lw=0, label=f"{label} (n={len(score)})")
    ax.set_xlabel("memorization score (acc_in - acc_out)")
    ax.set_ylabel("cumulative training loss")
    if any(v > 0 for _, loss in groups.values() for v in loss):
        ax.set_yscale("log")
    ax.legend(fontsize=8, markerscale=3)
    ax.set_title(title or "Cumulative training loss vs memorization score", fontsize=10)
    fig.tight_layout()
    return fig


def scores_figure(groups: dict[str, list[float]], title: str = "", threshold: float | None = None) -> plt.Figure:
    """Memorization-score distributions, one histogram per group (e.g. noisy vs clean examples,
    or the clean examples ETD's `drop` forgets vs those it keeps), each normalised to its own count."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bins = [i / 20 - 1 for i in range(41)]  # scores lie in [-1, 1]
    for (label, values), color in zip(groups.items(), (NOISY, CLEAN, "#7f7f7f", "#2ca02c")):
        v = [x for x in values if x == x]
        if v:
            ax.hist(v, bins=bins, weights=[1 / len(v)] * len(v), histtype="step", lw=1.6, color=color,
                    label=f"{label} (n={len(v)}, median {_median(v):.2f})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls=":", lw=1, label=f"rare threshold {threshold:g}")
    ax.set_xlabel("memorization score (acc_in - acc_out)")
    ax.set_ylabel("fraction of the group")
    ax.set_xlim(-0.5, 1.0)
    ax.legend(fontsize=8)
    ax.set_title(title or "Memorization scores", fontsize=10)
    fig.tight_layout()
    return fig
