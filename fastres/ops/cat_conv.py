"""A convolution of a concatenation whose parts each carry their own BN-act prologue, with the
output's batch statistics, for training (Res2Net's conv3 over its splits):

    a   = cat_i(pre_act(BN_i(parts[i])))    parts (N, C_i, H, W); the BN vectors run over all
                                            C = sum C_i channels; a part with prologue[i] False
                                            goes in as it is
    out = conv(a, weight) + bias            and out's per-channel (mean, biased variance)

`a` is never kept: the backward recomputes it from the parts (which the prologues' backward
reads anyway), runs one convolution_backward over all channels, and the BN-act backward of each
part on its channels of the input gradient. So training stores what a sum of per-part convs
stores, with one convolution in each direction instead of one per part.

Native (CPU): `a` is formed in native bn_act passes and one cat, then one oneDNN convolution
(oneDNN takes no input-side prologue). Triton, whichever moves fewer bytes: each part's BN-act
written at its channel offset of one buffer, then one conv; or a sum of per-part convs, each
part's prologue applied as its conv loads it and the running sum added in the next conv's
epilogue, so `a` never exists (one part, or an output much narrower than the parts). The last
conv's epilogue gives the statistics.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import library
from fastres.ops import reference as ref
from fastres.ops.bn_act import check_act, unaliased
from fastres.ops.conv import _conv2d_fake


def _check(op: str, parts, pre_vectors, prologue, pre_training, weight=None, groups=1) -> None:
    """The arguments of cat_conv2d_stats (and without `weight`, of cat_bn_act)."""
    n = len(parts)
    if n == 0:
        raise ValueError(f"fastres.{op}: needs at least one part")
    if len(prologue) != n or len(pre_training) != n:
        raise ValueError(f"fastres.{op}: prologue and pre_training need one entry per part ({n}), got "
                         f"{len(prologue)} and {len(pre_training)}")
    p0 = parts[0]
    for i, p in enumerate(parts):
        if p.dim() != 4 or p.shape[0] != p0.shape[0] or p.shape[2:] != p0.shape[2:] or p.dtype != p0.dtype \
                or p.device != p0.device:
            raise ValueError(f"fastres.{op}: part {i} must be (N, C_i, H, W) = ({p0.shape[0]}, *, "
                             f"{p0.shape[2]}, {p0.shape[3]}) of dtype {p0.dtype} on {p0.device}, got "
                             f"{tuple(p.shape)} {p.dtype} on {p.device}")
    channels = sum(p.shape[1] for p in parts)
    for name, v in zip(("pre_weight", "pre_bias", "pre_mean", "pre_invstd"), pre_vectors):
        if v is not None and v.shape != (channels,):
            raise ValueError(f"fastres.{op}: {name} must have one value per channel of the parts "
                             f"({channels},), got {tuple(v.shape)}")
    if any(t and p for t, p in zip(pre_training, prologue)) and (pre_vectors[2] is None or pre_vectors[3] is None):
        raise ValueError(f"fastres.{op}: pre_training=True needs the batch mean and invstd")
    if weight is not None and (weight.dim() != 4 or weight.shape[1] * groups != channels):
        raise ValueError(f"fastres.{op}: weight must be (K, C/groups, R, S) with C = {channels} (the "
                         f"parts' channels), groups = {groups}; got {tuple(weight.shape)}")


@library.op("fastres::cat_conv2d_stats", mutates_args=())
def cat_conv2d_stats(parts: Sequence[Tensor], pre_weight: Optional[Tensor], pre_bias: Optional[Tensor],
                     pre_mean: Optional[Tensor], pre_invstd: Optional[Tensor], pre_act: str,
                     prologue: Sequence[bool], pre_training: Sequence[bool], weight: Tensor, bias: Optional[Tensor],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """pre_*: per-channel vectors over the parts' channels in order (entries of a part without a
    prologue are not read); prologue[i]: whether part i gets its BN-act."""
    check_act(pre_act)
    _check("cat_conv2d_stats", parts, (pre_weight, pre_bias, pre_mean, pre_invstd), prologue, pre_training, weight,
           groups)
    args = (list(parts), pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, list(prologue), list(pre_training),
            weight, bias, list(stride), list(padding), list(dilation), groups)
    return B.choose("cat_conv2d_stats", backend, parts[0].device, args)(*args)


@cat_conv2d_stats.register_fake
def _(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training, weight, bias, stride,
      padding, dilation, groups, backend):
    x = parts[0]
    out = _conv2d_fake(x, weight, bias, stride, padding, dilation, groups, *([None] * 4), "identity", False,
                       None, None, "identity", backend)
    dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return out, x.new_empty(weight.shape[0], dtype=dt), x.new_empty(weight.shape[0], dtype=dt)


def _prologues(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training):
    """Per part: its (x, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, pre_training) conv2d
    prologue arguments, the vectors cut to its channels (all None, identity, without a prologue)."""
    sizes = [p.shape[1] for p in parts]
    cut = [torch.split(v, sizes) if v is not None else [None] * len(parts)
           for v in (pre_weight, pre_bias, pre_mean, pre_invstd)]
    for i, x in enumerate(parts):
        if prologue[i]:
            yield (x, *(c[i] for c in cut), pre_act, pre_training[i])
        else:
            yield x, None, None, None, None, "identity", False


@library.op("fastres::cat_bn_act", mutates_args=())
def cat_bn_act(parts: Sequence[Tensor], pre_weight: Optional[Tensor], pre_bias: Optional[Tensor],
               pre_mean: Optional[Tensor], pre_invstd: Optional[Tensor], pre_act: str, prologue: Sequence[bool],
               backend: str) -> Tensor:
    """a = cat_i(pre_act(BN_i(part_i))): cat_conv2d_stats's input, laid out as torch.cat lays out
    the parts (its backward recomputes it with this op)."""
    check_act(pre_act)
    _check("cat_bn_act", parts, (pre_weight, pre_bias, pre_mean, pre_invstd), prologue, [False] * len(parts))
    args = (list(parts), pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, list(prologue))
    return unaliased((B.choose("cat_bn_act", backend, parts[0].device, args)(*args),), args[0])[0]


@cat_bn_act.register_fake
def _(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, backend):
    return _cat_like(parts)


def _cat_like(parts: Sequence[Tensor]) -> Tensor:
    """An uninitialised tensor with the shape and strides of torch.cat(parts, 1)."""
    meta = torch.cat([torch.empty_like(p, device="meta") for p in parts], 1)
    return torch.empty_strided(meta.shape, meta.stride(), dtype=parts[0].dtype, device=parts[0].device)


def _cat_bn_act(backend: str):
    """Each part's BN-act as `backend`'s bn_act op, then one cat."""
    def run(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue):
        from fastres.ops.bn_act import bn_act
        acts = [bn_act(x, w, b, m, s, None, act, False, backend) if ref.has_prologue(w, b, m, s, act) else x
                for x, w, b, m, s, act, _ in _prologues(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act,
                                                        prologue, [False] * len(parts))]
        return torch.cat(acts, 1) if len(acts) > 1 else acts[0]
    return run


def _cat_bn_act_supports(backend: str):
    """Whether `backend`'s bn_act takes every part that goes through it (on Triton every part is
    written by the bn_act kernel, a part without a prologue as a copy)."""
    def supports(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue):
        for x, w, b, m, s, act, _ in _prologues(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act,
                                                prologue, [False] * len(parts)):
            if backend == "triton" or ref.has_prologue(w, b, m, s, act):
                why = B._try("bn_act", backend, x.device, (x, w, b, m, s, None, act))[1]
                if why:
                    return f"bn_act of a part: {why}"
        return None
    return supports


B.register("cat_bn_act", "reference")(_cat_bn_act("reference"))
B.register("cat_bn_act", "native", supports=_cat_bn_act_supports("native"), kernel=False)(_cat_bn_act("native"))


@B.register("cat_bn_act", "triton", supports=_cat_bn_act_supports("triton"), kernel=False)
def _cat_bn_act_triton(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue):
    return _slotted(_prologues(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue,
                               [False] * len(parts)), _cat_like(parts))


def _slotted(prologues, a: Optional[Tensor] = None) -> Tensor:
    """A buffer holding every part's BN-act (a copy for a part without one), each written at its
    channel offset by the Triton bn_act kernel: the concatenation without a cat. `a`: the buffer
    (default: a new channels_last one)."""
    from fastres.ops.bn_act import bn_act_triton
    prologues = list(prologues)
    sizes = [p[0].shape[1] for p in prologues]
    if a is None:
        x0 = prologues[0][0]
        a = torch.empty((x0.shape[0], sum(sizes), *x0.shape[2:]), dtype=x0.dtype, device=x0.device,
                        memory_format=torch.channels_last)
    for slot, (x, w_, b, m, s, act, _) in zip(torch.split(a, sizes, 1), prologues):
        bn_act_triton(x, w_, b, m, s, None, act, out=slot)
    return a


def _setup(ctx, inputs, output):
    (parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training, weight, bias, stride,
     padding, dilation, groups, backend) = inputs
    ctx.conf = (len(parts), pre_act, list(prologue), list(pre_training), list(stride), list(padding),
                list(dilation), groups, backend)
    ctx.save_for_backward(*parts, pre_weight, pre_bias, pre_mean, pre_invstd, weight, bias)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad, gmean, gvar):
    """One convolution_backward over the recomputed concatenation, then each part's BN-act
    backward on its channels of the input gradient (with the batch statistics' terms)."""
    from fastres.ops.bn_act import bn_act_backward
    n, pre_act, prologue, pre_training, stride, padding, dilation, groups, backend = ctx.conf
    saved = ctx.saved_tensors
    parts, (pw, pb, pm, pi, weight, bias) = list(saved[:n]), saved[n:]
    if not all(t for t, p in zip(pre_training, prologue) if p) and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
        raise RuntimeError("fastres.cat_conv2d_stats: gradients w.r.t. pre_mean/pre_invstd in eval mode are not "
                           "supported; fold them into pre_weight/pre_bias")
    args = (parts, pw, pb, pm, pi, pre_act, prologue, pre_training)
    a = cat_bn_act(parts, pw, pb, pm, pi, pre_act, prologue, backend)
    ga, gw, _ = torch.ops.aten.convolution_backward(grad, a, weight, None, stride, padding, dilation, False,
                                                    [0, 0], groups, [True, ctx.needs_input_grad[8], False])
    gb = grad.sum((0, 2, 3), dtype=ref.acc_dtype(grad.dtype)).to(bias.dtype) \
        if bias is not None and ctx.needs_input_grad[9] else None
    gparts, gpw, gpb = [], [], []
    for ga_i, (x, w, b, m, s, act, training) in zip(torch.split(ga, [p.shape[1] for p in parts], 1),
                                                     _prologues(*args)):
        if not ref.has_prologue(w, b, m, s, act):
            gparts.append(ga_i)
            gpw.append(torch.zeros(x.shape[1], dtype=pw.dtype, device=x.device) if pw is not None else None)
            gpb.append(torch.zeros(x.shape[1], dtype=pb.dtype, device=x.device) if pb is not None else None)
            continue
        gx, _, gw_i, gb_i = bn_act_backward(ga_i, x, w, b, m, s, None, None, act, training,
                                            [True, False, w is not None, b is not None], backend)
        gparts.append(gx)
        gpw.append(gw_i)
        gpb.append(gb_i)
    gpw = torch.cat(gpw) if pw is not None and ctx.needs_input_grad[1] else None
    gpb = torch.cat(gpb) if pb is not None and ctx.needs_input_grad[2] else None
    return gparts, gpw, gpb, None, None, None, None, None, gw, gb, None, None, None, None, None


cat_conv2d_stats.register_autograd(_backward, setup_context=_setup)


def _composed(backend: str):
    """a in `backend`'s BN-act passes and one cat, then its conv2d_stats of a."""
    def run(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training, weight, bias,
            stride, padding, dilation, groups):
        a = _cat_bn_act(backend)(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue)
        args = (a, weight, bias, stride, padding, dilation, groups, None, None, None, None, "identity", False,
                None, None, "identity")
        return B._TABLES["conv2d_stats"][backend].fn(*args)
    return run


B.register("cat_conv2d_stats", "reference")(_composed("reference"))


def _native_supports(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training, weight,
                     bias, stride, padding, dilation, groups):
    from fastres.ops.conv import _conv2d_stats_native_supports
    if B.NATIVE_MISSING is not None:
        return f"the BN-act passes and statistics need the native kernels: {B.NATIVE_MISSING}"
    return _conv2d_stats_native_supports(parts[0], weight, bias, stride, padding, dilation, groups, None, None,
                                         None, None, "identity", False, None, None, "identity")


B.register("cat_conv2d_stats", "native", supports=_native_supports, kernel=False)(_composed("native"))


def _weight_parts(parts, weight):
    return torch.split(weight, [p.shape[1] for p in parts], 1)


def _triton_supports(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training, weight,
                     bias, stride, padding, dilation, groups):
    from fastres.ops.conv import _triton_conv2d_supports
    if groups != 1:
        return f"a sum of per-part convs needs groups == 1 (groups is {groups})"
    for (x, w, b, m, s, act, training), w_i in zip(_prologues(parts, pre_weight, pre_bias, pre_mean, pre_invstd,
                                                              pre_act, prologue, pre_training),
                                                   _weight_parts(parts, weight)):
        why = _triton_conv2d_supports(x, w_i, bias, stride, padding, dilation, 1, w, b, m, s, act, training, None,
                                      None, "identity")
        if why is not None:
            return why
    return None


def _concat_pays(parts: Sequence[Tensor], weight: Tensor, out_pixels: int) -> bool:
    """Whether writing the prologues' outputs into one concatenation and running one conv moves
    fewer bytes than the sum of per-part convs: the concatenation is written and read once more
    (2 x C input planes), the sum reads and writes its running output once per extra part
    (2 x (P - 1) x K output planes)."""
    c, hw = sum(p.shape[1] for p in parts), parts[0].shape[2] * parts[0].shape[3]
    return c * hw < (len(parts) - 1) * weight.shape[0] * out_pixels


@B.register("cat_conv2d_stats", "triton", supports=_triton_supports)
def _cat_conv2d_stats_triton(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training,
                             weight, bias, stride, padding, dilation, groups):
    """The cheaper in bytes (`_concat_pays`) of: each part's BN-act written at its channel offset
    of one channels_last buffer (no cat), then one conv with the statistics in its epilogue; or
    a sum of per-part convs with the prologues applied as they load."""
    from fastres.ops.conv import conv2d_triton, out_shape
    prologues = list(_prologues(parts, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act, prologue, pre_training))
    oh, ow = out_shape(parts[0], weight, stride, padding, dilation)[2:]
    if _concat_pays(parts, weight, oh * ow):
        return conv2d_triton(_slotted(prologues), weight, bias, stride, padding, dilation, 1, None, None, None,
                             None, "identity", False, None, None, "identity", stats=True)
    out = None
    steps = list(zip(prologues, _weight_parts(parts, weight)))
    for j, ((x, w, b, m, s, act, training), w_j) in enumerate(steps):
        out = conv2d_triton(x, w_j, bias if j == 0 else None, stride, padding, dilation, 1, w, b, m, s, act,
                            training, None, out, "identity", stats=j == len(steps) - 1)
    return out
