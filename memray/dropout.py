"""Example-tied dropout (EXPERIMENTS.md section 5) and standard dropout at the same sites.

ETD at a site with C units: the first G = floor(p_gen * C) units are generalization units (always
on); each of the remaining M = C - G memorization units is kept by a training example with
probability p_mem, and that choice is tied to (mask seed, site, example id, unit) for the whole
run. Training multiplies by the 0/1 mask with no rescaling.

Mask state: the keep bits of every memorization unit of every chosen site, for every example,
packed 8 to a byte with the (always set) generalization bits: a uint8 tensor
(N, ceil(sum_s C_s / 8)) on the training device, built once from a counter-based hash in int32
(no RNG stream, so any chunking, device, process or resume gives the same bits). One hash per
(example, site, byte of 8 units) draws the whole byte from an alias table of the 256 byte values
(`byte_alias_table`): about 20 in-place elementwise passes and one table gather over
N x units / 8 words. A batch's masks are one gather of packed rows and one lookup of each byte's
8 float bits on the device (see `example_masks`).

Evaluation modes (masks of shape [C], the same for every example):
  own   the example's own tied mask (training examples only): the model as trained.
  all   generalization units 1, memorization units p_mem (their expected keep rate).
  drop  memorization units 0, generalization units scaled by
            (G + p_mem * M) / G          (units active in training / units left on)
        which is (p_gen + (1 - p_gen) * p_mem) / p_gen whenever p_gen * C is a whole number.
  plain no masks (models trained without ETD).
"""
from __future__ import annotations

import functools
import math

import torch

from . import streams
from .config import ConfigError, DropoutConfig
from .sites import BinaryMasks

_M32 = 0xFFFFFFFF


def _i32(v: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return v - (1 << 32) if v >= (1 << 31) else v


def _c(v: int) -> torch.Tensor:
    """An int32 0-dim (CPU scalar) tensor for constant v: in-place ops take it without converting
    a Python number on every call (a few microseconds each, in loops over chunks)."""
    return torch.tensor(_i32(v), dtype=torch.int32)


# lowbias32 as steps: ("xs", k, mask) is x ^= x >>> k (the mask makes int32's arithmetic shift
# logical), ("mul", c) is x *= c mod 2**32.
_LOWBIAS32 = tuple((op, *map(_c, arg)) for op, *arg in (
    ("xs", 16, 0xFFFF), ("mul", 0x7FEB352D), ("xs", 15, 0x1FFFF), ("mul", 0x846CA68B), ("xs", 16, 0xFFFF)))
_C8, _C24, _C31, _C255, _CR8 = map(_c, (8, 24, 31, 0xFF, 0x7FFFFF00))  # for `_draw_bytes_`


def _hash32_(x: torch.Tensor, t: torch.Tensor | None = None, steps: slice = slice(None)) -> torch.Tensor:
    """lowbias32 (or the given slice of its steps) in place on an int32 tensor holding uint32 bit
    patterns. `t`: scratch of x's shape (allocated if None)."""
    t = torch.empty_like(x) if t is None else t
    for op, *arg in _LOWBIAS32[steps]:
        if op == "mul":
            x *= arg[0]
        else:
            torch.bitwise_right_shift(x, arg[0], out=t)
            t &= arg[1]
            x ^= t
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    return _hash32_((x & _M32).to(torch.int32)).to(torch.int64) & _M32


_CAP = 1 << 23  # alias column capacity: 256 columns x 2**23 = 2**31, the draw's resolution


@functools.lru_cache(maxsize=64)
def byte_alias_table(p: float) -> torch.Tensor:
    """(256,) int32 alias table (Vose) for one byte of 8 independent Bernoulli(p) bits.

    Byte value v has probability q_v = p**k (1 - p)**(8 - k), k = popcount(v). The q_v are scaled
    to integer weights w_v summing to exactly 2**31 (each within 1 of q_v * 2**31), and integer Vose
    splits them into 256 columns of 2**23: column i holds its own value for positions r < thr_i
    and value alias_i for the rest. Drawing column i (8 uniform bits) and position r (23 uniform
    bits) gives v with probability exactly w_v / 2**31, so every bit's keep rate is p within
    256 / 2**31 (about 1.2e-7), and the 8 bits of a byte are independent to that precision.

    Entry i packs both as (thr_i - 1) << 8 | (i ^ alias_i), which fits int32 (thr_i <= 2**23)."""
    q = [p ** v.bit_count() * (1 - p) ** (8 - v.bit_count()) for v in range(256)]
    w = [round(x * 256 * _CAP) for x in q]
    w[max(range(256), key=w.__getitem__)] += 256 * _CAP - sum(w)
    thr, alias = [_CAP] * 256, list(range(256))
    small = [v for v in range(256) if w[v] < _CAP]
    large = [v for v in range(256) if w[v] >= _CAP]
    while small and large:
        s, big = small.pop(), large[-1]
        thr[s], alias[s] = w[s], big
        w[big] -= _CAP - w[s]
        if w[big] < _CAP:
            small.append(large.pop())
    # leftovers (rounding) are full columns: thr = _CAP, alias = itself
    return torch.tensor([((t - 1) << 8) | (i ^ a) for i, (t, a) in enumerate(zip(thr, alias))],
                        dtype=torch.int32)


def _draw_bytes_(x: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                 e: torch.Tensor | None = None) -> torch.Tensor:
    """Bytes from hashed int32 words, in place: x's low 8 bits become the byte (the cast to uint8
    keeps exactly them; the high bits are not cleared); t (and e, if given) are scratch of x's shape.

    Column i = top 8 bits of the word, position r = its low 23 bits; with e = table[i]
    ((thr_i - 1) << 8 | k_i, k_i = i ^ alias_i): e - (r << 8) < 0 iff r >= thr_i (the low byte
    k_i < 256 cannot change the sign of a multiple of 256), so the byte is
    i ^ (k_i & ((e - (r << 8)) >> 31)). All elementwise, no branches; no intermediate overflows
    (e >= -256, r << 8 <= 2**31 - 256)."""
    torch.bitwise_right_shift(x, _C24, out=t)
    t &= _C255
    x <<= _C8
    x &= _CR8
    e = torch.index_select(table, 0, t.view(-1), out=None if e is None else e.view(-1)).view_as(x)
    torch.sub(e, x, out=x)
    x >>= _C31
    x &= e
    x ^= t
    return x


def _stream_keys(seed: int, site: int) -> tuple[int, int]:
    """(example key base, column key base) of one site: words of the mask seed's `etd.masks`
    stream (memray.streams), two per site."""
    words = streams.hash_keys("etd.masks", seed, 2 * (site + 1))
    return int(words[2 * site]), int(words[2 * site + 1])


def _example_keys(seed: int, ids: torch.Tensor, site: int = 0) -> torch.Tensor:
    """(B,) int32: each example's hashed id under the mask seed's stream."""
    base = int(hash32(torch.tensor([_stream_keys(seed, site)[0]]))[0])
    return _hash32_((ids.long() & _M32).to(torch.int32) ^ _i32(base))


def _column_keys(seed: int, site: int, nbytes: int) -> torch.Tensor:
    """(nbytes,) int32: hashed (stream word, byte index) for one site's bytes."""
    base = _stream_keys(seed, site)[1]
    k = (base + torch.arange(nbytes, dtype=torch.int64) * 0xC2B2AE3D) & _M32
    return hash32(k).to(torch.int32)


def _mix16(v: torch.Tensor) -> torch.Tensor:
    """lowbias32's first step, v ^ (v >>> 16), on a copy of int32 `v`."""
    return _hash32_(v.clone(), steps=slice(0, 1))


def _draw_block_(h1: torch.Tensor, k1: torch.Tensor, table: torch.Tensor, x: torch.Tensor,
                 t: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
    """x[:] = `_draw_bytes_` of lowbias32(h ^ k) for every (example key h, column key k) pair, given
    h1 = _mix16(h) and k1 = _mix16(k): lowbias32's first step distributes over xor
    ((h ^ k) ^ ((h ^ k) >>> 16) = h1 ^ k1), so it is taken on the key vectors and the block starts
    at the first multiply. x, t, e: int32 (len(h1), len(k1)) buffers."""
    torch.bitwise_xor(h1[:, None], k1[None, :], out=x)
    return _draw_bytes_(_hash32_(x, t, steps=slice(1, None)), t, table, e)


def draw_site_bytes(seed: int, site: int, ids: torch.Tensor, units: int, p: float) -> torch.Tensor:
    """(len(ids), ceil(units / 8)) uint8: bit j of byte b is unit 8b + j of the site, kept with
    probability p (see `byte_alias_table`), drawn from lowbias32(example key ^ column key) with
    no RNG stream."""
    h1 = _mix16(_example_keys(seed, ids, site))
    k1 = _mix16(_column_keys(seed, site, (units + 7) // 8).to(ids.device))
    x = torch.empty(h1.shape[0], k1.shape[0], dtype=torch.int32, device=ids.device)
    _draw_block_(h1, k1, byte_alias_table(float(p)).to(ids.device), x, torch.empty_like(x))
    return x.to(torch.uint8)


def keep_bits(seed: int, site: int, ids: torch.Tensor, units: int, p: float) -> torch.Tensor:
    """Bool (len(ids), units): unit u of example i at `site` is kept. Every unit of the site is drawn
    (ETD then forces its generalization units on), so the memorization units' bits do not depend
    on p_gen's split."""
    return unpack_bits(draw_site_bytes(seed, site, ids, units, p), units)


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
    """(256, 8) float32: row b holds byte b's 8 bits as 0./1. (bit j in column j)."""
    return ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float().to(device)


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
                 device: torch.device | str = "cpu", chunk: int | None = None):
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
        self.packed = self._build_packed(n_examples, chunk)  # (N, ceil(units / 8)) uint8
        self._slices, col = {}, 0
        for s in self.sites:
            self._slices[s] = (col, col + site_units[s])
            col += site_units[s]
        self._table = _byte_table(self.device)

    def _build_packed(self, n_examples: int, chunk: int | None) -> torch.Tensor:
        """(N, ceil(units / 8)) uint8 rows: every unit of each chosen site in site order (the bits
        of `keep_bits`, generalization units set), packed end to end, `chunk` examples at a time.
        Built once per trial, so kept plain: 19 ms for mnist1d's mlp (4,000 examples x 1,536
        units), 178 ms for 50,000 examples, on 2 CPU cores (a fused byte-level build gave the same
        bits in 3.1 and 31 ms with ~100 more lines; a trial trains for seconds to hours)."""
        chunk = chunk or 8192
        out = []
        for start in range(0, n_examples, chunk):
            ids = torch.arange(start, min(start + chunk, n_examples), device=self.device)
            bits = [keep_bits(self.seed, s, ids, self.site_units[s], self.p_mem) for s in self.sites]
            for s, b in zip(self.sites, bits):
                b[:, :self.gen[s]] = True
            out.append(pack_bits(torch.cat(bits, 1)))
        return torch.cat(out)

    @property
    def state_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def to(self, device) -> "ExampleTiedDropout":
        self.device = torch.device(device)
        self.packed, self._table = self.packed.to(device), self._table.to(device)
        return self

    # -- training / `own` -------------------------------------------------------------------
    def example_masks(self, ids: torch.Tensor) -> BinaryMasks:
        """Masks (B, C) per site (None for sites without ETD) for training examples `ids`.

        Two device gathers per batch: the examples' packed rows, then each byte's row of a (256, 8)
        float table of its bits, which is the float mask itself. Site masks are column slices
        (views) of that one tensor."""
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
            raise ValueError("example-tied dropout needs a 1-D tensor of integer example ids")
        rows = self.packed.index_select(0, ids).view(-1).int()
        bits = self._table.index_select(0, rows).view(ids.shape[0], -1)
        out = BinaryMasks([None] * len(self.site_units))
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
