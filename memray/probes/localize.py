"""Localization methods scored against ETD's ground truth (EXPERIMENTS.md section 7).

A method ranks the units of a model for one target: which hold its label. In an ETD model part of
the answer is known: among the memorization units, a noisy example's label can only live in
those its own mask kept. The analysis runs in mode `own`: the target and each reference example
carry their own tied masks; the **candidates** are the units active for the target; its
**truth** is the memorization units it kept. Models without ETD: every unit is a candidate and
there is no truth (the scores that need none are still computed).

Every method works through the site masks, batched over targets, on the edit mask E (T, U): unit
u of target i's model is multiplied by E[i, u] on top of the own masks, for the target and for
the reference batch R alike (an edit is a model edit). With

    J_i(E) = -loss(x_i, y_i) + mean_{r in R} loss(r)

a method returns a score per (target, unit), higher = more responsible; the ranking is the
candidates by descending score (ties: the lower flat index, site-major). Methods:
  greedy                the flip search's order (zero the unit with the most negative
                        -E_u dJ/dE_u, one per step), continued past the flip to the budget;
  random                a seeded random order;
  mask_only             the fraction of R whose own masks drop the unit: what the mask structure
                        alone gives away (no weights, no activations);
  zero_out              zero each unit alone: the rise of the target's loss minus the mean rise on R;
  grad_x_act            -(-E_u dJ/dE_u) at E = 1 (one backward): the first greedy step's scores;
  integrated_gradients  dJ/dE along E(t) = t (every unit, t from 1 to 0: the reference term is
                        the same for every target, so it is computed once per step), trapezoid
                        rule; the attributions sum to J(1) - J(0);
  activation            the target's mean activation of u against its mean and spread over R;
  slimming              a per-target mask s in [0, 1] trained (Adam) to flip the target while
                        keeping R, with an L1 penalty on 1 - s; rank by 1 - s.
A method is a function `(Localizer, targets, Options) -> (T, U) float scores`, or a (T, n) long
order of flat unit indices (greedy), registered in `METHODS`; adding one is a function here and
its name in `memray.config.LOCALIZE_METHODS` (which the CLIs validate without loading torch; a
test keeps the two equal).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data import Data
from ..dropout import ExampleTiedDropout
from ..sites import SiteModel


class LocalizeError(ValueError):
    pass


@dataclass(frozen=True)
class Options:
    budget: int = 64  # greedy: units zeroed (at least max(k, |truth|))
    ig_steps: int = 64  # integrated gradients: trapezoid intervals (>= 16)


class Localizer:
    """One frozen model, its reference batch and fixed test sample, in mode `own` (ETD) or plain."""

    def __init__(self, model: SiteModel, data: Data, reference_ids: torch.Tensor, test_ids: torch.Tensor,
                 etd: ExampleTiedDropout | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
        self.model, self.data, self.etd, self.dtype, self.seed = model, data, etd, dtype, seed
        self.device = data.device
        self.units = list(model.site_units)
        self.offsets = [0]
        for c in self.units:
            self.offsets.append(self.offsets[-1] + c)
        self.total = self.offsets[-1]
        self.ref = torch.as_tensor(reference_ids, dtype=torch.long, device=self.device)
        self.xr, self.yr = data.x_train[self.ref].to(dtype), data.y_train[self.ref]
        self.base_r = self.own(self.ref)  # (R, U)
        tid = torch.as_tensor(test_ids, dtype=torch.long, device=self.device)
        self.xs, self.ys = data.x_test[tid].to(dtype), data.y_test[tid]
        all_masks = etd.mode_masks("all") if etd is not None else [None] * len(self.units)
        self.base_test = torch.cat([m if m is not None else torch.ones(c, device=self.device)
                                    for m, c in zip(all_masks, self.units)]).to(dtype)  # (U,) mode `all`

    # -- masks ------------------------------------------------------------------------------
    def own(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, U) own tied masks of training examples (all ones without ETD)."""
        if self.etd is None:
            return torch.ones(len(ids), self.total, dtype=self.dtype, device=self.device)
        m = self.etd.example_masks(ids)
        return torch.cat([m[s] if m[s] is not None else torch.ones(len(ids), c, device=self.device)
                          for s, c in enumerate(self.units)], 1).to(self.dtype)

    def truth(self, ids: torch.Tensor) -> torch.Tensor | None:
        """(N, U) bool: the memorization units each example kept (None without ETD)."""
        if self.etd is None:
            return None
        own = self.own(ids) > 0
        mem = torch.zeros(self.total, dtype=torch.bool, device=self.device)
        for s in self.etd.sites:
            mem[self.offsets[s] + self.etd.gen[s]:self.offsets[s + 1]] = True
        return own & mem

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits of x (N, ...) with per-row flat masks rows (N, U)."""
        masks = [rows[:, a:b] for a, b in zip(self.offsets, self.offsets[1:])]
        return self.model(x, masks)

    def targets(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.data.x_train[ids].to(self.dtype), self.data.y_train[ids], self.own(ids)

    # -- J and its gradient -----------------------------------------------------------------
    def j_grad(self, ids: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(J (T,), dJ_i/dE_i (T, U)) with each target's own edit E_i on itself and on R."""
        xt, yt, bt = self.targets(ids)
        T, R = len(ids), self.ref.numel()
        E = E.detach().to(self.dtype).requires_grad_(True)
        with torch.enable_grad():
            rows = torch.cat([bt * E, (self.base_r[None] * E[:, None]).reshape(T * R, -1)])
            x = torch.cat([xt, self.xr.repeat(T, *[1] * (self.xr.dim() - 1))])
            losses = F.cross_entropy(self.forward(x, rows), torch.cat([yt, self.yr.repeat(T)]), reduction="none")
            J = -losses[:T] + losses[T:].view(T, R).mean(1)
            (g,) = torch.autograd.grad(J.sum(), E)
        return J.detach(), g

    def j_grad_shared(self, ids: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """J and dJ/dE at E = t (every unit, every target): the reference term is one for all."""
        xt, yt, bt = self.targets(ids)
        e_t = torch.full((len(ids), self.total), float(t), dtype=self.dtype, device=self.device, requires_grad=True)
        e_r = torch.full((self.total,), float(t), dtype=self.dtype, device=self.device, requires_grad=True)
        with torch.enable_grad():
            lt = F.cross_entropy(self.forward(xt, bt * e_t), yt, reduction="none")
            lr = F.cross_entropy(self.forward(self.xr, self.base_r * e_r), self.yr).mean()
            gt, = torch.autograd.grad(lt.sum(), e_t)
            gr, = torch.autograd.grad(lr, e_r)
        return (-lt + lr).detach(), -gt + gr[None]

    # -- scoring a ranking ------------------------------------------------------------------
    @torch.no_grad()
    def units_to_flip(self, ids: torch.Tensor, order: torch.Tensor, budget: int) -> list[int | None]:
        """Per target, how many units of its order (a prefix) must be zeroed for its prediction to
        leave its given label (mode own), or None within `budget` units."""
        xt, yt, bt = self.targets(ids)
        out: list[int | None] = []
        B = min(budget, order.shape[1])
        steps = torch.arange(1, B + 1, device=self.device)
        for i in range(len(ids)):
            rank = torch.empty(self.total, dtype=torch.long, device=self.device)
            rank[order[i]] = torch.arange(order.shape[1], device=self.device)
            if order.shape[1] < self.total:  # units outside the order are never zeroed
                rank[~torch.isin(torch.arange(self.total, device=self.device), order[i])] = self.total
            keep = (rank[None, :] >= steps[:, None]).to(self.dtype)  # (B, U): first j of the order zeroed
            pred = self.forward(xt[i:i + 1].expand(B, *xt.shape[1:]), bt[i:i + 1] * keep).argmax(1)
            hit = torch.nonzero(pred != yt[i]).flatten()
            out.append(int(hit[0]) + 1 if hit.numel() else None)
        return out

    @torch.no_grad()
    def after_zeroing(self, zeroed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(accuracy on R in mode own, on the fixed test sample in mode all) with each row of
        `zeroed` (N, U) bool zeroed."""
        keep = (~zeroed).to(self.dtype)
        ref, test = [], []
        for k in keep:
            pr = self.forward(self.xr, self.base_r * k).argmax(1)
            ps = self.forward(self.xs, (self.base_test * k).expand(len(self.xs), -1)).argmax(1)
            ref.append((pr == self.yr).double().mean())
            test.append((ps == self.ys).double().mean())
        return torch.stack(ref), torch.stack(test)


# ----------------------------------------------------------------------------- the methods
def greedy(loc: Localizer, ids: torch.Tensor, opts: Options = Options()) -> torch.Tensor:
    """(T, budget) flat unit indices in the order greedy zeroes them (candidates only)."""
    T, budget = len(ids), opts.budget
    cand = loc.own(torch.as_tensor(ids, device=loc.device)) > 0
    E = torch.ones(T, loc.total, dtype=loc.dtype, device=loc.device)
    steps = min(budget, int(cand.sum(1).min()))
    order = torch.empty(T, steps, dtype=torch.long, device=loc.device)
    for k in range(steps):
        _, g = loc.j_grad(ids, E)
        delta = (-E * g).masked_fill(~cand | (E == 0), math.inf)
        pick = delta.argmin(1)  # first minimum: the lowest flat index on ties
        order[:, k] = pick
        E[torch.arange(T), pick] = 0
    return order


def random_scores(loc: Localizer, ids: torch.Tensor, opts: Options = Options()) -> torch.Tensor:
    out = torch.empty(len(ids), loc.total, dtype=torch.float64, device=loc.device)
    for i, t in enumerate(torch.as_tensor(ids).tolist()):
        g = torch.Generator().manual_seed(loc.seed * 1_000_003 + t)
        out[i] = torch.rand(loc.total, generator=g, dtype=torch.float64).to(loc.device)
    return out


def mask_only(loc: Localizer, ids: torch.Tensor, opts: Options = Options()) -> torch.Tensor:
    return (loc.base_r == 0).double().mean(0).expand(len(ids), -1).clone()


@torch.no_grad()
def zero_out(loc: Localizer, ids: torch.Tensor, opts: Options = Options(), chunk: int = 256) -> torch.Tensor:
    """Rise of the target's loss minus the mean rise on R when unit u alone is zeroed."""
    xt, yt, bt = loc.targets(ids)
    T, U, R = len(ids), loc.total, loc.ref.numel()
    base_t = F.cross_entropy(loc.forward(xt, bt), yt, reduction="none")  # (T,)
    base_r = F.cross_entropy(loc.forward(loc.xr, loc.base_r), loc.yr, reduction="none").mean()
    out = torch.empty(T, U, dtype=loc.dtype, device=loc.device)
    eye = torch.eye(U, dtype=loc.dtype, device=loc.device)
    for a in range(0, U, chunk):
        b = min(a + chunk, U)
        keep = 1 - eye[a:b]  # (n, U): unit a..b zeroed, one per row
        n = b - a
        lt = F.cross_entropy(loc.forward(xt.repeat_interleave(n, 0), (bt[:, None] * keep[None]).reshape(T * n, U)),
                             yt.repeat_interleave(n), reduction="none").view(T, n)
        lr = F.cross_entropy(loc.forward(loc.xr.repeat(n, *[1] * (loc.xr.dim() - 1)),
                                         (keep[:, None] * loc.base_r[None]).reshape(n * R, U)),
                             loc.yr.repeat(n), reduction="none").view(n, R).mean(1)
        out[:, a:b] = (lt - base_t[:, None]) - (lr - base_r)[None]
    return out


def grad_x_act(loc: Localizer, ids: torch.Tensor, opts: Options = Options()) -> torch.Tensor:
    """-delta_u = E_u dJ/dE_u at E = 1: the first greedy step's scores (higher = zeroed first)."""
    _, g = loc.j_grad_shared(ids, 1.0)
    return g


def integrated_gradients(loc: Localizer, ids: torch.Tensor, opts: Options = Options()) -> torch.Tensor:
    """A_u = integral over t in [0, 1] of dJ/dE_u at E = t (trapezoid, `opts.ig_steps` intervals):
    the attributions sum to J(1) - J(0). Higher = zeroing it lowers J more (first order)."""
    steps = opts.ig_steps
    if steps < 16:
        raise LocalizeError(f"steps={steps} is invalid: at least 16 (the trapezoid rule's error)")
    acc = torch.zeros(len(ids), loc.total, dtype=torch.float64, device=loc.device)
    for k in range(steps + 1):
        _, g = loc.j_grad_shared(ids, 1 - k / steps)
        acc += g.double() * (0.5 if k in (0, steps) else 1.0)
    return acc / steps


def ig_completeness(loc: Localizer, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|sum of attributions - (J(1) - J(0))|, sum of |attributions|) per target."""
    a = integrated_gradients(loc, ids, Options(ig_steps=steps))
    j1, _ = loc.j_grad_shared(ids, 1.0)
    j0, _ = loc.j_grad_shared(ids, 0.0)
    return (a.sum(1) - (j1 - j0).double()).abs(), a.abs().sum(1)


@torch.no_grad()
def activation(loc: Localizer, ids: torch.Tensor, opts: Options = Options()) -> torch.Tensor:
    """z-score of the target's mean activation of u (post-mask, over positions) against R's."""
    xt, _, bt = loc.targets(ids)
    acts: list[torch.Tensor] = []

    def hook(site, inputs, out):
        dims = [d for d in range(out.dim()) if d not in (0, site.unit_dim % out.dim())]
        acts.append(out.mean(dims) if dims else out)

    handles = [s.register_forward_hook(hook) for s in loc.model.sites]
    try:
        loc.forward(xt, bt)
        at = torch.cat(acts, 1)
        acts.clear()
        loc.forward(loc.xr, loc.base_r)
        ar = torch.cat(acts, 1)
    finally:
        for h in handles:
            h.remove()
    return (at - ar.mean(0)) / ar.std(0).clamp_min(1e-6)


def slimming(loc: Localizer, ids: torch.Tensor, opts: Options = Options(), steps: int = 60, lr: float = 0.1,
             l1: float = 0.01) -> torch.Tensor:
    """1 - s for a per-target mask s = sigmoid(w) (initially about 1) trained by Adam to minimise
    J_i(s) + l1 * sum(1 - s): flip the target, keep R, remove few units. Targets are independent
    (their losses are summed), so batching changes nothing."""
    w = torch.full((len(ids), loc.total), 3.0, dtype=loc.dtype, device=loc.device, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        s = torch.sigmoid(w)
        J, g = loc.j_grad(ids, s)
        # d/dw of sum_i [J_i + l1 sum(1 - s_i)] = (dJ/ds - l1) * s (1 - s)
        opt.zero_grad(set_to_none=True)
        w.grad = ((g - l1) * s * (1 - s)).detach()
        opt.step()
    return 1 - torch.sigmoid(w.detach())


Method = Callable[..., torch.Tensor]
METHODS: dict[str, Method] = {"greedy": greedy, "random": random_scores, "mask_only": mask_only,
                              "zero_out": zero_out, "grad_x_act": grad_x_act,
                              "integrated_gradients": integrated_gradients, "activation": activation,
                              "slimming": slimming}


def ranking(loc: Localizer, method: str, ids: torch.Tensor, budget: int, ig_steps: int = 64) -> torch.Tensor:
    """(T, U) flat unit indices, most responsible first: each target's candidates, then the units
    its own mask already drops (greedy: its first `budget` zeroings, candidates only)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=loc.device)
    if method not in METHODS:
        raise LocalizeError(f"method={method!r} is invalid: one of {sorted(METHODS)}")
    out = METHODS[method](loc, ids, Options(budget=budget, ig_steps=ig_steps))
    if out.dtype == torch.long:  # an order already
        return out
    scores = out.double()
    cand = loc.own(ids) > 0
    scores = scores.masked_fill(~cand, -math.inf)
    # stable descending sort: ties keep the lower flat index first; each target's own candidates
    # come first, the units already off for it (not candidates) last
    return torch.sort(-scores, dim=1, stable=True).indices


def localization_rows(model: SiteModel, data: Data, targets: torch.Tensor, reference_ids: torch.Tensor,
                      test_ids: torch.Tensor, methods: list[str], ks: list[int], *, budget: int,
                      etd: ExampleTiedDropout | None = None, seed: int = 0, ig_steps: int = 64,
                      dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """`localization` rows: per target, method and k (|truth| and each fixed k): precision and
    recall of the top k against the truth (null without ETD), units to flip in rank order, and
    accuracy on R (mode own) and on a fixed test sample (mode all) after zeroing the top k."""
    was_training, orig = model.training, next(model.parameters()).dtype
    req = [p.requires_grad for p in model.parameters()]
    model.eval().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        loc = Localizer(model, data, reference_ids, test_ids, etd, dtype, seed)
        ids = torch.as_tensor(targets, dtype=torch.long, device=loc.device)
        truth = loc.truth(ids)
        n_cand = (loc.own(ids) > 0).sum(1).tolist()
        rows = []
        for method in methods:
            t0 = time.perf_counter()
            need = max([*ks, *(truth.sum(1).tolist() if truth is not None else [])])
            order = ranking(loc, method, ids, max(budget, need), ig_steps)
            flips = loc.units_to_flip(ids, order, budget)
            seconds = (time.perf_counter() - t0) / max(1, len(ids))
            for i, t in enumerate(ids.tolist()):
                n_truth = int(truth[i].sum()) if truth is not None else None
                for k in sorted({*ks, *([n_truth] if n_truth else [])}):
                    top = order[i, :k]
                    zeroed = torch.zeros(loc.total, dtype=torch.bool, device=loc.device)
                    zeroed[top] = True
                    ref_acc, test_acc = loc.after_zeroing(zeroed[None])
                    hit = int(truth[i][top].sum()) if truth is not None else None
                    rows.append({"example_id": t, "target_kind": data.target_kind(t),
                                 "mode": "own" if etd is not None else "plain", "method": method, "k": int(k),
                                 "n_candidates": int(n_cand[i]), "n_truth": n_truth,
                                 "precision": hit / k if hit is not None else None,
                                 "recall": hit / n_truth if n_truth else None,
                                 "flipped": flips[i] is not None, "units_to_flip": flips[i],
                                 "post_ref_acc": float(ref_acc[0]), "post_test_acc": float(test_acc[0]),
                                 "seconds": seconds})
        return rows
    finally:
        model.to(orig)
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
