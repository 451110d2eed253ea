"""Architectures, each a `SiteModel`: ordered `sites` (unit counts) and `layer_groups`.

Every model takes 2-D images [B, C, H, W]; all but ResNet-50 also take 1-D signals [B, C, L]
(conv layers switch to their 1-D versions). `width` is one number per arch:

| arch      | width means                                  | default | sites                        |
|-----------|----------------------------------------------|---------|------------------------------|
| mlp       | hidden neurons in each of 3 hidden layers    | 512     | 3 (after each hidden ReLU)   |
| lenet     | conv1 channels (conv2 2w, fc 8w and 4w)      | 16      | 4 (conv1, conv2, fc1, fc2)   |
| resnet9   | base channels c (the authors' ResNet-9:      | 16      | 6 (the authors' dropout      |
|           | c, 2c, 2c, 2c, 4c, 4c, 4c, 2c; theirs c=64)  |         | places, see ResNet9)         |
| resnet50  | bottleneck width per group (64 = standard)   | 64      | 17 (stem, each bottleneck)   |
| vit_small | embedding dim (6 blocks, 4 heads, MLP 4x)    | 64      | 6 (each block's MLP hidden)  |

ResNet-9 is the authors' (see `ResNet9`), with conv4 padded where its input map is smaller than
3. ResNet-50 is
torchvision's with a 3x3 stride-1 stem and no max-pool (the usual small-image adaptation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sites import Site, SiteModel


def _ops(one_d: bool):
    if one_d:
        return nn.Conv1d, nn.BatchNorm1d, MaxPool2, nn.AdaptiveMaxPool1d
    return nn.Conv2d, nn.BatchNorm2d, MaxPool2, nn.AdaptiveMaxPool2d


def _pool2(x: torch.Tensor):
    """((the four strided views of each 2x2 window), top row max, bottom row max, window max)."""
    H, W = x.shape[-2:]
    if H < 2 or W < 2:
        raise ValueError(f"max-pooling by 2 needs at least 2 rows and 2 columns: got {tuple(x.shape)}")
    e = x[..., :H - H % 2, :W - W % 2]
    views = e[..., 0::2, 0::2], e[..., 0::2, 1::2], e[..., 1::2, 0::2], e[..., 1::2, 1::2]
    top, bottom = torch.maximum(views[0], views[1]), torch.maximum(views[2], views[3])
    return views, top, bottom, torch.maximum(top, bottom)


class _MaxPool2(torch.autograd.Function):
    """`F.max_pool2d(x, 2)` on [B, C, H, W]: the same values, and the library's own backward on
    the indices its kernel would pick (the first maximum of each window in scan order), so the
    same gradient. The forward is maxima of strided views (`_pool2`): on a CPU the library's
    kernel takes 20.8-23.5 ms for LeNet 40's first map (batch 128, one thread), these views
    2.4-3.3 ms without the indices; forward and backward take 21.4-21.6 ms against the library's 29.2-29.5.
    (Windows holding NaN may pick another index than the library; their loss is NaN, and
    training stops there: `Diverged`.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        (a, b, c, d), top, bottom, out = _pool2(x)
        h, w = out.shape[-2:]
        W = x.shape[-1]
        first = torch.arange(h, device=x.device)[:, None] * (2 * W) + torch.arange(w, device=x.device) * 2
        up = top >= bottom  # the top row holds the first maximum
        col = torch.where(up, b > a, d > c)  # its second column is strictly greater
        ctx.save_for_backward(x, first + torch.where(up, 0, W) + col)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


class MaxPool2(nn.Module):
    """`nn.MaxPool2d(2)` through `_MaxPool2` (the same values and gradients; on a CPU several
    times faster without autograd, about 1.4 times with it); `nn.MaxPool1d(2)`'s own op on 1-D
    signals, and the library's op under `torch.func` transforms (the stacked scoring models'
    `vmap` of `grad`), which this Function does not implement."""

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        if kernel_size != 2:
            raise ValueError(f"kernel_size={kernel_size} is invalid: MaxPool2 pools windows of 2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return F.max_pool1d(x, 2)
        if torch._C._are_functorch_transforms_active():
            return F.max_pool2d(x, 2)
        if x.requires_grad and torch.is_grad_enabled():
            return _MaxPool2.apply(x)
        return _pool2(x)[-1]  # no gradient: no indices


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


# ----------------------------------------------------------------------------- MLP
class MLP(SiteModel):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 512, depth: int = 3):
        super().__init__()
        d = math.prod(in_shape)
        self.hidden = nn.ModuleList()
        for i in range(depth):
            self.hidden.append(nn.Sequential(nn.Linear(d if i == 0 else width, width),
                                             Site(width, relu=True)))
        self.head = nn.Linear(width, num_classes)
        self.layer_groups = [(f"fc{i + 1}", [f"hidden.{i}"]) for i in range(depth)] + [("head", ["head"])]
        self._register_sites()

    def stages(self):
        return [((), _flatten)] + [((f"hidden.{i}",), layer) for i, layer in enumerate(self.hidden)] + [
            (("head",), self.head)]


# ----------------------------------------------------------------------------- LeNet
class LeNet(SiteModel):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        one_d = len(in_shape) == 2
        Conv, _, Pool, _ = _ops(one_d)
        c_in = in_shape[0]
        self.conv1 = nn.Sequential(Conv(c_in, width, 3, padding=1), Site(width, relu=True), Pool(2))
        self.conv2 = nn.Sequential(Conv(width, 2 * width, 3, padding=1), Site(2 * width, relu=True), Pool(2))
        spatial = math.prod(s // 4 for s in in_shape[1:])
        self.fc1 = nn.Sequential(nn.Linear(2 * width * spatial, 8 * width), Site(8 * width, relu=True))
        self.fc2 = nn.Sequential(nn.Linear(8 * width, 4 * width), Site(4 * width, relu=True))
        self.head = nn.Linear(4 * width, num_classes)
        self.layer_groups = [(n, [n]) for n in ("conv1", "conv2", "fc1", "fc2", "head")]
        self._register_sites()

    def stages(self):
        return [(("conv1",), self.conv1), (("conv2",), self.conv2), ((), _flatten), (("fc1",), self.fc1),
                (("fc2",), self.fc2), (("head",), self.head)]


# ----------------------------------------------------------------------------- ResNet-9
class ConvBN(nn.Sequential):
    """conv (no bias) -> BN -> ReLU; with `site`, the ReLU is a Site's (a dropout / flip site)."""

    def __init__(self, c_in: int, c_out: int, one_d: bool, kernel: int = 3, stride: int = 1, padding: int = 1,
                 site: bool = False):
        Conv, Norm, _, _ = _ops(one_d)
        super().__init__(Conv(c_in, c_out, kernel, stride=stride, padding=padding, bias=False), Norm(c_out),
                         Site(c_out, relu=True) if site else nn.ReLU())


class ResNet9(SiteModel):
    """The authors' ResNet-9 (`models.py`, `ResNet9` and `ResNet9_dropout`), width c = 64 there:

        conv1 3x3 c -> conv2 5x5 stride 2, 2c -> res1 (2c, 2c) -> conv3 3x3 4c -> max-pool 2
        -> res2 (4c, 4c) -> conv4 3x3 unpadded 2c -> global max-pool -> linear (no bias) x 0.2

    channels (64, 128, 128, 128, 256, 256, 256, 128) x c / 64. Sites are where the authors put
    their dropout: after conv1, conv2, res1's output, conv3, res2's output and conv4.
    One departure: where the map before conv4 is smaller than 3 (8x8 digits: 2x2), conv4 is padded
    by 1 (unpadded, it would leave no position)."""

    GROUPS = ("conv1", "conv2", "res1a", "res1b", "conv3", "res2a", "res2b", "conv4")

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        one_d = len(in_shape) == 2
        c = width
        _, _, Pool, GlobalPool = _ops(one_d)
        self.conv1 = ConvBN(in_shape[0], c, one_d, site=True)
        self.conv2 = ConvBN(c, 2 * c, one_d, kernel=5, stride=2, padding=2, site=True)
        self.res1a = ConvBN(2 * c, 2 * c, one_d)
        self.res1b = ConvBN(2 * c, 2 * c, one_d)
        self.res1 = Site(2 * c)
        self.conv3 = ConvBN(2 * c, 4 * c, one_d, site=True)
        self.pool3 = Pool(2)
        self.res2a = ConvBN(4 * c, 4 * c, one_d)
        self.res2b = ConvBN(4 * c, 4 * c, one_d)
        self.res2 = Site(4 * c)
        before_conv4 = min(((s - 1) // 2 + 1) // 2 for s in in_shape[1:])  # conv2 stride 2, then the pool
        self.conv4 = ConvBN(4 * c, 2 * c, one_d, padding=0 if before_conv4 >= 3 else 1, site=True)
        self.pool = GlobalPool(1)
        self.head = nn.Linear(2 * c, num_classes, bias=False)
        self.layer_groups = [(n, [n]) for n in self.GROUPS] + [("head", ["head"])]
        self._register_sites()

    def body(self, x):
        x = self.conv2(self.conv1(x))
        x = self.res1(x + self.res1b(self.res1a(x)))
        x = self.pool3(self.conv3(x))
        x = self.res2(x + self.res2b(self.res2a(x)))
        x = self.conv4(x)
        return self.head(self.pool(x).flatten(1)) * 0.2  # the authors' logit scale (Mul(0.2))


# ----------------------------------------------------------------------------- ResNet-50
class ResNet50(SiteModel):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 64):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        net = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width_per_group=width)
        net.conv1 = nn.Conv2d(in_shape[0], 64, 3, 1, 1, bias=False)
        net.maxpool = Site(64)  # the stem's output (no max-pool on small images)
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            for i, block in enumerate(list(stage)):
                stage[i] = nn.Sequential(block, Site(block.conv3.out_channels))
        self.net = net
        self.layer_groups = [("stem", ["net.conv1", "net.bn1"])] + [
            (f"layer{i}", [f"net.layer{i}"]) for i in range(1, 5)] + [("head", ["net.fc"])]
        self._register_sites()

    def body(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.site = Site(4 * dim, unit_dim=-1)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.site(F.gelu(self.fc1(self.ln2(x)))))  # (B, T, D)


class ViTSmall(SiteModel):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 64, depth: int = 6):
        super().__init__()
        one_d = len(in_shape) == 2
        patch = _patch_size(in_shape)
        Conv = nn.Conv1d if one_d else nn.Conv2d
        tokens = math.prod(s // patch for s in in_shape[1:])
        heads = 4 if width % 4 == 0 else 1
        self.patch = Conv(in_shape[0], width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.layer_groups = ([("embed", ["patch", "pos", "cls"])]
                             + [(f"block{i}", [f"blocks.{i}"]) for i in range(depth)]
                             + [("head", ["norm", "head"])])
        self._register_sites()

    def body(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, T, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x[:, 0]))


def _patch_size(in_shape: tuple[int, ...]) -> int:
    side = in_shape[1]
    if len(in_shape) == 2:  # 1-D signal: ~10 tokens
        return max(1, side // 10)
    return 2 if side <= 8 else 4


# ----------------------------------------------------------------------------- registry
ARCH_CLASSES = {"mlp": MLP, "lenet": LeNet, "resnet9": ResNet9, "resnet50": ResNet50, "vit_small": ViTSmall}


def build_model(arch: str, width: int, in_shape: tuple[int, ...], num_classes: int) -> SiteModel:
    model = ARCH_CLASSES[arch](tuple(in_shape), num_classes, width=width)
    _check_groups(model)
    return model


def _check_groups(model: SiteModel) -> None:
    """Every trainable parameter belongs to exactly one layer group (our own invariant)."""
    for name, p in model.named_parameters():
        owners = [g for gi, (g, _) in enumerate(model.layer_groups) if model.in_group(gi, name)]
        assert len(owners) == 1, f"{name} is in groups {owners}"
