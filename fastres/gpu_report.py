"""Compile every Triton kernel variant the launchers can pick for sm_80 and sm_90 without a GPU, and
report what ptxas made of it: registers, spill (stack) bytes, shared memory, and which tensor-core /
async-copy instructions the code uses.

How: a stand-in Triton driver whose current target is GPUTarget("cuda", arch, 32) is activated
and each kernel is `warmup`-compiled with CPU tensors of the layout a real launch passes
(channels_last activations and weights, so the stride-1 and 16-byte-divisibility
specialisations match a real launch). Registers and stack come from the cubin through
`cuobjdump --dump-resource-usage` (shipped with Triton); a non-zero stack frame in these kernels
means ptxas spilled. Shared memory is Triton's dynamic allocation plus any static shared.
Must run in a process WITHOUT TRITON_INTERPRET=1 (interpreted kernels do not compile).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block (opt-in maximum)
MAX_REGS = 255


@dataclass(frozen=True)
class Row:
    kernel: str
    variant: str     # dtype, fusion flags
    config: str      # tile and launch parameters
    arch: int
    regs: int
    stack: int       # bytes of stack frame: ptxas spills
    smem: int        # bytes of shared memory per block
    mma: bool        # mma.sync (Ampere tensor cores)
    wgmma: bool      # wgmma (Hopper warpgroup tensor cores)
    cp_async: bool   # cp.async (Ampere async global->shared copies)
    tma: bool        # cp.async.bulk (Hopper TMA)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.stack:
            out.append(f"spills ({self.stack} B stack)")
        if self.smem > SMEM_LIMIT[self.arch]:
            out.append(f"shared memory {self.smem} B > {SMEM_LIMIT[self.arch]} B")
        return out


# ---- compiling without a GPU -------------------------------------------------------------------
def _fake_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class OfflineCUDA(DriverBase):
        """Just enough of a driver for JITFunction.warmup to compile for `arch`."""

        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("offline compile driver: kernels are compiled, never launched")

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("offline compile driver: nothing runs, nothing to time")

        def get_current_device(self) -> str:
            return f"offline-sm_{arch}"   # one compile cache per arch

        def get_current_stream(self, device=None) -> int:
            return 0

    return OfflineCUDA()


@contextlib.contextmanager
def offline_target(arch: int) -> Iterator[None]:
    """Within the block, Triton compiles for sm_<arch> (nothing can be launched)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("fastres.gpu_report needs a process without TRITON_INTERPRET=1")
    from triton.runtime.driver import driver
    prev = driver._active
    driver.set_active(_fake_driver(arch))
    try:
        yield
    finally:
        driver._active = prev


def cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of the (single) function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def _row(kernel: str, variant: str, config: str, arch: int, compiled) -> Row:
    use = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Row(kernel, variant, config, arch, use["REG"], use["STACK"] + use["LOCAL"],
               compiled.metadata.shared + use["SHARED"], bool(re.search(r"\bmma\.sync", ptx)),
               "wgmma." in ptx, "cp.async.cg" in ptx or "cp.async.ca" in ptx, "cp.async.bulk" in ptx)


# ---- the variants each launcher can pick ---------------------------------------------------------
CL = torch.channels_last
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _conv_variants():
    """(name, flags): the plain conv, the one with every fusion on (the most registers), the
    training one (BN-ReLU prologue, the output's batch statistics in the epilogue) and the one
    before a squeeze-excitation (folded BN, per-sample tiles with the channel sums in the epilogue)."""
    from fastres.kernels.conv import ACTS, MAX_MIX
    plain = dict(HAS_ADDEND=False, HAS_PRE_SCALE=False, HAS_PRE_SHIFT=False, PRE_ACT=0,
                 HAS_BIAS=False, HAS_RESIDUAL=False, ACT=0)
    full = dict(HAS_ADDEND=True, HAS_PRE_SCALE=True, HAS_PRE_SHIFT=True, PRE_ACT=ACTS["silu"],
                HAS_BIAS=True, HAS_RESIDUAL=True, ACT=ACTS["silu"])
    train = dict(plain, HAS_PRE_SCALE=True, HAS_PRE_SHIFT=True, PRE_ACT=ACTS["relu"], STATS=True,
                 stats_ptr=torch.empty(3 * 64, dtype=torch.float32))
    # fastres.ops.mix: the weighted sum of 3 (and of MAX_MIX, with the smaller chunks the launcher
    # then picks) slots of one buffer in the input load, with the only fusions that op has
    mix = dict(plain, HAS_BIAS=True, ACT=ACTS["silu"], mix_ptr=torch.empty(MAX_MIX, dtype=torch.float32),
               s_mix=2 * 64 * 16 * 16, NUM_MIX=3)
    se = dict(plain, HAS_BIAS=True, MEANS=True, means_ptr=torch.empty(64, dtype=torch.float32))
    return [("plain", plain), ("all-fusions", full), ("train-stats", train), ("se-means", se), ("mix", mix),
            (f"mix{MAX_MIX}", dict(mix, NUM_MIX=MAX_MIX))]


def conv_rows(arch: int, dtypes=("bf16", "fp32"), variants: Optional[list] = None) -> list[Row]:
    """Every conv config, with each variant that can use it. Plain tiles compile a 3x3 64 -> 64
    conv; packed-groups tiles a ResNeXt-like one, 32 groups of 4 channels, with the groups per
    program the launcher would pass. Every stride is a multiple of 16 elements, as in ResNet stages."""
    from fastres.kernels import conv as K
    rows = []
    for dname in dtypes:
        dt = DTYPES[dname]
        x = torch.empty(2, 64, 16, 16, dtype=dt).to(memory_format=CL)
        out = torch.empty(2, 64, 16, 16, dtype=dt).to(memory_format=CL)
        vec = torch.empty(64, dtype=torch.float32)
        prec = "tf32" if dt == torch.float32 else "ieee"
        for vname, flags in variants or _conv_variants():
            for cfg in K.all_configs(x.element_size(), flags.get("NUM_MIX", 0)):
                cg, groups = (4, 16) if cfg.PACK_GROUPS else (64, 1)
                gpt = K.groups_per_tile(cg, cg, groups, x.element_size()) if cfg.PACK_GROUPS else 1
                w = torch.empty(64, cg, 3, 3, dtype=dt).to(memory_format=CL)
                with offline_target(arch):
                    k = K.conv2d_kernel.warmup(
                        x, w, vec, vec, vec, x, out, out, 2, 16, 16, 16, 16, cg, 64 // groups, groups, gpt * cg, gpt * cg,
                        *x.stride(), *x.stride(), *w.stride(), *out.stride(), 64, *out.stride(),
                        1, 1, 1, 1, 1, 1, R=3, S=3, **flags, DOT_PRECISION=prec, DOT_UPCAST=False,
                        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_C=cfg.BLOCK_C,
                        PACK_GROUPS=cfg.PACK_GROUPS, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        grid=(1,))
                conf = f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_C} w{cfg.num_warps} s{cfg.num_stages}"
                if cfg.PACK_GROUPS:
                    conf += f" packed ({gpt} groups of {cg})"
                rows.append(_row("conv2d", f"{dname} {vname}", conf, arch, k))
    return rows


def bn_act_rows(arch: int, dtypes=("bf16", "fp32")) -> list[Row]:
    from fastres.kernels import bn_act as K
    rows = []
    for dname in dtypes:
        dt = DTYPES[dname]
        x = torch.empty(2, 64, 16, 16, dtype=dt).to(memory_format=CL)
        vec = torch.empty(64, dtype=torch.float32)
        for bp, bc in K.all_blocks():
            conf = f"{bp}x{bc} w{K.NUM_WARPS}"
            with offline_target(arch):
                k = K.bn_act_kernel.warmup(
                    x, vec, vec, x, x, 512, 64, 256, 16, *x.stride(), *x.stride(), *x.stride(),
                    HAS_SCALE=True, HAS_SHIFT=True, HAS_RESIDUAL=True, ACT=3, BLOCK_P=bp, BLOCK_C=bc,
                    num_warps=K.NUM_WARPS, grid=(1,))
            rows.append(_row("bn_act", f"{dname} all-fusions", conf, arch, k))
            with offline_target(arch):
                k = K.batch_stats_partial_kernel.warmup(
                    x, vec, 512, 64, 256, 16, 4, *x.stride(), BLOCK_P=bp, BLOCK_C=bc,
                    num_warps=K.NUM_WARPS, grid=(1,))
            rows.append(_row("batch_stats_partial", dname, conf, arch, k))
    for final in (True, False):
        with offline_target(arch):
            k = K.batch_stats_combine_kernel.warmup(vec, vec, vec, 64, 600, 25, BLOCK_C=1024, FINAL=final,
                                                    num_warps=K.NUM_WARPS, grid=(1,))
        rows.append(_row("batch_stats_combine", "fp32 " + ("final" if final else "slices"), f"1024 w{K.NUM_WARPS}",
                         arch, k))
    return rows + bn_act_backward_rows(arch, dtypes)


def _bn_act_backward_variants():
    """(name, flags): pass 1 with every output (eval-mode gx, residual grad, both sums) and the
    training-mode gx pass, both with silu recomputed from x and the residual (the most loads)."""
    common = dict(ACT=3, HAS_SCALE=True, HAS_SHIFT=True, HAS_RESIDUAL=True)
    return [("pass1 all-outputs", dict(common, STORE_GRES=True, SUM_G=True, SUM_GX=True, GX=1)),
            ("pass2 train-gx", dict(common, STORE_GRES=False, SUM_G=False, SUM_GX=False, GX=2))]


def _tiles(blocks, dname: str):
    """(BLOCK_P, BLOCK_C, a 2x64x16x16 input) per tile of an elementwise kernel: one channel wide
    is the NCHW tile, wider ones are channels_last tiles."""
    for bp, bc in blocks:
        x = torch.empty(2, 64, 16, 16, dtype=DTYPES[dname])
        yield bp, bc, (x if bc == 1 else x.to(memory_format=CL))


def bn_act_backward_rows(arch: int, dtypes=("bf16", "fp32")) -> list[Row]:
    from fastres.kernels import bn_act as K
    rows = []
    vec = torch.empty(64, dtype=torch.float32)
    for dname in dtypes:
        for bp, bc, x in _tiles(K.all_blocks(K.BACKWARD_ELEMENTS), dname):
            for vname, flags in _bn_act_backward_variants():
                with offline_target(arch):
                    k = K.bn_act_backward_kernel.warmup(
                        x, x, vec, vec, x, x, vec, vec, x, x, vec, 512, 64, 256, 16, 4, *x.stride() * 6,
                        **flags, BLOCK_P=bp, BLOCK_C=bc, num_warps=K.NUM_WARPS, grid=(1,))
                rows.append(_row("bn_act_backward", f"{dname} {vname}", f"{bp}x{bc} w{K.NUM_WARPS}", arch, k))
    with offline_target(arch):
        k = K.bn_act_backward_combine_kernel.warmup(vec, vec, vec, 64, 4, 512.0, TRAINING=True, BLOCK_C=1024,
                                                    num_warps=K.NUM_WARPS, grid=(1,))
    rows.append(_row("bn_act_backward_combine", "fp32 training", f"1024 w{K.NUM_WARPS}", arch, k))
    return rows


def se_rows(arch: int, dtypes=("bf16", "fp32")) -> list[Row]:
    """se_gate_act forward and backward with a residual and silu (the most loads), every tile."""
    from fastres.kernels import se as K
    rows = []
    vec = torch.empty(64, dtype=torch.float32)
    for dname in dtypes:
        dt = DTYPES[dname]
        gate = torch.empty(2, 64, dtype=dt)
        nchw = torch.empty(2, 64, 16, 16, dtype=dt)
        # pick_blocks gives NCHW inputs every tile shape, channels_last ones those 2+ channels wide
        for bp, bc in K.all_blocks():
            conf = f"{bp}x{bc} w{K.NUM_WARPS}"
            for fmt, x in [("nchw", nchw)] + ([("cl", nchw.to(memory_format=CL))] if bc > 1 else []):
                with offline_target(arch):
                    k = K.se_gate_act_kernel.warmup(
                        x, gate, x, x, 64, 256, 16, *x.stride(), *gate.stride(), *x.stride() * 2,
                        HAS_RESIDUAL=True, ACT=3, BLOCK_P=bp, BLOCK_C=bc, num_warps=K.NUM_WARPS, grid=(1,))
                rows.append(_row("se_gate_act", f"{dname} {fmt} residual silu", conf, arch, k))
                with offline_target(arch):
                    k = K.se_gate_act_backward_kernel.warmup(
                        x, x, gate, x, x, x, x, vec, 2, 64, 256, 16, 4, *x.stride() * 2, *gate.stride(),
                        *x.stride() * 4, HAS_RESIDUAL=True, ACT=3, BLOCK_P=bp, BLOCK_C=bc,
                        num_warps=K.NUM_WARPS, grid=(1,))
                rows.append(_row("se_gate_act_backward", f"{dname} {fmt} residual silu", conf, arch, k))
        with offline_target(arch):
            k = K.se_gate_grad_combine_kernel.warmup(vec, gate, gate, 64, 128, 4, *gate.stride(),
                                                     BLOCK=K.COMBINE_BLOCK, num_warps=K.NUM_WARPS, grid=(1,))
        rows.append(_row("se_gate_grad_combine", dname, f"{K.COMBINE_BLOCK} w{K.NUM_WARPS}", arch, k))
    return rows


def depthwise_rows(arch: int, dtypes=("bf16", "fp32")) -> list[Row]:
    """The direct depthwise conv: every tile pick_config can return, plain and with every fusion."""
    from fastres.kernels import depthwise as K
    variants = [(name, flags) for name, flags in _conv_variants() if name in ("plain", "all-fusions", "train-stats", "se-means")]
    rows = []
    for dname in dtypes:
        dt = DTYPES[dname]
        for cfg in K.all_configs(dt.itemsize):
            # 3x3, 64 channels; one channel wide is the NCHW tile, wider ones channels_last tiles
            fmt = torch.contiguous_format if cfg.BLOCK_C == 1 else CL
            x = torch.empty(2, 64, 16, 16, dtype=dt).to(memory_format=fmt)
            w = torch.empty(64, 1, 3, 3, dtype=dt).to(memory_format=fmt)
            vec = torch.empty(64, dtype=torch.float32)
            for vname, flags in variants:
                with offline_target(arch):
                    k = K.depthwise_conv2d_kernel.warmup(
                        x, w, vec, vec, vec, x, x, x, 2, 16, 16, 16, 16, 64, 1,
                        *x.stride(), *x.stride(), w.stride(0), w.stride(2), w.stride(3), *x.stride(), 64, *x.stride(),
                        1, 1, 1, 1, 1, 1, R=3, S=3, **flags, BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C,
                        num_warps=cfg.num_warps, grid=(1,))
                rows.append(_row("depthwise_conv2d", f"{dname} {vname}",
                                 f"{cfg.BLOCK_M}x{cfg.BLOCK_C} w{cfg.num_warps}", arch, k))
    return rows


def pool_rows(arch: int, dtypes=("bf16", "fp32")) -> list[Row]:
    """bn_act_pool2d, max and average, with the BN-act (silu, the longest), at the ResNet stem's
    3x3 window and DenseNet's 2x2 one, every tile pick_blocks can return for the kernel's ELEMENTS."""
    from fastres.kernels import bn_act as KB
    from fastres.kernels import pool as K
    rows = []
    vec = torch.empty(64, dtype=torch.float32)
    for dname in dtypes:
        for bp, bc, x in _tiles(KB.all_blocks(K.ELEMENTS), dname):
            for kind, k in (("max", 3), ("avg", 2)):
                with offline_target(arch):
                    compiled = K.bn_act_pool2d_kernel.warmup(
                        x, vec, vec, x, 128, 64, 16, 16, 64, 8, *x.stride(), *x.stride(), 2, 2, k // 2, k // 2,
                        R=k, S=k, MAX=kind == "max", HAS_SCALE=True, HAS_SHIFT=True, ACT=3, BLOCK_P=bp,
                        BLOCK_C=bc, num_warps=KB.NUM_WARPS, grid=(1,))
                rows.append(_row("bn_act_pool2d", f"{dname} {kind}{k}x{k} silu", f"{bp}x{bc} w{KB.NUM_WARPS}", arch,
                                 compiled))
    return rows


def report(archs=ARCHS) -> list[Row]:
    return [r for a in archs for r in conv_rows(a) + bn_act_rows(a) + se_rows(a) + depthwise_rows(a) + pool_rows(a)]


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "variant", "config", "arch", "regs", "spill", "smem KB", "mma", "wgmma", "cp.async", "tma", "")
    lines = [head]
    for r in rows:
        lines.append((r.kernel, r.variant, r.config, f"sm_{r.arch}", str(r.regs), str(r.stack),
                      f"{r.smem / 1024:.1f}", *("x" if f else "" for f in (r.mma, r.wgmma, r.cp_async, r.tma)),
                      "; ".join(r.problems)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def summary(rows: list[Row]) -> str:
    """Worst registers, spill and shared memory per (kernel, arch)."""
    worst: dict[tuple[str, int], list[int]] = {}
    for r in rows:
        w = worst.setdefault((r.kernel, r.arch), [0, 0, 0, 0])
        w[0], w[1], w[2], w[3] = max(w[0], r.regs), max(w[1], r.stack), max(w[2], r.smem), w[3] + 1
    return "\n".join(
        f"{k:<20} sm_{a}  variants {w[3]:>3}  max regs {w[0]:>3}  max spill {w[1]} B  "
        f"max smem {w[2] / 1024:.1f} KB (limit {SMEM_LIMIT[a] // 1024} KB)"
        for (k, a), w in sorted(worst.items()))


if __name__ == "__main__":
    rows = report()
    print(format_table(rows))
    print()
    print(summary(rows))
