"""DenseNet-BC dense layer, dense block and transition, drop-in for torchvision's.

`DenseLayer` and `DenseBlock` subclass torchvision's `_DenseLayer` / `_DenseBlock` (same
constructor arguments, state_dict keys and `memory_efficient` checkpointing); `Transition` has
the keys of `_Transition` (norm, relu, conv, pool). Every BN-ReLU runs fused into the load of
the conv that follows it, so the activated tensor is never stored.

`DenseBlock` without autograd (no_grad, or neither input nor parameters need grad) writes each
layer's output into its channel slot of one preallocated (N, C0 + L*growth, H, W) buffer, in the
input's memory format, and each layer reads the prefix view of that buffer: no concatenation at
all. When autograd records, it concatenates the previous features once per layer, as torchvision
does (in-place writes into a buffer whose views the backward saved would be invalid).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torchvision.models import densenet as tv

from fastres.convert import adopt, as_subclass, qualname, rule
from fastres.nn import inference as _inference
from fastres.nn.norm_act import bn_act_pool, bn_conv, bn_prologue, check_input, conv, is_bn, pool_kind


class DenseLayer(tv._DenseLayer):
    """conv2(relu(norm2(conv1(relu(norm1(cat(features))))))), then dropout; takes one tensor or
    the list of previous features, as torchvision's layer does."""
    backend: Optional[str] = None

    def forward(self, input: Union[Tensor, list[Tensor]]) -> Tensor:  # noqa: A002 (torchvision's name)
        if isinstance(input, Tensor):
            check_input(self, input, self.conv1.in_channels)
            features = [input]
        else:
            features = list(input)
        if self.memory_efficient and torch.is_grad_enabled() and any(t.requires_grad for t in features):
            out, fold = checkpoint(self._bottleneck, *features, use_reentrant=False), False
        else:
            fold = self._folds(features)
            out = self._bottleneck(*features, fold=fold)
        if fold:
            out = conv(out, self.conv2, backend=self.backend)
        else:
            out, stats = out if self.norm2.training else (out, None)
            out = bn_conv(out, self.norm2, self.conv2, pre_act="relu", stats=stats, backend=self.backend)
        if self.drop_rate > 0:
            out = TF.dropout(out, p=self.drop_rate, training=self.training)
        return out

    def _folds(self, features: list[Tensor]) -> bool:
        """Eval inference without autograd: norm2-ReLU folds into conv1, its only reader."""
        return not self.norm2.training and _inference.usable(features[0], self.conv1, self.norm1, self.norm2.weight,
                                                             self.norm2.bias, *features[1:])

    def _bottleneck(self, *features: Tensor, fold: bool = False):
        """conv1(relu(norm1(cat(features)))), with its batch statistics when norm2 trains, or with
        relu(norm2(.)) folded in (`fold`, see `_folds`)."""
        x = features[0] if len(features) == 1 else torch.cat(features, 1)
        check_input(self, x, self.conv1.in_channels)
        if fold:
            return bn_conv(x, self.norm1, self.conv1, pre_act="relu", post=self.norm2, act="relu", backend=self.backend)
        return bn_conv(x, self.norm1, self.conv1, pre_act="relu", with_stats=self.norm2.training,
                       backend=self.backend)


class DenseBlock(tv._DenseBlock):
    """`num_layers` dense layers; returns the input and every layer's output concatenated."""
    backend: Optional[str] = None

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__(num_layers, num_input_features, bn_size, growth_rate, drop_rate, memory_efficient)
        for name, layer in list(self.items()):
            self[name] = as_subclass(layer, DenseLayer)

    def forward(self, init_features: Tensor) -> Tensor:
        layers = list(self.values())
        if not layers:
            return torch.cat([init_features], 1)
        x = init_features
        check_input(self, x, layers[0].conv1.in_channels)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            features = [x]
            for layer in layers:
                features.append(layer(features))
            return torch.cat(features, 1)
        c = x.shape[1]
        total = c + sum(layer.conv2.out_channels for layer in layers)
        out = torch.empty((x.shape[0], total, *x.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=_memory_format(x))
        out[:, :c].copy_(x)
        for layer in layers:
            g = layer.conv2.out_channels
            out[:, c:c + g].copy_(layer(out[:, :c]))
            c += g
        return out


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when channels are `x`'s innermost dimension (a channels_last tensor or a
    channel slice of one), else contiguous."""
    return torch.channels_last if x.stride(1) == 1 and x.stride(3) != 1 else torch.contiguous_format


class Transition(nn.Module):
    """pool(conv1x1(relu(norm(x)))) with the BN-ReLU fused into the conv; keys norm, conv.
    In eval inference without autograd the average pooling (linear, like the 1x1 conv) runs
    first, in the BN-ReLU's own pass: the conv then works on a quarter of the pixels."""
    backend: Optional[str] = None

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv.in_channels)
        # (the pooling's padded zeros would meet the conv's bias in the other order: no padding)
        if not self.norm.training and _inference.usable(x, self.conv, self.norm) and pool_kind(self.pool) == "avg" \
                and self.pool.padding in (0, (0, 0)) and self.conv.kernel_size == (1, 1) \
                and self.conv.stride == (1, 1) and self.conv.padding == (0, 0):
            a = bn_act_pool(x, bn_prologue(x, self.norm, backend=self.backend), self.pool, backend=self.backend)
            return conv(a, self.conv, backend=self.backend)
        return self.pool(bn_conv(x, self.norm, self.conv, pre_act="relu", backend=self.backend))


# ---- conversion from torchvision -------------------------------------------------------------
_TV = "torchvision.models.densenet."


def _norm_relu_conv_reason(pairs: list[tuple[nn.Module, nn.Module, nn.Module]]) -> Optional[str]:
    for norm, relu, conv in pairs:
        if not is_bn(norm):
            return "norm layers are not BatchNorm2d/SyncBatchNorm/FrozenBatchNorm2d"
        if type(relu) is not nn.ReLU:
            return "activation is not ReLU"
        if type(conv) is not nn.Conv2d:
            return "conv layers are not plain nn.Conv2d"
    return None


@rule(_TV + "_DenseLayer")
def _layer_from_torchvision(m: nn.Module) -> Union[nn.Module, str]:
    why = _norm_relu_conv_reason([(m.norm1, m.relu1, m.conv1), (m.norm2, m.relu2, m.conv2)])
    return why or as_subclass(m, DenseLayer)


@rule(_TV + "_DenseBlock")
def _block_from_torchvision(m: nn.Module) -> Union[nn.Module, str]:
    layers = {}
    for name, layer in m.items():
        new = (_layer_from_torchvision(layer) if qualname(layer) == _TV + "_DenseLayer"
               else f"is a {qualname(layer)}")
        if isinstance(new, str):
            return f"{name}: {new}"
        layers[name] = new
    return as_subclass(m, DenseBlock, **layers)


@rule(_TV + "_Transition")
def _transition_from_torchvision(m: nn.Module) -> Union[nn.Module, str]:
    if list(m._modules) != ["norm", "relu", "conv", "pool"]:
        return f"layers {list(m._modules)} are not norm, relu, conv, pool"
    why = _norm_relu_conv_reason([(m.norm, m.relu, m.conv)])
    return why or adopt(Transition, m, norm=m.norm, relu=m.relu, conv=m.conv, pool=m.pool)
