"""Random streams: one per (seed, purpose), from numpy's SeedSequence (EXPERIMENTS.md, "Random streams").

Every random choice a trial makes (which examples are noisy, the ETD masks, the initialisation,
each batch order, dropout draws, reference batches, targets, random-order baselines, subsets)
draws from its own stream. A stream is named by a registered **purpose** and the integers that
select it (the relevant seed, and for some purposes an example id or an epoch): its entropy is

    [purpose hash (64 bits), seed (64 bits), extra_1 (64 bits), ...]

as fixed-width 32-bit words, so two purposes never share a stream for any pair of seeds (their
first words differ), and two selections of one purpose differ in some word (each purpose has a
fixed number of integers). Protocol 2 used seed formulas (`seed * 1000 + 1` for batch order while
`torch.manual_seed(seed)` initialised the model), so seed 0's batch order was seed 1's
initialisation stream.

Streams are the same on every machine and every run. torch draws through generators seeded from
a stream (`torch_generator`), or through `torch.random.fork_rng` with `torch_seed` for the global
generator (initialisation).
"""
from __future__ import annotations

import hashlib

import numpy as np

# purpose -> (the seed it is drawn from, the extra integers that select one stream)
PURPOSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "data.split": ("the dataset's fixed split seed", ()),
    "data.noise": ("data_seed", ()),
    "etd.masks": ("mask_seed", ()),
    "train.init": ("seed", ()),
    "train.order": ("seed", ()),
    "train.dropout": ("seed", ()),
    "train.augment": ("seed", ()),
    "gradients.control": ("data_seed", ()),
    "flip.targets": ("seed", ()),
    "flip.samples": ("seed", ()),
    "flip.random_order": ("seed", ("example_id",)),
    "localize.targets": ("seed", ()),
    "localize.random": ("seed", ("example_id",)),
    "localize.decoys": ("seed", ("example_id",)),
    "retrain.order": ("seed", ()),
    "forgotten.sample": ("seed", ()),
    "memscores.model": ("base seed", ("model index",)),
    "memscores.subset": ("model seed", ()),
    "memscores.init": ("model seed", ()),
    "memscores.order": ("model seed", ("epoch",)),
}
_M64 = (1 << 64) - 1


class UnknownPurpose(KeyError):
    pass


def _words(x: int) -> list[int]:
    if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or not 0 <= int(x) <= _M64:
        raise ValueError(f"a stream is selected by integers in [0, 2**64): got {x!r}")
    x = int(x)
    return [x & 0xFFFFFFFF, x >> 32]


def _purpose_words(purpose: str) -> list[int]:
    if purpose not in PURPOSES:
        raise UnknownPurpose(f"purpose={purpose!r} is not registered in memray.streams.PURPOSES: one of {sorted(PURPOSES)}")
    h = int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:8], "little")
    return _words(h)


def sequence(purpose: str, seed: int, *extra: int) -> np.random.SeedSequence:
    """The SeedSequence of one stream."""
    words = _purpose_words(purpose)
    want = len(PURPOSES[purpose][1])
    if len(extra) != want:
        raise ValueError(f"purpose {purpose!r} is selected by its seed and {want} more integer(s) "
                         f"{PURPOSES[purpose][1]}: got {len(extra)}")
    for v in (seed, *extra):
        words += _words(v)
    return np.random.SeedSequence(words)


def numpy_rng(purpose: str, seed: int, *extra: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(sequence(purpose, seed, *extra)))


def torch_seed(purpose: str, seed: int, *extra: int) -> int:
    """A 63-bit integer seed for torch from the stream (torch seeds its Mersenne Twister from it)."""
    return int(sequence(purpose, seed, *extra).generate_state(1, np.uint64)[0]) >> 1


def torch_generator(purpose: str, seed: int, *extra: int, device="cpu"):
    import torch

    return torch.Generator(device=device).manual_seed(torch_seed(purpose, seed, *extra))


def hash_keys(purpose: str, seed: int, n: int) -> np.ndarray:
    """(n,) uint32 words from the stream: keys for a counter-based hash (ETD's masks, derived on
    the fly per (site, example, unit) without holding a mask)."""
    return sequence(purpose, seed).generate_state(n, np.uint32)
