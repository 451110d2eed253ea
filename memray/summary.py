"""A trial's summary numbers from its table rows: plain arithmetic, no torch.

The trial reports them to Tune and MLflow, the sweep summary prints them, and `analysis` reads
the same rows from the tables, so each number is computed one way.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from .config import metric_key

Rows = list[dict[str, Any]]
FLIP_METHODS = ("greedy", "random")


def epoch_metrics(evals: Rows) -> dict[str, float]:
    """{'<mode>/<subset>/accuracy': value} of `evals` rows (one epoch's)."""
    return {metric_key(r["mode"], r["subset"]): r["accuracy"] for r in evals}


def final_metrics(evals: Rows) -> dict[str, float]:
    """The accuracy metrics of the last evaluated epoch among `evals` rows."""
    last = max((r["epoch"] for r in evals), default=None)
    return epoch_metrics([r for r in evals if r["epoch"] == last])


def target_kind(r: dict[str, Any]) -> str:
    """A flip or localization row's target kind: noisy, clean (typical, when scores are named) or
    rare (rows written before rare targets existed: noisy or clean by is_noisy)."""
    return r.get("target_kind") or ("noisy" if r["is_noisy"] else "clean")


def units_to_flip(rows: Rows, method: str, kind: str) -> list[float]:
    """Units zeroed per target of one method and kind; a target not flipped counts as infinite."""
    return [r["n_units"] if r["flipped"] else math.inf for r in rows
            if r["method"] == method and target_kind(r) == kind]


def layer_summary(tables: dict[str, Rows]) -> dict[str, float]:
    """The layer-level analyses in a few numbers: per group, train_noisy after rewinding it to
    epoch 0 and after retraining it on clean data (and whether that converged); the last epoch's
    aggregate gradient norms of the noisy examples over the clean ones and over the control."""
    out: dict[str, float] = {}
    for r in tables.get("rewinding", []):
        if r["rewind_epoch"] == 0 and r["subset"] == "train_noisy":
            out[f"rewind/{r['layer_name']}/train_noisy_at_0"] = r["accuracy"]
    for r in tables.get("retraining", []):
        if r["subset"] == "train_noisy":
            out[f"retrain/{r['layer_name']}/train_noisy"] = r["accuracy"]
            out[f"retrain/{r['layer_name']}/converged"] = float(r["converged"])
    grads = tables.get("gradients", [])
    last = max((r["epoch"] for r in grads), default=None)
    for r in grads:
        if r["epoch"] == last and r["clean_norm"] and r["control_norm"]:
            out[f"gradients/{r['layer_name']}/noisy_over_clean"] = r["noisy_norm"] / r["clean_norm"]
            out[f"gradients/{r['layer_name']}/noisy_over_control"] = r["noisy_norm"] / r["control_norm"]
    return out


def localization_summary(rows: Rows) -> dict[str, float]:
    """Per track, method and target kind (EXPERIMENTS.md section 7): the median precision@|truth|,
    its lift over chance and AUROC (ETD trials), the median units to flip in rank order (where
    flips are defined; not flipped: infinite; NaN when that is the median), the median fall of
    log p(given label) after zeroing the top |truth| (or the smallest k), seconds per target.
    Keys like 'localize/decoy/greedy/noisy/lift'."""
    out: dict[str, float] = {}
    for (track, method, kind) in sorted({(r.get("track") or "none", r["method"], r["target_kind"]) for r in rows}):
        sel = [r for r in rows if (r.get("track") or "none") == track and r["method"] == method
               and r["target_kind"] == kind]
        key = f"localize/{track}/{method}/{kind}"
        at_truth = [r for r in sel if r["n_truth"] and r["k"] == r["n_truth"]]
        for col, name in (("precision", "precision_at_truth"), ("lift", "lift"), ("auroc", "auroc")):
            v = [r[col] for r in at_truth if r.get(col) is not None]
            if v:
                out[f"{key}/{name}"] = statistics.median(v)
        per_target = {r["example_id"]: r for r in sel}.values()
        flips = [(r["units_to_flip"] if r["flipped"] else math.inf) for r in per_target if r["flipped"] is not None]
        if flips:
            n = statistics.median(flips)
            out[f"{key}/median_units_to_flip"] = n if math.isfinite(n) else math.nan
        first = at_truth or [r for r in sel if r["k"] == min(x["k"] for x in sel)]
        falls = [r["logp_drop"] for r in first if r.get("logp_drop") is not None]
        if falls:
            out[f"{key}/logp_drop"] = statistics.median(falls)
        out[f"{key}/seconds_per_target"] = statistics.median(r["seconds"] for r in per_target)
    return out


def flip_summary(rows: Rows) -> dict[str, float]:
    """Per method and target kind: median units to flip (targets not flipped count as infinitely
    many; a median that lands on one is reported as NaN), the flipped fraction, and the median
    post-edit test accuracy. Keys like 'flip/greedy/noisy/median_units'."""
    out: dict[str, float] = {}
    for method in FLIP_METHODS:
        for kind in ("noisy", "clean", "rare"):
            n = units_to_flip(rows, method, kind)
            if not n:
                continue
            med = statistics.median(n)
            key = f"flip/{method}/{kind}"
            out[f"{key}/median_units"] = med if math.isfinite(med) else math.nan
            out[f"{key}/flipped_frac"] = sum(math.isfinite(v) for v in n) / len(n)
            out[f"{key}/median_post_test_acc"] = statistics.median(
                r["post_test_acc"] for r in rows if r["method"] == method and target_kind(r) == kind)
    return out


def memscore_summary(rows: Rows, rare_threshold: float = 0.25) -> dict[str, float]:
    """What a scoring sweep reports from its `memscores` rows: the median standard error (overall,
    noisy, and over the examples whose models disagree), noisy and clean median scores, the
    one-sided Mann-Whitney p that noisy examples score higher, the rare count (clean, score >=
    the threshold)."""
    import numpy as np
    from scipy import stats

    ok = [r for r in rows if r["score"] is not None]
    noisy = [r["score"] for r in ok if r["is_noisy"]]
    clean = [r["score"] for r in ok if not r["is_noisy"]]
    out = {"models": float(rows[0]["models"]) if rows else 0.0, "examples": float(len(rows)),
           "scored": float(len(ok)), "median_stderr": float(np.median([r["stderr"] for r in ok])) if ok else math.nan,
           "noisy_median_stderr": (float(np.median([r["stderr"] for r in ok if r["is_noisy"]]))
                                   if noisy else math.nan),
           # most examples are right (or wrong) in every model, in and out: their stderr is 0
           "varied": float(sum(r["stderr"] > 0 for r in ok)),
           "varied_median_stderr": (float(np.median([r["stderr"] for r in ok if r["stderr"] > 0]))
                                    if any(r["stderr"] > 0 for r in ok) else math.nan),
           "max_stderr": max((r["stderr"] for r in ok), default=math.nan),
           "noisy_median_score": float(np.median(noisy)) if noisy else math.nan,
           "clean_median_score": float(np.median(clean)) if clean else math.nan,
           "rare": float(sum(s >= rare_threshold for s in clean))}
    out["noisy_gt_clean_p"] = (float(stats.mannwhitneyu(noisy, clean, alternative="greater").pvalue)
                               if len(noisy) >= 8 and len(clean) >= 8 else math.nan)
    return out
