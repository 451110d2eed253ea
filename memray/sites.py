"""The one mask mechanism: per-example unit masks applied at a model's sites.

A *site* is a place where activations have a unit axis (conv channels, MLP neurons, transformer
MLP features). A mask for a site has shape [batch, units] (one row per example) or [units] (the
same for every example) and multiplies the activation along the unit axis, broadcast over every
other axis (spatial positions, tokens). Example-tied dropout, standard dropout at the same sites,
the ETD evaluation modes and the flip analysis all go through this one mechanism.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

Masks = Sequence[torch.Tensor | None]
Stage = tuple[tuple[str, ...], Callable[[torch.Tensor], torch.Tensor]]


class BinaryMasks(list):
    """Masks whose entries are all 0 or 1 (example-tied dropout's training masks): lets a site
    that applies its own ReLU use the fused op (`_ReLUMask`)."""


class _MaskSlot:
    """Shared, non-module holder of the masks for the forward pass in flight."""

    __slots__ = ("binary", "masks")

    def __init__(self) -> None:
        self.masks: Masks | None = None
        self.binary = False


class _ReLUMask(torch.autograd.Function):
    """relu(x) * m for a 0/1 mask m, as one autograd node whose backward is ReLU's own on the
    masked output: out > 0 exactly where x > 0 and m = 1, so grad * 1[out > 0] is the exact
    gradient and the mask multiply drops out of the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        out = torch.relu(x).mul_(m)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0), None


class Site(nn.Module):
    """Identity unless a mask is set for it; then x * mask along `unit_dim`.

    `relu=True`: the site also applies the ReLU in front of it, relu(x) (* mask). Where nothing
    needs a gradient, relu's output is scaled in place; with 0/1 masks (`BinaryMasks`) and a
    gradient to compute, one fused op with ReLU's own backward (`_ReLUMask`); otherwise
    relu(x) * mask."""

    def __init__(self, units: int, unit_dim: int = 1, relu: bool = False):
        super().__init__()
        self.units = units
        self.unit_dim = unit_dim  # 1 for [B, C, ...], -1 for [B, T, C]
        self.relu = relu
        self.index = -1
        self.slot: _MaskSlot | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = self.slot.masks if self.slot is not None else None
        m = masks[self.index] if masks is not None else None
        if m is None:
            return torch.relu(x) if self.relu else x
        m = broadcast_mask(m, x, self.unit_dim)
        if not self.relu:
            return x * m
        if not torch.is_grad_enabled() or not (x.requires_grad or m.requires_grad):
            out = torch.relu(x)  # nothing to differentiate: relu's output is ours to scale
            return out.mul_(m) if torch.broadcast_shapes(out.shape, m.shape) == out.shape else out * m
        if self.slot.binary and not m.requires_grad:
            return _ReLUMask.apply(x, m)
        return torch.relu(x) * m

    def extra_repr(self) -> str:
        return f"index={self.index}, units={self.units}" + (", relu=True" if self.relu else "")


def broadcast_mask(m: torch.Tensor, x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """View a [B, C] or [C] mask so it broadcasts against x along unit_dim."""
    if unit_dim == -1 or unit_dim == x.dim() - 1:
        return m if m.dim() == 1 else m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])
    trailing = [1] * (x.dim() - 2)
    if m.dim() == 1:
        return m.view(1, m.shape[0], *trailing)
    return m.view(m.shape[0], m.shape[1], *trailing)


class SiteModel(nn.Module):
    """Base for every architecture: `forward(x, masks=None)` with masks per site (or None).

    Subclasses build their layers, implement `body(x)` (or `stages()`, where the body is a chain
    of stages: the default body runs them), and call `self._register_sites()` once at the end of
    `__init__`. Sites are numbered in module-registration order, which every
    architecture here keeps equal to forward order (input side first).
    """

    def __init__(self) -> None:
        super().__init__()
        self._slot = _MaskSlot()
        self.sites: list[Site] = []
        self.layer_groups: list[tuple[str, list[str]]] = []  # (name, parameter/buffer prefixes)

    def _register_sites(self) -> None:
        self.sites = [m for m in self.modules() if isinstance(m, Site)]
        for i, s in enumerate(self.sites):
            s.index = i
            s.slot = self._slot

    @property
    def site_units(self) -> list[int]:
        return [s.units for s in self.sites]

    def body(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.stages()
        if stages is None:  # pragma: no cover - abstract
            raise NotImplementedError
        for _, f in stages:
            x = f(x)
        return x

    def stages(self) -> list[Stage] | None:
        """The body as a chain of stages, input side first, where it is one: (module names the
        stage runs, callable); glue without parameters names none. None where the body is not
        a chain. The probes then run a partly rewound model from its first changed stage on
        (`stages_before`, `forward_stages`)."""
        return None

    def stages_before(self, group: int) -> int:
        """How many leading stages hold no parameter or buffer of layer group `group`: their
        output is the same whatever `group` holds. 0 without a chain."""
        stages = self.stages()
        if stages is None:
            return 0
        first = len(stages)
        for key in self.group_state_keys(group):
            at = [i for i, (names, _) in enumerate(stages) if any(key.startswith(n + ".") for n in names)]
            if not at:  # a tensor outside every stage: nothing is known unchanged
                return 0
            first = min(first, at[0])
        return first if first < len(stages) else 0

    def forward_stages(self, x: torch.Tensor, masks: Masks | None = None, start: int = 0,
                       stop: int | None = None) -> torch.Tensor:
        """Stages start..stop-1 of the chain on x (the output of stage start-1), with masks per
        site as in `forward` (sites outside the range ignore theirs)."""
        stages = self.stages()
        if stages is None:
            raise ValueError(f"{type(self).__name__} has no chain of stages")
        with self.masked(masks):
            for _, f in stages[start:stop]:
                x = f(x)
        return x

    @contextmanager
    def masked(self, masks: Masks | None) -> Iterator[None]:
        if masks is not None and len(masks) != len(self.sites):
            raise ValueError(f"got {len(masks)} masks for {len(self.sites)} sites")
        self._slot.masks, self._slot.binary = masks, isinstance(masks, BinaryMasks)
        try:
            yield
        finally:
            self._slot.masks, self._slot.binary = None, False

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        with self.masked(masks):
            return self.body(x)

    # -- layer groups ------------------------------------------------------------------------
    def group_names(self) -> list[str]:
        return [g for g, _ in self.layer_groups]

    def in_group(self, gi: int, name: str) -> bool:
        """Whether a parameter, buffer or module name belongs to layer group gi (one of its prefixes
        is the name or a dotted parent of it)."""
        return any(name == p or name.startswith(p + ".") for p in self.layer_groups[gi][1])

    def group_of(self, name: str) -> int:
        """Index of the layer group that owns a parameter or buffer name."""
        for gi in range(len(self.layer_groups)):
            if self.in_group(gi, name):
                return gi
        raise KeyError(name)

    def group_modules(self, gi: int) -> list[nn.Module]:
        return [m for name, m in self.named_modules() if self.in_group(gi, name)]

    def group_state_keys(self, gi: int) -> list[str]:
        """State-dict keys (parameters and norm buffers) of layer group gi."""
        return [k for k in self.state_dict() if self._owner(k) == gi]

    def group_parameters(self, gi: int) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if self.group_of(n) == gi]

    def _owner(self, key: str) -> int | None:
        try:
            return self.group_of(key)
        except KeyError:
            return None
