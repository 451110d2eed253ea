"""The paper's findings measured from table rows (EXPERIMENTS.md sections 1-5).

Each function takes one trial's rows of a table (lists of dicts with ARCHITECTURE.md's columns)
and returns plain numbers, so scripts, the sweep summary and the report compute them one way.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from memray.summary import units_to_flip

Rows = list[dict[str, Any]]


def gradient_findings(rows: Rows, noise_rate: float) -> dict[str, Any]:
    """Per group: the noisy examples' share of gradient norm, noisy / (clean + noisy), averaged over
    epochs, against their share of the data; and where the clean/noisy cosine is negative."""
    groups = sorted({(r["layer_index"], r["layer_name"]) for r in rows})
    share, neg = {}, {}
    for gi, name in groups:
        sel = [r for r in rows if r["layer_index"] == gi and not math.isnan(r["noisy_norm"])]
        if sel:
            share[name] = statistics.fmean(r["noisy_norm"] / (r["clean_norm"] + r["noisy_norm"])
                                           for r in sel if r["clean_norm"] + r["noisy_norm"] > 0)
            neg[name] = sorted(r["epoch"] for r in sel if r["cosine"] < 0)
    return {"noisy_data_share": noise_rate, "noisy_grad_norm_share": share,
            "min_cosine": min((r["cosine"] for r in rows if not math.isnan(r["cosine"])), default=math.nan),
            "epochs_with_negative_cosine": neg,
            "groups_with_negative_cosine": sum(1 for v in neg.values() if v)}


def rewinding_findings(rows: Rows, final_noisy: float, keep: float = 0.8) -> dict[str, Any]:
    """Groups whose rewinding to epoch 0 keeps train_noisy accuracy >= keep x its final value
    (memorization survives rewinding that group: it is not stored there alone)."""
    at0 = {r["layer_name"]: r["accuracy"] for r in rows if r["rewind_epoch"] == 0 and r["subset"] == "train_noisy"}
    kept = sorted(n for n, a in at0.items() if a >= keep * final_noisy)
    return {"final_train_noisy": final_noisy, "train_noisy_after_rewind_to_0": at0,
            "groups_keeping_memorization": kept, "n_groups_keeping": len(kept), "n_groups": len(at0)}


def retraining_findings(rows: Rows) -> dict[str, Any]:
    """Groups that, retrained on clean data alone, still predict most noisy examples' given labels."""
    noisy = {r["layer_name"]: r["accuracy"] for r in rows if r["subset"] == "train_noisy"}
    most = sorted(n for n, a in noisy.items() if a > 0.5)
    return {"train_noisy_after_retraining": noisy, "groups_still_memorizing": most,
            "n_groups_still_memorizing": len(most), "n_groups": len(noisy)}


def flip_findings(rows: Rows, test_before: float | None = None) -> dict[str, Any]:
    """Medians of units to flip (not flipped counts as infinite), per method and target kind;
    the sites the greedy units fall on; the median post-edit test accuracy (and its drop)."""
    def med(method, noisy):
        v = units_to_flip(rows, method, noisy)
        return statistics.median(v) if v else math.nan

    greedy_noisy = [r for r in rows if r["method"] == "greedy" and r["is_noisy"]]
    post = statistics.median(r["post_test_acc"] for r in greedy_noisy) if greedy_noisy else math.nan
    out = {"greedy_noisy_median": med("greedy", True), "greedy_clean_median": med("greedy", False),
           "random_noisy_median": med("random", True), "random_clean_median": med("random", False),
           "greedy_sites": sorted({u["site"] for r in rows if r["method"] == "greedy" for u in r["units"]}),
           "median_post_test_acc_noisy_targets": post}
    if test_before is not None:
        out["median_test_drop_noisy_targets"] = test_before - post
    return out
