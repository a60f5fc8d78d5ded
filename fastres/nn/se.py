"""Squeeze-excitation with the gate applied in one fused pass (optionally with the block's
residual add and activation). Keys of timm's SEModule: fc1, [bn], fc2."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor

from fastres import functional as F
from fastres.convert import act_name, adopt, qualname, rule
from fastres.nn.norm_act import check_input
from fastres.ops.reference import apply_act


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(act(bn(fc1(mean_hw(x)))))); `gate_logits` gives the (N, C) logits so a block
    can fuse the gate with its residual add and activation (`F.se_gate_act`)."""
    backend: Optional[str] = None

    def __init__(self, channels: int, rd_channels: int, *, act: str = "relu", norm: bool = False,
                 bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias)
        self.bn = nn.BatchNorm2d(rd_channels) if norm else nn.Identity()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias)
        self.act, self.backend = act, backend

    def gate_logits(self, x: Tensor, means: Optional[Tensor] = None) -> Tensor:
        """The (N, C) gate logits; `means`: x's (N, C) channel means, if known (the conv that made
        x gives them, `F.conv2d(with_means=True)`). The 1x1 convs on the pooled (N, C, 1, 1) tensor
        run as matrix products (a convolution primitive per call costs milliseconds on CPU there)."""
        means = x.mean((2, 3)) if means is None else means.to(x.dtype)
        s = TF.linear(means, self.fc1.weight.flatten(1), self.fc1.bias)
        if not isinstance(self.bn, nn.Identity):
            s = self.bn(s[:, :, None, None]).flatten(1)
        return TF.linear(apply_act(s, self.act), self.fc2.weight.flatten(1), self.fc2.bias)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, act: str = "identity") -> Tensor:
        check_input(self, x, self.fc1.in_channels)
        return F.se_gate_act(x, self.gate_logits(x), residual=residual, act=act, backend=self.backend)


@rule("timm.layers.squeeze_excite.SEModule")
def from_timm_se(m: nn.Module):
    """timm's SEModule (sigmoid gate, mean pooling) as a SqueezeExcite; a reason string if not."""
    if getattr(m, "add_maxpool", False):
        return "SE with max pooling is not fused"
    if type(m.gate).__name__ != "Sigmoid" or act_name(m.act) is None:
        return "SE gate is not sigmoid or its activation is not relu/relu6/silu"
    if not isinstance(m.bn, (nn.Identity, nn.BatchNorm2d)):
        return "SE norm layer is not BatchNorm2d"
    return adopt(SqueezeExcite, m, fc1=m.fc1, bn=m.bn, fc2=m.fc2, act=act_name(m.act))


def block_se(se: Optional[nn.Module]):
    """A timm block's `se` attribute for a fastres block: None, the converted SqueezeExcite, or a
    string saying why the block cannot be converted."""
    if se is None:
        return None
    if qualname(se) != "timm.layers.squeeze_excite.SEModule":
        return f"attention layer {type(se).__name__} is not fused"
    return from_timm_se(se)
