"""Gradient accounting (EXPERIMENTS.md section 1), computed inside the training step.

As the authors (`train.py`: gradients accumulated over the epoch, then `grads_to_norms`): over an
epoch's batches, accumulate per parameter the gradient of the *summed* loss of the batch's clean
examples divided by the batch size, likewise for its noisy examples, and for a **control** subset
(a seeded random clean subset as large as the noisy set, fixed by the data seed). Each batch is
split into its noisy examples, its control examples and the other clean ones; clean = control +
the rest. The training gradient is (clean + noisy) / B, exactly the gradient of the mean loss, so
training is unchanged. Where no layer couples the examples of a batch (no batch norm in training:
the mlp, LeNet, the ViT), each part has its own forward and backward (`step`): per example the
same computation as one pass over the batch (to float rounding), and one backward's work in all.
Where batch norm couples them (the ResNets), the one forward pass over the batch (dropout and ETD
masks included) has three backward passes over its graph, one per part: about twice the work of
a training step (measured on LeNet 40, batch 128: 0.23 s a step against 0.11 s split).

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
import torch.nn.functional as F

from .. import streams
from ..sites import SiteModel


def couples_examples(model: torch.nn.Module) -> bool:
    """Whether a training forward pass mixes the examples of a batch (batch norm in train mode)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def control_mask(noise_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random subset of the clean examples, as large as the noisy set (bool, (N,))."""
    clean = torch.nonzero(~noise_mask.cpu()).flatten()
    n = int(noise_mask.sum())
    g = streams.torch_generator("gradients.control", seed)
    pick = clean[torch.randperm(len(clean), generator=g)[:n]]
    out = torch.zeros(noise_mask.shape[0], dtype=torch.bool)
    out[pick] = True
    return out.to(noise_mask.device)


GRAD_KW = {"allow_unused": True, "materialize_grads": True}  # every parameter gets a gradient


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
        self.split = not couples_examples(model)
        self.start_epoch()

    def start_epoch(self) -> None:
        self.acc = {k: [torch.zeros_like(p) for p in self.params] for k in self.KINDS}

    def step(self, x: torch.Tensor, y: torch.Tensor, masks, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's forward and backward over the batch `idx` (inputs x, labels y, the
        model's per-example masks): sets .grad to the mean-loss gradient, adds the parts to the
        epoch aggregates, and returns the (B,) losses and (B, classes) logits in batch order."""
        if not self.split:
            logits = self.model(x, masks)
            losses = F.cross_entropy(logits, y, reduction="none")
            self.backward(losses, idx)
            return losses, logits
        B = x.shape[0]
        parts, losses, logits = [], None, None
        for sel in self._parts(idx):
            j = torch.nonzero(sel).flatten()
            if not j.numel():
                parts.append([torch.zeros_like(p) for p in self.params])
                continue
            sub = None if masks is None else type(masks)(m if m is None or m.dim() < 2 else m[j] for m in masks)
            out = self.model(x[j], sub)
            loss = F.cross_entropy(out, y[j], reduction="none")
            parts.append(list(torch.autograd.grad(loss.sum(), self.params, **GRAD_KW)))
            if logits is None:
                logits = out.new_empty((B, out.shape[1]))
                losses = loss.new_empty(B)
            logits[j], losses[j] = out.detach(), loss.detach()
        self._add(*parts, B)
        return losses, logits

    def backward(self, losses: torch.Tensor, idx: torch.Tensor) -> None:
        """Set .grad of every trainable parameter to the mean-loss gradient of the batch `idx`
        (example ids; `losses` its per-example losses) and add its parts to the epoch aggregates."""
        noisy, ctrl, rest = self._parts(idx)
        g_n = torch.autograd.grad(losses[noisy].sum(), self.params, retain_graph=True, **GRAD_KW)
        g_k = torch.autograd.grad(losses[ctrl].sum(), self.params, retain_graph=True, **GRAD_KW)
        g_r = torch.autograd.grad(losses[rest].sum(), self.params, **GRAD_KW)
        self._add(g_n, g_k, g_r, losses.shape[0])

    def _parts(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy, control, rest) bool masks over the batch `idx`: the three disjoint parts."""
        noisy, ctrl = self.noise_mask[idx], self.control[idx]
        return noisy, ctrl, ~(noisy | ctrl)

    def _add(self, g_n, g_k, g_r, B: int) -> None:
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
