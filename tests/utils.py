"""The one tolerance table every numeric test uses, and comparison helpers."""
from __future__ import annotations

import math

import torch

# (atol, rtol) on the max-abs error relative to the reference's scale:
#   max|actual - expected| <= atol + rtol * max|expected|
# fp32/fp64 bounds cover reassociation of sums (oneDNN vs ATen order); half types their rounding.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (1e-3, 4e-3),
}


# GRADIENTS in half precision are checked by relative L2 error against a float64 run of the same
# (rounded) weights and input, and must be within max(GRAD_RTOL_L2, 2 x eager's own error in
# that dtype). A max-error bound does not fit there: ReLU masks flip where a pre-activation
# rounds across zero, and BN's training backward is a small difference of large terms, so eager
# bf16 itself lands 0.01-0.15 from float64 depending on the seed (Basic/Bottleneck, 20 seeds).
GRAD_RTOL_L2 = {torch.bfloat16: 0.1, torch.float16: 0.02}


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN state (affine parameters, running statistics) in every BN-like layer, so eval
    folding is exercised and nothing hides behind zero-initialised last BNs."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    return model


def tol(dtype: torch.dtype, reduced: int = 1) -> tuple[float, float]:
    """(atol, rtol) for `dtype`; atol grows with sqrt of the number of terms reduced (dW, dB)."""
    atol, rtol = TOL[dtype]
    return atol * math.sqrt(max(reduced, 1)), rtol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 reduced: int = 1, name: str = "") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = tol(dtype or expected.dtype, reduced)
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{name}: non-finite values differ"
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    bound = atol + rtol * scale
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} (scale {scale:.3g}, {dtype or expected.dtype})"


def assert_as_accurate(actual: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, *,
                       dtype: torch.dtype, name: str = "") -> None:
    """`actual` is no further from the float64 `oracle` than the table allows, or than twice
    eager's own error in `dtype`: for outputs that float noise is known to dominate (half
    precision, BN over few values per channel in train mode)."""
    o = oracle.detach().double()
    atol, rtol = tol(dtype)
    bound = max(atol + rtol * o.abs().max().item(), 2 * (eager.detach().double() - o).abs().max().item())
    err = (actual.detach().double() - o).abs().max().item()
    assert err <= bound, f"{name}: max abs error {err:.3g} vs float64 > {bound:.3g} ({dtype})"


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_same_buffers(new: torch.nn.Module, ref: torch.nn.Module, *, dtype: torch.dtype) -> None:
    """Running statistics within the table; integer buffers (num_batches_tracked) exactly."""
    bn = dict(new.named_buffers())
    for name, b in ref.named_buffers():
        if b.is_floating_point():
            assert_close(bn[name], b, dtype=dtype, name=name)
        else:
            assert torch.equal(bn[name], b), f"{name}: {bn[name]} != {b}"


def assert_same_step(ref: torch.nn.Module, new: torch.nn.Module, x: torch.Tensor, *, train: bool) -> torch.Tensor:
    """Run `ref` and `new` (same weights) on `x` in train or eval mode and compare outputs; in
    train mode also the input and parameter gradients of a random projection of the output,
    the running statistics and num_batches_tracked. Returns new's output."""
    import copy
    dtype = x.dtype
    half = dtype in GRAD_RTOL_L2
    runs = {"ref": ref, "new": new}
    if half:
        runs["ref64"] = copy.deepcopy(ref).double()
    outs = {}
    proj = None
    for key, m in runs.items():
        m.train(train)
        xi = (x.double() if key == "ref64" else x).detach().clone().requires_grad_(train)
        y = m(xi)
        outs[key] = {"out": y}
        if train:
            if proj is None:
                proj = torch.randn(y.shape, dtype=torch.float64)
            (y.double() * proj).sum().backward()
            outs[key]["input"] = xi.grad
            outs[key].update({n: p.grad for n, p in m.named_parameters()})
    if half:
        assert_as_accurate(outs["new"]["out"], outs["ref"]["out"], outs["ref64"]["out"], dtype=dtype, name="output")
    else:
        assert_close(outs["new"]["out"], outs["ref"]["out"], dtype=dtype, name="output")
    if train:
        for name, g in outs["ref"].items():
            if name == "out":
                continue
            gn = outs["new"][name]
            if g is None:
                assert gn is None or not gn.any(), f"{name}: unexpected grad"
            elif half:
                g64 = outs["ref64"][name]
                bound = max(GRAD_RTOL_L2[dtype], 2 * rel_l2(g, g64))
                err = rel_l2(gn, g64)
                assert err <= bound, f"grad {name}: relative L2 error {err:.3g} vs float64 > {bound:.3g} ({dtype})"
            else:
                reduced = 1 if name == "input" else max(1, x.numel() // max(g.numel(), 1))
                assert_close(gn, g, dtype=dtype, reduced=reduced, name=f"grad {name}")
        assert_same_buffers(new, ref, dtype=dtype)
    return outs["new"]["out"]
