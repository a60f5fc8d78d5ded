"""The triton backend on CPU.

The numeric tests need TRITON_INTERPRET=1 for a whole process (it is read when a kernel is
decorated), so they live in tests/triton_interp, which the main run does not collect, and
`test_interpreter_suite` runs them here in a subprocess. This file also checks, in-process, the
launchers' support checks and the tile heuristic.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastres.ops.bn_act import triton_supports
from fastres.ops.conv import _triton_conv2d_supports

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton", reason="the triton backend needs triton installed")


def test_interpreter_suite():
    env = {k: v for k, v in os.environ.items() if k != "FASTRES_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/triton_interp", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    m = re.search(r"(\d+) passed", proc.stdout)
    assert m and int(m.group(1)) >= 150, tail
    assert not re.search(r"\d+ (failed|skipped|error)", proc.stdout), tail


def _conv(x, w, **kw):
    args = dict(bias=None, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, pre_weight=None,
                pre_bias=None, pre_mean=None, pre_invstd=None, pre_act="identity", pre_training=False,
                addend=None, residual=None, act="identity")
    args.update(kw)
    return _triton_conv2d_supports(x, w, *args.values())


def test_conv2d_supports_reasons():
    x, w = torch.randn(2, 8, 5, 5), torch.randn(4, 8, 3, 3)
    assert _conv(x, w) is None
    assert _conv(x, w, pre_training=True, pre_mean=torch.zeros(8), pre_invstd=torch.ones(8)) is None
    assert "dtype torch.float64" in _conv(x.double(), w.double())
    assert "differs from the input" in _conv(x, w.bfloat16())
    assert "addend shape" in _conv(x, w, addend=torch.randn(2, 8, 5, 1))
    assert _conv(x, w, residual=torch.randn(2, 3, 5, 5)) is None   # onto the first 3 channels
    assert "empty" in _conv(torch.randn(0, 8, 5, 5), w)
    assert "4-D" in _conv(torch.randn(2, 8, 5), torch.randn(4, 8, 3))


def test_bn_act_supports_reasons():
    x = torch.randn(2, 3, 4, 4)
    assert triton_supports(x) is None
    assert "dtype torch.int32" in triton_supports(x.int())
    assert "4-D" in triton_supports(torch.randn(2, 3))
    assert "empty" in triton_supports(torch.randn(0, 3, 4, 4))
    assert "residual shape (1, 3, 4, 4)" in triton_supports(x, same_shape=torch.randn(1, 3, 4, 4))


def test_conv_tile_heuristic():
    from fastres.kernels import conv as K
    for elem in (2, 4):
        configs = K.all_configs(elem)
        for cg in (1, 3, 4, 16, 37, 64, 256):
            for kg in (1, 4, 50, 64, 128, 2048):
                cfg = K.pick_config(cg, kg, elem)
                assert cfg in configs
                assert cfg.BLOCK_C * elem <= 128 and cfg.num_warps <= 4   # triton#1254
                assert cfg.BLOCK_N >= min(kg, max(K.BLOCK_NS)) and cfg.BLOCK_C >= min(cg, 128 // elem, max(K.BLOCK_CS))
                assert min(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_C) >= 16      # tl.dot's minimum
                assert not cfg.PACK_GROUPS


def test_conv_packed_groups_heuristic():
    """Narrow groups share a program: as many (a power of two) as fill a 64-byte tile both ways,
    never more than the groups there are, and the tile covers all of their channels."""
    from fastres.kernels import conv as K
    for elem in (2, 4):
        width = K.PACK_BYTES // elem
        configs = K.all_configs(elem)
        for cg, kg, groups in [(4, 4, 32), (8, 8, 32), (16, 16, 64), (6, 5, 8), (4, 4, 3), (2, 3, 20), (32, 32, 32)]:
            gpt = K.groups_per_tile(cg, kg, groups, elem)
            cfg = K.pick_config(cg, kg, elem, groups=groups)
            assert cfg in configs
            assert cfg.PACK_GROUPS == (gpt > 1) == (2 * max(cg, kg) <= width)
            if gpt > 1:
                assert gpt & (gpt - 1) == 0 and gpt < 2 * groups and gpt * max(cg, kg) <= width
                assert 2 * gpt * max(cg, kg) > width or gpt >= groups     # as many as fit
                assert cfg.BLOCK_C >= gpt * cg and cfg.BLOCK_N >= gpt * kg and cfg.BLOCK_C * elem <= 128
    assert K.groups_per_tile(4, 4, 32, 2) == 8 and K.groups_per_tile(4, 4, 32, 4) == 4   # resnext50_32x4d
    assert K.groups_per_tile(32, 32, 32, 2) == 1
