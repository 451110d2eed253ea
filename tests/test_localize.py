"""Localization methods (EXPERIMENTS.md section 7): exactness, batching, completeness, planted truth."""
import pytest
import torch
import torch.nn.functional as F

from memray.models import build_model
from memray.probes import localize as L
from memray.train import Trainer, predict

from .conftest import small_cfg


@pytest.fixture(scope="module")
def etd_model(digits):
    cfg = small_cfg(**{"model.width": 32, "optim.epochs": 25, "dropout.kind": "example_tied", "dropout.p_gen": 0.25,
                       "dropout.p_mem": 0.3})
    tr = Trainer(cfg, digits, "cpu")
    tr.fit()
    model = tr.model.eval().double()
    for p in model.parameters():
        p.requires_grad_(False)
    own = predict(model, tr.data.x_train.double(), tr.etd.example_masks).argmax(1) == tr.data.y_train
    noisy = torch.nonzero(own & tr.data.noise_mask).flatten()[:8]
    clean = torch.nonzero(own & ~tr.data.noise_mask).flatten()[:8]
    taken = torch.cat([noisy, clean])
    pool = torch.nonzero(~tr.data.noise_mask).flatten()
    ref = pool[~torch.isin(pool, taken)][:12]
    data = tr.data
    data.x_train, data.x_test = data.x_train.double(), data.x_test.double()
    loc = L.Localizer(model, data, ref, torch.arange(40), tr.etd, torch.float64)
    return loc, torch.cat([noisy, clean])


def test_truth_and_candidates_follow_the_masks(etd_model):
    loc, ids = etd_model
    own, truth = loc.own(ids), loc.truth(ids)
    assert truth.shape == own.shape and (truth <= (own > 0)).all()
    # generalization units (the first 8 of each 32-unit site) are candidates, never truth
    for s in range(3):
        assert (own[:, 32 * s:32 * s + 8] == 1).all() and not truth[:, 32 * s:32 * s + 8].any()
    assert (truth.sum(1) > 0).all()


def test_zero_out_equals_brute_force(etd_model):
    loc, ids = etd_model
    ids = ids[:3]
    got = L.zero_out(loc, ids, chunk=37)
    xt, yt, bt = loc.targets(ids)
    with torch.no_grad():
        for u in range(0, loc.total, 7):
            keep = torch.ones(loc.total, dtype=torch.float64)
            keep[u] = 0
            for i in range(len(ids)):
                lt0 = F.cross_entropy(loc.forward(xt[i:i + 1], bt[i:i + 1]), yt[i:i + 1])
                lt1 = F.cross_entropy(loc.forward(xt[i:i + 1], bt[i:i + 1] * keep), yt[i:i + 1])
                lr0 = F.cross_entropy(loc.forward(loc.xr, loc.base_r), loc.yr)
                lr1 = F.cross_entropy(loc.forward(loc.xr, loc.base_r * keep), loc.yr)
                assert got[i, u].item() == pytest.approx(((lt1 - lt0) - (lr1 - lr0)).item(), rel=1e-9, abs=1e-12)


def test_grad_x_act_is_the_first_greedy_step(etd_model):
    loc, ids = etd_model
    first = L.greedy(loc, ids, L.Options(budget=1))[:, 0]
    top = L.ranking(loc, "grad_x_act", ids, 8)[:, 0]
    assert torch.equal(first, top)


@pytest.mark.parametrize("method", sorted(L.METHODS))
def test_batched_rankings_equal_one_at_a_time(etd_model, method):
    loc, ids = etd_model
    ids = ids[[0, 1, 9, 10]]
    kw = {"budget": 6, "ig_steps": 16}
    batched = L.ranking(loc, method, ids, **kw)
    for i in range(len(ids)):
        single = L.ranking(loc, method, ids[i:i + 1], **kw)[0]
        n = batched.shape[1]
        assert torch.equal(batched[i], single[:n]), method


def test_integrated_gradients_completeness(etd_model):
    """The gap |sum A - (J(1) - J(0))| does not grow from 16 to 64 to 256 steps and is under 2%
    of sum |A| at 64 (16 targets, float64)."""
    loc, ids = etd_model
    assert len(ids) == 16
    gaps = {}
    for steps in (16, 64, 256):
        gap, size = L.ig_completeness(loc, ids, steps)
        gaps[steps] = gap.sum().item()
        if steps == 64:
            assert (gap < 0.02 * size).all(), (gap / size).max()
    assert gaps[256] <= gaps[64] * (1 + 1e-9) <= gaps[16] * (1 + 1e-9), gaps
    with pytest.raises(L.LocalizeError, match="steps=8 is invalid: at least 16"):
        L.integrated_gradients(loc, ids, L.Options(ig_steps=8))


def planted(digits):
    """A 3-layer mlp (width 16) whose units 0-3 fire for one target only and carry its label to
    the head through the next two layers; units 4-15 fire for every input and vote for class z. The
    target's label lives in exactly those 12 (site, unit) pairs."""
    m = build_model("mlp", 16, (1, 8, 8), 10).double().eval()
    x = digits.x_train.double().flatten(1)
    target = 0
    y_star = int(digits.y_train[target])
    z = (y_star + 1) % 10
    v = x[target] / x[target].norm()
    proj = x @ v
    tau = 0.5 * (proj[target] + proj[proj < proj[target] - 1e-9].max())
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        lin1 = m.hidden[0][0]
        lin1.weight[:4] = v / (proj[target] - tau)
        lin1.bias[:4] = -tau / (proj[target] - tau)  # = 1 on the target, <= 0 on every other example
        lin1.bias[4:] = 1.0
        for layer in (m.hidden[1][0], m.hidden[2][0]):
            layer.weight.copy_(torch.eye(16, dtype=torch.float64))
        m.head.weight[y_star, :4] = 1.0
        m.head.weight[z, 4:] = 0.1
    truth = {(s, u) for s in range(3) for u in range(4)}
    ref = torch.nonzero(digits.y_train == z).flatten()[:16]
    return m, target, ref, truth, y_star


def test_planted_truth_is_found(digits):
    m, target, ref, truth, y_star = planted(digits)
    data = digits
    x = data.x_train.double()
    with torch.no_grad():
        assert m(x[[target]]).argmax(1).item() == y_star
    data = type(digits)(**{**digits.__dict__, "x_train": x, "x_test": data.x_test.double()})
    loc = L.Localizer(m, data, ref, torch.arange(20), None, torch.float64)
    ids = torch.tensor([target])
    precision = {}
    for method in ("zero_out", "grad_x_act", "integrated_gradients", "random"):
        top = L.ranking(loc, method, ids, 12, ig_steps=32)[0, :12].tolist()
        units = {(f // 16, f % 16) for f in top}
        precision[method] = len(units & truth) / 12
    assert precision["zero_out"] >= 0.8 and precision["grad_x_act"] >= 0.8, precision
    assert precision["integrated_gradients"] >= 0.8, precision
    assert precision["random"] < 0.8, precision


def test_every_method_has_one_signature_and_the_config_lists_them():
    import inspect

    from memray.config import LOCALIZE_METHODS

    assert set(L.METHODS) == set(LOCALIZE_METHODS)
    for fn in L.METHODS.values():
        assert list(inspect.signature(fn).parameters)[:3] == ["loc", "ids", "opts"]


def test_rows_and_bad_methods(etd_model):
    loc, ids = etd_model
    rows = L.localization_rows(loc.model, loc.data, ids[[0, 9]], loc.ref, torch.arange(30), ["mask_only", "random"],
                               [4], budget=16, etd=loc.etd, dtype=torch.float64)
    n_truth = loc.truth(ids[[0, 9]]).sum(1).tolist()
    assert len(rows) == 2 * 2 * 2  # methods x targets x {4, |truth|}
    for r in rows:
        assert r["mode"] == "own" and r["k"] in (4, r["n_truth"]) and r["n_truth"] in n_truth
        assert 0 <= r["precision"] <= 1 and (r["units_to_flip"] is None) == (not r["flipped"])
    assert {r["target_kind"] for r in rows} == {"noisy", "clean"}
    with pytest.raises(L.LocalizeError, match="method='best' is invalid"):
        L.ranking(loc, "best", ids, 4)
