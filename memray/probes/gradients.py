"""Gradient accounting (EXPERIMENTS.md section 1), computed inside the training step.

As the authors (`train.py`: gradients accumulated over the epoch, then `grads_to_norms`): over an
epoch's batches, accumulate per parameter the gradient of the *summed* loss of the batch's clean
examples divided by the batch size, likewise for its noisy examples, and for a **control** subset
(a seeded random clean subset as large as the noisy set, fixed by the data seed). From the one
training forward pass (dropout and ETD masks included), three backward passes over one graph:
noisy, control, and the other clean examples; clean = control + the rest. The training gradient
is (clean + noisy) / B, exactly the gradient of the mean loss, so training is unchanged.

At the end of the epoch, per layer group: each aggregate's norm (per parameter tensor
||g|| / sqrt(numel), summed over the group's tensors); the cosine between the clean and noisy
aggregates (per tensor, averaged over the group's tensors); `control_cosine`, the same between the
control aggregate and the clean aggregate minus the control (both comparisons are then between
disjoint sets of examples). Rows carry `aggregation` = "epoch" (the per-batch-averaged variant of
protocol 1 is gone; the column keeps the two from ever being mixed).
"""
from __future__ import annotations

import math

import torch

from .. import streams
from ..sites import SiteModel


def control_mask(noise_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random subset of the clean examples, as large as the noisy set (bool, (N,))."""
    clean = torch.nonzero(~noise_mask.cpu()).flatten()
    n = int(noise_mask.sum())
    g = streams.torch_generator("gradients.control", seed)
    pick = clean[torch.randperm(len(clean), generator=g)[:n]]
    out = torch.zeros(noise_mask.shape[0], dtype=torch.bool)
    out[pick] = True
    return out.to(noise_mask.device)


class GradientAccounting:
    KINDS = ("clean", "noisy", "control")

    def __init__(self, model: SiteModel, noise_mask: torch.Tensor, seed: int):
        self.model = model
        self.names = model.group_names()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.groups = [model.group_of(n) for n, _ in named]
        self.noise_mask = noise_mask
        self.control = control_mask(noise_mask, seed)
        self.start_epoch()

    def start_epoch(self) -> None:
        self.acc = {k: [torch.zeros_like(p) for p in self.params] for k in self.KINDS}

    def backward(self, losses: torch.Tensor, idx: torch.Tensor) -> None:
        """Set .grad of every trainable parameter to the mean-loss gradient of the batch `idx`
        (example ids; `losses` its per-example losses) and add its parts to the epoch aggregates."""
        B = losses.shape[0]
        noisy, ctrl = self.noise_mask[idx], self.control[idx]
        rest = ~(noisy | ctrl)
        kw = {"allow_unused": True, "materialize_grads": True}
        g_n = torch.autograd.grad(losses[noisy].sum(), self.params, retain_graph=True, **kw)
        g_k = torch.autograd.grad(losses[ctrl].sum(), self.params, retain_graph=True, **kw)
        g_r = torch.autograd.grad(losses[rest].sum(), self.params, **kw)
        for i, (p, n, k, r) in enumerate(zip(self.params, g_n, g_k, g_r)):
            clean = r.add_(k)  # g_r is ours: reuse its buffer
            self.acc["clean"][i].add_(clean, alpha=1 / B)
            self.acc["noisy"][i].add_(n, alpha=1 / B)
            self.acc["control"][i].add_(k, alpha=1 / B)
            p.grad = clean.add_(n).div_(B)

    def end_epoch(self) -> list[dict]:
        """One row per layer group for the epoch that just ended."""
        G = len(self.names)
        norms = {k: [0.0] * G for k in self.KINDS}
        cos, ccos, count = [0.0] * G, [0.0] * G, [0] * G
        for i, g in enumerate(self.groups):
            c, n, k = (self.acc[kind][i].double().flatten() for kind in self.KINDS)
            scale = math.sqrt(c.numel())
            for kind, v in zip(self.KINDS, (c, n, k)):
                norms[kind][g] += v.norm().item() / scale
            cos[g] += _cosine(c, n)
            ccos[g] += _cosine(k, c - k)
            count[g] += 1
        return [{"layer_index": g, "layer_name": self.names[g], "aggregation": "epoch",
                 "clean_norm": norms["clean"][g], "noisy_norm": norms["noisy"][g],
                 "control_norm": norms["control"][g], "cosine": cos[g] / count[g],
                 "control_cosine": ccos[g] / count[g]} for g in range(G)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 0 else 0.0
