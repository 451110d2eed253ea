import math

import pytest
import torch

from memray.config import ConfigError, DropoutConfig, ExperimentConfig
from memray.dropout import (
    ExampleTiedDropout,
    StandardDropout,
    _column_keys,
    _draw_bytes_,
    _example_keys,
    byte_alias_table,
    draw_site_bytes,
    hash32,
    keep_bits,
    pack_bits,
    unpack_bits,
)
from memray.train import Trainer

UNITS = [16, 64, 130]


def test_hash_matches_a_python_reference():
    def ref(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 12345, 2**31 + 7, 2**32 - 1]
    assert hash32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]


@pytest.mark.parametrize("p", [0.003, 0.1, 0.3, 0.5, 0.9])
def test_byte_alias_table_draws_eight_independent_bernoulli_bits(p):
    """Read back the exact distribution the table draws from: every byte value within 2**-24 of
    p**k (1-p)**(8-k), total exactly 1, and each bit's keep rate within 1.2e-7 of p."""
    e = byte_alias_table(p).tolist()
    cap = 1 << 23
    mass = [0] * 256  # in units of 2**-31
    for i, v in enumerate(e):
        thr, alias = (v >> 8) + 1, i ^ (v & 0xFF)
        assert 0 <= thr <= cap
        mass[i] += thr
        mass[alias] += cap - thr
    assert sum(mass) == 1 << 31
    for v in range(256):
        k = v.bit_count()
        assert abs(mass[v] / 2**31 - p**k * (1 - p) ** (8 - k)) <= 2**-24
    for bit in range(8):
        rate = sum(m for v, m in enumerate(mass) if v >> bit & 1) / 2**31
        assert abs(rate - p) < 1.2e-7


def test_byte_draw_matches_a_python_reference():
    p = 0.3
    table = byte_alias_table(p)
    words = torch.randint(-2**31, 2**31 - 1, (5000,), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    words[:4] = torch.tensor([0, -1, 2**31 - 1, -2**31], dtype=torch.int32)
    got = _draw_bytes_(words.clone(), torch.empty_like(words), table).to(torch.uint8).tolist()
    assert got == [_alias_draw(table, w & 0xFFFFFFFF) for w in words.tolist()]


def _alias_draw(table, u):
    e = table.tolist()
    i, r = u >> 24, u & 0x7FFFFF
    thr, alias = (e[i] >> 8) + 1, i ^ (e[i] & 0xFF)
    return i if r < thr else alias


def test_site_bytes_are_the_alias_draw_of_the_full_hash():
    """draw_site_bytes (lowbias32's first step taken on the key vectors) equals hashing each
    (example key ^ column key) word in full, then the alias draw."""
    ids = torch.tensor([0, 5, 4095, 2**20 + 3])
    got = draw_site_bytes(9, 2, ids, 77, 0.2)
    h = _example_keys(9, ids, 2).long() & 0xFFFFFFFF
    k = _column_keys(9, 2, 10).long() & 0xFFFFFFFF
    words = hash32(h[:, None] ^ k[None, :])
    table = byte_alias_table(0.2)
    assert got.shape == (4, 10)
    assert got.tolist() == [[_alias_draw(table, w) for w in row] for row in words.tolist()]


def test_pack_unpack_round_trip():
    bits = torch.rand(37, 21) < 0.3
    assert torch.equal(unpack_bits(pack_bits(bits), 21), bits)


def test_masks_are_tied_to_the_example_not_the_batch():
    etd = ExampleTiedDropout(DropoutConfig(kind="example_tied", p_gen=0.25, p_mem=0.3, mask_seed=7), UNITS, 500)
    a = etd.example_masks(torch.tensor([3, 10, 499]))
    b = etd.example_masks(torch.tensor([499, 3]))
    for s in range(len(UNITS)):
        assert torch.equal(a[s][0], b[s][1]) and torch.equal(a[s][2], b[s][0])
    # a fresh object (another process, a resume) builds the same bits; chunking does not matter
    again = ExampleTiedDropout(DropoutConfig(kind="example_tied", p_gen=0.25, p_mem=0.3, mask_seed=7), UNITS, 500,
                               chunk=37)
    assert torch.equal(etd.packed, again.packed)
    other = ExampleTiedDropout(DropoutConfig(kind="example_tied", p_gen=0.25, p_mem=0.3, mask_seed=8), UNITS, 500)
    assert not torch.equal(etd.packed, other.packed)


def test_generalization_units_always_on_and_keep_rate_is_p_mem():
    p_mem = 0.1
    etd = ExampleTiedDropout(DropoutConfig(kind="example_tied", p_gen=0.2, p_mem=p_mem), UNITS, 4000)
    masks = etd.example_masks(torch.arange(4000))
    kept, total = 0, 0
    for s, m in enumerate(masks):
        g = math.floor(0.2 * UNITS[s])
        assert (m[:, :g] == 1).all()
        kept += m[:, g:].sum().item()
        total += m[:, g:].numel()
    rate = kept / total
    # binomial: 5 standard errors around p_mem (false alarm probability < 1e-6)
    se = math.sqrt(p_mem * (1 - p_mem) / total)
    assert abs(rate - p_mem) < 5 * se, (rate, se)
    # and per example the rate varies as a binomial would, not frozen per example
    per_example = torch.cat([m[:, math.floor(0.2 * UNITS[s]):] for s, m in enumerate(masks)], 1).mean(1)
    assert per_example.std().item() > 0


def test_mask_state_is_packed_bits():
    # the models' sites have multiples of 8 units: at most examples x units / 8 bytes
    for units in ([512] * 3, [16, 32, 32, 32, 64, 64, 64, 128]):
        etd = ExampleTiedDropout(DropoutConfig(kind="example_tied", p_gen=0.2, p_mem=0.1), units, 50_000)
        assert etd.state_bytes <= 50_000 * sum(units) / 8
        assert etd.packed.dtype == torch.uint8
    # any other count rounds up to whole bytes per example
    etd = ExampleTiedDropout(DropoutConfig(kind="example_tied"), UNITS, 1000)
    assert etd.state_bytes == 1000 * math.ceil(sum(UNITS) / 8)


@pytest.mark.parametrize("units", [UNITS, [10, 21, 16, 7]])
def test_batch_masks_are_the_hash_bits(units):
    """example_masks (packed gather + table unpack) equals keep_bits computed directly, also when
    sites with unit counts that are not multiples of 8 are spliced end to end."""
    cfg = DropoutConfig(kind="example_tied", p_gen=0.25, p_mem=0.3, mask_seed=11)
    etd = ExampleTiedDropout(cfg, units, 300, chunk=64)
    assert etd.packed.shape == (300, math.ceil(sum(units) / 8))
    ids = torch.tensor([299, 0, 64, 65, 17])
    masks = etd.example_masks(ids)
    for s, c in enumerate(units):
        g = math.floor(0.25 * c)
        expect = torch.cat([torch.ones(len(ids), g), keep_bits(11, s, ids, c, 0.3)[:, g:].float()], 1)
        assert torch.equal(masks[s], expect)


def test_eval_modes_follow_the_definition():
    etd = ExampleTiedDropout(DropoutConfig(kind="example_tied", p_gen=0.2, p_mem=0.1), [10, 64], 10)
    all_m, drop_m = etd.mode_masks("all"), etd.mode_masks("drop")
    assert all_m[0].tolist() == [1.0, 1.0] + [pytest.approx(0.1)] * 8
    # p_gen * C whole: the factor is (p_gen + (1 - p_gen) p_mem) / p_gen = 1.4
    assert drop_m[0][:2].tolist() == pytest.approx([1.4, 1.4]) and drop_m[0][2:].sum() == 0
    # 64 units: G = 12, M = 52 -> (12 + 0.1 * 52) / 12
    assert drop_m[1][0].item() == pytest.approx((12 + 5.2) / 12)


def test_standard_dropout_rate_matches_etd_keep_rate():
    cfg = DropoutConfig(kind="standard", p_gen=0.2, p_mem=0.1)
    sd = StandardDropout(cfg, [4096], "cpu")
    m = sd.train_masks(64, torch.Generator().manual_seed(0))[0]
    keep = 0.2 + 0.8 * 0.1
    assert sd.rate == pytest.approx(1 - keep)
    assert (m > 0).float().mean().item() == pytest.approx(keep, abs=0.01)
    assert m.max().item() == pytest.approx(1 / keep)


def test_bad_sites_and_ids_fail_before_training(digits):
    with pytest.raises(ConfigError, match=r"dropout.sites=\[0, 9\] is invalid: site indices of this model, 0..2"):
        Trainer(ExperimentConfig().replace(**{"dropout.kind": "example_tied", "dropout.sites": [0, 9]}), digits, "cpu")
    etd = ExampleTiedDropout(DropoutConfig(kind="example_tied"), UNITS, 10)
    with pytest.raises(ValueError, match="integer example ids"):
        etd.example_masks(torch.zeros(3))


def test_etd_only_on_chosen_sites(digits):
    tr = Trainer(ExperimentConfig().replace(**{"dropout.kind": "example_tied", "dropout.sites": [1],
                                               "optim.epochs": 1}), digits, "cpu")
    masks = tr.masks_for_training(torch.arange(4))
    assert masks[0] is None and masks[2] is None and masks[1].shape == (4, 512)


@pytest.mark.slow
def test_etd_localizes_memorization_on_digits(digits):
    """Acceptance (issue: example-tied dropout): own noisy >= .95, drop noisy <= .05, drop clean
    >= .95, drop test >= plain twin's test - .01; the twin memorizes."""
    base = ExperimentConfig().replace(**{"analyses.run": []})
    plain = Trainer(base, digits, "cpu")
    plain.fit()
    etd = Trainer(base.replace(**{"dropout.kind": "example_tied"}), digits, "cpu")
    etd.fit()
    p, e = plain.final(), etd.final()
    assert p["plain/train_noisy/accuracy"] >= 0.95 and p["plain/test/accuracy"] >= 0.85
    assert e["own/train_noisy/accuracy"] >= 0.95
    assert e["drop/train_noisy/accuracy"] <= 0.05
    assert e["drop/train_clean/accuracy"] >= 0.95
    assert e["drop/test/accuracy"] >= p["plain/test/accuracy"] - 0.01
