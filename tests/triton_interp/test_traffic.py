"""fastres.traffic: the Triton load/store counter against analytic bytes, the aten counter against
inputs + outputs, and fused vs eager bytes of the residual blocks (small shapes; the stage-shape
table is `fastres gpu-report --traffic`). Needs TRITON_INTERPRET=1 (run by tests/ops/test_triton.py)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 for the whole process (run via tests/ops/test_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402

from fastres import traffic as T  # noqa: E402
from tests.utils import assert_close  # noqa: E402

CL = torch.channels_last
ops = torch.ops.fastres


@pytest.mark.parametrize("dtype, layout, residual", [
    (torch.float32, "channels_last", True), (torch.bfloat16, "channels_last", False),
    (torch.bfloat16, "nchw", True), (torch.float32, "nchw", False)], ids=str)
def test_bn_act_launch_bytes(dtype, layout, residual):
    """One bn_act launch: x read once, out written once, residual read once, the fp32 per-channel
    scale and shift once; requested bytes count every program's loads of the vectors again."""
    n, c, h, w = 2, 48, 7, 9
    x = torch.randn(n, c, h, w).to(dtype)
    x = x.to(memory_format=CL) if layout == "channels_last" else x
    res = torch.randn_like(x) if residual else None
    w_, b_ = torch.rand(c) + 0.5, torch.randn(c)
    mean, invstd = torch.randn(c), torch.rand(c) + 0.5
    with T.counting() as cnt:
        ops.bn_act(x, w_, b_, mean, invstd, res, "relu", False, "triton")
    assert [lc.kernel for lc in cnt.launches] == ["bn_act_kernel"]
    launch = cnt.launches[0]
    act = x.numel() * x.element_size()
    assert launch.unique == act * (3 if residual else 2) + 2 * c * 4
    assert launch.requested >= launch.unique
    # the host folds BN into per-channel vectors: no pass over the activation outside the kernel
    assert cnt.aten_bytes < act, cnt.aten


def test_aten_counter_inputs_plus_outputs():
    a, b = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    nb = a.numel() * 4
    vec = torch.randn(8)
    with T.counting() as c:
        y = torch.add(a, b)                      # 2 reads + 1 write
    assert c.aten_bytes == 3 * nb, c.aten
    with T.counting() as c:
        y.relu_()                                # in place: read + write
        y.mul(y)                                 # one input counted once, + output
    assert c.aten == {"relu_": [1, 2 * nb], "mul": [1, 2 * nb]}
    with T.counting() as c:                      # views and allocations move nothing
        a.permute(0, 2, 3, 1), a.view(4, -1).t(), a[:, :4], torch.empty(10), torch.empty_like(a)
    assert c.aten_bytes == 0, c.aten
    with T.counting() as c:
        a.copy_(b)                               # src read, dst written (not read)
        a.to(torch.bfloat16)                     # 4 bytes read + 2 written per element
        a * vec.view(1, 8, 1, 1).expand(4, 8, 5, 5)   # a broadcast operand: its 8 distinct elements
    moved = {op: v for op, v in c.aten.items() if v[1]}
    assert moved == {"copy_": [1, 2 * nb], "_to_copy": [1, nb + nb // 2], "mul": [1, 2 * nb + 8 * 4]}, c.aten


def test_packed_groups_use_whole_sectors():
    """ResNeXt's 4-channel groups: one group per program fetches a 32-byte sector for 8 bytes of
    bf16 channels; packed groups read each pixel's channels of 8 groups as one run. Same unique
    bytes and the same output either way."""
    from fastres.kernels import conv as K
    from fastres.ops.conv import conv2d_triton
    x = torch.randn(1, 128, 8, 8).bfloat16().to(memory_format=CL)
    w = torch.randn(128, 4, 3, 3).bfloat16().to(memory_format=CL)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 32, None, None, None, None, "identity", False, None, None, "relu")
    runs = {}
    for name, cfg in (("one", K.Config(64, 32, 16, 4, 3)), ("packed", K.pick_config(4, 4, 2, groups=32))):
        with T.counting() as c:
            runs[name] = (conv2d_triton(*args, config=cfg), c)
    assert K.pick_config(4, 4, 2, groups=32).PACK_GROUPS
    (y1, one), (y2, packed) = runs["one"], runs["packed"]
    assert_close(y2, y1, dtype=torch.bfloat16, name="packed vs one group per program")
    assert one.launches[0].unique == packed.launches[0].unique
    assert one.sector_use < 0.3 < 0.8 < packed.sector_use, (one.sector_use, packed.sector_use)


# small versions of the stage shapes (same blocks, same code paths: identity shortcut, bf16,
# channels_last); the stage shapes themselves are in `fastres gpu-report --traffic`
SMALL = {
    "Bottleneck": lambda: T._tv_bottleneck(64, 16, 1),
    "PreActBottleneck": lambda: T._timm_preact(64, 64, 1),
}


@pytest.fixture(scope="module")
def small_rows():
    return {fam: {r.mode: r for r in T.compare(fam, fam, make, T._image(64, 8), shape="64-16-64 8x8")}
            for fam, make in SMALL.items()}


@pytest.mark.parametrize("family", list(SMALL))
def test_fused_inference_below_goal(small_rows, family):
    r = small_rows[family]["inference"]
    assert r.kernels.get("conv2d_kernel") and not r.fallbacks, (r.kernels, r.fallbacks)
    assert r.goal == 0.6
    assert r.ratio <= r.goal, f"{family} inference: fused/eager {r.ratio:.2f} > {r.goal}"


@pytest.mark.parametrize("family", list(SMALL))
def test_fused_training_forward_below_eager(small_rows, family):
    """The training forward runs fused (Triton), below eager's bytes; the whole training ratio is
    reported, not asserted (the backward runs ATen's convolution_backward between the fused ops)."""
    r = small_rows[family]["training"]
    assert r.kernels.get("conv2d_kernel") and r.kernels.get("batch_stats_combine_kernel"), r.kernels
    # every BN after a conv takes its statistics from the conv's epilogue; only the pre-activation
    # block's first BN, of the block's input, reads its tensor for them
    assert r.kernels.get("batch_stats_partial_kernel", 0) == {"Bottleneck": 0, "PreActBottleneck": 1}[family], r.kernels
    assert not r.fallbacks, r.fallbacks
    fused_forward = r.fused_img - r.fused_backward_img
    eager_forward = r.eager_img - r.eager_backward_img
    assert 0 < fused_forward < eager_forward, (fused_forward, eager_forward)
