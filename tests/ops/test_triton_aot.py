"""Every Triton kernel variant the launchers can pick compiles for sm_80 and sm_90 without a GPU,
without register spills and within the shared-memory limit (fastres.gpu_report). Runs in the
normal process: kernels must be JIT functions, not interpreted ones."""
import os

import pytest

pytest.importorskip("triton", reason="the AOT check needs triton installed")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: kernels are interpreted and cannot be compiled", allow_module_level=True)

from fastres import gpu_report as G  # noqa: E402

if not os.path.exists(G.cuobjdump()):
    pytest.skip(f"{G.cuobjdump()} missing (triton's nvidia backend)", allow_module_level=True)


@pytest.mark.parametrize("arch", G.ARCHS, ids=lambda a: f"sm_{a}")
def test_conv2d_compiles_without_spills(arch):
    from fastres.kernels import conv as K
    rows = G.conv_rows(arch)
    bad = [f"{r.variant} {r.config}: {'; '.join(r.problems)}" for r in rows if r.problems]
    assert not bad, "\n" + G.format_table(rows)
    for dname in ("bf16", "fp32"):
        elem = G.DTYPES[dname].itemsize
        compiled = {r.config for r in rows if r.variant.startswith(dname)}
        assert len(compiled) == len(K.all_configs(elem))
    assert all(r.cp_async and r.regs <= G.MAX_REGS for r in rows)
    assert all(r.wgmma if arch == 90 else r.mma for r in rows), G.format_table(rows)


@pytest.mark.parametrize("arch", G.ARCHS, ids=lambda a: f"sm_{a}")
def test_bn_act_kernels_compile_without_spills(arch):
    from fastres.kernels import bn_act as K
    rows = G.bn_act_rows(arch)
    bad = [f"{r.kernel} {r.variant} {r.config}: {'; '.join(r.problems)}" for r in rows if r.problems]
    assert not bad, "\n" + G.format_table(rows)
    assert len({r.config for r in rows if r.kernel == "bn_act"}) == len(K.all_blocks())
    backward = {r.config for r in rows if r.kernel == "bn_act_backward"}
    assert len(backward) == len(K.all_blocks(K.BACKWARD_ELEMENTS))


@pytest.mark.parametrize("arch", G.ARCHS, ids=lambda a: f"sm_{a}")
def test_se_kernels_compile_without_spills(arch):
    from fastres.kernels import se as K
    rows = G.se_rows(arch)
    bad = [f"{r.kernel} {r.variant} {r.config}: {'; '.join(r.problems)}" for r in rows if r.problems]
    assert not bad, "\n" + G.format_table(rows)
    for kernel in ("se_gate_act", "se_gate_act_backward"):
        assert len({r.config for r in rows if r.kernel == kernel}) == len(K.all_blocks())
    assert any(r.kernel == "se_gate_grad_combine" for r in rows)


@pytest.mark.parametrize("arch", G.ARCHS, ids=lambda a: f"sm_{a}")
def test_depthwise_conv2d_compiles_without_spills(arch):
    from fastres.kernels import depthwise as K
    rows = G.depthwise_rows(arch)
    bad = [f"{r.variant} {r.config}: {'; '.join(r.problems)}" for r in rows if r.problems]
    assert not bad, "\n" + G.format_table(rows)
    for dname in ("bf16", "fp32"):
        compiled = {r.config for r in rows if r.variant.startswith(dname)}
        assert len(compiled) == len(K.all_configs(G.DTYPES[dname].itemsize)) >= 7
    assert all(r.regs <= G.MAX_REGS and not r.mma and not r.wgmma for r in rows), G.format_table(rows)


@pytest.mark.parametrize("arch", G.ARCHS, ids=lambda a: f"sm_{a}")
def test_bn_act_pool2d_compiles_without_spills(arch):
    from fastres.kernels import bn_act as KB
    from fastres.kernels import pool as K
    rows = G.pool_rows(arch)
    bad = [f"{r.variant} {r.config}: {'; '.join(r.problems)}" for r in rows if r.problems]
    assert not bad, "\n" + G.format_table(rows)
    assert len({r.config for r in rows}) == len(KB.all_blocks(K.ELEMENTS))
    assert len(rows) == 2 * 2 * len(KB.all_blocks(K.ELEMENTS))   # bf16, fp32 x max, avg


def test_resource_usage_parses_cuobjdump():
    """The parser reads what cuobjdump prints (and a report row flags spills and smem)."""
    row = G.Row("k", "v", "c", 80, 255, 16, 200 * 1024, True, False, True, False)
    assert len(row.problems) == 2
    assert not G.Row("k", "v", "c", 90, 200, 0, 200 * 1024, False, True, True, False).problems
