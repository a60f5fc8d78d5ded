"""Eval-mode inference without autograd: BN-folded (and, for oneDNN, prepacked) conv weights cached
per conv module instead of being recomputed on every forward.

The cache lives in a module-level weak table keyed by the conv module, so parameters, buffers,
state_dict, deepcopy and pickling of the model are untouched. An entry is rebuilt when any of
conv.weight/bias, bn.weight/bias/running_mean/running_var is replaced or changed in place (its
storage address or `_version`, as an optimizer step, `load_state_dict` or `.to()` does), or when
dtype, device or eps change. It is used only when nothing needs gradients (no_grad,
inference_mode, or no input or parameter requiring grad), BN is in eval mode, and outside
torch.compile tracing, which freezes and folds by itself.

In the same conditions a conv may accumulate into its residual instead of allocating its output,
when that residual is a tensor nobody else holds (`mark_scratch`): a projection shortcut's output,
or the residual stream between the blocks of a `Stage` (`run_blocks`).

With the native backend (or "auto") on a CPU tensor that oneDNN takes, the folded weight is also
reordered into oneDNN's blocked layout for the input size (`_reorder_convolution_weight`) and the
conv runs through `fastres.ops.conv.conv2d_onednn` directly: an opaque prepacked weight cannot pass
through the public `torch.ops.fastres.conv2d` custom op. The call is recorded for
`fastres.explain` as conv2d on native. Other backends get the cached folded weight through the
public op.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from fastres import backend as _backend
from fastres import functional as F
from fastres.ops import conv as _conv

_PACKED_SIZES = 4  # prepacked weights kept per conv (one per input size seen, oldest dropped)
_WHY = "eval inference: BN folded into a cached weight prepacked for oneDNN, epilogue fused"
_WHY_PRE = "eval inference: BN-act prologue in one native pass, cached weight prepacked for oneDNN"


@dataclass
class _Entry:
    key: tuple
    weight: Tensor
    bias: Tensor
    packed: dict = field(default_factory=dict)  # input shape -> prepacked weight


_CACHE: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()
_SCRATCH: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def usable(x: Tensor, conv: nn.Conv2d, bn: Optional[nn.Module], *tensors: Optional[Tensor]) -> bool:
    """True when the cached path may run: no autograd recording, not tracing (`bn` None: a conv
    with nothing folded in)."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    norm = (bn.weight, bn.bias) if bn is not None else ()
    return not any(t is not None and t.requires_grad for t in (x, conv.weight, conv.bias, *norm, *tensors))


def _key(conv: nn.Conv2d, args: Optional[tuple]) -> Optional[tuple]:
    """What the folded weight depends on (`args` as `bn_args` resolves them; None: nothing folded);
    None if it cannot be tracked (inference tensors have no version counter)."""
    running_mean, running_var, weight, bias, _, _, eps = args if args is not None else (None,) * 7
    key = [eps]
    try:
        for t in (conv.weight, conv.bias, weight, bias, running_mean, running_var):
            key.append(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device))
    except RuntimeError:
        return None
    return tuple(key)


def _entry(conv: nn.Conv2d, args: Optional[tuple]) -> Optional[_Entry]:
    """The cache entry of `conv`: its weight with the BN of `args` folded in (args None: as it is)."""
    key = _key(conv, args)
    if key is None:
        return None
    e = _CACHE.get(conv)
    if e is not None and e.key == key:
        return e
    # built outside inference_mode, so the cached tensors may later meet autograd-enabled code
    with torch.inference_mode(False), torch.no_grad():
        if args is None:
            w, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        else:
            running_mean, running_var, weight, bias, _, momentum, eps = args
            mean, invstd = F.bn_stats(conv.weight, running_mean, running_var, False, momentum, eps)
            w, b = F.fold_bn(conv.weight, conv.bias, weight, bias, mean, invstd)
    e = _Entry(key, w, b)
    _CACHE[conv] = e
    return e


def _prepacked(e: _Entry, x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The weight for input `x`: prepacked for its size when x is channels_last; else the dense
    one (oneDNN gives a prepacked weight's output channels_last, which would change the layout)."""
    if not _conv.is_channels_last(x):
        return e.weight
    shape = tuple(x.shape)
    w = e.packed.get(shape)
    if w is None:
        if len(e.packed) >= _PACKED_SIZES:
            e.packed.pop(next(iter(e.packed)))
        with torch.inference_mode(False), torch.no_grad():
            w = torch.ops.mkldnn._reorder_convolution_weight(
                e.weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(shape))
        e.packed[shape] = w
    return w


def mark_scratch(t: Tensor) -> Tensor:
    """Mark `t` (a fresh tensor nobody else holds, e.g. a projection shortcut's output) as one
    that the conv adding it as its residual may overwrite; consumed by that one conv."""
    _SCRATCH[id(t)] = t
    return t


def offer_scratch(t: Tensor) -> Tensor:
    """`t`, a fresh tensor only one later conv reads as its residual, marked as scratch unless
    autograd or a compiler trace may hold it."""
    return t if t.requires_grad or torch.compiler.is_compiling() else mark_scratch(t)


def unmark_scratch(t: Tensor) -> None:
    if _SCRATCH.get(id(t)) is t:
        del _SCRATCH[id(t)]


def _take_scratch(t: Optional[Tensor]) -> bool:
    if t is None or _SCRATCH.get(id(t)) is not t:
        return False
    del _SCRATCH[id(t)]
    return True


def hooked(m: nn.Module) -> bool:
    """`m` has hooks of its own, which may keep its inputs or outputs."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


def reuses_input(block: nn.Module) -> bool:
    """A fastres residual block whose input is read last, as the identity its last conv adds, and
    whose output is a tensor only it made: declared by the class attribute `reuses_input`."""
    return getattr(type(block), "reuses_input", False)


def run_blocks(blocks: nn.Module, x: Tensor, owned: bool) -> tuple[Tensor, bool]:
    """(blocks(x), whether that output is still private to this forward). In eval inference
    without autograd, each identity-shortcut block of a Sequential may accumulate its last conv
    into its input, the residual stream, as compiled code does, when that input is an
    intermediate nobody else can hold: `owned` for the first (a tensor the caller made), then the
    output of the block before, which made it and has no hooks that could keep it."""
    if not isinstance(blocks, nn.Sequential) or hooked(blocks) or not _may_reuse(blocks, x):
        return blocks(x), False
    return _chain(blocks, x, owned)


def _may_reuse(blocks: nn.Sequential, x: Tensor) -> bool:
    return not (torch.compiler.is_compiling() or x.requires_grad or _global_hooks()
                or torch.is_grad_enabled() and any(p.requires_grad for p in blocks.parameters()))


def _chain(blocks: nn.Sequential, x: Tensor, owned: bool) -> tuple[Tensor, bool]:
    for block in blocks:
        private = reuses_input(block) and not block.training and not hooked(block)
        if private and owned:
            mark_scratch(x)
        y = block(x)
        unmark_scratch(x)
        x, owned = y, private
    return x, owned


class Stage(nn.Sequential):
    """A Sequential of residual blocks (`convert` re-classes one whose blocks all `reuses_input`)
    that runs them as `run_blocks` does: in eval inference each identity block after the first
    adds its output into the residual stream in place instead of allocating a new tensor. Same
    modules, keys and indexing as the Sequential; the stage's own input is never overwritten."""

    def forward(self, x: Tensor) -> Tensor:
        return _chain(self, x, False)[0] if _may_reuse(self, x) else super().forward(x)


def runs_onednn(x: Tensor, conv: nn.Conv2d, backend: Optional[str]) -> bool:
    """Whether `conv_bn` runs `conv` on x through oneDNN (given residual and addend it takes)."""
    return (backend or _backend.get_backend()) in ("native", "auto") and conv.padding_mode == "zeros" \
        and isinstance(conv.padding, tuple) and _conv.onednn_missing(x, conv.weight) is None


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: Optional[nn.Module], args: Optional[tuple], *, act: str,
            residual: Optional[Tensor], addend: Optional[Tensor], backend: Optional[str],
            with_means: bool = False):
    """act(bn(conv(x + addend)) + residual) from the cache (bn and args None: no BN), or None
    when it cannot be used (then the caller runs the uncached path). `with_means`: (out, the (N, K)
    means of each sample's channels), on oneDNN in a pass of their own."""
    e = _entry(conv, args)
    if e is None:
        return None
    name = backend or _backend.get_backend()
    if runs_onednn(x, conv, backend) and _conv.onednn_missing(x, e.weight, addend, residual) is None \
            and _conv.residual_missing(residual, x, conv.weight, conv.stride, conv.padding, conv.dilation) is None:
        _backend._record("conv2d", "native", _WHY if name == "native" else "auto: " + _WHY)
        if addend is not None:
            x = x + addend
        accumulate = _take_scratch(residual) and residual.shape[1] == conv.out_channels and residual.is_contiguous(
            memory_format=torch.channels_last if _conv.is_channels_last(x) else torch.contiguous_format) \
            and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        y = _conv.conv2d_onednn(x, _prepacked(e, x, conv), e.bias, conv.stride, conv.padding, conv.dilation,
                                conv.groups, residual, act, accumulate=accumulate)
        return (y, _conv.sample_means(y)) if with_means else y
    return F.conv2d(x, e.weight, e.bias, conv.stride, conv.padding, conv.dilation, conv.groups, addend=addend,
                    residual=residual, act=act, with_means=with_means, backend=backend)


def bn_conv(x: Tensor, bn: nn.Module, conv: nn.Conv2d, args: tuple, *, pre_act: str,
            residual: Optional[Tensor], post_args: Optional[tuple] = None, act: str = "identity",
            backend: Optional[str] = None) -> Optional[Tensor]:
    """act(post(conv(pre_act(bn(x)))) + residual) with the BN-act prologue in one native pass
    (oneDNN has no input-side post-ops) and the conv from its cached prepacked weight, the BN of
    `post_args` folded in; None when this path cannot run (then the caller runs the public op)."""
    name = backend or _backend.get_backend()
    if not runs_onednn(x, conv, backend) or _backend.NATIVE_MISSING is not None \
            or _conv.onednn_missing(x, conv.weight, residual) is not None:
        return None
    if _conv.residual_missing(residual, x, conv.weight, conv.stride, conv.padding, conv.dilation) is not None:
        return None
    e = _entry(conv, post_args)
    if e is None:
        return None
    running_mean, running_var, weight, bias, _, momentum, eps = args
    mean, invstd = F.bn_stats(x, running_mean, running_var, False, momentum, eps)
    _backend._record("conv2d", "native", ("" if name == "native" else "auto: ") + _WHY_PRE)
    a = torch.ops.fastres_native.bn_act(x, weight, bias, mean, invstd, None, pre_act)
    return _conv.conv2d_onednn(a, _prepacked(e, a, conv), e.bias, conv.stride, conv.padding, conv.dilation,
                               conv.groups, residual, act)


def clear() -> None:
    """Drop every cached weight (they are rebuilt on the next inference forward)."""
    _CACHE.clear()
