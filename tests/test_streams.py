"""Random streams (EXPERIMENTS.md, "Random streams"): one per (seed, purpose), none shared."""
import numpy as np
import pytest
import torch

from memray import streams


def _selections(purpose, seeds=range(10)):
    extra = len(streams.PURPOSES[purpose][1])
    for s in seeds:
        for e in ([()] if extra == 0 else [(i,) for i in range(5)]):
            yield (purpose, s, *e)


def test_no_two_streams_coincide_for_seeds_0_to_9():
    """Every registered purpose, seeds 0-9 (and 5 values of its extra integer): the numpy draws
    and the torch seeds all differ; torch keeps 32 bits of a seed, so those bits differ too."""
    sel = [x for p in streams.PURPOSES for x in _selections(p)]
    draws = {tuple(streams.numpy_rng(*x).integers(0, 2**63, 4).tolist()) for x in sel}
    assert len(draws) == len(sel)
    seeds32 = {streams.torch_seed(*x) & 0xFFFFFFFF for x in sel}
    assert len(seeds32) == len(sel)
    first = {tuple(torch.rand(4, generator=streams.torch_generator(*x)).tolist()) for x in sel}
    assert len(first) == len(sel)


def test_protocol_2s_collision_is_gone():
    """Protocol 2 seeded seed 0's batch order with 0 * 1000 + 1 = 1, seed 1's init with 1."""
    assert streams.torch_seed("train.order", 0) != streams.torch_seed("train.init", 1)


def test_streams_are_fixed_values():
    """The same on every machine and run: a pinned draw (numpy's SeedSequence and PCG64 are
    specified bit for bit)."""
    assert streams.numpy_rng("data.noise", 0).integers(0, 1000, 3).tolist() == [251, 521, 706]
    assert streams.torch_seed("train.init", 3) == 7945800820675933227


def test_an_unregistered_purpose_or_a_wrong_selection_raises():
    with pytest.raises(streams.UnknownPurpose, match="not registered"):
        streams.numpy_rng("train.shuffle", 0)
    with pytest.raises(ValueError, match="1 more integer"):
        streams.numpy_rng("flip.random_order", 0)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        streams.numpy_rng("train.init", -1)
    assert isinstance(streams.hash_keys("etd.masks", 0, 4), np.ndarray)
