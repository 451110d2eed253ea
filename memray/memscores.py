"""Memorization scores (EXPERIMENTS.md section 8): the estimator and stacked subset training.

After Feldman & Zhang (2020): K models with one recipe (no ETD), model k trained on a seeded random
subset S_k holding a fraction r of the training set. For example i with given label y_i:

    acc_in(i)  = mean over k with i in S_k     of [h_k(x_i) = y_i]
    acc_out(i) = mean over k with i not in S_k of [h_k(x_i) = y_i]
    score      = acc_in - acc_out
    stderr     = sqrt(acc_in (1 - acc_in) / n_in + acc_out (1 - acc_out) / n_out)

(NaN, and excluded, where n_in or n_out is 0). Subsets are regenerated from their seeds
(`subset_mask`), so a trial stores only each model's seed and its predictions (int16).

`train_stacked` trains M models at once in one process: their parameters stacked
(`torch.func.stack_module_state`), one `vmap` of `functional_call` and `grad` per step, each
model with its own subset, data order and initialisation, and SGD with momentum on the stacked
tensors (elementwise, so exactly per-model SGD). `train_one` is the same recipe one model at a
time; the two agree in float64 (tested). Models with BatchNorm are not stacked here (vmap over
running statistics would need `functional_call` to return buffers): this covers the mlp.

This is the library half of the scoring sweep; the Ray sweep, its tables and the grid sweep's use
of the scores are not built yet.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

from .models import build_model


def subset_mask(seed: int, n: int, fraction: float) -> torch.Tensor:
    """(n,) bool: the seeded subset S_k of round(fraction * n) training examples."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=g)[:round(fraction * n)]] = True
    return out


def scores(predictions: torch.Tensor, in_subset: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per example: n_in, n_out, acc_in, acc_out, score, stderr (float64; NaN where n_in or n_out
    is 0). predictions (K, N) class ids, in_subset (K, N) bool, labels (N,) given labels."""
    right = (predictions.long() == labels.long()[None]).double()
    inn, out = in_subset.double(), (~in_subset).double()
    n_in, n_out = inn.sum(0), out.sum(0)
    acc_in = (right * inn).sum(0) / n_in
    acc_out = (right * out).sum(0) / n_out
    stderr = (acc_in * (1 - acc_in) / n_in + acc_out * (1 - acc_out) / n_out).sqrt()
    return {"n_in": n_in, "n_out": n_out, "acc_in": acc_in, "acc_out": acc_out, "score": acc_in - acc_out,
            "stderr": stderr}


@dataclass(frozen=True)
class Recipe:
    arch: str = "mlp"
    width: int = 512
    epochs: int = 60
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    fraction: float = 0.7


def _init(recipe: Recipe, seed: int, in_shape, classes, dtype) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(recipe.arch, recipe.width, in_shape, classes).to(dtype)


def _batches(seed: int, ids: torch.Tensor, epochs: int, batch_size: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed * 1000 + 1)
    return [list(ids[torch.randperm(len(ids), generator=g)].split(batch_size)) for _ in range(epochs)]


def _lr(recipe: Recipe, step: int, total: int) -> float:
    t = step / max(1, total)  # one-cycle: linear up to the peak at 20%, then linear down
    return recipe.lr * (t / 0.2 if t < 0.2 else max(0.0, (1 - t) / 0.8))


def train_one(recipe: Recipe, seed: int, x: torch.Tensor, y: torch.Tensor,
              classes: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model on its subset: (its predictions on all of x (int16), its parameters)."""
    model = _init(recipe, seed, tuple(x.shape[1:]), classes, x.dtype)
    ids = torch.nonzero(subset_mask(seed, len(x), recipe.fraction)).flatten()
    plan = _batches(seed, ids, recipe.epochs, recipe.batch_size)
    total = sum(len(e) for e in plan)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    step = 0
    for epoch in plan:
        for b in epoch:
            for group in opt.param_groups:
                group["lr"] = _lr(recipe, step, total)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return model.eval()(x).argmax(1).to(torch.int16), {k: v.detach() for k, v in model.named_parameters()}


def train_stacked(recipe: Recipe, seeds: list[int], x: torch.Tensor, y: torch.Tensor,
                  classes: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """len(seeds) models trained at once (see the module doc): ((M, N) int16 predictions, the
    stacked parameters {name: (M, ...)})."""
    models = [_init(recipe, s, tuple(x.shape[1:]), classes, x.dtype) for s in seeds]
    params = {k: v.detach() for k, v in stack_module_state(models)[0].items()}  # {name: (M, ...)}, no autograd graph
    base = copy.deepcopy(models[0]).to("meta")
    plans = [_batches(s, torch.nonzero(subset_mask(s, len(x), recipe.fraction)).flatten(), recipe.epochs,
                      recipe.batch_size) for s in seeds]
    steps = [len(b) for b in plans[0]]
    assert all([len(b) for b in p] == steps for p in plans), "equal subsets give equal batch counts"
    total = sum(steps)

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(base, p, (xb,)), yb)

    grads = vmap(grad(loss))
    mom = {k: torch.zeros_like(v) for k, v in params.items()}
    step = 0
    for e, n in enumerate(steps):
        for j in range(n):
            idx = torch.stack([p[e][j] for p in plans])  # (M, B): every model's batch
            g = grads(params, x[idx], y[idx])
            lr = _lr(recipe, step, total)
            with torch.no_grad():
                for k in params:
                    mom[k].mul_(recipe.momentum).add_(g[k])  # torch.optim.SGD's momentum buffer
                    params[k].sub_(mom[k], alpha=lr)
            step += 1
    with torch.no_grad():
        logits = vmap(lambda p: functional_call(base, p, (x,)))(params)  # (M, N, classes)
    return logits.argmax(-1).to(torch.int16), params


def model_seeds(models: int, base_seed: int = 0) -> list[int]:
    """The subset (and init, and order) seed of each of K models."""
    return [base_seed * 1_000_003 + k for k in range(models)]


def median_stderr(s: dict[str, torch.Tensor]) -> float:
    v = s["stderr"][~s["stderr"].isnan()]
    return float(v.median()) if v.numel() else math.nan
