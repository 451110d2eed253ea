"""Example-tied dropout (EXPERIMENTS.md section 5) and standard dropout at the same sites.

ETD at a site with C units: the first G = floor(p_gen * C) units are generalization units (always
on); each of the remaining M = C - G memorization units is kept by a training example with
probability p_mem, and that choice is tied to (mask seed, site, example id, unit) for the whole
run. Training multiplies by the 0/1 mask with no rescaling.

Mask state: the keep bits of every memorization unit of every chosen site, for every example,
packed 8 to a byte: a uint8 tensor (N, ceil(sum_s M_s / 8)) on the training device, built once
from a counter-based hash (no RNG stream, so any chunking, device, process or resume gives the
same bits). A batch's masks are one gather and one bit-unpack on the device.

Evaluation modes (masks of shape [C], the same for every example):
  own   the example's own tied mask (training examples only): the model as trained.
  all   generalization units 1, memorization units p_mem (their expected keep rate).
  drop  memorization units 0, generalization units scaled by
            (G + p_mem * M) / G          (units active in training / units left on)
        which is (p_gen + (1 - p_gen) * p_mem) / p_gen whenever p_gen * C is a whole number.
  plain no masks (models trained without ETD).
"""
from __future__ import annotations

import math

import torch

from .config import ConfigError, DropoutConfig

MODES = ("plain", "own", "all", "drop")
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 held in int64, without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keep_bits(seed: int, site: int, ids: torch.Tensor, units: int, p: float) -> torch.Tensor:
    """Bool (len(ids), units): unit u of example i kept iff hash(seed, site, i, u) < p * 2**32."""
    dev = ids.device
    base = hash32(torch.tensor([(seed * 0x9E3779B1 + site * 0x85EBCA77) & _M32], device=dev))
    h_ex = hash32(base ^ (ids.long() & _M32))  # (B,)
    u = torch.arange(units, device=dev, dtype=torch.long)
    h = hash32(h_ex[:, None] ^ _mul32(u, 0xC2B2AE3D)[None, :])  # (B, units)
    return h < int(round(p * 2**32))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, ceil(K/8)) uint8, bit j of byte b = column 8b + j."""
    N, K = bits.shape
    pad = (-K) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(N, -1, 8)
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.uint8))
    return (b * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """(N, nbytes) uint8 -> (N, K) bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[:, :, None] >> shifts) & 1).view(packed.shape[0], -1)[:, :K].bool()


def resolve_sites(cfg: DropoutConfig, n_sites: int) -> list[int]:
    if cfg.sites is None:
        return list(range(n_sites))
    bad = [s for s in cfg.sites if s >= n_sites]
    if bad:
        raise ConfigError("dropout.sites", list(cfg.sites),
                          f"site indices of this model, 0..{n_sites - 1} (it has {n_sites} sites)")
    return sorted(cfg.sites)


class ExampleTiedDropout:
    """Per-example tied masks for the chosen sites of a model with `site_units`."""

    def __init__(self, cfg: DropoutConfig, site_units: list[int], n_examples: int,
                 device: torch.device | str = "cpu", chunk: int = 4096):
        self.p_gen, self.p_mem, self.seed = cfg.p_gen, cfg.p_mem, cfg.mask_seed
        self.site_units = list(site_units)
        self.sites = resolve_sites(cfg, len(site_units))
        self.n_examples = n_examples
        self.gen = {s: math.floor(cfg.p_gen * site_units[s]) for s in self.sites}
        for s, g in self.gen.items():
            if g < 1 or g >= site_units[s]:
                raise ConfigError("dropout.p_gen", cfg.p_gen,
                                  f"a value leaving 1..{site_units[s] - 1} generalization units at "
                                  f"site {s} ({site_units[s]} units)")
        self.mem = {s: site_units[s] - self.gen[s] for s in self.sites}
        self.total_mem = sum(self.mem.values())
        self.device = torch.device(device)
        rows = []
        for start in range(0, n_examples, chunk):
            ids = torch.arange(start, min(start + chunk, n_examples), device=self.device)
            bits = torch.cat([keep_bits(self.seed, s, ids, self.mem[s], self.p_mem) for s in self.sites], 1)
            rows.append(pack_bits(bits))
        self.packed = torch.cat(rows)  # (N, ceil(total_mem / 8)) uint8

    @property
    def state_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def to(self, device) -> "ExampleTiedDropout":
        self.device = torch.device(device)
        self.packed = self.packed.to(device)
        return self

    # -- training / `own` -------------------------------------------------------------------
    def example_masks(self, ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Masks (B, C) per site (None for sites without ETD) for training examples `ids`."""
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
            raise ValueError("example-tied dropout needs a 1-D tensor of integer example ids")
        keep = unpack_bits(self.packed[ids], self.total_mem)  # (B, total_mem)
        out: list[torch.Tensor | None] = [None] * len(self.site_units)
        col = 0
        for s in self.sites:
            g, m = self.gen[s], self.mem[s]
            ones = torch.ones(ids.shape[0], g, device=keep.device)
            out[s] = torch.cat([ones, keep[:, col:col + m].float()], 1)
            col += m
        return out

    # -- evaluation modes -------------------------------------------------------------------
    def mode_masks(self, mode: str) -> list[torch.Tensor | None]:
        if mode not in ("all", "drop"):
            raise ValueError(f"mode_masks takes 'all' or 'drop', not {mode!r}")
        out: list[torch.Tensor | None] = [None] * len(self.site_units)
        for s in self.sites:
            g, m = self.gen[s], self.mem[s]
            if mode == "all":
                v = torch.cat([torch.ones(g), torch.full((m,), self.p_mem)])
            else:
                v = torch.cat([torch.full((g,), (g + self.p_mem * m) / g), torch.zeros(m)])
            out[s] = v.to(self.device)
        return out


class StandardDropout:
    """Unit (channel) dropout at the same sites: inverted scaling in training, none at eval.

    The drop rate defaults to 1 - (p_gen + (1 - p_gen) p_mem), ETD's expected drop rate."""

    def __init__(self, cfg: DropoutConfig, site_units: list[int], device="cpu"):
        self.rate = cfg.standard_rate
        self.site_units = list(site_units)
        self.sites = resolve_sites(cfg, len(site_units))
        self.device = torch.device(device)

    def train_masks(self, batch: int, generator: torch.Generator) -> list[torch.Tensor | None]:
        keep = 1.0 - self.rate
        out: list[torch.Tensor | None] = [None] * len(self.site_units)
        for s in self.sites:
            m = (torch.rand(batch, self.site_units[s], generator=generator) < keep).float() / keep
            out[s] = m.to(self.device)
        return out
