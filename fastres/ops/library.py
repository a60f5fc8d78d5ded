"""How fastres defines its ops: `torch.library.define` + `torch.library.impl`, one level below
`torch.library.custom_op`.

`custom_op` wraps every call of a Python kernel in a torch.compile guard and an aliasing check of
its results; for ops as short as ours (a few kernels on small tensors) that costs about 35 us a
call more than a plain kernel registration on a 2-core CPU (a 17-argument conv2d without grad:
123 against 89 us, its kernel function alone 73 us), as much as some of the kernels. The schema is still inferred from the type
annotations (`torch.library.infer_schema`), the kernel is registered once for every device
(CompositeExplicitAutograd), and fake and autograd formulas go through `torch.library`
(`register_fake`, `register_autograd`), so the ops are the same to torch.compile, opcheck and
autograd. Kernels must not return a view of an input (`unaliased` in fastres.ops.bn_act).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

LIB = torch.library.Library("fastres", "DEF")
IMPLS: dict[str, Callable] = {}   # op name -> its Python kernel (fastres.traffic calls it directly)


class Op:
    """One fastres op: call it like the function it was made from."""

    def __init__(self, name: str, fn: Callable, mutates_args: Sequence[str]) -> None:
        LIB.define(name + torch.library.infer_schema(fn, mutates_args=tuple(mutates_args)))
        LIB.impl(name, fn, "CompositeExplicitAutograd")
        IMPLS[name] = fn
        self.qualname = f"fastres::{name}"
        self.default = getattr(torch.ops.fastres, name).default
        self.__doc__, self.__name__ = fn.__doc__, name

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
