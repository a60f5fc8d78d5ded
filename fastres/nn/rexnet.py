"""ReXNet LinearBottleneck, drop-in for timm's, same state_dict keys.

[1x1 conv-BN-SiLU] -> 3x3 depthwise conv-BN -> [SE] -> ReLU6 -> 1x1 conv-BN (+ shortcut on the
first `in_channels` channels). Each conv runs with its BN (and activation) fused; the SE's channel
means come with the depthwise conv's output (in eval from its epilogue); the SE gate is applied
together with the ReLU6; the partial-channel residual add is fused into the last conv.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from fastres import functional as F
from fastres.convert import act_name, adopt, rule
from fastres.nn.norm_act import check_input, conv_bn, is_bn
from fastres.nn.se import SqueezeExcite, block_se


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None, round_limit: float = 0.9) -> int:
    """Channel rounding as timm's `make_divisible` (nearest multiple, never below 90% of v)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


class ConvNormAct(nn.Module):
    """conv -> BN -> act as one fused op; keys `conv.*`, `bn.*` as timm's ConvNormAct."""
    backend: Optional[str] = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, act: str = "identity",
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, device=device, dtype=dtype)
        self.act, self.backend = act, backend

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        check_input(self, x, self.conv.in_channels)
        return conv_bn(x, self.conv, self.bn, act=self.act, residual=residual, backend=self.backend)


class LinearBottleneck(nn.Module):
    """ReXNet's inverted bottleneck; the shortcut (stride 1, equal dilations, in <= out) is added
    to the first `in_channels` output channels only."""
    backend: Optional[str] = None

    def __init__(self, in_chs: int, out_chs: int, stride: int, *, dilation: tuple[int, int] = (1, 1),
                 exp_ratio: float = 1.0, se_ratio: float = 0.0, ch_div: int = 1, act: str = "silu",
                 dw_act: str = "relu6", backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.use_shortcut = stride == 1 and dilation[0] == dilation[1] and in_chs <= out_chs
        self.in_channels, self.out_channels = in_chs, out_chs
        if exp_ratio != 1.0:
            dw_chs = make_divisible(round(in_chs * exp_ratio), divisor=ch_div)
            self.conv_exp = ConvNormAct(in_chs, dw_chs, act=act, **dd)
        else:
            dw_chs = in_chs
            self.conv_exp = None
        self.conv_dw = ConvNormAct(dw_chs, dw_chs, 3, stride=stride, dilation=dilation[0], groups=dw_chs, **dd)
        if se_ratio > 0:
            rd = make_divisible(int(dw_chs * se_ratio), ch_div)
            self.se = SqueezeExcite(dw_chs, rd, act="relu", norm=True).to(**dd)
        else:
            self.se = None
        self.dw_act = dw_act
        self.conv_pwl = ConvNormAct(dw_chs, out_chs, 1, **dd)
        self.backend = backend

    def feat_channels(self, exp: bool = False) -> int:
        return self.conv_dw.out_channels if exp else self.out_channels

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.in_channels)
        b = self.backend
        out = x
        if self.conv_exp is not None:
            out = conv_bn(out, self.conv_exp.conv, self.conv_exp.bn, act=self.conv_exp.act, backend=b)
        if self.se is None:
            out = conv_bn(out, self.conv_dw.conv, self.conv_dw.bn, act=self.dw_act, backend=b)
        else:
            # the SE's channel means come with the conv's output (in eval from its epilogue)
            out, means = conv_bn(out, self.conv_dw.conv, self.conv_dw.bn, act="identity", with_means=True, backend=b)
            out = F.se_gate_act(out, self.se.gate_logits(out, means), act=self.dw_act, backend=b)
        # the shortcut goes onto the first in_channels output channels, in the conv's epilogue
        return conv_bn(out, self.conv_pwl.conv, self.conv_pwl.bn, act="identity",
                       residual=x if self.use_shortcut else None, backend=b)


def _timm_conv_norm_act(m: nn.Module, act: Optional[str]):
    """timm ConvNormAct as a fastres ConvNormAct sharing its conv and BN; a reason if not fusable.
    `act` is the activation the block requires there (None: any that fastres fuses)."""
    bn = m.bn
    if type(m.conv) is not nn.Conv2d or not is_bn(bn):
        return "conv/norm layers are not nn.Conv2d/BatchNorm2d"
    if any(not isinstance(e, (nn.Identity, type(None))) for e in (getattr(m, "aa", None), getattr(bn, "drop", None))):
        return "anti-aliasing or dropout inside ConvNormAct is not fused"
    got = act_name(getattr(bn, "act", None))
    if got is None or (act is not None and got != act):
        return f"activation {type(bn.act).__name__} is not fused here"
    return adopt(ConvNormAct, m, conv=m.conv, bn=bn, act=got)


@rule("timm.layers.conv_bn_act.ConvNormAct")
def _from_timm_conv_norm_act(m: nn.Module):
    """A standalone timm ConvNormAct (ReXNet's stem and head): conv, BN and activation in one op."""
    return _timm_conv_norm_act(m, None)


@rule("timm.models.rexnet.LinearBottleneck")
def _from_timm(m: nn.Module):
    if m.drop_path is not None and not isinstance(m.drop_path, nn.Identity):
        return "stochastic depth (drop_path) is not fused"
    dw_act = act_name(m.act_dw)
    if dw_act is None:
        return f"activation {type(m.act_dw).__name__} is not fused"
    parts = {"conv_exp": None if m.conv_exp is None else _timm_conv_norm_act(m.conv_exp, None),
             "conv_dw": _timm_conv_norm_act(m.conv_dw, "identity"),
             "conv_pwl": _timm_conv_norm_act(m.conv_pwl, "identity")}
    for name, p in parts.items():
        if isinstance(p, str):
            return f"{name}: {p}"
    se = block_se(m.se)
    if isinstance(se, str):
        return se
    return adopt(LinearBottleneck, m, use_shortcut=m.use_shortcut, in_channels=m.in_channels,
                 out_channels=m.out_channels, conv_exp=parts["conv_exp"], conv_dw=parts["conv_dw"],
                 se=se, dw_act=dw_act, conv_pwl=parts["conv_pwl"])
