"""The greedy and random unit searches of the minimum-unit flip (EXPERIMENTS.md section 4).

Batched form: T targets advance together, one unit per step each, and share what is exactly
the same for several of them. dJ/dm splits into the target's own row, -dloss(x, y)/dm, and the
reference term d mean_R loss/dm, which depends on the mask alone; at step k every active target's
mask is "all units but the k it zeroed", so targets that zeroed the same set of units share one
reference block (|R| rows) per step (every target shares the first step's). One forward and one
activation-gradient backward serve the target rows (one per target) and all blocks, a pass holding
at most `max_rows` rows (memory bound: blocks beyond it go to further passes). Batched,
their predictions are checked first (a row each, no backward), so a target that has flipped costs
no block; flipped targets leave the batch. Targets are processed in chunks of `targets_per_batch`;
`targets_per_batch=1` is the one-at-a-time form (one pass of 1 + |R| rows per step, no sharing,
no separate check: the backward is skipped when the prediction has flipped).
Parameters are frozen during the search, so backward computes only activation gradients.
`rows_computed` counts the target and reference rows that went through passes.

The split changes the order of float additions, not the arithmetic: batched and one-at-a-time
runs give the same unit sequences in float64 (tested; benchmarks/flip_throughput.py reports
whether float32 runs agree too). Ties go to the lowest flat index, site-major.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import streams
from ..dropout import ExampleTiedDropout
from ..sites import SiteModel
from . import Subject

class FlipError(ValueError):
    pass


def base_masks(etd: ExampleTiedDropout | None) -> list[torch.Tensor | None] | None:
    """The fixed masks an edit multiplies: ETD models are edited in mode `all`."""
    return etd.mode_masks("all") if etd is not None else None


class FlipSearch:
    """Runs the flip analysis on one subject (its model frozen, in eval mode)."""

    def __init__(self, subject: Subject, reference_ids: torch.Tensor, *, sites: list[int] | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, max_rows: int = 2048):
        model, data, etd = subject.model, subject.data, subject.etd
        if not isinstance(model, SiteModel) or not model.sites:
            raise FlipError("the flip analysis needs a model with sites (a memray SiteModel); "
                            f"got {type(model).__name__}")
        n_sites = len(model.sites)
        self.sites = sorted(set(sites)) if sites is not None else list(range(n_sites))
        if not self.sites or any(not isinstance(s, int) or s < 0 or s >= n_sites for s in self.sites):
            raise FlipError(f"sites={sites} is invalid: site indices of this model, 0..{n_sites - 1}")
        self.model, self.data, self.etd, self.dtype = model, data, etd, dtype
        self.device = data.device
        self.units = [model.site_units[s] for s in self.sites]
        self.offsets = [0]
        for c in self.units:
            self.offsets.append(self.offsets[-1] + c)
        self.total = self.offsets[-1]
        ref = torch.as_tensor(reference_ids, dtype=torch.long)
        self.check_ids(ref, "reference_ids")
        self.ref = ref.to(self.device)
        self.xr, self.yr = data.x_train[self.ref], data.y_train[self.ref]  # the reference batch
        self.pos = {s: i for i, s in enumerate(self.sites)}  # site -> its index among included sites
        self.max_rows = max_rows
        base = base_masks(etd)
        self.base = [(base[s] if base is not None and base[s] is not None
                      else torch.ones(model.site_units[s], device=self.device)).to(dtype) for s in range(n_sites)]
        self.seed = seed
        self.rows_computed = {"target": 0, "reference": 0}  # rows through forward + backward (greedy)

    def check_ids(self, ids: torch.Tensor, name: str) -> None:
        n = self.data.n_train
        if ids.dim() != 1 or (ids.numel() and (ids.min() < 0 or ids.max() >= n)):
            bad = ids[(ids < 0) | (ids >= n)].tolist()[:5] if ids.dim() == 1 else ids.shape
            raise FlipError(f"{name} holds {bad}: allowed are training example ids 0..{n - 1}")

    # -- masks ------------------------------------------------------------------------------
    def site_masks(self, keep: torch.Tensor, rows_per_target: int) -> tuple[list, list[torch.Tensor]]:
        """keep: (T, total) 0/1 in self.dtype. Returns the per-site masks for the model (rows
        repeated per target) and the leaf [T, C] tensors gradients are taken against."""
        T = keep.shape[0]
        leaves, masks = [], []
        for s in range(len(self.base)):
            if s in self.pos:
                i = self.pos[s]
                leaf = (keep[:, self.offsets[i]:self.offsets[i + 1]] * self.base[s]).detach().requires_grad_(True)
                leaves.append(leaf)
                m = leaf[:, None, :].expand(T, rows_per_target, leaf.shape[1]).reshape(T * rows_per_target, -1)
            else:
                m = self.base[s].expand(T * rows_per_target, -1)
            masks.append(m)
        return masks, leaves

    def forward(self, x: torch.Tensor, masks) -> torch.Tensor:
        return self.model(x.to(self.dtype), masks)

    def keep_rows(self, units_per_target: list[list[tuple[int, int]]]) -> torch.Tensor:
        """(T, total) 0/1 rows in self.dtype: every included unit on but each target's `units`."""
        keep = torch.ones(len(units_per_target), self.total, dtype=self.dtype, device=self.device)
        for t, units in enumerate(units_per_target):
            for s, u in units:
                keep[t, self.offsets[self.pos[s]] + u] = 0
        return keep

    # -- greedy -----------------------------------------------------------------------------
    def greedy(self, targets: torch.Tensor, budget: int, targets_per_batch: int = 64) -> list:
        """Per target: (units zeroed in order as (site, unit), flipped within budget)."""
        out: list = [None] * len(targets)
        for start in range(0, len(targets), targets_per_batch):
            idx = list(range(start, min(start + targets_per_batch, len(targets))))
            for j, res in zip(idx, self._greedy_chunk(targets[idx], budget, check_first=targets_per_batch > 1)):
                out[j] = res
        return out

    def _pass(self, xt: torch.Tensor, yt: torch.Tensor, keep_t: torch.Tensor, keep_r: torch.Tensor,
              need_grads=lambda logits_t: True):
        """One forward + activation-gradient backward over target rows (one per row of keep_t,
        examples xt) and reference blocks (|R| rows per row of keep_r). Returns the target rows'
        logits, d loss(target row)/d its leaf (a, total) and d mean_R loss/d the block's leaf
        (n, total); the gradients are None when `need_grads(target logits)` says the backward is
        not needed (every target flipped)."""
        R = self.ref.numel()
        a, n = keep_t.shape[0], keep_r.shape[0]
        xr, yr = self.xr, self.yr
        x = torch.cat([xt, xr[None].expand(n, *xr.shape).reshape(n * R, *xr.shape[1:])])
        y = torch.cat([yt, yr.repeat(n)])
        leaves_t, leaves_r, masks = [], [], []
        for s in range(len(self.base)):
            if s in self.pos:
                lo, hi = self.offsets[self.pos[s]], self.offsets[self.pos[s] + 1]
                lt = (keep_t[:, lo:hi] * self.base[s]).requires_grad_(True)
                lr = (keep_r[:, lo:hi] * self.base[s]).requires_grad_(True)
                leaves_t.append(lt)
                leaves_r.append(lr)
                masks.append(torch.cat([lt, lr[:, None, :].expand(n, R, hi - lo).reshape(n * R, hi - lo)]))
            else:
                masks.append(self.base[s].expand(a + n * R, -1))
        self.rows_computed["target"] += a
        self.rows_computed["reference"] += n * R
        with torch.enable_grad():
            logits = self.forward(x, masks)
            if not need_grads(logits[:a].detach()):
                return logits[:a].detach(), None, None
            losses = F.cross_entropy(logits, y, reduction="none")
            loss = losses[:a].sum() + losses[a:].view(n, R).mean(1).sum()
            grads = torch.autograd.grad(loss, leaves_t + leaves_r, allow_unused=True)
        k = len(leaves_t)
        fill = (lambda g, leaf: g if g is not None else torch.zeros_like(leaf))
        g_t = torch.cat([fill(g, lf) for g, lf in zip(grads[:k], leaves_t)], 1)
        g_r = torch.cat([fill(g, lf) for g, lf in zip(grads[k:], leaves_r)], 1)
        return logits[:a].detach(), g_t, g_r

    def _greedy_chunk(self, targets: torch.Tensor, budget: int, check_first: bool = True):
        """Greedy search for a chunk of targets advancing together, one unit per step each.

        dJ/dmask = -dloss(target)/dmask + d mean_R loss/dmask. The first term is one row per
        target. The second depends on the mask only, and at step k every active target's mask is
        "all units but k zeroed ones", so targets that zeroed the same set share it: it is computed
        once per distinct set, in blocks of |R| rows (up to `max_rows` rows a pass), in the same
        forward/backward as the target rows. Targets whose budget is spent need no block."""
        dev, R = self.device, self.ref.numel()
        T = targets.numel()
        keep = torch.ones(T, self.total, dtype=self.dtype, device=dev)
        base = torch.cat([self.base[s] for s in self.sites])  # (total,)
        zeroed: list[list[int]] = [[] for _ in range(T)]
        flipped = [False] * T
        active = list(range(T))
        tg = targets.to(dev)
        xt, yt = self.data.x_train[tg], self.data.y_train[tg]
        per_pass = max(1, self.max_rows // max(1, R))
        while active:
            if check_first:
                # batched: check the predictions first (one row per target, no backward), so no
                # reference block is computed for a target that has just flipped
                a = torch.tensor(active, dtype=torch.long, device=dev)
                masks, _ = self.site_masks(keep[a], 1)
                with torch.no_grad():
                    flip_now = (self.forward(xt[a], [m.detach() for m in masks]).argmax(1) != yt[a]).tolist()
                for t, f in zip(active, flip_now):
                    flipped[t] = f
                active = [t for t, f in zip(active, flip_now) if not f and len(zeroed[t]) < budget]
                if not active:
                    break
            a = torch.tensor(active, dtype=torch.long, device=dev)
            # one block per distinct zeroed set among targets that may take another step
            first: dict[frozenset, int] = {}
            key_of: dict[int, frozenset] = {}
            for k, t in enumerate(active):
                if len(zeroed[t]) < budget:
                    key_of[k] = frozenset(zeroed[t])
                    first.setdefault(key_of[k], k)
            keys = list(first)
            slot = {key: i for i, key in enumerate(keys)}
            rep = a[[first[key] for key in keys]]
            g_ref = torch.empty(len(keys), self.total, dtype=self.dtype, device=dev)
            n0 = min(len(keys), per_pass)
            state = {}

            def need(logits_t, a=a, state=state):
                state["done"] = (logits_t.argmax(1) != yt[a]).tolist()
                return any(not state["done"][k] for k in key_of)

            logits, g_target, g0 = self._pass(xt[a], yt[a], keep[a], keep[rep[:n0]], need)
            done = state["done"]
            still = [k for k in key_of if not done[k]]
            for k, t in enumerate(active):
                flipped[t] = bool(done[k])
            if not still:
                break
            g_ref[:n0] = g0
            for i in range(n0, len(keys), per_pass):  # more blocks than one pass holds
                n = min(per_pass, len(keys) - i)
                _, _, g_ref[i:i + n] = self._pass(xt[:0], yt[:0], keep[:0], keep[rep[i:i + n]])
            sel = torch.tensor(still, dtype=torch.long, device=dev)
            ref_rows = torch.tensor([slot[key_of[k]] for k in still], dtype=torch.long, device=dev)
            kp = keep[a[sel]]
            delta = (-(kp * base) * (g_ref[ref_rows] - g_target[sel])).masked_fill(kp == 0, math.inf)
            choice = delta.argmin(1).tolist()  # first minimum: lowest flat index on ties
            nxt = []
            for k, c in zip(still, choice):
                t = active[k]
                zeroed[t].append(c)
                keep[t, c] = 0
                nxt.append(t)
            active = nxt
        return [(self._as_units(z), f) for z, f in zip(zeroed, flipped)]

    def _as_units(self, flat: list[int]) -> list[tuple[int, int]]:
        out = []
        for f in flat:
            i = max(k for k in range(len(self.sites)) if self.offsets[k] <= f)
            out.append((self.sites[i], f - self.offsets[i]))
        return out

    # -- random -----------------------------------------------------------------------------
    @torch.no_grad()
    def random(self, targets: torch.Tensor, chunk: int = 256) -> list:
        """Zero units in a seeded random order (per target) until the prediction flips: all
        prefixes of the order are evaluated in batches of `chunk`."""
        out = []
        for t in targets.tolist():
            g = streams.torch_generator("flip.random_order", self.seed, t)
            order = torch.randperm(self.total, generator=g).to(self.device)
            x, y = self.data.x_train[t], int(self.data.y_train[t])
            found = None
            rank = torch.empty(self.total, dtype=torch.long, device=self.device)
            rank[order] = torch.arange(self.total, device=self.device)  # position of each unit in the order
            for start in range(0, self.total, chunk):
                ks = torch.arange(start + 1, min(start + chunk, self.total) + 1, device=self.device)  # prefix sizes
                keep = (rank[None, :] >= ks[:, None]).to(self.dtype)  # (n, total): first k of order zeroed
                masks, _ = self.site_masks(keep, 1)
                logits = self.forward(x[None].expand(len(ks), *x.shape), [m.detach() for m in masks])
                hit = torch.nonzero(logits.argmax(1) != y).flatten()
                if hit.numel():
                    found = int(ks[hit[0]])
                    break
            n = found if found is not None else self.total
            flat = order[:n].tolist()
            out.append((self._as_units(flat), found is not None))
        return out
