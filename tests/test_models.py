import pytest
import torch

from memray.config import ARCHS, DATASETS, ConfigError, ExperimentConfig
from memray.data import Data
from memray.models import build_model
from memray.sites import BinaryMasks
from memray.train import Trainer

WORKING = [(d, a) for d in ("digits", "mnist1d") for a in ARCHS if not (d == "mnist1d" and a == "resnet50")]
SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
SMALL_WIDTH = {"mlp": 32, "lenet": 8, "resnet9": 8, "resnet50": 4, "vit_small": 16}


def _fake_data(shape, n=64, k=10):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n,), generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:6] = True
    given = y.clone()
    given[mask] = (y[mask] + 1) % k
    return Data("fake", torch.randn(n, *shape, generator=g), given, y, mask,
                torch.randn(16, *shape, generator=g), torch.randint(0, k, (16,), generator=g), k)


@pytest.mark.parametrize("dataset,arch", WORKING)
def test_every_working_pair_trains_one_epoch(dataset, arch):
    cfg = ExperimentConfig().replace(**{"data.dataset": dataset, "model.arch": arch,
                                        "model.width": SMALL_WIDTH[arch], "optim.epochs": 1,
                                        "dropout.kind": "example_tied", "analyses.run": ["gradients"]})
    tr = Trainer(cfg, _fake_data(SHAPES[dataset]), "cpu")
    m = tr.model
    out = m(tr.data.x_train[:5])
    assert out.shape == (5, 10)
    # sites: ordered unit counts; masks of shape [B, units] are accepted at each
    assert len(m.sites) >= 3 and [s.index for s in m.sites] == list(range(len(m.sites)))
    masks = [torch.ones(5, u) for u in m.site_units]
    assert torch.allclose(m(tr.data.x_train[:5], masks), out, atol=1e-5) or arch == "resnet50"
    # groups cover every trainable parameter exactly once
    names = [n for n, _ in m.named_parameters()]
    owned = sorted(n for g in range(len(m.layer_groups)) for n, _ in m.group_parameters(g))
    assert owned == sorted(names)
    tr.fit()
    assert len(tr.grad_rows) == len(m.layer_groups)
    subsets = {(r["mode"], r["subset"]) for r in tr.history}
    assert ("drop", "test") in subsets and ("own", "train_noisy") in subsets and ("own", "test") not in subsets


def test_group_counts_follow_experiments_md():
    counts = {"resnet9": 9, "resnet50": 6, "mlp": 4, "lenet": 5, "vit_small": 8}
    for arch, n in counts.items():
        m = build_model(arch, SMALL_WIDTH[arch], (1, 8, 8), 10)
        assert len(m.layer_groups) == n, arch
    r9 = build_model("resnet9", 8, (1, 8, 8), 10)
    assert r9.group_names() == ["conv1", "conv2", "res1a", "res1b", "conv3", "res2a", "res2b", "conv4", "head"]
    assert r9.site_units == [8, 16, 16, 32, 32, 16]  # conv1, conv2, res1, conv3, res2, conv4
    # norm buffers travel with their group
    assert "conv1.1.running_mean" in r9.group_state_keys(0)


@pytest.mark.parametrize("dataset,arch", [(d, a) for d in DATASETS for a in ARCHS
                                          if d == "mnist1d" and a == "resnet50"])
def test_other_pairs_are_rejected_by_validation(dataset, arch):
    with pytest.raises(ConfigError, match="1-D signal"):
        ExperimentConfig().replace(**{"data.dataset": dataset, "model.arch": arch})


@pytest.mark.parametrize("arch", ["mlp", "lenet", "resnet9", "vit_small"])
def test_zeroing_a_unit_zeroes_that_activation_for_that_example_only(arch):
    m = build_model(arch, SMALL_WIDTH[arch], (1, 8, 8), 10).eval()
    seen = {}
    site = m.sites[1]
    site.register_forward_hook(lambda mod, i, o: seen.__setitem__("out", o.detach().clone()))
    x = torch.randn(3, 1, 8, 8)
    m(x)
    plain = seen["out"].movedim(site.unit_dim, 1).reshape(3, site.units, -1)  # (B, C, positions)
    u = int(plain[0].abs().sum(1).argmax())  # a unit that is active for example 0
    masks = [None] * len(m.sites)
    masks[1] = torch.ones(3, site.units)
    masks[1][0, u] = 0
    m(x, masks)
    out = seen["out"].movedim(site.unit_dim, 1).reshape(3, site.units, -1)
    assert plain[0, u].abs().sum() > 0 and torch.count_nonzero(out[0, u]) == 0
    keep = torch.ones(site.units, dtype=torch.bool)
    keep[u] = False
    assert torch.equal(out[0, keep], plain[0, keep]) and torch.equal(out[1:], plain[1:])
    with pytest.raises(ValueError, match="masks for"):
        m(x, [None])


def test_cifar_shaped_resnet9_and_vit():
    for arch in ("resnet9", "vit_small", "resnet50"):
        m = build_model(arch, SMALL_WIDTH[arch], (3, 32, 32), 100)
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("arch,in_shape", [("mlp", (1, 8, 8)), ("lenet", (1, 8, 8)), ("resnet9", (1, 8, 8)),
                                           ("resnet9", (1, 40)), ("vit_small", (1, 8, 8))])
def test_fused_relu_site_gives_the_same_outputs_and_gradients(arch, in_shape):
    """0/1 masks passed as BinaryMasks take the fused ReLU + mask op at sites that apply their own
    ReLU; outputs and every parameter and input gradient equal the plain relu(x) * mask path."""
    torch.manual_seed(0)
    m = build_model(arch, SMALL_WIDTH[arch], in_shape, 10).double()
    x = torch.randn(6, *in_shape, dtype=torch.float64)
    masks = [(torch.rand(6, u) < 0.5).double() for u in m.site_units]
    results, fused = [], []
    for ms in (list(masks), BinaryMasks(masks)):
        xi = x.clone().requires_grad_(True)
        out = m(xi, ms)
        fused.append(_count_nodes(out.grad_fn, "_ReLUMaskBackward"))
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 10, dtype=torch.float64)).sum(),
                                    [xi, *m.parameters()])
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    relu_sites = sum(s.relu for s in m.sites)  # mlp, lenet: every site; resnet9: all but its 2 residual outputs
    assert relu_sites == {"vit_small": 0, "resnet9": len(m.sites) - 2}.get(arch, len(m.sites))
    assert fused == [0, relu_sites]


def _count_nodes(fn, name: str) -> int:
    seen, stack, n = set(), [fn], 0
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == name
        stack.extend(g for g, _ in f.next_functions)
    return n


def test_resnet9_is_the_authors_at_width_64():
    """At width 64 on 3x32x32 every stage has the shape of the authors' ResNet-9 (models.py):
    channels (64, 128, 128, 128, 256, 256, 256, 128), conv2 5x5 stride 2, max-pool after conv3,
    conv4 unpadded, global max-pool, a bias-free head; and the same parameter count."""
    m = build_model("resnet9", 64, (3, 32, 32), 10)
    shapes = {}
    for name in ("conv1", "conv2", "res1", "conv3", "pool3", "res2", "conv4", "pool"):
        getattr(m, name).register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert shapes == {"conv1": (2, 64, 32, 32), "conv2": (2, 128, 16, 16), "res1": (2, 128, 16, 16),
                      "conv3": (2, 256, 16, 16), "pool3": (2, 256, 8, 8), "res2": (2, 256, 8, 8),
                      "conv4": (2, 128, 6, 6), "pool": (2, 128, 1, 1)}
    # conv weights (no bias) + BN weight and bias per conv, and the bias-free head
    convs = [(3, 64, 3), (64, 128, 5), (128, 128, 3), (128, 128, 3), (128, 256, 3), (256, 256, 3),
             (256, 256, 3), (256, 128, 3)]
    expected = sum(i * o * k * k + 2 * o for i, o, k in convs) + 128 * 10
    assert sum(p.numel() for p in m.parameters()) == expected
    assert m.head.bias is None
    # 8x8 digits: conv4 is padded by 1 (2x2 before it), the one departure; 1-D signals work too
    assert build_model("resnet9", 8, (1, 8, 8), 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert build_model("resnet9", 8, (1, 40), 10)(torch.randn(2, 1, 40)).shape == (2, 10)


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 2, 7, 9), (2, 3, 10), (2, 3, 11)])
def test_maxpool2_has_the_library_values_and_gradients(shape):
    """Values and gradients equal `F.max_pool2d` / `F.max_pool1d` bit for bit, ties included (the
    first maximum of a window in scan order takes the gradient), odd sizes too; without autograd
    the same values."""
    import torch.nn.functional as F

    from memray.models import MaxPool2

    torch.manual_seed(0)
    lib = F.max_pool2d if len(shape) == 4 else F.max_pool1d
    for x in (torch.randn(shape), torch.randint(0, 3, shape).float(), torch.zeros(shape)):  # ties: small integers, all equal
        x = x.requires_grad_(True)
        ref, got = lib(x, 2), MaxPool2(2)(x)
        g = torch.randn_like(ref)
        assert torch.equal(ref, got)
        assert torch.equal(torch.autograd.grad(ref, x, g)[0], torch.autograd.grad(got, x, g)[0])
        with torch.no_grad():
            assert torch.equal(MaxPool2(2)(x), ref)
    with pytest.raises(ValueError, match="at least 2 rows and 2 columns: got"):
        MaxPool2(2)(torch.zeros(1, 1, 1, 4))


def test_maxpool2_in_float64_and_under_torch_func():
    """float64 values and gradients as the library's; under `vmap(grad(...))` (the stacked scoring
    models) the library's op, so the same per-model gradients."""
    import torch.nn.functional as F
    from torch.func import grad, vmap

    from memray.models import MaxPool2

    torch.manual_seed(0)
    x = torch.randint(0, 3, (2, 3, 6, 5), dtype=torch.float64).requires_grad_(True)
    ref, got = F.max_pool2d(x, 2), MaxPool2(2)(x)
    assert got.dtype == torch.float64 and torch.equal(ref, got)
    assert torch.equal(torch.autograd.grad(ref.sum(), x)[0], torch.autograd.grad(got.sum(), x)[0])
    xs = torch.randint(0, 3, (3, 2, 2, 6, 6)).float()
    ours = vmap(grad(lambda t: (MaxPool2(2)(t) * torch.arange(18.).view(2, 1, 3, 3)).sum()))(xs)
    lib = vmap(grad(lambda t: (F.max_pool2d(t, 2) * torch.arange(18.).view(2, 1, 3, 3)).sum()))(xs)
    assert torch.equal(ours, lib)
