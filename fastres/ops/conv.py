"""2-D convolution with a fused prologue and epilogue.

    a   = pre_act(BN(x)) + addend          prologue: BN-act pre-activation (pre_weight, pre_bias,
                                           pre_mean, pre_invstd; `pre_training` when they are the
                                           batch statistics of x), then Res2Net's + y_{i-1}
    out = act(conv(a, weight) + bias + residual)   epilogue: folded BN, residual, activation

Every prologue/epilogue input is optional. Padded pixels are zeros of `a` (after the prologue).
The residual may have fewer channels than the output, C' <= K: it is added to the first C'
channels (ReXNet's shortcut), as if zero-extended, without that zero-extended copy ever existing.
The backward recomputes `a` from `x` instead of saving it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import library
from fastres.ops import reference as ref
from fastres.ops.bn_act import check_act, check_bn


def out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> list[int]:
    hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
          for i in range(2)]
    return [x.shape[0], weight.shape[0], *hw]


@library.op("fastres::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int,
           pre_weight: Optional[Tensor], pre_bias: Optional[Tensor], pre_mean: Optional[Tensor],
           pre_invstd: Optional[Tensor], pre_act: str, pre_training: bool,
           addend: Optional[Tensor], residual: Optional[Tensor], act: str, backend: str) -> Tensor:
    return _dispatch("conv2d", backend, x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias,
                     pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act)


def _fits(residual: Tensor, shape: Sequence[int]) -> bool:
    """A residual is (N, C', OH, OW): the output's shape, but at most its channels."""
    return residual.dim() == 4 and residual.shape[0] == shape[0] and list(residual.shape[2:]) == list(shape[2:]) \
        and residual.shape[1] <= shape[1]


def check_residual(op: str, residual: Optional[Tensor], shape: Sequence[int]) -> None:
    if residual is not None and not _fits(residual, shape):
        raise ValueError(f"fastres.{op}: residual must be (N, C', OH, OW) = ({shape[0]}, C' <= {shape[1]}, "
                         f"{shape[2]}, {shape[3]}), the output's shape with at most its channels, got "
                         f"{tuple(residual.shape)}")


def _dispatch(op: str, backend: str, x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias,
              pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act):
    """Check the arguments of conv2d / conv2d_stats and run the chosen backend's implementation."""
    check_act(pre_act)
    check_act(act)
    check_bn(op, x, pre_mean, pre_invstd, pre_training)
    if x.dim() == 4 and weight.dim() == 4:
        check_residual(op, residual, out_shape(x, weight, stride, padding, dilation))
    args = (x, weight, bias, list(stride), list(padding), list(dilation), groups, pre_weight,
            pre_bias, pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act)
    return B.choose(op, backend, x.device, args)(*args)


def _strides_like_channels_last(t: Tensor) -> bool:
    """ATen's test (is_channels_last_strides_2d): strides non-decreasing in the order C, W, H, N.
    It also decides the ambiguous case of one channel, e.g. a depthwise (K, 1, R, S) weight."""
    bound = 0
    for d in (1, 3, 2, 0):
        if t.shape[d] == 0 or t.stride(d) < bound or (d == 0 and bound == t.stride(1)):
            return False
        bound = t.stride(d) * max(t.shape[d], 1)
    return True


def _memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout ATen's convolution gives its output: channels_last if either operand has
    channels-last strides (also a channel slice of a channels_last buffer)."""
    def cl(t: Tensor) -> bool:
        return (t.stride(1) == 1 and t.stride(3) != 1 and not t.is_contiguous()
                or t.is_contiguous(memory_format=torch.channels_last) and _strides_like_channels_last(t))
    return torch.channels_last if cl(x) or cl(weight) else torch.contiguous_format


@conv2d.register_fake
def _conv2d_fake(x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias, pre_mean,
                 pre_invstd, pre_act, pre_training, addend, residual, act, backend):
    return x.new_empty(out_shape(x, weight, stride, padding, dilation)).contiguous(
        memory_format=_memory_format(x, weight))


# positions of the differentiable inputs, in the order conv2d_backward returns their grads
_GRAD_INPUTS = (0, 1, 2, 7, 8, 13, 14)  # x, weight, bias, pre_weight, pre_bias, addend, residual


def _setup(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias, pre_mean, pre_invstd,
     pre_act, pre_training, addend, residual, act, backend) = inputs
    ctx.conf = (list(stride), list(padding), list(dilation), groups, pre_act, pre_training, act)
    ctx.residual = (residual.dtype, residual.shape[1]) if residual is not None else None
    ctx.backend = backend
    # the epilogue's mask comes from the output (relu family) or, for silu, from a recomputed
    # pre-activation that needs the residual; nothing else of the epilogue is kept
    ctx.save_for_backward(x, weight, bias, pre_weight, pre_bias, pre_mean, pre_invstd, addend,
                          residual if act == "silu" else None, output if act in ("relu", "relu6") else None)


def _backward(ctx, grad):
    x, weight, bias, pw, pb, pmean, pinvstd, addend, residual, out = ctx.saved_tensors
    stride, padding, dilation, groups, pre_act, pre_training, act = ctx.conf
    if not pre_training and (ctx.needs_input_grad[9] or ctx.needs_input_grad[10]):
        raise RuntimeError("fastres.conv2d: gradients w.r.t. pre_mean/pre_invstd in eval mode are not "
                           "supported; fold them into pre_weight/pre_bias")
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    if act == "silu":  # silu' needs the conv's pre-activation: the reference recomputes the conv
        grads = ref.conv2d_backward(grad, out, x, weight, bias, stride, padding, dilation, groups, pw, pb,
                                    pmean, pinvstd, pre_act, pre_training, addend, residual, act, needs)
    else:
        grads = _backward_ops(grad, out, x, weight, bias, stride, padding, dilation, groups, pw, pb, pmean,
                              pinvstd, pre_act, pre_training, addend, act, needs, ctx.backend)
    result = [None] * 17
    for i, g in zip(_GRAD_INPUTS, grads):
        result[i] = g
    if result[14] is not None:   # the grad of the output channels the residual was added to
        dtype, channels = ctx.residual
        result[14] = result[14][:, :channels].to(dtype)
    return tuple(result)


def _backward_ops(grad, out, x, weight, bias, stride, padding, dilation, groups, pw, pb, pmean, pinvstd,
                  pre_act, pre_training, addend, act, needs, backend):
    """The backward as three passes on the chosen backend around ATen's convolution_backward:
    the epilogue's activation mask (bn_act_backward of the output), the prologue's BN-act
    recomputed from x (bn_act) for the weight gradient, and its backward with the batch
    statistics' gradient (bn_act_backward, its activation's derivative recomputed from x, which
    it reads anyway, rather than read from the recomputed a). The elementwise work is the fused
    ops' own, not a chain of ATen ops."""
    from fastres.ops.bn_act import bn_act, bn_act_backward
    nx, nw, nb, npw, npb, nadd, nres = needs
    gz = grad
    if act != "identity":  # relu / relu6: the mask is read from the saved output
        gz = bn_act_backward(grad, out, None, None, None, None, None, out, act, False,
                             [True, False, False, False], backend)[0]
    gb = gz.sum((0, 2, 3), dtype=ref.acc_dtype(gz.dtype)).to(bias.dtype) if nb else None
    prologue = ref.has_prologue(pw, pb, pmean, pinvstd, pre_act)
    a_act = bn_act(x, pw, pb, pmean, pinvstd, None, pre_act, pre_training, backend) if prologue else x
    a = a_act if addend is None else a_act + addend
    need_ga = nx or npw or npb or nadd
    ga, gw, _ = torch.ops.aten.convolution_backward(gz, a, weight, None, stride, padding, dilation, False,
                                                    [0, 0], groups, [need_ga, nw, False])
    gx = gpw = gpb = None
    if prologue and (nx or npw or npb):
        gx, _, gpw, gpb = bn_act_backward(ga, x, pw, pb, pmean, pinvstd, None, None, pre_act, pre_training,
                                          [nx, False, npw and pw is not None, npb and pb is not None], backend)
    elif nx:
        gx = ga
    return (gx if nx else None, gw, gb, gpw if npw else None, gpb if npb else None, ga if nadd else None,
            gz if nres else None)


conv2d.register_autograd(_backward, setup_context=_setup)

B.register("conv2d", "reference")(ref.conv2d)


# ---- conv2d with its output's batch statistics --------------------------------------------------
@library.op("fastres::conv2d_stats", mutates_args=())
def conv2d_stats(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int,
                 pre_weight: Optional[Tensor], pre_bias: Optional[Tensor], pre_mean: Optional[Tensor],
                 pre_invstd: Optional[Tensor], pre_act: str, pre_training: bool,
                 addend: Optional[Tensor], residual: Optional[Tensor], act: str,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """`conv2d`, and the per-channel (mean, biased variance) of its output (fp32 for half types) for
    the BN that follows it in training, as `batch_stats` of the output gives them. On Triton they
    come from the conv kernel's epilogue, so that BN takes no pass of its own over the output. The
    statistics carry no gradient: BN's training backward (bn_act, the conv prologue) includes theirs."""
    return _dispatch("conv2d_stats", backend, x, weight, bias, stride, padding, dilation, groups, pre_weight,
                     pre_bias, pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act)


@conv2d_stats.register_fake
def _(x, weight, *args):
    out, dt = _conv2d_fake(x, weight, *args), ref.acc_dtype(x.dtype)
    return out, x.new_empty(weight.shape[0], dtype=dt), x.new_empty(weight.shape[0], dtype=dt)


def _stats_setup(ctx, inputs, output):
    _setup(ctx, inputs, output[0])
    ctx.mark_non_differentiable(output[1], output[2])


conv2d_stats.register_autograd(lambda ctx, grad, gmean, gvar: _backward(ctx, grad), setup_context=_stats_setup)


def _composed_stats(backend: str):
    """conv2d_stats on `backend` as its conv2d, then its batch_stats of the output."""
    def run(*args):
        out = B._TABLES["conv2d"][backend].fn(*args)
        return (out, *B._TABLES["batch_stats"][backend].fn(out))
    return run


B.register("conv2d_stats", "reference")(_composed_stats("reference"))


# ---- conv2d with each sample's channel means ----------------------------------------------------
@library.op("fastres::conv2d_means", mutates_args=())
def conv2d_means(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int,
                 pre_weight: Optional[Tensor], pre_bias: Optional[Tensor], pre_mean: Optional[Tensor],
                 pre_invstd: Optional[Tensor], pre_act: str, pre_training: bool,
                 addend: Optional[Tensor], residual: Optional[Tensor], act: str,
                 backend: str) -> tuple[Tensor, Tensor]:
    """`conv2d`, and the (N, K) spatial mean of each sample's output channels (fp32 for half types),
    the channel descriptor of the squeeze-excitation that follows. On Triton the means come from
    the conv kernel's epilogue (row tiles that never cross a sample), so SE takes no pass of its
    own over the output. Differentiable: the means' gradient reaches the output's."""
    return _dispatch("conv2d_means", backend, x, weight, bias, stride, padding, dilation, groups, pre_weight,
                     pre_bias, pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act)


@conv2d_means.register_fake
def _(x, weight, *args):
    out = _conv2d_fake(x, weight, *args)
    return out, x.new_empty(out.shape[:2], dtype=ref.acc_dtype(x.dtype))


def _means_setup(ctx, inputs, output):
    _setup(ctx, inputs, output[0])
    ctx.pixels = output[0].shape[2] * output[0].shape[3]


def _means_backward(ctx, grad, gmeans):
    # each mean is the sum of its sample's channel over OH*OW pixels, divided by their count
    grad = grad + (gmeans / ctx.pixels).to(grad.dtype)[:, :, None, None]
    return _backward(ctx, grad)


conv2d_means.register_autograd(_means_backward, setup_context=_means_setup)


def sample_means(out: Tensor) -> Tensor:
    """(N, K) means of each sample's channels of `out` in one pass, as ATen's mean gives them
    (accumulated in fp32, rounded to out's dtype: mean(dtype=) would first copy a half-precision
    tensor to fp32), in conv2d_means's dtype."""
    return out.mean((2, 3)).to(ref.acc_dtype(out.dtype))


def _composed_means(backend: str):
    """conv2d_means on `backend` as its conv2d, then the mean over the output's pixels."""
    def run(*args):
        out = B._TABLES["conv2d"][backend].fn(*args)
        return out, sample_means(out)
    return run


B.register("conv2d_means", "reference")(_composed_means("reference"))


# ==== native implementation: oneDNN (CPU) or cuDNN (CUDA) with the native kernels ================
# The epilogue (bias, residual add, activation) runs as oneDNN post-ops of one convolution
# primitive (`torch.ops.mkldnn._convolution_pointwise[.binary]`, what inductor emits on CPU).
# oneDNN has no input-side post-ops, so a prologue (eval BN-act pre-activation, Res2Net's addend)
# is materialised first in one pass of the native bn_act kernel; the convolution and its epilogue
# then run fused. `conv2d_onednn` is also the entry point of the cached eval-mode path
# (fastres.nn.inference), which passes a BN-folded weight already prepacked into oneDNN's opaque
# layout: such a weight cannot travel through the public custom op (it takes dense tensors).
# On CUDA the convolution is cuDNN's and the epilogue one native pass (`conv2d_cudnn`); there
# `backend="auto"` may run the Triton conv instead where fastres.tuning measured it faster.
_ONEDNN_ACT = {"identity": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]),
               "silu": ("swish", [])}


def onednn_missing(x: Tensor, weight: Tensor, *others: Optional[Tensor]) -> Optional[str]:
    """Why oneDNN cannot run this convolution, or None."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    if x.device.type != "cpu":
        return f"oneDNN convolution runs on CPU tensors (device is {x.device.type})"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN path takes float32 and bfloat16 (dtype is {x.dtype})"
    if x.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 support in oneDNN"
    if x.dim() != 4:
        return f"expects a 4-D input, got {x.dim()}-D"
    if weight.dtype != x.dtype or any(t is not None and t.device != x.device for t in others):
        return "weight dtype or tensor devices differ from the input's"
    return None


def is_channels_last(x: Tensor) -> bool:
    """x has channels-last strides (oneDNN then gives the output channels_last too)."""
    return x.stride(1) == 1 and x.stride(3) != 1 and not x.is_contiguous()


def conv2d_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int,
                  residual: Optional[Tensor], act: str, *, accumulate: bool = False) -> Tensor:
    """act(conv(x, weight) + bias + residual) as one oneDNN primitive; `weight` dense or prepacked.
    With `accumulate` the result is written into `residual` (which the caller must own) and
    returned. A residual of fewer channels than the output (see `residual_missing`) is added,
    with the activation, by the native residual_act_ kernel in one pass after the convolution."""
    attr, scalars = _ONEDNN_ACT[act]
    mk = torch.ops.mkldnn
    if residual is None:
        return mk._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, attr, scalars, "")
    if residual.shape[1] != weight.shape[0]:
        y = mk._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, "none", [], "")
        torch.ops.fastres_native.residual_act_(y, residual, act)
        return y
    # after a binary add torch's wrapper fuses ReLU only; where it declines the fusion (bf16 with
    # groups or a non-channels_last operand) it falls back to ATen's add_relu, which has no bf16
    # kernel. Other activations, and ReLU in those cases, follow in place.
    fuse = act == "relu" and (x.dtype == torch.float32 or groups == 1 and is_channels_last(x)
                              and residual.is_contiguous(memory_format=torch.channels_last))
    unary = "relu" if fuse else None
    if accumulate:
        mk._convolution_pointwise_.binary(residual, x, weight, bias, padding, stride, dilation, groups,
                                          "add", 1.0, unary, [], "")
        y = residual
    else:
        y = mk._convolution_pointwise.binary(x, residual, weight, bias, padding, stride, dilation, groups,
                                             "add", 1.0, unary, [], "")
    return y if fuse else ref.apply_act_(y, act)


# ---- the same on CUDA: cuDNN's convolution, then the native kernels -----------------------------
def cudnn_missing(x: Tensor, weight: Tensor, *others: Optional[Tensor]) -> Optional[str]:
    """Why `conv2d_cudnn` cannot run this convolution, or None."""
    if x.device.type != "cuda":
        return f"the cuDNN path runs on CUDA tensors (device is {x.device.type})"
    if B.NATIVE_MISSING is not None:
        return f"it needs the native kernels: {B.NATIVE_MISSING}"
    from fastres import _C
    if not _C.built_with_cuda:
        return "the installed extension was built without its CUDA kernels (reinstall with CUDA_HOME set)"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() != 4:
        return f"expects a 4-D float32/float16/bfloat16 input, got {x.dim()}-D {x.dtype}"
    if weight.dtype != x.dtype or any(t is not None and t.device != x.device for t in others):
        return "weight dtype or tensor devices differ from the input's"
    return None


def conv2d_cudnn(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int,
                 residual: Optional[Tensor], act: str) -> Tensor:
    """act(conv(x, weight) + bias + residual): ATen's convolution (cuDNN on CUDA, the bias added
    by it), then the residual and activation in one in-place pass over the output (the native
    residual_act_ kernel, also for a residual of fewer channels), or the activation alone in place.
    Device-generic, so the composition is tested on CPU as well."""
    y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    if residual is None:
        return ref.apply_act_(y, act)
    torch.ops.fastres_native.residual_act_(y, residual, act)
    return y


def residual_missing(residual: Optional[Tensor], x: Tensor, weight: Tensor, stride, padding,
                     dilation) -> Optional[str]:
    """Why conv2d_onednn cannot add this residual, or None."""
    if residual is None:
        return None
    shape = out_shape(x, weight, stride, padding, dilation)
    if residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} differs from the input's ({x.dtype})"
    if not _fits(residual, shape):
        return f"residual {tuple(residual.shape)} does not fit the output {tuple(shape)}"
    if residual.shape[1] < shape[1] and B.NATIVE_MISSING is not None:
        return f"a residual of {residual.shape[1]} of the {shape[1]} channels needs the native kernels: " \
               f"{B.NATIVE_MISSING}"
    return None


def materialise_prologue(x: Tensor, addend: Optional[Tensor], pw, pb, pmean, pinvstd, pre_act: str) -> Tensor:
    """a = pre_act(BN(x)) + addend in native passes (the identity prologue returns x itself)."""
    if ref.has_prologue(pw, pb, pmean, pinvstd, pre_act):
        x = torch.ops.fastres_native.bn_act(x, pw, pb, pmean, pinvstd, None, pre_act)
    return x if addend is None else x + addend


def _conv2d_native_supports(x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias,
                            pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act):
    missing = onednn_missing if x.device.type == "cpu" else cudnn_missing
    why = missing(x, weight, bias, pre_weight, pre_bias, pre_mean, pre_invstd, addend, residual)
    bn_prologue = any(t is not None for t in (pre_weight, pre_bias, pre_mean, pre_invstd)) or pre_act != "identity"
    if why is None and bn_prologue and B.NATIVE_MISSING is not None:
        why = f"the BN-act prologue needs the native bn_act kernel: {B.NATIVE_MISSING}"
    return why or residual_missing(residual, x, weight, stride, padding, dilation)


def _conv2d_stats_native_supports(*args):
    return _conv2d_native_supports(*args) or (
        f"the statistics need the native batch_stats kernel: {B.NATIVE_MISSING}" if B.NATIVE_MISSING else None)


@B.register("conv2d", "native", supports=_conv2d_native_supports, kernel=False)
def _conv2d_native(x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias, pre_mean,
                   pre_invstd, pre_act, pre_training, addend, residual, act):
    a = materialise_prologue(x, addend, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act)
    conv = conv2d_onednn if x.device.type == "cpu" else conv2d_cudnn
    return conv(a, weight, bias, stride, padding, dilation, groups, residual, act)


B.register("conv2d_stats", "native", supports=_conv2d_stats_native_supports, kernel=False)(_composed_stats("native"))
B.register("conv2d_means", "native", supports=_conv2d_native_supports, kernel=False)(_composed_means("native"))
# ==== end of the native implementation ========================================================


# ==== triton implementation: implicit-GEMM kernel with fused prologue and epilogue ===============
# fastres.kernels.conv.conv2d_kernel runs the whole forward (prologue BN-act / addend, bias,
# residual, activation) in one kernel, on CUDA or on CPU under TRITON_INTERPRET=1. The prologue's
# BN arguments are folded into a per-channel fp32 (scale, shift) on the host; `pre_training` only
# changes the backward, which stays on the reference. Every tensor goes in with its strides:
# channels_last is the fast layout (contiguous channel chunks), NCHW runs uncopied but with strided
# loads. Kernels are imported on first use: TRITON_INTERPRET is read when a kernel is decorated.
def _triton_conv2d_supports(x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias,
                            pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act):
    from fastres.ops.bn_act import triton_supports
    why = triton_supports(x, weight, bias, pre_weight, pre_bias, pre_mean, pre_invstd, addend, residual,
                          same_shape=addend, same_shape_name="addend")
    if why is not None:
        return why
    if weight.dim() != 4 or weight.dtype != x.dtype or (addend is not None and addend.dtype != x.dtype):
        return f"weight/addend dtype {weight.dtype} or rank differs from the input's ({x.dtype}, 4-D)"
    shape = out_shape(x, weight, stride, padding, dilation)
    if min(shape) <= 0:
        return f"empty output {tuple(shape)}"
    return None


def _dot_precision(x: Tensor) -> str:
    """fp32 convs use TF32 tensor cores on CUDA when torch allows it for cuDNN (its default)."""
    return "tf32" if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"


@B.register("conv2d", "triton", supports=_triton_conv2d_supports)
def conv2d_triton(x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias, pre_mean,
                  pre_invstd, pre_act, pre_training, addend, residual, act, *, config=None, mix=None,
                  stats=False, means=False):
    """One fused implicit-GEMM kernel; `config` (a kernels.conv.Config) overrides the heuristic.
    Depthwise convs (groups == C) run the direct kernel instead unless a `config` is given.
    `mix`: the kernel's NUM_MIX arguments (fastres.ops.mix), x then being input 0 of the sum.
    `stats`: return (out, mean, var), the output's batch statistics from the kernel's epilogue;
    `means`: return (out, means), the (N, K) means of each sample's output channels from it."""
    import os

    import triton

    from fastres.kernels import conv as K
    from fastres.kernels import depthwise as D
    from fastres.ops.bn_act import triton_device
    if mix is None and config is None and D.unsupported(x.shape[1], weight.shape[0], groups) is None:
        return conv2d_depthwise_triton(x, weight, bias, stride, padding, dilation, pre_weight, pre_bias,
                                       pre_mean, pre_invstd, pre_act, addend, residual, act, stats=stats,
                                       means=means)
    scale, shift = ref.scale_shift(pre_weight, pre_bias, pre_mean, pre_invstd, x)
    shape = out_shape(x, weight, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x, weight))
    n, _, h, w = x.shape
    k, cg, r, s = weight.shape
    kg = k // groups
    cfg = config or K.pick_config(cg, kg, x.element_size(), groups=groups)
    gpt = K.groups_per_tile(cg, kg, groups, x.element_size()) if cfg.PACK_GROUPS else 1
    grid = (_row_tiles(shape, cfg.BLOCK_M, means), triton.cdiv(gpt * kg, cfg.BLOCK_N), triton.cdiv(groups, gpt))
    part, sums = _partials(grid[0], k, x.device, stats, means)
    zero4 = (0, 0, 0, 0)
    res_k = residual.shape[1] if residual is not None else 0
    with triton_device(x):
        B.launcher(K.conv2d_kernel)[grid](
            x, weight, bias if bias is not None else x, scale if scale is not None else x,
            shift if shift is not None else x, addend if addend is not None else x,
            residual if residual is not None else x, out,
            n, h, w, shape[2], shape[3], cg, kg, groups, gpt * cg, gpt * kg,
            *x.stride(), *(addend.stride() if addend is not None else zero4), *weight.stride(),
            *(residual.stride() if residual is not None else zero4), res_k, *out.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            R=r, S=s, HAS_ADDEND=addend is not None, HAS_PRE_SCALE=scale is not None,
            HAS_PRE_SHIFT=shift is not None, PRE_ACT=K.ACTS[pre_act], HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, ACT=K.ACTS[act], DOT_PRECISION=_dot_precision(x),
            DOT_UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_C=cfg.BLOCK_C, PACK_GROUPS=cfg.PACK_GROUPS,
            stats_ptr=part, STATS=stats, means_ptr=sums, MEANS=means, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **(mix or {}))
        return _results(out, part, sums)


@B.register("conv2d_stats", "triton", supports=_triton_conv2d_supports)
def _conv2d_stats_triton(*args):
    return conv2d_triton(*args, stats=True)


@B.register("conv2d_means", "triton", supports=_triton_conv2d_supports)
def _conv2d_means_triton(*args):
    return conv2d_triton(*args, means=True)


def _row_tiles(shape: Sequence[int], block_m: int, per_sample: bool) -> int:
    """Row tiles of an (N, K, OH, OW) output (kernels.conv.pixel_tile): over all N*OH*OW pixels,
    or `per_sample`, over each sample's OH*OW apart."""
    import triton
    n, pixels = shape[0], shape[2] * shape[3]
    return n * triton.cdiv(pixels, block_m) if per_sample else triton.cdiv(n * pixels, block_m)


def _partials(rows: int, k: int, device: torch.device, stats: bool, means: bool):
    """The epilogue's fp32 partial buffers: (count, mean, M2) per row tile and channel for `stats`,
    sums per row tile and channel for `means` (None when not asked for)."""
    part = torch.empty((3, rows, k), dtype=torch.float32, device=device) if stats else None
    sums = torch.empty((rows, k), dtype=torch.float32, device=device) if means else None
    return part, sums


def _results(out: Tensor, part: Optional[Tensor], sums: Optional[Tensor]):
    """out, with its batch statistics merged from `part` and/or its per-sample channel means
    summed from `sums` (each sample's row tiles in turn; a fixed order, so deterministic)."""
    from fastres.ops.bn_act import combine_stats
    extra = [] if part is None else list(combine_stats(part))
    if sums is not None:
        n, k, oh, ow = out.shape
        extra.append(sums.view(n, -1, k).sum(1) / (oh * ow))
    return (out, *extra) if extra else out


def conv2d_depthwise_triton(x, weight, bias, stride, padding, dilation, pre_weight, pre_bias, pre_mean,
                            pre_invstd, pre_act, addend, residual, act, *, config=None, stats=False,
                            means=False):
    """A depthwise conv (groups == C, K = m*C) in one direct kernel with the same fusions;
    `config` (a kernels.depthwise.Config) overrides the heuristic; `stats`, `means` as for
    conv2d_triton."""
    import triton

    from fastres.kernels import depthwise as D
    from fastres.kernels.conv import ACTS
    from fastres.ops.bn_act import triton_device
    scale, shift = ref.scale_shift(pre_weight, pre_bias, pre_mean, pre_invstd, x)
    shape = out_shape(x, weight, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x, weight))
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    cfg = config or D.pick_config(k, x.stride(1) == 1 and c > 1, x.element_size())
    grid = (_row_tiles(shape, cfg.BLOCK_M, means), triton.cdiv(k, cfg.BLOCK_C))
    part, sums = _partials(grid[0], k, x.device, stats, means)
    zero4 = (0, 0, 0, 0)
    res_k = residual.shape[1] if residual is not None else 0
    with triton_device(x):
        B.launcher(D.depthwise_conv2d_kernel)[grid](
            x, weight, bias if bias is not None else x, scale if scale is not None else x,
            shift if shift is not None else x, addend if addend is not None else x,
            residual if residual is not None else x, out,
            n, h, w, shape[2], shape[3], k, k // c,
            *x.stride(), *(addend.stride() if addend is not None else zero4),
            weight.stride(0), weight.stride(2), weight.stride(3),
            *(residual.stride() if residual is not None else zero4), res_k, *out.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            R=r, S=s, HAS_ADDEND=addend is not None, HAS_PRE_SCALE=scale is not None,
            HAS_PRE_SHIFT=shift is not None, PRE_ACT=ACTS[pre_act], HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, ACT=ACTS[act],
            BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C, stats_ptr=part, STATS=stats, means_ptr=sums, MEANS=means,
            num_warps=cfg.num_warps)
        return _results(out, part, sums)
# ==== end of the triton implementation ========================================================
