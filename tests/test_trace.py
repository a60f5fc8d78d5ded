"""torch.compile sees the Triton kernels of a fused op, not an opaque call.

Under AOTAutograd (torch.compile's tracer) an op that runs on the Triton backend is decomposed into
its kernel launches (fastres.ops.library), as `torch.library.triton_op` does; an op on any other
backend stays one call. No GPU is needed to check the graphs: the tensors are fake, and torch's
analysis of which arguments a kernel writes compiles it for an offline sm_90 target
(fastres.gpu_report.offline_target), so each launch node also says which tensors its kernel writes.
The numerics of the same kernels are tested in tests/triton_interp.
"""
import collections

import pytest
import torch
import torchvision.models.resnet as tv
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

import fastres
from fastres import backend as B
from fastres.gpu_report import offline_target

F = torch.ops.fastres
CL = torch.channels_last


def trace(fn, *inputs):
    """The forward and backward graphs AOTAutograd makes of fn (inputs: fake tensors)."""
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm)
    out = aot_function(fn, fw_compiler=keep, bw_compiler=keep)(*inputs)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.sum().backward()
    return graphs


def launches(gm) -> collections.Counter:
    """(kernel name, the arguments it writes) of every Triton launch in the graph."""
    return collections.Counter(
        (kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, tuple(n.kwargs["tensors_to_clone"]))
        for n in gm.graph.nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target))


def fastres_calls(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "fastres." in str(n.target)]


@pytest.fixture
def fake_cuda():
    """Inside: a factory of fake CUDA tensors (cl: channels_last)."""
    with offline_target(90), FakeTensorMode():
        yield lambda *shape, cl=False: torch.empty(shape, device="cuda",
                                                   memory_format=CL if cl else torch.contiguous_format)


def _conv(x, w, b, res, backend="triton"):
    return F.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], x.shape[1] // w.shape[1], b, b, None, None, "relu", False,
                    None, res, "relu", backend)


OPS = {
    # name: (fn of the fake-tensor factory, the launches expected)
    "conv2d": (lambda t: _conv(t(2, 8, 9, 9, cl=True), t(8, 8, 3, 3), t(8), t(2, 8, 9, 9, cl=True)),
               {("conv2d_kernel", ("out_ptr",)): 1}),
    "conv2d_depthwise": (lambda t: _conv(t(2, 8, 9, 9, cl=True), t(8, 1, 3, 3), t(8), None),
                         {("depthwise_conv2d_kernel", ("out_ptr",)): 1}),
    "conv2d_stats": (lambda t: F.conv2d_stats(t(2, 8, 9, 9, cl=True), t(16, 8, 1, 1), None, [1, 1], [0, 0],
                                              [1, 1], 1, None, None, None, None, "identity", False, None, None,
                                              "identity", "triton"),
                     {("conv2d_kernel", ("out_ptr", "stats_ptr")): 1,
                      ("batch_stats_combine_kernel", ("mean_ptr", "var_ptr")): 1}),
    "conv2d_means": (lambda t: F.conv2d_means(t(2, 8, 9, 9, cl=True), t(8, 1, 3, 3), t(8), [1, 1], [1, 1], [1, 1], 8,
                                              None, None, None, None, "identity", False, None, None, "identity",
                                              "triton"),
                     {("depthwise_conv2d_kernel", ("out_ptr", "means_ptr")): 1}),
    "bn_act": (lambda t: F.bn_act(t(2, 8, 5, 5), t(8), t(8), t(8), t(8), t(2, 8, 5, 5), "relu", True, "triton"),
               {("bn_act_kernel", ("out_ptr",)): 1}),
    "se_gate_act": (lambda t: F.se_gate_act(t(2, 8, 5, 5, cl=True), t(2, 8), None, "relu", "triton"),
                    {("se_gate_act_kernel", ("out_ptr",)): 1}),
    "bn_act_pool2d": (lambda t: F.bn_act_pool2d(t(2, 8, 9, 9, cl=True), t(8), t(8), t(8), t(8), "relu", True, "max",
                                                [3, 3], [2, 2], [1, 1], "triton"),
                      {("bn_act_pool2d_kernel", ("out_ptr",)): 1}),
}


@pytest.mark.parametrize("name", list(OPS))
def test_a_triton_op_traces_into_its_kernels(fake_cuda, name):
    """Each op is its kernel launches, and each kernel writes only the tensors the op allocated."""
    make, expected = OPS[name]
    (graph,) = trace(lambda: make(fake_cuda))
    assert fastres_calls(graph) == []
    assert launches(graph) == expected


def _fake_state(module, device, train):
    """A function of the fake mode that makes the module's state_dict its fake tensors on `device`,
    parameters requiring grad if `train` (state_dict() itself runs before the mode is entered)."""
    state, params = module.state_dict(), {name for name, _ in module.named_parameters()}
    return lambda mode: {k: mode.from_tensor(v).to(device).requires_grad_(train and k in params)
                         for k, v in state.items()}


def test_converted_bottleneck_in_eval_is_three_conv_kernels():
    block = fastres.convert(tv.Bottleneck(64, 16), backend="triton").eval()
    fake_state = _fake_state(block, "cuda", False)
    with offline_target(90), FakeTensorMode() as mode:
        state = fake_state(mode)
        x = torch.empty(2, 64, 9, 9, device="cuda", memory_format=CL)
        (graph,) = trace(lambda st, x: functional_call(block, st, (x,)), state, x)
    assert fastres_calls(graph) == []
    assert launches(graph) == {("conv2d_kernel", ("out_ptr",)): 3}   # BN folded, residual + ReLU in conv3


def test_converted_bottleneck_training_step_traces_forward_and_backward(monkeypatch):
    """Autograd's engine needs a CUDA context for a backward of CUDA tensors, even fake ones, so the
    training graphs are traced on fake CPU tensors with the Triton backend allowed on CPU (nothing
    runs)."""
    monkeypatch.setattr(B, "_triton_missing", lambda device: None)
    block = fastres.convert(tv.Bottleneck(64, 16), backend="triton").train()
    fake_state = _fake_state(block, "cpu", True)
    with offline_target(90), FakeTensorMode() as mode:
        state = fake_state(mode)
        x = torch.empty(2, 64, 9, 9, memory_format=CL).requires_grad_()
        forward, backward = trace(lambda st, x: functional_call(block, st, (x,)), state, x)
    assert fastres_calls(forward) == [] and fastres_calls(backward) == []
    fwd, bwd = launches(forward), launches(backward)
    # forward: each conv with its output's statistics in the epilogue; bn3 + residual + ReLU
    assert fwd[("conv2d_kernel", ("out_ptr", "stats_ptr"))] == 3
    assert fwd[("bn_act_kernel", ("out_ptr",))] == 1
    # backward: two BN-act backward passes per BN (sums, then the input gradient; bn3's first pass
    # also writes the shortcut's gradient), the recomputed BN-ReLU of conv2's and conv3's inputs
    assert {key: n for key, n in bwd.items() if key[0] == "bn_act_backward_kernel"} == {
        ("bn_act_backward_kernel", ("gres_ptr", "part_ptr")): 1, ("bn_act_backward_kernel", ("part_ptr",)): 2,
        ("bn_act_backward_kernel", ("gx_ptr",)): 3}
    assert bwd[("bn_act_kernel", ("out_ptr",))] == 2
    assert "aten.convolution_backward.default" in {str(n.target) for n in backward.graph.nodes}


def _family(name: str) -> tuple[torch.nn.Module, int]:
    """A block (or a small model) of the family and its input channels."""
    if name == "densenet":
        import torchvision.models.densenet as tvd
        return tvd.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2), 3
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models import res2net, resnetv2, rexnet
    return {"preact": lambda: resnetv2.PreActBottleneck(32, 64, stride=2, bottle_ratio=0.25, conv_layer=create_conv2d,
                                                        norm_layer=BatchNormAct2d, proj_layer=resnetv2.DownsampleConv),
            "res2net": lambda: res2net.Bottle2neck(32, 8, 1, None, base_width=26, scale=4,
                                                   norm_layer=torch.nn.BatchNorm2d),
            "rexnet": lambda: rexnet.LinearBottleneck(32, 40, 1, exp_ratio=6.0, se_ratio=0.25)}[name](), 32


WITHOUT_TRITON = {f"fastres.{op}.default" for op, table in B._TABLES.items() if "triton" not in table}


@pytest.mark.parametrize("name", ["preact", "res2net", "rexnet", "densenet"])
def test_every_block_family_traces_into_kernels_in_training(monkeypatch, name):
    """Forward and backward graphs of a training step keep no fastres op that has Triton kernels."""
    monkeypatch.setattr(B, "_triton_missing", lambda device: None)
    original, channels = _family(name)
    block = fastres.convert(original, backend="triton", strict=True).train()
    fake_state = _fake_state(block, "cpu", True)
    with offline_target(90), FakeTensorMode() as mode:
        state = fake_state(mode)
        x = torch.empty(3, channels, 9 if channels > 3 else 32, 9 if channels > 3 else 32,
                        memory_format=CL).requires_grad_()
        forward, backward = trace(lambda st, x: functional_call(block, st, (x,)), state, x)
    assert set(fastres_calls(forward) + fastres_calls(backward)) <= WITHOUT_TRITON
    kernels = {k for k, _ in launches(forward) + launches(backward)}
    assert {"conv2d_kernel", "bn_act_backward_kernel"} <= kernels
    if name == "rexnet":
        assert {"depthwise_conv2d_kernel", "se_gate_act_kernel", "se_gate_act_backward_kernel"} <= kernels
    if name == "densenet":   # the stem's BN-ReLU-maxpool
        assert "bn_act_pool2d_kernel" in {k for k, _ in launches(forward)}


@pytest.mark.parametrize("name", ["preact", "res2net", "rexnet", "densenet"])
def test_every_block_family_traces_into_kernels_in_eval_on_cuda(name):
    """Inference graphs on fake CUDA tensors: every op with Triton kernels is its launches."""
    original, channels = _family(name)
    block = fastres.convert(original, backend="triton", strict=True).eval()
    fake_state = _fake_state(block, "cuda", False)
    with offline_target(90), FakeTensorMode() as mode:
        state = fake_state(mode)
        x = torch.empty(3, channels, 9 if channels > 3 else 32, 9 if channels > 3 else 32, device="cuda",
                        memory_format=CL)
        (graph,) = trace(lambda st, x: functional_call(block, st, (x,)), state, x)
    assert set(fastres_calls(graph)) <= WITHOUT_TRITON
    kernels = {k for k, _ in launches(graph)}
    assert "conv2d_kernel" in kernels or "depthwise_conv2d_kernel" in kernels
    if name == "rexnet":
        assert {"depthwise_conv2d_kernel", "se_gate_act_kernel"} <= kernels
    if name == "densenet":   # the stem's BN-ReLU-maxpool, the transitions' BN-ReLU-avgpool
        assert launches(graph)[("bn_act_pool2d_kernel", ("out_ptr",))] == 2


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_other_backends_stay_one_opaque_call(backend):
    with FakeTensorMode():
        x, w = torch.empty(2, 8, 9, 9, memory_format=CL), torch.empty(8, 8, 3, 3)
        (graph,) = trace(lambda x, w: _conv(x, w, None, None, backend), x, w)
    assert fastres_calls(graph) == ["fastres.conv2d.default"]
    assert launches(graph) == {}


def test_export_keeps_the_op(monkeypatch):
    """An exported program is meant to be portable: it keeps the op, not Triton source."""
    monkeypatch.setattr(B, "_triton_missing", lambda device: None)

    class Conv(torch.nn.Module):
        def forward(self, x, w):
            return _conv(x, w, None, None)
    program = torch.export.export(Conv(), (torch.randn(2, 8, 9, 9), torch.randn(8, 8, 3, 3)))
    assert fastres_calls(program.graph_module) == ["fastres.conv2d.default"]
