"""Op families at ResNet-50 stage shapes: the eager composition vs torch.compile of it vs each
fastres backend's fused op. `infer` times the forward, `train` forward + backward of the sum.
extra_info also carries `bytes_moved`: the inputs + outputs of every aten op the step dispatches
(fastres.traffic's counter; a fused native kernel counts as the one op it is, the eager
composition as its chain of ops), so the memory passes a fusion saves sit beside its time."""
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as TF

from bench.conftest import run
from fastres import functional as F
from fastres.benchmark import Case, fastres_backend, group_name, synchronize, tuned_if
from fastres.traffic import aten_bytes

CL = torch.channels_last


def _bn_vectors(c: int) -> list[torch.Tensor]:
    return [torch.randn(c), torch.rand(c) + 0.5, torch.rand(c) + 0.5, torch.randn(c)]   # mean, var, weight, bias


def _bn_act_add(shape):
    """eval BN + residual add + ReLU: the end of a v1 block."""
    x, r = torch.randn(shape).to(memory_format=CL), torch.randn(shape).to(memory_format=CL)
    mean, var, w, b = _bn_vectors(shape[1])
    eager = lambda x, r: torch.relu(TF.batch_norm(x, mean, var, w, b, False) + r)
    fused = lambda x, r, backend: F.bn_act(x, mean, var, w, b, False, residual=r, backend=backend)
    return (x, r), eager, fused


def _batch_stats(shape):
    """training BN's batch statistics (mean, biased variance)."""
    x = torch.randn(shape).to(memory_format=CL)
    eager = lambda x: torch.var_mean(x, (0, 2, 3), correction=0)
    fused = lambda x, backend: torch.ops.fastres.batch_stats(x, backend)
    return (x,), eager, fused


def _conv_bn_add_relu(shape):
    """1x1 conv, eval BN folded, residual add, ReLU: the last conv of a bottleneck."""
    c = shape[1]
    x, r = torch.randn(shape).to(memory_format=CL), torch.randn(shape[0], 4 * c, *shape[2:]).to(memory_format=CL)
    wt = (torch.randn(4 * c, c, 1, 1) * c ** -0.5).to(memory_format=CL)
    mean, var, w, b = _bn_vectors(4 * c)
    eager = lambda x, r: torch.relu(TF.batch_norm(TF.conv2d(x, wt), mean, var, w, b, False) + r)
    fused = lambda x, r, backend: F.conv2d_bn_add_act(x, wt, None, mean, var, w, b, False, 0.1, 1e-5, r,
                                                      backend=backend)
    return (x, r), eager, fused


def _bn_relu_conv(shape):
    """eval BN-ReLU pre-activation + 3x3 conv: a pre-activation unit's inner conv."""
    c = shape[1]
    x = torch.randn(shape).to(memory_format=CL)
    wt = (torch.randn(c, c, 3, 3) * (9 * c) ** -0.5).to(memory_format=CL)
    mean, var, w, b = _bn_vectors(c)
    eager = lambda x: TF.conv2d(torch.relu(TF.batch_norm(x, mean, var, w, b, False)), wt, padding=1)
    fused = lambda x, backend: F.bn_act_conv2d(x, mean, var, w, b, False, weight=wt, padding=1, backend=backend)
    return (x,), eager, fused


def _se_gate_add_relu(shape):
    """squeeze-excitation gate, residual add, ReLU: the end of an SE-ResNet block."""
    x, r = torch.randn(shape).to(memory_format=CL), torch.randn(shape).to(memory_format=CL)
    gate = torch.randn(shape[0], shape[1])
    eager = lambda x, r: torch.relu(x * torch.sigmoid(gate)[:, :, None, None] + r)
    fused = lambda x, r, backend: F.se_gate_act(x, gate, residual=r, act="relu", backend=backend)
    return (x, r), eager, fused


def _dwconv_bn_se_means(shape):
    """3x3 depthwise conv, eval BN folded, and the SE's channel means of its output: ReXNet's
    depthwise conv and the squeeze of the SE after it."""
    c = shape[1]
    x = torch.randn(shape).to(memory_format=CL)
    wt = (torch.randn(c, 1, 3, 3) / 3).to(memory_format=CL)
    mean, var, w, b = _bn_vectors(c)

    def eager(x):
        y = TF.batch_norm(TF.conv2d(x, wt, padding=1, groups=c), mean, var, w, b, False)
        return y, y.mean((2, 3))
    fused = lambda x, backend: F.conv2d_bn_act(x, wt, None, mean, var, w, b, False, padding=1, groups=c,
                                               act="identity", with_means=True, backend=backend)
    return (x,), eager, fused


# name: (build, input shape, modes)
SUBJECTS = {
    "bn_add_relu": (_bn_act_add, (8, 256, 56, 56), ("infer", "train")),
    "batch_stats": (_batch_stats, (8, 256, 56, 56), ("infer",)),
    "conv1x1_bn_add_relu": (_conv_bn_add_relu, (8, 64, 56, 56), ("infer", "train")),
    "bn_relu_conv3x3": (_bn_relu_conv, (8, 64, 56, 56), ("infer", "train")),
    "se_gate_add_relu": (_se_gate_add_relu, (8, 256, 56, 56), ("infer", "train")),
    "dwconv_bn_se_means": (_dwconv_bn_se_means, (8, 300, 28, 28), ("infer",)),
}
CASES = [(s, m) for s, (_, _, modes) in SUBJECTS.items() for m in modes]


def _step(fn: Callable, inputs: tuple, train: bool, device: torch.device) -> Callable:
    """One synchronised forward (no grad), or forward + backward of the output's sum."""
    if not train:
        def infer():
            with torch.no_grad():
                out = fn(*inputs)
            synchronize(device)
            return out
        return infer
    leaves = [t.detach().requires_grad_() for t in inputs]

    def fwd_bwd():
        out = fn(*leaves)
        (out if isinstance(out, torch.Tensor) else out[0]).sum().backward()
        synchronize(device)
        for t in leaves:
            t.grad = None
    return fwd_bwd


def _case(provider: str, eager: Callable, fused: Callable, inputs: tuple, train: bool) -> Case:
    t0 = time.perf_counter()
    tuned = False
    if provider == "eager":
        fn = eager
    elif provider == "compile":
        fn = torch.compile(eager)
    else:
        backend, tuned = fastres_backend(provider)
        fn = lambda *xs: fused(*xs, backend=backend)
    step = tuned_if(tuned, _step(fn, inputs, train, inputs[0].device))
    step()
    return Case(provider, step, time.perf_counter() - t0, None)


EXCLUDED_PROVIDERS = ("eager_cl",)   # the inputs are channels_last already


@pytest.mark.parametrize("subject, mode", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_op(benchmark, quick, baselines, device, subject, mode, provider):
    build, shape, _ = SUBJECTS[subject]
    if quick and provider == "compile":
        pytest.skip("quick mode compiles only in test_models.py (C++ codegen costs seconds per graph)")
    if quick:
        shape = (1, shape[1], 8, 8)
    torch.manual_seed(0)
    with device:   # every tensor the subject makes
        inputs, eager, fused = build(shape)
    benchmark.group = group_name(subject, shape, torch.float32, mode)
    case = _case(provider, eager, fused, inputs, mode == "train")
    if provider != "compile":   # inductor's generated kernels bypass the dispatcher
        benchmark.extra_info["bytes_moved"] = aten_bytes(case.step)
    run(benchmark, case, quick=quick, batch=shape[0], baselines=baselines)
