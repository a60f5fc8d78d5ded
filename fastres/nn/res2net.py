"""Res2Net / Res2NeXt Bottle2neck, drop-in for timm's (the official block), same state_dict keys.

Eval: conv1-BN-ReLU is one fused op; each 3x3 split conv takes the hierarchical add x_i + y_{i-1}
in its input load (the `addend` prologue) with BN-ReLU in its epilogue; conv3-BN runs with the
residual add and ReLU (and the SE gate, when present) fused. Where the convs run on oneDNN
without autograd, the chain builds the concatenation in conv1's output instead: see
`Bottle2neck._chain_in_place`. Training stores only conv outputs: see `Bottle2neck._forward_train`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fastres.convert import adopt, rule
from fastres import functional as F
from fastres.nn.inference import runs_onednn
from fastres.nn.norm_act import bn_act_pool, bn_prologue, check_input, conv, conv_bn, is_bn, pool_kind, shortcut
from fastres.nn.resnet import bn_residual_relu, residual_branch
from fastres.nn.se import SqueezeExcite, block_se


class Bottle2neck(nn.Module):
    """Res2Net bottleneck: 1x1 conv to `width * scale` channels split into `scale` groups; group i
    gets a 3x3 conv (grouped by `cardinality`) of x_i + y_{i-1} (of x_i alone in a stage's first
    block, which also average-pools the last group), the last group passes through; concat, 1x1
    conv, [SE], residual add, ReLU."""
    expansion = 4
    backend: Optional[str] = None
    reuses_input = True  # see fastres.nn.inference.run_blocks

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, *, cardinality: int = 1,
                 base_width: int = 26, scale: int = 4, dilation: int = 1,
                 first_dilation: Optional[int] = None, se_channels: Optional[int] = None,
                 norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        """`se_channels`: reduced channels of an SE module on the output (None: no SE)."""
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.scale = scale
        self.is_first = stride > 1 or downsample is not None
        self.width = width = int(math.floor(planes * (base_width / 64.0))) * cardinality
        outplanes = planes * self.expansion
        d = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, width * scale, 1, bias=False, **dd)
        self.bn1 = norm_layer(width * scale, **dd)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride, padding=d, dilation=d, groups=cardinality, bias=False, **dd)
            for _ in range(max(1, scale - 1)))
        self.bns = nn.ModuleList(norm_layer(width, **dd) for _ in range(max(1, scale - 1)))
        self.pool = nn.AvgPool2d(3, stride, padding=1) if self.is_first else None
        self.conv3 = nn.Conv2d(width * scale, outplanes, 1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.se = SqueezeExcite(outplanes, se_channels) if se_channels else None
        if self.se is not None:
            self.se.to(**dd)
        self.downsample = downsample
        self.backend = backend

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        identity = shortcut(self.downsample, x, self.backend)
        if self.bn1.training:
            return self._forward_train(x, identity)
        out = conv_bn(x, self.conv1, self.bn1, act="relu", backend=self.backend)
        spx = torch.split(out, self.width, 1)  # views, no copies
        if self._in_place(x):
            return residual_branch(self, self._chain_in_place(out, spx), [(self.conv3, self.bn3)], identity)
        spo: list[Tensor] = []
        for i, (conv_i, bn_i) in enumerate(zip(self.convs, self.bns)):
            addend = None if i == 0 or self.is_first else spo[-1]
            spo.append(conv_bn(spx[i], conv_i, bn_i, act="relu", addend=addend, backend=self.backend))
        if self.scale > 1:
            spo.append(spx[-1] if self.pool is None else self.pool(spx[-1]))
        out = torch.cat(spo, 1) if len(spo) > 1 else spo[0]
        return residual_branch(self, out, [(self.conv3, self.bn3)], identity)

    def _in_place(self, x: Tensor) -> bool:
        """Whether the eval chain may run in place: a chain of adds (not a stage's first block),
        nothing recorded by autograd or traced, and convs on oneDNN, which take the sum
        x_i + y_{i-1} materialised anyway (the triton conv forms it as it loads its input)."""
        return not self.is_first and len(self.convs) > 1 and not torch.compiler.is_compiling() \
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))) \
            and runs_onednn(x, self.convs[0], self.backend)

    def _chain_in_place(self, out: Tensor, spx: tuple[Tensor, ...]) -> Tensor:
        """The concatenation [y_1, ..., y_{s-1}, x_s] built in conv1's output `out`, without a cat:
        x_i is read by split conv i alone, so y_i may take its slot afterwards. Each split add
        forms the next conv's input x_i + y_{i-1} and writes y_{i-1} into slot i-1 in the same pass;
        the last split passes through where it already is."""
        b = self.backend
        y = conv_bn(spx[0], self.convs[0], self.bns[0], act="relu", backend=b)
        for i in range(1, len(self.convs)):
            a = F.split_add(spx[i], y, spx[i - 1], backend=b)
            y = conv_bn(a, self.convs[i], self.bns[i], act="relu", backend=b)
        spx[len(self.convs) - 1].copy_(y)
        return out

    def _forward_train(self, x: Tensor, identity: Tensor) -> Tensor:
        """Training: only conv outputs are stored. Every BN-ReLU is applied as the convs that
        read it load their input (split i reads relu(bn1(conv1(x)))_i in its prologue, plus
        y_{i-1} as the addend); conv3 runs as one conv over the concatenation of the splits'
        relu(bn_i(c_i)), which `cat_conv2d_stats` forms for the forward and again in the backward,
        never keeping it. Only the y_{i-1} addends (and the first block's pooled split) are
        materialised. Each conv hands its output's batch statistics to the BN after it."""
        b, w = self.backend, self.width
        c1, stats = conv(x, self.conv1, with_stats=True, backend=b)
        p1 = bn_prologue(c1, self.bn1, stats=stats, backend=b)
        parts: list[tuple[Tensor, Optional[dict]]] = []  # conv3's input per split: (tensor, BN-ReLU or None)
        # views of c1 and its BN's vectors per split; the gradients of each are put together by one cat
        spx = torch.split(c1, w, 1)
        pre = F.split_channels(p1, w, self.scale)
        y = None
        for i, (conv_i, bn_i) in enumerate(zip(self.convs, self.bns)):
            c, stats = conv(spx[i], conv_i, pre=pre[i], addend=y, with_stats=True, backend=b)
            p = bn_prologue(c, bn_i, stats=stats, backend=b)
            parts.append((c, p))
            if not self.is_first and i + 1 < len(self.convs):
                y = F.bn_act_from(c, p, backend=b)
        if self.scale > 1:
            if self.pool is None:
                parts.append((spx[-1], pre[-1]))
            elif pool_kind(self.pool) is not None:
                parts.append((bn_act_pool(spx[-1], pre[-1], self.pool, backend=b), None))
            else:
                parts.append((self.pool(F.bn_act_from(spx[-1], pre[-1], backend=b)), None))
        c3 = self.conv3
        out, stats = F.cat_conv2d_stats([t for t, _ in parts], [p for _, p in parts], c3.weight, c3.bias,
                                        c3.stride, c3.padding, c3.dilation, c3.groups, backend=b)
        return bn_residual_relu(self, out, self.bn3, identity, stats)


@rule("timm.models.res2net.Bottle2neck")
def _from_timm(m: nn.Module):
    if type(m.relu) is not nn.ReLU:
        return "activation is not ReLU"
    if not isinstance(m.drop_block, nn.Identity):
        return "DropBlock is not fused"
    if m.drop_path is not None and not isinstance(m.drop_path, nn.Identity):
        return "stochastic depth (drop_path) is not fused"
    if not all(is_bn(bn) for bn in (m.bn1, m.bn3, *m.bns)):
        return "norm layers are not BatchNorm2d/SyncBatchNorm/FrozenBatchNorm2d"
    if not all(type(c) is nn.Conv2d for c in (m.conv1, m.conv3, *m.convs)):
        return "convolutions are not plain nn.Conv2d"
    se = block_se(m.se)
    if isinstance(se, str):
        return se
    return adopt(Bottle2neck, m, scale=m.scale, is_first=m.is_first, width=m.width, conv1=m.conv1,
                 bn1=m.bn1, convs=m.convs, bns=m.bns, pool=m.pool, conv3=m.conv3, bn3=m.bn3, se=se,
                 downsample=m.downsample)
