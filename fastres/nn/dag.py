"""DAGBlock: a block of 3x3 conv-BN-ReLU layers whose connectivity is a (learnable) DAG.

Nodes 0 .. L+1: node 0 is the block input x, nodes 1 .. L the layers, node L+1 the output. An
upper-triangular adjacency A ((L+2) x (L+2), A[i, j] the weight of the edge i -> j, i < j) says
what each node consumes:

    h_0 = x,   h_j = relu(bn_j(conv_j(a_j))),   a_j = sum_{i<j} A[i, j] h_i,   out = a_{L+1}

connectivity="residual": every A[i, j] = 1, so a_j = h_0 + ... + h_{j-1} is exactly the unrolled
    residual stream x_{j-1} (x_j = x_{j-1} + f_j(x_{j-1})) and the block is a ResNet of L layers;
"dense": A[i, j] = 1/j, the uniform average of all j earlier outputs (DenseNet's connectivity
    with a sum in place of the concatenation);
"learned": an nn.Parameter initialised to the residual pattern, so training starts from a plain
    ResNet and reweights the edges from there. The fixed patterns are buffers.

The outputs h_0 .. h_L live in one buffer allocated per call ((L+1, N, C, H, W), each slot in the
input's memory format); a_j is formed by `fastres.ops.mix` as the conv loads its input (triton)
or in one pass (native), never by concatenation. In training BN uses the batch statistics of
the conv output (one fused BN-ReLU pass); in eval BN is folded into the conv, ReLU fused.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fastres import functional as F
from fastres.nn.norm_act import bn_args, check_input
from fastres.ops import reference as ref
from fastres.ops.conv import is_channels_last
from fastres.ops.mix import weighted_sum

CONNECTIVITY = ("residual", "dense", "learned")


def adjacency(connectivity: str, layers: int) -> Tensor:
    """The (L+2) x (L+2) strictly upper-triangular adjacency of a fixed pattern (learned: its
    initial value, the residual pattern)."""
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"DAGBlock: connectivity must be one of {CONNECTIVITY}, got {connectivity!r}")
    n = layers + 2
    a = torch.ones(n, n).triu(1)
    if connectivity == "dense":
        a = a / torch.arange(n).clamp_min(1).view(1, n)   # column j: j inputs of weight 1/j
    return a


class DAGBlock(nn.Module):
    """`layers` 3x3 conv-BN-ReLU layers of `channels` channels (stride 1); layer j consumes the
    weighted sum of the block input and every earlier layer's output, the block returns the
    weighted sum of all of them (see the module docstring). `adjacency` holds A."""
    backend: Optional[str] = None

    def __init__(self, channels: int, layers: int, connectivity: str = "learned", *,
                 norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if layers < 1 or channels < 1:
            raise ValueError(f"DAGBlock: channels and layers must be at least 1, got {channels}, {layers}")
        dd = dict(device=device, dtype=dtype)
        self.channels, self.layers, self.connectivity = channels, layers, connectivity
        a = adjacency(connectivity, layers).to(**dd)
        if connectivity == "learned":
            self.adjacency = nn.Parameter(a)
        else:
            self.register_buffer("adjacency", a)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False, **dd)
                                   for _ in range(layers))
        self.bns = nn.ModuleList(norm_layer(channels, **dd) for _ in range(layers))
        self.backend = backend

    def _layer(self, states: Tensor, mix: Tensor, conv: nn.Conv2d, bn: nn.Module) -> Tensor:
        args, group = bn_args(bn)
        running_mean, running_var, bn_w, bn_b, training, momentum, eps = args
        if training:
            y = F.mix_conv2d(states, mix, conv.weight, padding=1, backend=self.backend)
            return F.bn_act(y, *args, act="relu", process_group=group, backend=self.backend)
        mean, invstd = F.bn_stats(states[0], running_mean, running_var, False, momentum, eps)
        w, b = F.fold_bn(conv.weight, None, bn_w, bn_b, mean, invstd)
        return F.mix_conv2d(states, mix, w, b, padding=1, act="relu", backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.channels)
        n, c, h, w = x.shape
        layers = self.layers
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        buf = torch.empty(((layers + 1) * n, c, h, w), dtype=x.dtype, device=x.device,
                          memory_format=fmt).view(layers + 1, n, c, h, w)
        a = self.adjacency
        buf[0].copy_(x)
        for j, (conv, bn) in enumerate(zip(self.convs, self.bns), start=1):
            buf[j].copy_(self._layer(buf[:j], a[:j, j], conv, bn))
        out_mix = a[:layers + 1, layers + 1]
        # autograd goes through the reference's running sum; without it one pass over the buffer
        return ref.mix_sum(buf, out_mix) if torch.is_grad_enabled() else weighted_sum(buf, out_mix)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layers={self.layers}, connectivity={self.connectivity!r}"
