"""Gradient accounting (EXPERIMENTS.md section 1), computed inside the training step.

Per batch, from the one training forward pass (dropout / ETD masks included): the gradient of the
*summed* loss of the batch's clean examples, g_c, and of its noisy examples, g_n -- two backward
passes over one graph, i.e. one extra backward per batch. The training gradient is
(g_c + g_n) / B, exactly the gradient of the mean loss, so training is unchanged.

Per layer group: ||g_c|| / sqrt(P) and ||g_n|| / sqrt(P) (P = parameters in the group, so groups
compare) and cos(g_c, g_n). Each is computed per batch and averaged over the epoch's batches; the
noisy norm and the cosine over the batches that hold at least one noisy example. All reductions
stay on the device (no host sync per batch).
"""
from __future__ import annotations

import torch

from ..sites import SiteModel


class GradientAccounting:
    def __init__(self, model: SiteModel):
        self.model = model
        self.names = model.group_names()
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        gi = [model.group_of(n) for n, p in model.named_parameters() if p.requires_grad]
        dev = self.params[0].device
        self.group_index = torch.tensor(gi, device=dev)
        G = len(self.names)
        numel = torch.zeros(G, device=dev, dtype=torch.float64)
        numel.index_add_(0, self.group_index, torch.tensor([float(p.numel()) for p in self.params],
                                                           device=dev, dtype=torch.float64))
        self.sqrt_numel = numel.sqrt()
        self.start_epoch()

    def start_epoch(self) -> None:
        G, dev = len(self.names), self.group_index.device
        self.sums = torch.zeros(3, G, device=dev, dtype=torch.float64)  # clean norm, noisy norm, cosine
        self.counts = torch.zeros(2, device=dev, dtype=torch.float64)  # batches, batches with noisy

    @staticmethod
    def group_stats(g_c, g_n, group_index, G):
        """(3, G) float64: per group ||g_c||^2, ||g_n||^2, <g_c, g_n>.

        Dot products read each gradient in place (no float64 copies, no temporaries): fresh
        parameter-sized buffers cost page faults on every batch, which made accounting 3x a step."""
        dots = []
        for a, b in zip(g_c, g_n):
            a, b = a.reshape(-1), b.reshape(-1)
            dots += [torch.dot(a, a), torch.dot(b, b), torch.dot(a, b)]
        per_param = torch.stack(dots).double().view(-1, 3).T
        out = torch.zeros(3, G, device=per_param.device, dtype=torch.float64)
        return out.index_add_(1, group_index, per_param)

    def backward(self, losses: torch.Tensor, noisy: torch.Tensor) -> None:
        """Set .grad of every trainable parameter to the mean-loss gradient; accumulate stats."""
        B = losses.shape[0]
        g_n = torch.autograd.grad(losses[noisy].sum(), self.params, retain_graph=True, allow_unused=True,
                                  materialize_grads=True)
        g_c = torch.autograd.grad(losses[~noisy].sum(), self.params, allow_unused=True, materialize_grads=True)
        s = self.group_stats(g_c, g_n, self.group_index, len(self.names))
        for p, a, b in zip(self.params, g_c, g_n):
            p.grad = a.add_(b).div_(B)  # g_c is ours: reuse its buffer for the mean-loss gradient
        nc, nn_ = s[0].sqrt(), s[1].sqrt()
        has_noisy = noisy.any().double()
        cos = torch.where(nc * nn_ > 0, s[2] / (nc * nn_).clamp_min(1e-300), torch.zeros_like(nc))
        self.sums[0] += nc / self.sqrt_numel
        self.sums[1] += has_noisy * nn_ / self.sqrt_numel
        self.sums[2] += has_noisy * cos
        self.counts += torch.stack([torch.ones((), device=has_noisy.device, dtype=torch.float64), has_noisy])

    def end_epoch(self) -> list[dict]:
        c = self.counts.cpu()
        s = self.sums.cpu()
        rows = []
        for i, name in enumerate(self.names):
            rows.append({"layer_index": i, "layer_name": name,
                         "clean_norm": (s[0, i] / c[0]).item(),
                         "noisy_norm": (s[1, i] / c[1]).item() if c[1] > 0 else float("nan"),
                         "cosine": (s[2, i] / c[1]).item() if c[1] > 0 else float("nan")})
        return rows
