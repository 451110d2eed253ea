"""Minimum-unit flip (EXPERIMENTS.md section 4), batched over targets.

For a target training example (x, y) and a fixed clean reference batch R, start with every unit
of the included sites on and repeat until the model no longer predicts y for x, or `budget`
units are zeroed:

    J = -loss(x, y) + mean_{r in R} loss(r)        (all under the current mask: a model edit)
    delta_u = -m_u * dJ/dm_u                        (first-order change in J from zeroing u)
    zero the unit with the most negative delta_u    (ties: the lowest flat index, site-major)

`method="random"` zeroes units in a seeded random order instead, until the prediction flips (its
budget is every included unit).

Models trained with example-tied dropout are edited in mode `all` (memorization units scaled by
p_mem for every example): the zeroing mask multiplies that mode's fixed mask. Targets are drawn
from examples the unedited model predicts with their given label (memorized noisy examples,
learned clean ones).

The searches are `probes.flip_search.FlipSearch`; this module picks the targets and the
fixed evaluation samples, measures each edit on them, and builds the `flips` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import streams
from ..data import Data
from ..summary import FLIP_METHODS
from ..train import predict
from . import Subject
from .flip_search import FlipError, FlipSearch, base_masks

__all__ = ["FlipError", "FlipSearch", "fixed_samples", "flip_rows", "post_edit", "select_targets"]


@dataclass
class FlipResult:
    example_id: int
    target_kind: str  # noisy, clean or rare
    is_noisy: bool
    given_label: int
    true_label: int
    method: str
    flipped: bool
    units: list[tuple[int, int]]  # (site, unit) in the order zeroed
    pre: dict[str, float]  # accuracy on the fixed samples before the edit (the unedited model)
    post: dict[str, float]  # the same samples after the edit

    def row(self) -> dict[str, Any]:
        out = {"example_id": self.example_id, "target_kind": self.target_kind,
               "is_noisy": self.is_noisy, "given_label": self.given_label, "true_label": self.true_label,
               "method": self.method, "flipped": self.flipped, "n_units": len(self.units),
               "units": [{"site": s, "unit": u} for s, u in self.units]}
        for when, acc in (("pre", self.pre), ("post", self.post)):
            for subset, col in (("train_clean", "clean"), ("train_noisy", "noisy"), ("test", "test")):
                out[f"{when}_{col}_acc"] = acc.get(subset, math.nan)
        return out


def select_targets(subject: Subject, n_noisy: int, n_clean: int, n_reference: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target ids, reference ids): seeded samples of the noisy and clean training examples the
    model predicts with their given label, and a clean reference batch disjoint from the targets.
    With rare examples marked (`data.rare_mask`), the clean targets are typical ones (not rare)
    and as many rare targets follow them, drawn after the others (the noisy and clean draws are
    unchanged)."""
    data, base = subject.data, base_masks(subject.etd)
    pred = predict(subject.model, data.x_train, (lambda i: base) if base is not None else None).argmax(1).cpu()
    ok = pred == data.y_train.cpu()
    noisy = data.noise_mask.cpu()
    g = streams.torch_generator("flip.targets", seed)
    noisy_ids = torch.nonzero(ok & noisy).flatten()
    clean_ids = torch.nonzero(ok & ~noisy).flatten()
    noisy_ids = noisy_ids[torch.randperm(len(noisy_ids), generator=g)][:n_noisy]
    perm = clean_ids[torch.randperm(len(clean_ids), generator=g)]
    clean_t = perm[:n_clean]
    rare_t = clean_t[:0]
    if data.rare_mask is not None:
        rare = data.rare_mask.cpu()
        clean_t = perm[~rare[perm]][:n_clean]
        rare_ids = torch.nonzero(ok & rare).flatten()
        rare_t = rare_ids[torch.randperm(len(rare_ids), generator=g)][:n_clean]
    all_clean = torch.nonzero(~noisy).flatten()
    pool = all_clean[~torch.isin(all_clean, torch.cat([clean_t, rare_t]))]
    ref = pool[torch.randperm(len(pool), generator=g)][:n_reference]
    return torch.cat([noisy_ids, clean_t, rare_t]), ref.sort().values


def fixed_samples(data: Data, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded samples (at most n each) of train_clean, train_noisy and test: every edit of a trial
    is measured on the same ones, before and after."""
    g = streams.torch_generator("flip.samples", seed)
    noisy = data.noise_mask.cpu()
    out = {}
    for name, ids in (("train_clean", torch.nonzero(~noisy).flatten()), ("train_noisy", torch.nonzero(noisy).flatten())):
        if len(ids):
            out[name] = ids[torch.randperm(len(ids), generator=g)][:n]
    out["test"] = torch.randperm(data.x_test.shape[0], generator=g)[:n]
    return out


@torch.no_grad()
def post_edit(search: FlipSearch, samples: dict[str, torch.Tensor], units_per_target: list[list[tuple[int, int]]],
              batch_rows: int | None = None) -> list[dict[str, float]]:
    """Accuracy on the fixed samples of train_clean, train_noisy and test, per edited model
    (the search's model with one target's units zeroed). Rows go through in passes of at most
    `batch_rows` (edited models x samples): 8,192 on an accelerator, 256 on a CPU, where a pass's
    activations then stay in cache and under glibc's mmap threshold (LeNet 40 at 28x28, 32
    edits on 3 x 512 samples: 8,192-row passes of 1 GB activations took 9.0 s, most of it
    faulting pages in; the rows are the same in any passes, each row being computed alone)."""
    data = search.data
    if batch_rows is None:
        batch_rows = 256 if search.device.type == "cpu" else 8192
    out: list[dict[str, float]] = [{} for _ in units_per_target]
    sets = {k: (data.x_train[v], data.y_train[v]) for k, v in samples.items() if k != "test"}
    sets["test"] = (data.x_test[samples["test"]], data.y_test[samples["test"]])
    keep = search.keep_rows(units_per_target)
    for name, (x, y) in sets.items():
        n = x.shape[0]
        per = max(1, batch_rows // max(1, n))
        for start in range(0, len(units_per_target), per):
            k = keep[start:start + per]
            right = torch.empty(k.shape[0] * n, dtype=torch.bool, device=search.device)
            masks, _ = search.site_masks(k, 1)  # one row per edit
            masks = [m.detach() for m in masks]
            for a in range(0, k.shape[0] * n, batch_rows):  # rows a..b of (edit, sample) pairs
                b = min(a + batch_rows, k.shape[0] * n)
                rows = torch.arange(a, b, device=search.device)
                pred = search.forward(x[rows % n], [m[rows // n] for m in masks]).argmax(1)
                right[a:b] = pred == y[rows % n]
            acc = right.view(k.shape[0], n).double().mean(1).tolist()
            for j, v in enumerate(acc):
                out[start + j][name] = v
    return out


def flip_rows(subject: Subject, targets: torch.Tensor, reference_ids: torch.Tensor, *,
              method: str = "greedy", budget: int = 64, targets_per_batch: int = 64,
              sites: list[int] | None = None, eval_samples: int = 512, seed: int = 0,
              dtype: torch.dtype = torch.float32, max_rows: int = 2048) -> list[dict[str, Any]]:
    """`flips` rows for `targets` (training example ids)."""
    if method not in FLIP_METHODS:
        raise FlipError(f"method={method!r} is invalid: one of {list(FLIP_METHODS)}")
    if not isinstance(budget, int) or budget < 1:
        raise FlipError(f"budget={budget!r} is invalid: an integer >= 1")
    if not isinstance(targets_per_batch, int) or targets_per_batch < 1:
        raise FlipError(f"targets_per_batch={targets_per_batch!r} is invalid: an integer >= 1")
    data = subject.data
    with subject.frozen(dtype) as model:
        search = FlipSearch(subject, reference_ids, sites=sites, seed=seed, dtype=dtype, max_rows=max_rows)
        tg = torch.as_tensor(targets, dtype=torch.long)
        search.check_ids(tg, "targets")
        res = (search.greedy(tg, budget, targets_per_batch) if method == "greedy" else search.random(tg))
        samples = {k: v.to(search.device) for k, v in fixed_samples(data, eval_samples, seed).items()}
        pre, *post = post_edit(search, samples, [[]] + [u for u, _ in res])
        site_units = [u if s in search.sites else 0 for s, u in enumerate(model.site_units)]
    rows = []
    for t, (units, flipped), p in zip(tg.tolist(), res, post):
        rows.append({**FlipResult(t, data.target_kind(t), bool(data.noise_mask[t]), int(data.y_train[t]),
                                  int(data.y_true[t]), method, flipped, units, pre, p).row(),
                     "site_units": site_units})
    return rows
