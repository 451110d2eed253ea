"""Example-tied dropout (EXPERIMENTS.md section 5) and standard dropout at the same sites.

ETD at a site with C units: the first G = floor(p_gen * C) units are generalization units (always
on); each of the remaining M = C - G memorization units is kept by a training example with
probability p_mem, and that choice is tied to (mask seed, site, example id, unit) for the whole
run. Training multiplies by the 0/1 mask with no rescaling.

Mask state: the keep bits of every memorization unit of every chosen site, for every example,
packed 8 to a byte with the (always set) generalization bits: a uint8 tensor
(N, ceil(sum_s C_s / 8)) on the training device, built once from a counter-based hash in int32
(no RNG stream, so any chunking, device, process or resume gives the same bits). A batch's masks
are one gather, one byte-to-bits table lookup and one cast on the device (see `example_masks`).

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


def _i32(v: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return v - (1 << 32) if v >= (1 << 31) else v


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor holding uint32 bit patterns (multiplies wrap mod 2**32;
    the masks after each shift make it logical)."""
    x ^= (x >> 16) & 0xFFFF
    x *= _i32(0x7FEB352D)
    x ^= (x >> 15) & 0x1FFFF
    x *= _i32(0x846CA68B)
    x ^= (x >> 16) & 0xFFFF
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    return _hash32_((x & _M32).to(torch.int32)).to(torch.int64) & _M32


def keep_bits(seed: int, site: int, ids: torch.Tensor, units: int, p: float) -> torch.Tensor:
    """Bool (len(ids), units): unit u of example i kept iff its 16-bit hash field < round(p * 2**16).

    One 32-bit hash h(seed, site, i, k) serves units 2k (low 16 bits) and 2k + 1 (high 16 bits),
    so the keep probability is round(p * 65536) / 65536 (within 8e-6 of p). Computed in int32 on
    the ids' device: a handful of elementwise passes over (len(ids), units / 2).

    lowbias32's last step (x ^= x >>> 16) leaves the high half unchanged and xors it into the low
    half, so it is folded into the two comparisons: high field = the top 16 bits of x read as
    unsigned (x ^ 0x80000000 < (t << 16) - 2**31 in int32), low field = (x ^ (x >> 16)) & 0xFFFF
    (an arithmetic shift only touches the bits the mask clears)."""
    dev = ids.device
    base = int(hash32(torch.tensor([(seed * 0x9E3779B1 + site * 0x85EBCA77) & _M32]))[0])
    h_ex = _hash32_((ids.long() & _M32).to(torch.int32) ^ _i32(base))  # (B,)
    pairs = (units + 1) // 2
    k = (torch.arange(pairs, dtype=torch.int64) * 0xC2B2AE3D & _M32).to(torch.int32).to(dev)
    x = h_ex[:, None] ^ k[None, :]  # (B, pairs)
    x ^= (x >> 16) & 0xFFFF
    x *= _i32(0x7FEB352D)
    x ^= (x >> 15) & 0x1FFFF
    x *= _i32(0x846CA68B)
    t = int(round(p * 2**16))
    hi = (x ^ _i32(0x80000000)) < (t << 16) - (1 << 31)
    x ^= x >> 16
    lo = (x & 0xFFFF) < t
    return torch.stack([lo, hi], 2).view(ids.shape[0], 2 * pairs)[:, :units]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, ceil(K/8)) uint8, bit j of byte b = column 8b + j (little-endian hosts).

    Each run of 8 bools is read as one little-endian int64 holding bytes b_0..b_7 in {0, 1};
    multiplying by sum_j 2**(56 - 7j) puts b_j at bit 56 + j and every cross term at a distinct
    position below bit 56 or above bit 63, so the top byte is the packed byte (no carries)."""
    N, K = bits.shape
    pad = (-K) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).contiguous().view(torch.int64)
    return ((b * 0x0102040810204080) >> 56 & 0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """(N, nbytes) uint8 -> (N, K) bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[:, :, None] >> shifts) & 1).view(packed.shape[0], -1)[:, :K].bool()


def _byte_table(device) -> torch.Tensor:
    """(256,) int64: entry b holds byte b's 8 bits as 8 bytes of 0/1 (bit j in byte j, little-endian)."""
    b = torch.arange(256, dtype=torch.int64)
    t = torch.zeros(256, dtype=torch.int64)
    for j in range(8):
        t |= ((b >> j) & 1) << (8 * j)
    return t.to(device)


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
                 device: torch.device | str = "cpu", chunk: int = 1024):
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
        # Row layout: every unit of each chosen site in site order, generalization bits set, then
        # padding to whole bytes: ceil(units / 8) bytes per example, so a batch's masks need no
        # reassembly (see `example_masks`).
        rows = []
        for start in range(0, n_examples, chunk):
            ids = torch.arange(start, min(start + chunk, n_examples), device=self.device)
            bits = []
            for s in self.sites:
                bits.append(torch.ones(ids.shape[0], self.gen[s], dtype=torch.bool, device=self.device))
                bits.append(keep_bits(self.seed, s, ids, self.mem[s], self.p_mem))
            rows.append(pack_bits(torch.cat(bits, 1)))
        self.packed = torch.cat(rows)  # (N, ceil(sum of chosen sites' units / 8)) uint8
        self._slices, col = {}, 0
        for s in self.sites:
            self._slices[s] = (col, col + site_units[s])
            col += site_units[s]
        self._table = _byte_table(self.device)

    @property
    def state_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def to(self, device) -> "ExampleTiedDropout":
        self.device = torch.device(device)
        self.packed, self._table = self.packed.to(device), self._table.to(device)
        return self

    # -- training / `own` -------------------------------------------------------------------
    def example_masks(self, ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Masks (B, C) per site (None for sites without ETD) for training examples `ids`.

        Three device ops per batch: gather the examples' packed rows, look each byte up in a
        256-entry int64 table whose 8 bytes are its bits (0/1), convert those bytes to float. Site
        masks are column slices (views) of that one tensor."""
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
            raise ValueError("example-tied dropout needs a 1-D tensor of integer example ids")
        rows = self.packed.index_select(0, ids).view(-1).int()
        bits = self._table.index_select(0, rows).view(torch.uint8).view(ids.shape[0], -1).float()
        out: list[torch.Tensor | None] = [None] * len(self.site_units)
        for s, (a, b) in self._slices.items():
            out[s] = bits[:, a:b]
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
