"""How fastres defines its ops: `torch.library.define` + `torch.library.impl`, one level below
`torch.library.custom_op`.

`custom_op` wraps every call of a Python kernel in a torch.compile guard and an aliasing check of
its results; for ops as short as ours (a few kernels on small tensors) that costs about 35 us a
call more than a plain kernel registration on a 2-core CPU (a 17-argument conv2d without grad:
123 against 89 us, its kernel function alone 73 us), as much as some of the kernels. The schema
is still inferred from the type annotations (`torch.library.infer_schema`), the kernel is
registered once for every device (CompositeExplicitAutograd), and fake and autograd formulas go
through `torch.library` (`register_fake`, `register_autograd`), so the ops are the same to
torch.compile, opcheck and autograd. Kernels must not return a view of an input (`unaliased` in fastres.ops.bn_act).

Under torch.compile (AOTAutograd's FunctionalTensorMode, also make_fx) an op whose backend picks
Triton kernels is decomposed into them, as `torch.library.triton_op` does: its Python kernel is
traced, each launch becoming a `triton_kernel_wrapper` node, so the compiler launches the kernels
itself, without the op's Python dispatch around them. An op on any other implementation stays one
opaque call (`fastres.backend.Opaque`), and so does every op under torch.export, whose programs
keep custom ops rather than Triton source, and under TRITON_INTERPRET=1 (torch's `wrap_triton`
hands back interpreted kernels as they are, and they cannot run on the tracer's fake tensors).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from fastres import backend as B

LIB = torch.library.Library("fastres", "DEF")
IMPLS: dict[str, Callable] = {}   # op name -> its Python kernel (fastres.traffic calls it directly)


class Op:
    """One fastres op: call it like the function it was made from."""

    def __init__(self, name: str, fn: Callable, mutates_args: Sequence[str]) -> None:
        LIB.define(name + torch.library.infer_schema(fn, mutates_args=tuple(mutates_args)))
        LIB.impl(name, fn, "CompositeExplicitAutograd")
        IMPLS[name] = fn
        self.fn = fn
        self.qualname = f"fastres::{name}"
        self.default = getattr(torch.ops.fastres, name).default
        self.__doc__, self.__name__ = fn.__doc__, name
        torch.library.register_torch_dispatch(self.qualname, FunctionalTensorMode, self._decompose, lib=LIB)

    def _decompose(self, mode, func, types, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
        from torch.export._trace import custom_triton_ops_decomposition_disabled
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented  # another tensor subclass: let it handle the op first
        if not custom_triton_ops_decomposition_disabled() and os.environ.get("TRITON_INTERPRET") != "1":
            try:
                with B.decomposing(), mode:
                    return self.fn(*args, **kwargs)
            except B.Opaque:
                pass  # what was recorded (launches into the op's new buffers) is dead code
        return mode.__torch_dispatch__(func, types, args, kwargs)

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=LIB)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=LIB)


def op(qualname: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], Op]:
    """Decorator, in place of `torch.library.custom_op(qualname, mutates_args=...)`."""
    namespace, name = qualname.split("::")
    if namespace != "fastres":
        raise ValueError(f"fastres ops live in the fastres namespace, got {qualname!r}")
    return lambda fn: Op(name, fn, mutates_args)
