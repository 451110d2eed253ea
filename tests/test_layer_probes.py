import copy

import pytest
import torch
import torch.nn.functional as F

from memray.models import build_model
from memray.probes import Subject
from memray.probes.gradients import GradientAccounting
from memray.probes.retraining import retrain_layer
from memray.probes.rewinding import rewind_item, rewind_layer, rewinding_rows
from memray.sites import BinaryMasks
from memray.train import Trainer

from .conftest import small_cfg


@pytest.fixture(scope="module")
def trained(digits):
    cfg = small_cfg(**{"model.arch": "resnet9", "model.width": 8, "optim.epochs": 3,
                       "analyses.snapshot_epochs": [0, 1, 3], "analyses.snapshot_thresholds": []})
    tr = Trainer(cfg, digits, "cpu")
    tr.fit()
    return tr


@pytest.mark.parametrize("arch,split", [("resnet9", False), ("lenet", True), ("mlp", True)])
def test_gradient_accounting_equals_epoch_aggregates_by_autograd(arch, split):
    """Two epochs of a tiny float64 model: every row equals the norms and cosines of the epoch's
    aggregated gradients computed directly (a forward and backward per subset and batch), and
    training steps with the mean-loss gradient; the step's losses and logits are the batch's.
    Batch norm (resnet9) couples a batch's examples: one forward, a backward per part; the others
    split the batch into its parts, each with its own forward and backward."""
    torch.manual_seed(0)
    m = build_model(arch, 4, (1, 8, 8), 10).double()
    m.train()
    n = 40
    x, y = torch.randn(n, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (n,))
    noise = torch.zeros(n, dtype=torch.bool)
    noise[[1, 5, 7, 20, 33]] = True
    acc = GradientAccounting(m, noise, seed=3)
    assert acc.split is split
    # per-example 0/1 masks at every site (as example-tied dropout trains): a split batch's parts
    # take their examples' rows
    masks = BinaryMasks([(torch.rand(n, c) < 0.7).double() for c in m.site_units])

    def mk(idx):
        return BinaryMasks([mm[idx] for mm in masks])

    ctrl = acc.control
    assert int(ctrl.sum()) == 5 and not (ctrl & noise).any()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    params = list(m.parameters())
    for epoch in range(2):
        acc.start_epoch()
        agg = {k: [torch.zeros_like(p) for p in params] for k in ("clean", "noisy", "control")}
        for idx in torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).split(16):
            B = len(idx)
            for kind, sel in (("clean", ~noise[idx]), ("noisy", noise[idx]), ("control", ctrl[idx])):
                g = torch.autograd.grad(F.cross_entropy(m(x[idx], mk(idx)), y[idx], reduction="none")[sel].sum(), params,
                                        allow_unused=True, materialize_grads=True)
                for a, b in zip(agg[kind], g):
                    a += b / B
            mean = torch.autograd.grad(F.cross_entropy(m(x[idx], mk(idx)), y[idx]), params)
            logits = m(x[idx], mk(idx))
            opt.zero_grad()
            losses, got = acc.step(x[idx], y[idx], mk(idx), idx)
            assert torch.allclose(got, logits, rtol=1e-12, atol=1e-12)
            assert torch.allclose(losses, F.cross_entropy(logits, y[idx], reduction="none"), rtol=1e-12, atol=1e-12)
            for p, g in zip(params, mean):
                assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12)
            opt.step()
        rows = acc.end_epoch()
        for gi, name in enumerate(m.group_names()):
            idx = [i for i, (nm, _) in enumerate(m.named_parameters()) if m.group_of(nm) == gi]
            r = rows[gi]

            def norm(kind):
                return sum(agg[kind][i].norm().item() / agg[kind][i].numel() ** 0.5 for i in idx)

            def cos(a, b):
                return sum(F.cosine_similarity(a[i].flatten(), b[i].flatten(), dim=0).item()
                           for i in range(len(a))) / len(a)

            assert r["layer_name"] == name and r["aggregation"] == "epoch"
            for kind in ("clean", "noisy", "control"):
                assert r[f"{kind}_norm"] == pytest.approx(norm(kind), rel=1e-9)
            c, nz, k = ([agg[kind][i] for i in idx] for kind in ("clean", "noisy", "control"))
            assert r["cosine"] == pytest.approx(cos(c, nz), rel=1e-9, abs=1e-12)
            assert r["control_cosine"] == pytest.approx(cos(k, [a - b for a, b in zip(c, k)]), rel=1e-9, abs=1e-12)


def test_rewind_to_final_changes_nothing(trained):
    subject = trained.subject
    final = {k: v.clone() for k, v in subject.model.state_dict().items()}
    rows = rewind_item(subject, final, final, 2, 3)
    from memray.probes.rewinding import subset_accuracies
    base = subset_accuracies(subject)
    assert {r["subset"]: r["accuracy"] for r in rows} == base


def test_rewind_to_init_restores_exactly_group_g(trained):
    m = copy.deepcopy(trained.model)
    final = {k: v.clone() for k, v in m.state_dict().items()}
    init = trained.snapshots[0]
    g = 1  # conv2: conv weight and BN weight and bias; its BN running statistics stay final
    rewind_layer(m, g, init)
    keys = {n for n, _ in m.group_parameters(g)}
    assert keys == {"conv2.0.weight", "conv2.1.weight", "conv2.1.bias"}
    for k, v in m.state_dict().items():
        expected = init[k] if k in keys else final[k]
        assert torch.equal(v, expected), k
    assert all(not torch.equal(init[k], final[k]) for k in keys)
    # the buffers of the rewound group are the trained model's, and differ from epoch 0's
    for k in ("conv2.1.running_mean", "conv2.1.running_var"):
        assert torch.equal(m.state_dict()[k], final[k]) and not torch.equal(init[k], final[k])


def test_rewinding_table_shape(trained):
    rows = rewinding_rows(trained.subject, trained.snapshots)
    assert len(rows) == 9 * 3 * 4  # groups x snapshot epochs x subsets
    assert {r["rewind_epoch"] for r in rows} == {0, 1, 3}


def test_retraining_touches_only_group_g_and_no_noisy_example(trained):
    m = trained.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    seen = []
    g = 4
    out, info = retrain_layer(trained.subject, g, trained.snapshots[0], max_epochs=2, seen_ids=seen)
    assert info["epochs"] <= 2
    keys = set(m.group_state_keys(g))
    for k, v in out.state_dict().items():
        if k not in keys:
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(out.state_dict()[k], before[k]) for k in keys)
    ids = torch.cat(seen)
    assert not trained.data.noise_mask[ids].any()
    assert sorted(set(ids.tolist())) == trained.data.clean_ids().tolist()
    # the original model is untouched
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_retraining_steps_and_records_its_budget(trained):
    """The reset alone must not pass: retraining moves the group's parameters away from the
    snapshot it was reset to and lifts clean accuracy above the reset model's; each row carries the
    epochs run and `converged` (final train_clean >= 99% of the trained model's)."""
    from memray.probes.retraining import CONVERGED, retrain_item
    from memray.probes.rewinding import subset_accuracies

    subject, data, g = trained.subject, trained.data, 1
    reset = copy.deepcopy(subject.model)
    rewind_layer(reset, g, trained.snapshots[0])
    out, info = retrain_layer(subject, g, trained.snapshots[0], max_epochs=4)
    moved = [not torch.equal(p, trained.snapshots[0][n]) for n, p in out.group_parameters(g)]
    assert all(moved)
    assert (subset_accuracies(Subject(out, data))["train_clean"]
            > subset_accuracies(Subject(reset, data))["train_clean"])
    rows = retrain_item(subject, g, trained.snapshots[0], 0, max_epochs=4)
    trained_clean = subset_accuracies(subject)["train_clean"]
    clean = next(r["accuracy"] for r in rows if r["subset"] == "train_clean")
    assert {r["epochs_run"] for r in rows} == {info["epochs"]} and 1 <= info["epochs"] <= 4
    assert {r["converged"] for r in rows} == {clean >= CONVERGED * trained_clean}


@pytest.fixture(scope="module")
def etd_lenet(digits):
    cfg = small_cfg(**{"model.arch": "lenet", "model.width": 8, "optim.epochs": 3, "dropout.kind": "example_tied",
                       "analyses.snapshot_epochs": [0, 1, 3], "analyses.snapshot_thresholds": []})
    tr = Trainer(cfg, digits, "cpu")
    tr.fit()
    return tr


@pytest.mark.parametrize("arch,before", [("lenet", [0, 1, 3, 4, 5]), ("mlp", [1, 2, 3, 4]), ("resnet9", None)])
def test_stages_split_the_forward_pass(digits, arch, before):
    """A chain's stages run in two parts give the whole pass's logits exactly; a group's
    `stages_before` counts the stages before its first parameter; a model without a chain has none."""
    torch.manual_seed(0)
    m = build_model(arch, 8, digits.in_shape, digits.num_classes).eval()
    x = digits.x_train[:16]
    masks = [(torch.rand(16, c) > 0.3).float() for c in m.site_units]
    if before is None:
        assert m.stages() is None and m.stages_before(2) == 0
        with pytest.raises(ValueError, match="has no chain of stages"):
            m.forward_stages(x, masks, 1)
        return
    assert [m.stages_before(g) for g in range(len(m.layer_groups))] == before
    with torch.no_grad():
        whole = m(x, masks)
        with m.masked(masks):  # the chain is the architecture's forward pass, written out
            if arch == "lenet":
                explicit = m.head(m.fc2(m.fc1(m.conv2(m.conv1(x)).flatten(1))))
            else:
                h = x.flatten(1)
                for layer in m.hidden:
                    h = layer(h)
                explicit = m.head(h)
        assert torch.equal(whole, explicit)
        for k in range(len(m.stages()) + 1):
            assert torch.equal(m.forward_stages(m.forward_stages(x, masks, 0, k), masks, k), whole)


def test_prefix_rows_equal_whole_passes(etd_lenet):
    """Rewinding from the trained model's prefix gives the same rows, bit for bit, as whole passes
    (the same batches); retraining from it trains the same (to float rounding); a prefix that
    reaches into the group is refused, and one over its memory bound is not built."""
    from memray.probes.retraining import retrain_item
    from memray.probes.rewinding import Prefix

    subject, snaps = etd_lenet.subject, etd_lenet.snapshots
    m = subject.model
    final = {k: v.clone() for k, v in m.state_dict().items()}
    for g in range(len(m.layer_groups)):
        p = Prefix.of(subject, m.stages_before(g))
        assert (p is None) == (g == 0)
        for e in sorted(snaps):
            assert rewind_item(subject, final, snaps[e], g, e, p) == rewind_item(subject, final, snaps[e], g, e)
        if p is None:
            continue
        assert p.train.shape[0] == subject.data.n_train and p.test.shape[0] == len(subject.data.x_test)
        kw = {"max_epochs": 2, "patience": 3}
        a, b = (retrain_item(subject, g, snaps[0], 0, prefix=q, **kw) for q in (p, None))
        assert [(r["subset"], r["epochs_run"]) for r in a] == [(r["subset"], r["epochs_run"]) for r in b]
        for r, s in zip(a, b):
            assert r["accuracy"] == pytest.approx(s["accuracy"], abs=2 / subject.data.n_train)
        ma, _ = retrain_layer(subject, g, snaps[0], max_epochs=2, prefix=p)
        mb, _ = retrain_layer(subject, g, snaps[0], max_epochs=2)
        for k, v in ma.state_dict().items():
            assert torch.allclose(v, mb.state_dict()[k], rtol=1e-4, atol=1e-5), k
    assert all(torch.equal(v, final[k]) for k, v in m.state_dict().items())
    p = Prefix.of(subject, 3)
    with pytest.raises(ValueError, match="a prefix of 3 stages covers layer group 1"):
        rewind_item(subject, final, snaps[0], 1, 0, p)
    with pytest.raises(ValueError, match="a prefix of 4 stages covers layer group 2"):
        retrain_layer(subject, 2, snaps[0], prefix=Prefix.of(subject, 4))  # fc1's first stage is 3
    assert Prefix.of(subject, 3, max_bytes=1024) is None


def test_runner_keeps_one_prefix_for_rewinding_and_retraining(etd_lenet):
    """The runner builds a group's prefix from the trained model, keeps one at a time, drops it
    when other analyses run, and its rewinding rows equal whole passes'."""
    from memray.experiment import AnalysisRunner

    tr = etd_lenet
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    cfg = tr.cfg.replace(**{"analyses.run": ["rewind", "flip"], "analyses.flip_targets": 2,
                            "analyses.flip_budget": 2, "analyses.flip_reference": 4, "analyses.eval_samples": 8})
    r = AnalysisRunner(cfg, state, tr.snapshots, tr.data, "cpu")
    final = {k: v.clone() for k, v in r.subject.model.state_dict().items()}
    for g, start in ((1, 1), (4, 5), (1, 1)):
        _, rows = r.run(("rewind", g, 0))
        assert r._prefix is not None and r._prefix.start == start
        assert rows == rewind_item(r.subject, final, tr.snapshots[0], g, 0)
    assert r.prefix(0) is None
    r.prefix(2)
    r.run(("flip", "random", 0, 2))
    assert r._prefix is None
