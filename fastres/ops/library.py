"""How fastres defines its ops: `torch.library.define` + `torch.library.impl`, one level below
`torch.library.custom_op`.

`custom_op` wraps every call of a Python kernel in a torch.compile guard and an aliasing check of
its results; for ops as short as ours (a few kernels on small tensors) that costs about 35 us a
call more than a plain kernel registration on a 2-core CPU (a 17-argument conv2d without grad:
123 against 89 us, its kernel function alone 73 us), as much as some of the kernels. The schema
is still inferred from the type annotations (`torch.library.infer_schema`), the kernel is
registered once for every device (CompositeExplicitAutograd), fake kernels go through
`torch.library.register_fake`, and autograd formulas keep `torch.library.register_autograd`'s
contract, registered at the Autograd key by a leaner kernel of the same construction
(`_autograd_kernel`), so the ops are the same to torch.compile, opcheck and autograd. Kernels
must not return a view of an input (`unaliased` in fastres.ops.bn_act).

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
        """`torch.library.register_autograd`'s contract (setup_context(ctx, inputs, output), then
        backward(ctx, *grads) -> one gradient per input, `ctx.needs_input_grad` per input), with
        a leaner kernel where the op has no tensor-list argument; see `_autograd_kernel`."""
        schema = self.default._schema
        if any(str(a.type).startswith("List[Tensor]") for a in schema.arguments):
            torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=LIB)
        else:
            LIB.impl(self.__name__, _autograd_kernel(self.default, backward, setup_context), "Autograd",
                     with_keyset=True)


def _autograd_kernel(op, backward: Callable, setup_context: Callable) -> Callable:
    """The Autograd kernel `torch.library.register_autograd` builds (an autograd.Function around
    the op's redispatch below autograd), less its per-call `fill_defaults`, which reads the
    schema's argument list afresh for each argument: 115 us a conv2d call (17 arguments), 34 us a
    bn_act (9), on a 2-core CPU. fastres schemas have no defaults (checked here), so the
    dispatcher always passes every argument and there is nothing to fill in."""
    defaulted = [a.name for a in op._schema.arguments if a.has_default_value()]
    if defaulted:
        raise TypeError(f"fastres ops take every argument; {op} has defaults for {defaulted}")
    after_autograd = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        keyset, args = args[-1], args[:-1]
        with torch._C._AutoDispatchBelowAutograd():
            out = op.redispatch(keyset & after_autograd, *args)
        setup_context(ctx, args, out)
        return out

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]
        try:
            grads = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*(grads if isinstance(grads, tuple) else (grads,)), None)   # None: the keyset's

    node = type(f"{op._namespace}_{op._opname}", (torch.autograd.Function,),  # node fastres_<op>Backward
                {"forward": staticmethod(forward), "backward": staticmethod(backward_)})

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return node.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & after_autograd, *args)
    return kernel


def op(qualname: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], Op]:
    """Decorator, in place of `torch.library.custom_op(qualname, mutates_args=...)`."""
    namespace, name = qualname.split("::")
    if namespace != "fastres":
        raise ValueError(f"fastres ops live in the fastres namespace, got {qualname!r}")
    return lambda fn: Op(name, fn, mutates_args)
