"""Architectures, each a `SiteModel`: ordered `sites` (unit counts) and `layer_groups`.

Every model takes 2-D images [B, C, H, W]; all but ResNet-50 also take 1-D signals [B, C, L]
(conv layers switch to their 1-D versions). `width` is one number per arch:

| arch      | width means                                  | default | sites                        |
|-----------|----------------------------------------------|---------|------------------------------|
| mlp       | hidden neurons in each of 3 hidden layers    | 512     | 3 (after each hidden ReLU)   |
| lenet     | conv1 channels (conv2 2w, fc 8w and 4w)      | 16      | 4 (conv1, conv2, fc1, fc2)   |
| resnet9   | base channels c (blocks c, 2c, 2c, 2c, 4c,   | 16      | 8 (after every conv-BN-ReLU) |
|           | 4c, 4c, 8c; the paper's ResNet-9 has c=64)   |         |                              |
| resnet50  | bottleneck width per group (64 = standard)   | 64      | 17 (stem, each bottleneck)   |
| vit_small | embedding dim (6 blocks, 4 heads, MLP 4x)    | 64      | 6 (each block's MLP hidden)  |

ResNet-9 on 8x8 `digits`: the paper's net pools four times (32 -> 2 before its final pool) and
collapses to 0x0 on 8x8 inputs. Here it pools after conv2, conv3 and conv4 only (8 -> 4 -> 2 -> 1)
and the head takes a global max pool, so every input size from 8 up keeps at least one position;
on 32x32 this gives a 4x4 map before the global pool, as in the common ResNet-9. ResNet-50 is
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
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveMaxPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d


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

    def body(self, x):
        x = x.flatten(1)  # (B, d)
        for layer in self.hidden:
            x = layer(x)  # (B, width)
        return self.head(x)


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

    def body(self, x):
        x = self.conv2(self.conv1(x))
        return self.head(self.fc2(self.fc1(x.flatten(1))))


# ----------------------------------------------------------------------------- ResNet-9
class ConvBlock(nn.Sequential):
    """conv3x3 -> BN -> ReLU + site (-> max-pool)."""

    def __init__(self, c_in: int, c_out: int, one_d: bool, pool: bool = False):
        Conv, Norm, Pool, _ = _ops(one_d)
        layers = [Conv(c_in, c_out, 3, padding=1, bias=False), Norm(c_out), Site(c_out, relu=True)]
        if pool:
            layers.append(Pool(2))
        super().__init__(*layers)


class ResNet9(SiteModel):
    GROUPS = ("conv1", "conv2", "res1a", "res1b", "conv3", "res2a", "res2b", "conv4")

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 16):
        super().__init__()
        one_d = len(in_shape) == 2
        c = width
        self.conv1 = ConvBlock(in_shape[0], c, one_d)
        self.conv2 = ConvBlock(c, 2 * c, one_d, pool=True)
        self.res1a = ConvBlock(2 * c, 2 * c, one_d)
        self.res1b = ConvBlock(2 * c, 2 * c, one_d)
        self.conv3 = ConvBlock(2 * c, 4 * c, one_d, pool=True)
        self.res2a = ConvBlock(4 * c, 4 * c, one_d)
        self.res2b = ConvBlock(4 * c, 4 * c, one_d)
        self.conv4 = ConvBlock(4 * c, 8 * c, one_d, pool=True)
        self.pool = _ops(one_d)[3](1)
        self.head = nn.Linear(8 * c, num_classes, bias=False)
        self.layer_groups = [(n, [n]) for n in self.GROUPS] + [("head", ["head"])]
        self._register_sites()

    def body(self, x):
        x = self.conv2(self.conv1(x))
        x = x + self.res1b(self.res1a(x))
        x = self.conv3(x)
        x = x + self.res2b(self.res2a(x))
        x = self.conv4(x)
        return self.head(self.pool(x).flatten(1)) * 0.125  # the ResNet-9 logit scale


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
