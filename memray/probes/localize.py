"""Localization methods scored against ETD's ground truth (EXPERIMENTS.md section 7, protocol 3).

A method ranks units for one target: which hold its memorized label. In an ETD model part of the
answer is known: among the memorization units, a noisy example's label can only live in those
its own mask kept (the others never saw it). Protocol 2 scored methods in mode `own`, where
every unit a target did not keep is exactly zero and the generalization units are on for every
example, so the truth was readable from the zeros and the unit type (a ranking by the masks
alone reached precision 1.0). Protocol 3 removes both leaks: **only memorization units are
candidates**, and **no candidate is zero because of the target's mask**. Two tracks:

  decoy  the target runs with the generalization units, its kept memorization units and, per
         site, d = min(kept, not kept) decoys (memorization units it did not keep, drawn from its
         own stream); candidates: kept + decoys; truth: kept; chance |truth| / |candidates|
         (0.5 whenever p_mem <= 0.5). R runs in mode `own`, each with its own mask, so a decoy
         and a truth unit are kept by the same expected share of R. Units to flip are counted
         for targets that predict their given label under the decoy mask (`given_before`).
  all    target and R in mode `all` (every unit on, memorization units scaled by p_mem);
         candidates: every memorization unit; truth: the target's kept units. ETD models do not
         predict noisy labels in this mode, so there is no flip metric: the fall of
         log p(given label) after zeroing the top-|truth| is scored instead.

Models without ETD have one track, `none`: every unit is a candidate, there is no truth, and the
scores that need none (units to flip, log-prob fall, accuracy after zeroing) are computed.

Every method works through the site masks, batched over targets, on an edit mask E (T, U): unit
u of target i's model is multiplied by E[i, u] on top of its track's base mask, for the target
and for R alike (an edit is a model edit). With J_i(E) = -loss(x_i, y_i) + mean_{r in R} loss(r),
a method returns a score per (target, unit), higher = more responsible, ranked over the
candidates by descending score (ties: the lower flat index, site-major):
  greedy                the flip search's order (zero the candidate with the most negative
                        -E_u dJ/dE_u, one per step), continued past the flip to the budget;
  zero_out              zero each candidate alone: the target's loss rise minus R's mean rise;
  grad_x_act            E_u dJ/dE_u at E = 1 (one backward): the first greedy step's scores;
  integrated_gradients  dJ/dE along E(t) = t on the candidates (1 elsewhere), t from 1 to 0,
                        trapezoid rule; the attributions sum to J(1) - J(0) (in `all` the
                        candidates are the same for every target, so the reference term is
                        computed once a step; in `decoy` it is per target);
  activation            the target's mean (post-mask) activation of u against R's mean and spread;
  slimming              a per-target mask s on the candidates trained (Adam) to flip the target
                        while keeping R, with an L1 penalty on 1 - s; rank by 1 - s;
and the **leak controls**, which must sit at chance (a control above chance means the design
leaks): `mask_only` (the fraction of R whose own masks drop the unit: no weights, no
activations), `class_mean` (the unit's mean pre-mask activation over the training examples of the
target's given label, every target of the trial excluded, in R's mode), `random` (a seeded random
order per target). `oracle` ranks by the target's own mask: precision 1.0, a plumbing check, and
in `all` the ceiling of the log-prob fall.

A method is a function `(Localizer, Targets, Options) -> (T, U) float scores`, or a (T, n) long
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

from .. import streams
from . import Subject

TRACKS = ("decoy", "all")
PASS_ROWS = 128  # rows per forward / backward pass: large enough to batch, small enough for cache
CONTROLS = ("mask_only", "class_mean", "random")  # leak controls: must sit at chance
REFERENCE_ONLY = ("oracle",)  # knows the truth: a plumbing check and a ceiling


class LocalizeError(ValueError):
    pass


@dataclass(frozen=True)
class Options:
    budget: int = 64  # greedy: units zeroed (at least max(k, |truth|))
    ig_steps: int = 64  # integrated gradients: trapezoid intervals (>= 16)


@dataclass
class Targets:
    """One batch of targets in one track: their inputs, given labels and masks (T, U)."""

    ids: torch.Tensor  # (T,) example ids
    x: torch.Tensor
    y: torch.Tensor
    base: torch.Tensor  # (T, U) the track's mask of each target (float)
    cand: torch.Tensor  # (T, U) bool candidates
    truth: torch.Tensor | None  # (T, U) bool: the memorization units each target kept (None: no ETD)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shared_candidates(self) -> bool:
        return bool((self.cand == self.cand[:1]).all())


class Localizer:
    """One subject (its model frozen), its reference batch R and fixed test sample, in one track."""

    def __init__(self, subject: Subject, reference_ids: torch.Tensor, test_ids: torch.Tensor, track: str = "decoy",
                 dtype: torch.dtype = torch.float32, seed: int = 0):
        model, data, etd = subject.model, subject.data, subject.etd
        if etd is None:
            track = "none"
        elif track not in TRACKS:
            raise LocalizeError(f"track={track!r} is invalid: one of {list(TRACKS)}")
        self.model, self.data, self.etd, self.track, self.dtype, self.seed = model, data, etd, track, dtype, seed
        self.device = data.device
        self.units = list(model.site_units)
        self.offsets = [0]
        for c in self.units:
            self.offsets.append(self.offsets[-1] + c)
        self.total = self.offsets[-1]
        self.mem = torch.zeros(self.total, dtype=torch.bool, device=self.device)  # memorization units
        if etd is not None:
            for s in etd.sites:
                self.mem[self.offsets[s] + etd.gen[s]:self.offsets[s + 1]] = True
        all_masks = etd.mode_masks("all") if etd is not None else [None] * len(self.units)
        self.base_all = torch.cat([m if m is not None else torch.ones(c, device=self.device)
                                   for m, c in zip(all_masks, self.units)]).to(dtype)  # (U,) mode `all`
        self.ref = torch.as_tensor(reference_ids, dtype=torch.long, device=self.device)
        self.xr, self.yr = data.x_train[self.ref].to(dtype), data.y_train[self.ref]
        self.own_r = self.own(self.ref)  # (R, U) R's own tied masks (mask_only reads them)
        self.base_r = self.own_r if track == "decoy" else self.base_all.expand(len(self.ref), -1)
        tid = torch.as_tensor(test_ids, dtype=torch.long, device=self.device)
        self.xs, self.ys = data.x_test[tid].to(dtype), data.y_test[tid]
        self.mode = {"decoy": "own", "all": "all", "none": "plain"}[track]  # the mode R runs in

    # -- masks ------------------------------------------------------------------------------
    def own(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, U) own tied masks of training examples (all ones without ETD)."""
        if self.etd is None:
            return torch.ones(len(ids), self.total, dtype=self.dtype, device=self.device)
        m = self.etd.example_masks(ids)
        return torch.cat([m[s] if m[s] is not None else torch.ones(len(ids), c, device=self.device)
                          for s, c in enumerate(self.units)], 1).to(self.dtype)

    def decoys(self, example_id: int, own: torch.Tensor) -> torch.Tensor:
        """(U,) bool: per site, d = min(kept, not kept) memorization units the target did not keep,
        drawn from its own stream (`localize.decoys`, seed, example id)."""
        rng = streams.numpy_rng("localize.decoys", self.seed, example_id)
        out = torch.zeros(self.total, dtype=torch.bool)
        kept = (own > 0).cpu() & self.mem.cpu()
        off = (own == 0).cpu() & self.mem.cpu()
        for a, b in zip(self.offsets, self.offsets[1:]):
            pool = torch.nonzero(off[a:b]).flatten().numpy() + a
            d = min(int(kept[a:b].sum()), len(pool))
            if d:
                out[torch.as_tensor(rng.choice(pool, size=d, replace=False))] = True
        return out.to(self.device)

    def targets(self, ids) -> Targets:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        x, y, own = self.data.x_train[ids].to(self.dtype), self.data.y_train[ids], self.own(ids)
        if self.track == "none":
            ones = torch.ones(len(ids), self.total, dtype=torch.bool, device=self.device)
            return Targets(ids, x, y, own, ones, None)
        truth = (own > 0) & self.mem
        if self.track == "all":
            cand = self.mem.expand(len(ids), -1).clone()
            return Targets(ids, x, y, self.base_all.expand(len(ids), -1).clone(), cand, truth)
        dec = torch.stack([self.decoys(int(i), own[n]) for n, i in enumerate(ids.tolist())])
        base = torch.where(dec, torch.ones_like(own), own)  # generalization + kept + decoys on
        return Targets(ids, x, y, base, truth | dec, truth)

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits of x (N, ...) with per-row flat masks rows (N, U)."""
        masks = [rows[:, a:b] for a, b in zip(self.offsets, self.offsets[1:])]
        return self.model(x, masks)

    # -- J and its gradient -----------------------------------------------------------------
    def j_grad(self, tg: Targets, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(J (T,), dJ_i/dE_i (T, U)) with each target's own edit E_i on itself and on R. Targets
        are independent: they go through in passes of about `PASS_ROWS` rows (each target's row
        and its R block), which keeps a pass's activations in cache (LeNet 40 at 28x28, 32 targets
        and |R| = 32: 1,056 rows in one pass 1.30-1.34 s, in passes of 64-256 rows 0.66-0.89 s)."""
        T, R = len(tg), self.ref.numel()
        step = max(1, PASS_ROWS // (1 + R))
        Js, gs = [], []
        for a in range(0, T, step):
            b = min(a + step, T)
            n = b - a
            e = E[a:b].detach().to(self.dtype).clone().requires_grad_(True)
            with torch.enable_grad():
                rows = torch.cat([tg.base[a:b] * e, (self.base_r[None] * e[:, None]).reshape(n * R, -1)])
                x = torch.cat([tg.x[a:b], self.xr.repeat(n, *[1] * (self.xr.dim() - 1))])
                losses = F.cross_entropy(self.forward(x, rows), torch.cat([tg.y[a:b], self.yr.repeat(n)]),
                                         reduction="none")
                J = -losses[:n] + losses[n:].view(n, R).mean(1)
                (g,) = torch.autograd.grad(J.sum(), e)
            Js.append(J.detach())
            gs.append(g)
        if not Js:  # no targets
            return (torch.empty(0, dtype=self.dtype, device=self.device),
                    torch.empty(0, self.total, dtype=self.dtype, device=self.device))
        return torch.cat(Js), torch.cat(gs)

    def j_grad_path(self, tg: Targets, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """J and dJ/dE at E = t on each target's candidates (1 elsewhere). When every target has
        the same candidates (track `all`, plain models, or t = 1) the reference term is one for
        all targets and is computed once; otherwise per target."""
        if not (t == 1.0 or tg.shared_candidates):
            E = torch.where(tg.cand, torch.full_like(tg.base, float(t)), torch.ones_like(tg.base))
            return self.j_grad(tg, E)
        e_row = torch.where(tg.cand[0], torch.full((self.total,), float(t), dtype=self.dtype, device=self.device),
                            torch.ones(self.total, dtype=self.dtype, device=self.device))
        e_t = e_row.expand(len(tg), -1).clone().requires_grad_(True)
        e_r = e_row.clone().requires_grad_(True)
        with torch.enable_grad():
            lt = F.cross_entropy(self.forward(tg.x, tg.base * e_t), tg.y, reduction="none")
            lr = F.cross_entropy(self.forward(self.xr, self.base_r * e_r), self.yr).mean()
            gt, = torch.autograd.grad(lt.sum(), e_t)
            gr, = torch.autograd.grad(lr, e_r)
        return (-lt + lr).detach(), -gt + gr[None]

    # -- scoring a ranking ------------------------------------------------------------------
    @torch.no_grad()
    def predicts_given(self, tg: Targets) -> torch.Tensor:
        """(T,) bool: each target predicts its given label under its track's mask, unedited."""
        return self.forward(tg.x, tg.base).argmax(1) == tg.y

    @torch.no_grad()
    def units_to_flip(self, tg: Targets, order: torch.Tensor, budget: int) -> list[int | None]:
        """Per target, how many units of its order (a prefix of its candidates) must be zeroed for
        its prediction to leave its given label, or None within `budget` units."""
        out: list[int | None] = []
        for i in range(len(tg)):
            B = min(budget, order.shape[1], int(tg.cand[i].sum()))
            steps = torch.arange(1, B + 1, device=self.device)
            rank = torch.full((self.total,), self.total, dtype=torch.long, device=self.device)
            rank[order[i]] = torch.arange(order.shape[1], device=self.device)
            keep = (rank[None, :] >= steps[:, None]).to(self.dtype)  # (B, U): first j of the order zeroed
            pred = self.forward(tg.x[i:i + 1].expand(B, *tg.x.shape[1:]), tg.base[i:i + 1] * keep).argmax(1)
            hit = torch.nonzero(pred != tg.y[i]).flatten()
            out.append(int(hit[0]) + 1 if hit.numel() else None)
        return out

    @torch.no_grad()
    def after_zeroing(self, tg: Targets, i: int, zeroed: torch.Tensor) -> tuple[float, float, float]:
        """(fall of the target's log p(given label), accuracy on R in R's mode, on the fixed test
        sample in mode all) with `zeroed` (U,) bool zeroed."""
        keep = (~zeroed).to(self.dtype)
        x, y = tg.x[i:i + 1], tg.y[i:i + 1]
        before = F.log_softmax(self.forward(x, tg.base[i:i + 1]), 1)[0, y[0]]
        after = F.log_softmax(self.forward(x, tg.base[i:i + 1] * keep), 1)[0, y[0]]
        pr = self.forward(self.xr, self.base_r * keep).argmax(1)
        ps = self.forward(self.xs, (self.base_all * keep).expand(len(self.xs), -1)).argmax(1)
        return (float(before - after), float((pr == self.yr).double().mean()),
                float((ps == self.ys).double().mean()))


# ----------------------------------------------------------------------------- the methods
def greedy(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    """(T, steps) flat unit indices in the order greedy zeroes them (candidates only)."""
    T = len(tg)
    E = torch.ones(T, loc.total, dtype=loc.dtype, device=loc.device)
    steps = min(opts.budget, int(tg.cand.sum(1).min()))
    order = torch.empty(T, steps, dtype=torch.long, device=loc.device)
    for k in range(steps):
        _, g = loc.j_grad(tg, E)
        delta = (-E * g).masked_fill(~tg.cand | (E == 0), math.inf)
        pick = delta.argmin(1)  # first minimum: the lowest flat index on ties
        order[:, k] = pick
        E[torch.arange(T), pick] = 0
    return order


def random_scores(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    rows = [torch.from_numpy(streams.numpy_rng("localize.random", loc.seed, int(t)).random(loc.total))
            for t in tg.ids.tolist()]
    return torch.stack(rows).to(loc.device)


def mask_only(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    """The fraction of R whose own masks drop the unit: what the masks alone give away."""
    return (loc.own_r == 0).double().mean(0).expand(len(tg), -1).clone()


def oracle(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    if tg.truth is None:
        raise LocalizeError("the oracle needs ETD's truth (a model trained with example-tied dropout)")
    return tg.truth.double()


@torch.no_grad()
def zero_out(loc: Localizer, tg: Targets, opts: Options = Options(), chunk: int | None = None) -> torch.Tensor:
    """Rise of the target's loss minus the mean rise on R when candidate u alone is zeroed (-inf
    off the target's candidates). R's rise is computed once per unit for every target, `chunk`
    units (chunk x |R| rows) a pass; each target goes alone, in passes of its unedited row and
    `chunk` edited ones, so its scores do not depend on the targets beside it. Default chunks:
    about `PASS_ROWS` rows a pass (LeNet 40 at 28x28, 32 targets in the decoy track: 5.9 s,
    against 24.9 s in passes of 256 units for all targets at once)."""
    T, R = len(tg), loc.ref.numel()
    out = torch.full((T, loc.total), -math.inf, dtype=loc.dtype, device=loc.device)
    units = torch.nonzero(tg.cand.any(0)).flatten()
    eye = torch.ones(loc.total, dtype=loc.dtype, device=loc.device)

    def edits(u: torch.Tensor) -> torch.Tensor:  # (n, U): unit u_j zeroed in row j
        keep = eye.expand(len(u), -1).clone()
        keep[torch.arange(len(u)), u] = 0
        return keep

    base_r = F.cross_entropy(loc.forward(loc.xr, loc.base_r), loc.yr, reduction="none").mean()
    rise_r = torch.empty(loc.total, dtype=loc.dtype, device=loc.device)
    step = chunk or max(1, PASS_ROWS // max(R, 1))
    for a in range(0, len(units), step):
        u = units[a:a + step]
        n = len(u)
        lr = F.cross_entropy(loc.forward(loc.xr.repeat(n, *[1] * (loc.xr.dim() - 1)),
                                         (edits(u)[:, None] * loc.base_r[None]).reshape(n * R, -1)),
                             loc.yr.repeat(n), reduction="none").view(n, R).mean(1)
        rise_r[u] = lr - base_r
    step = chunk or PASS_ROWS - 1
    for i in range(T):
        mine = torch.nonzero(tg.cand[i]).flatten()
        for a in range(0, len(mine), step):
            u = mine[a:a + step]
            rows = torch.cat([eye[None], edits(u)]) * tg.base[i]
            lt = F.cross_entropy(loc.forward(tg.x[i:i + 1].expand(len(u) + 1, *tg.x.shape[1:]), rows),
                                 tg.y[i].expand(len(u) + 1), reduction="none")
            out[i, u] = (lt[1:] - lt[0]) - rise_r[u]
    return out


def grad_x_act(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    """-delta_u = E_u dJ/dE_u at E = 1: the first greedy step's scores (higher = zeroed first)."""
    _, g = loc.j_grad_path(tg, 1.0)
    return g


def integrated_gradients(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    """A_u = integral over t in [0, 1] of dJ/dE_u at E = t on the candidates (trapezoid,
    `opts.ig_steps` intervals): the attributions sum to J(1) - J(0). Higher = zeroing it lowers
    J more (first order)."""
    steps = opts.ig_steps
    if steps < 16:
        raise LocalizeError(f"steps={steps} is invalid: at least 16 (the trapezoid rule's error)")
    acc = torch.zeros(len(tg), loc.total, dtype=torch.float64, device=loc.device)
    for k in range(steps + 1):
        _, g = loc.j_grad_path(tg, 1 - k / steps)
        acc += g.double() * (0.5 if k in (0, steps) else 1.0)
    return acc / steps


def ig_completeness(loc: Localizer, tg: Targets, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|sum of attributions over the candidates - (J(1) - J(0))|, sum of |attributions|) per target."""
    a = integrated_gradients(loc, tg, Options(ig_steps=steps)).masked_fill(~tg.cand, 0)
    j1, _ = loc.j_grad_path(tg, 1.0)
    j0, _ = loc.j_grad_path(tg, 0.0)
    return (a.sum(1) - (j1 - j0).double()).abs(), a.abs().sum(1)


def _site_means(loc: Localizer, x: torch.Tensor, rows: torch.Tensor, pre_mask: bool, chunk: int = 512) -> torch.Tensor:
    """(N, U) each unit's mean activation over positions at its site: after the site's mask, or
    before it (`pre_mask`: the site's input, through its ReLU where it applies one)."""
    acts: list[torch.Tensor] = []

    def hook(site, inputs, out):
        a = (torch.relu(inputs[0]) if site.relu else inputs[0]) if pre_mask else out
        dims = [d for d in range(a.dim()) if d not in (0, site.unit_dim % a.dim())]
        acts.append(a.mean(dims) if dims else a)

    handles = [s.register_forward_hook(hook) for s in loc.model.sites]
    out = []
    try:
        with torch.no_grad():
            for a in range(0, len(x), chunk):
                loc.forward(x[a:a + chunk], rows[a:a + chunk])
                out.append(torch.cat(acts, 1))
                acts.clear()
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out) if out else torch.empty(0, loc.total, device=loc.device)


def activation(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    """z-score of the target's mean activation of u (post-mask, over positions) against R's."""
    at = _site_means(loc, tg.x, tg.base, pre_mask=False)
    ar = _site_means(loc, loc.xr, loc.base_r, pre_mask=False)
    return (at - ar.mean(0)) / ar.std(0).clamp_min(1e-6)


def class_mean(loc: Localizer, tg: Targets, opts: Options = Options()) -> torch.Tensor:
    """The unit's mean pre-mask activation over the training examples of the target's given label
    (in R's mode), every target of the batch excluded: a class-level trace with nothing specific
    to the target (post-mask means would carry its own kept units)."""
    d = loc.data
    keep = torch.ones(d.n_train, dtype=torch.bool, device=loc.device)
    keep[tg.ids] = False
    ids = torch.nonzero(keep).flatten()
    rows = loc.own(ids) if loc.track == "decoy" else loc.base_all.expand(len(ids), -1)
    acts = _site_means(loc, d.x_train[ids].to(loc.dtype), rows, pre_mask=True)  # (N, U)
    labels = d.y_train[ids]
    means = torch.zeros(d.num_classes, loc.total, dtype=acts.dtype, device=loc.device)
    means.index_add_(0, labels, acts)
    counts = torch.bincount(labels, minlength=d.num_classes).clamp_min(1).to(acts.dtype)
    return (means / counts[:, None])[tg.y]


def slimming(loc: Localizer, tg: Targets, opts: Options = Options(), steps: int = 60, lr: float = 0.1,
             l1: float = 0.01) -> torch.Tensor:
    """1 - s for a per-target mask s = sigmoid(w) on the candidates (1 elsewhere; initially about
    1) trained by Adam to minimise J_i(s) + l1 * sum(1 - s): flip the target, keep R, remove few
    units. Targets are independent (their losses are summed), so batching changes nothing."""
    w = torch.full((len(tg), loc.total), 3.0, dtype=loc.dtype, device=loc.device, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    cand = tg.cand.to(loc.dtype)
    for _ in range(steps):
        sig = torch.sigmoid(w)
        s = cand * sig + (1 - cand)
        _, g = loc.j_grad(tg, s)
        # d/dw of sum_i [J_i + l1 sum(1 - s_i)] = (dJ/ds - l1) * s (1 - s) on the candidates
        opt.zero_grad(set_to_none=True)
        w.grad = ((g - l1) * sig * (1 - sig) * cand).detach()
        opt.step()
    return 1 - torch.sigmoid(w.detach())


Method = Callable[..., torch.Tensor]
METHODS: dict[str, Method] = {"greedy": greedy, "random": random_scores, "mask_only": mask_only,
                              "class_mean": class_mean, "oracle": oracle, "zero_out": zero_out,
                              "grad_x_act": grad_x_act, "integrated_gradients": integrated_gradients,
                              "activation": activation, "slimming": slimming}


def scores_and_order(loc: Localizer, method: str, tg: Targets, budget: int,
                     ig_steps: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """((T, U) float64 scores, -inf off the candidates; (T, n) order, most responsible first):
    the order is each target's candidates by descending score (stable: ties keep the lower flat
    index first), then the rest; greedy's order is its zeroings and its scores their reverse rank
    (units it did not reach tie below them)."""
    if method not in METHODS:
        raise LocalizeError(f"method={method!r} is invalid: one of {sorted(METHODS)}")
    out = METHODS[method](loc, tg, Options(budget=budget, ig_steps=ig_steps))
    if out.dtype == torch.long:  # an order already
        n = out.shape[1]
        scores = torch.full((len(tg), loc.total), -float(n), dtype=torch.float64, device=loc.device)
        scores.scatter_(1, out, -torch.arange(n, dtype=torch.float64, device=loc.device).expand(len(tg), -1))
        return scores.masked_fill(~tg.cand, -math.inf), out
    scores = out.double().masked_fill(~tg.cand, -math.inf)
    return scores, torch.sort(-scores, dim=1, stable=True).indices


def auroc(scores: torch.Tensor, truth: torch.Tensor, cand: torch.Tensor) -> float:
    """P(a truth candidate scores above a non-truth candidate), ties half."""
    pos, neg = scores[cand & truth], scores[cand & ~truth]
    if not len(pos) or not len(neg):
        return math.nan
    gt = (pos[:, None] > neg[None]).double().mean()
    eq = (pos[:, None] == neg[None]).double().mean()
    return float(gt + 0.5 * eq)


def localization_rows(subject: Subject, targets: torch.Tensor, reference_ids: torch.Tensor, test_ids: torch.Tensor,
                      methods: list[str], ks: list[int], *, budget: int, track: str = "decoy", seed: int = 0,
                      ig_steps: int = 64, dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """`localization` rows of one track: per target, method and k (|truth| and each fixed k up to
    the candidates): precision@k, lift (precision / chance), recall and AUROC against the truth
    (null without ETD), units to flip in rank order (`decoy` and plain models; null where the
    target does not predict its given label unedited), and after zeroing the top-|truth| (the
    top k of each fixed k in plain models, which have no truth; null at the fixed k of ETD
    tracks): the fall of log p(given label), accuracy on R (in R's mode) and on a fixed test
    sample (mode all)."""
    with subject.frozen(dtype):
        loc = Localizer(subject, reference_ids, test_ids, track, dtype, seed)
        tg = loc.targets(targets)
        n_cand = tg.cand.sum(1).tolist()
        n_truth = tg.truth.sum(1).tolist() if tg.truth is not None else [None] * len(tg)
        flips_defined = loc.track != "all"
        given = loc.predicts_given(tg).tolist()
        rows = []
        for method in methods:
            if method == "oracle" and tg.truth is None:
                continue
            t0 = time.perf_counter()
            need = max([*ks, *(v for v in n_truth if v)])
            scores, order = scores_and_order(loc, method, tg, max(budget, need), ig_steps)
            flips = loc.units_to_flip(tg, order, budget) if flips_defined else [None] * len(tg)
            seconds = (time.perf_counter() - t0) / max(1, len(tg))
            for i, t in enumerate(tg.ids.tolist()):
                nt = int(n_truth[i]) if n_truth[i] is not None else None
                chance = nt / n_cand[i] if nt is not None else None
                au = auroc(scores[i], tg.truth[i], tg.cand[i]) if tg.truth is not None else None
                for k in sorted({*ks, *([nt] if nt else [])}):
                    if k > n_cand[i]:
                        continue
                    top = order[i, :k]
                    fall = ref_acc = test_acc = None
                    if nt is None or k == nt:  # the protocol scores the edit at the top-|truth|
                        zeroed = torch.zeros(loc.total, dtype=torch.bool, device=loc.device)
                        zeroed[top] = True
                        fall, ref_acc, test_acc = loc.after_zeroing(tg, i, zeroed)
                    hit = int(tg.truth[i][top].sum()) if tg.truth is not None else None
                    prec = hit / k if hit is not None else None
                    defined = flips_defined and given[i]
                    rows.append({"example_id": t, "target_kind": subject.data.target_kind(t), "mode": loc.mode,
                                 "track": loc.track, "method": method, "k": int(k), "n_candidates": int(n_cand[i]),
                                 "n_truth": nt, "chance": chance, "precision": prec,
                                 "lift": prec / chance if prec is not None and chance else None,
                                 "recall": hit / nt if nt else None, "auroc": au,
                                 "given_before": bool(given[i]),
                                 "flipped": (flips[i] is not None) if defined else None,
                                 "units_to_flip": flips[i] if defined else None, "logp_drop": fall,
                                 "post_ref_acc": ref_acc, "post_test_acc": test_acc, "seconds": seconds})
        return rows
