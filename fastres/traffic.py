"""Modeled global-memory traffic of the fused Triton kernel sequences against the eager op sequence,
counted on CPU in Triton's interpreter, with a roofline estimate on H100 numbers.

Two counters run together inside `counting()`:

* Triton: every load and store of an interpreted kernel goes through
  `triton.runtime.interpreter.InterpreterBuilder.create_masked_load / create_masked_store` (and
  `create_atomic_rmw`); the wrappers read the pointer array and the mask. Per launch they give the
  bytes requested (masked-on elements x element size, every program's every access) and the unique
  bytes touched (distinct addresses read + distinct addresses written: the compulsory DRAM traffic
  of a GPU with a perfect cache within one launch), the distinct 32-byte sectors of the launch, and
  the 32-byte sectors each single load or store of a program touches, summed over accesses (the
  transactions of a GPU without cache reuse between instructions: a coalescing measure; bytes
  requested / access sector bytes is the fraction of each fetched sector that is used).
* aten: a TorchDispatchMode adds, for every aten op that is not part of a Triton launch, the bytes
  of the distinct elements of its tensor inputs (read) and outputs (written), each distinct view
  once per op; an in-place op reads and writes its tensor, `copy_` and `out=` only write theirs.
  Views, metadata ops and allocations (`empty*`, `as_strided`, `view`, `t`, `permute`, ...) move no
  data and count 0. The same counter sees the eager model and every aten op the fused path still
  runs (fallbacks, the reference backward, host-side folding of per-channel vectors).

So eager bytes = the sum of every eager op's inputs and outputs; fused bytes = unique bytes of every
Triton launch + the aten ops around them. `compare` runs a block both ways at batch 1 and 2 and
splits the bytes into a per-image slope and a per-batch constant (weights, per-channel vectors), so
bytes per image are reported at a stated batch without extrapolating anything else. Spatial sizes
are those given: nothing is scaled. FLOPs are those of the convolutions (2 x MACs; 3x the forward
in training: the data and weight gradients). The roofline time is max(bytes / 3.35 TB/s,
FLOPs / 989 TFLOP/s) per image: H100 SXM HBM3 bandwidth and dense bf16 peak. All figures are
modeled, not measured on a GPU.

Needs TRITON_INTERPRET=1 for the whole process (read when a kernel is decorated); `main()`
(`python -m fastres.traffic`, `fastres gpu-report --traffic`) prints the table of every block family.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

H100_BYTES_PER_S = 3.35e12      # HBM3, H100 SXM
H100_FLOPS = 989e12             # dense bf16 tensor-core peak, H100 SXM
GOALS = {("Bottleneck", "inference"): 0.6, ("Bottleneck", "training"): 0.7,
         ("PreActBottleneck", "inference"): 0.6, ("PreActBottleneck", "training"): 0.7}
SECTOR = 32

# aten ops that allocate or change metadata only (views are recognised from their schema)
_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "resize_",
         "_unsafe_view", "lift_fresh", "is_same_size", "sym_size", "sym_stride", "sym_numel",
         "sym_storage_offset", "_has_compatible_shallow_copy_type", "record_stream"}


# ---- the counters -----------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str
    phase: str = "forward"
    requested: int = 0   # bytes of every masked-on access of every program
    unique: int = 0      # distinct bytes read + distinct bytes written
    sectors: int = 0     # bytes of distinct 32-byte sectors read + written
    access_sectors: int = 0   # bytes of the 32-byte sectors of each access, summed over accesses
    _acc: dict = field(default_factory=dict, repr=False)  # (write, itemsize) -> [address arrays]

    def access(self, addrs: np.ndarray, itemsize: int, write: bool) -> None:
        self.requested += addrs.size * itemsize
        self.access_sectors += np.unique(addrs // SECTOR).size * SECTOR
        self._acc.setdefault((write, itemsize), []).append(addrs)

    def close(self) -> None:
        for write in (False, True):
            for (w, size), arrs in self._acc.items():
                if w != write:
                    continue
                a = np.unique(np.concatenate(arrs))
                self.unique += a.size * size
                self.sectors += np.unique(a // SECTOR).size * SECTOR
        self._acc = {}


@dataclass
class Counter:
    """Everything counted inside one `counting()` block."""
    launches: list[Launch] = field(default_factory=list)
    aten: dict[str, list[int]] = field(default_factory=dict)   # op -> [calls, bytes]
    phases: dict[str, int] = field(default_factory=dict)       # phase -> bytes (unique for kernels)
    phase: str = "forward"
    paused: bool = False   # aten ops are not counted while set
    _launch: Optional[Launch] = None

    # Triton side
    def _begin(self, name: str) -> None:
        if self._launch is not None:
            raise RuntimeError("fastres.traffic: nested Triton launch")
        self._launch = Launch(name, self.phase)

    def _end(self) -> None:
        launch, self._launch = self._launch, None
        launch.close()
        self.launches.append(launch)
        self.phases[self.phase] = self.phases.get(self.phase, 0) + launch.unique

    def _access(self, ptrs, mask, write: bool) -> None:
        if self._launch is None:
            raise RuntimeError("fastres.traffic: a load/store outside a kernel launch")
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        addrs = ptrs.data
        if mask is not None:
            addrs = addrs[np.broadcast_to(mask.data, addrs.shape)]
        self._launch.access(np.ravel(addrs).astype(np.uint64, copy=False), itemsize, write)

    # aten side
    def _aten(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        nbytes = 0
        if not (func.is_view or name in _FREE):
            reads, writes = _operands(func, args, kwargs, out)
            nbytes = sum(_distinct_bytes(t) for t in reads.values()) + sum(
                _distinct_bytes(t) for t in writes.values())
        entry = self.aten.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
        self.phases[self.phase] = self.phases.get(self.phase, 0) + nbytes

    # totals
    @property
    def kernel_bytes(self) -> int:
        return sum(lc.unique for lc in self.launches)

    @property
    def kernel_requested(self) -> int:
        return sum(lc.requested for lc in self.launches)

    @property
    def sector_use(self) -> float:
        """Bytes requested / bytes of the sectors each access touched, over every launch (1 = every
        fetched sector fully used; nan without launches)."""
        fetched = sum(lc.access_sectors for lc in self.launches)
        return self.kernel_requested / fetched if fetched else float("nan")

    @property
    def aten_bytes(self) -> int:
        return sum(b for _, b in self.aten.values())

    @property
    def total(self) -> int:
        return self.kernel_bytes + self.aten_bytes

    def kernels(self, phase: str = "forward") -> dict[str, int]:
        """Kernel name -> launches in `phase`."""
        out: dict[str, int] = {}
        for lc in self.launches:
            if lc.phase == phase:
                out[lc.kernel] = out.get(lc.kernel, 0) + 1
        return out


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a strided tensor covers (a stride-0 dim adds none)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return (n if t.numel() else 0) * t.element_size()


def _operands(func, args, kwargs, out) -> tuple[dict, dict]:
    """(read tensors, written tensors), each keyed by view. Arguments the schema marks as written
    are written (and read too, unless the op only overwrites them: `copy_`'s self, `out=`)."""
    reads: dict = {}
    writes: dict = {}
    schema = func._schema
    named = dict(zip((a.name for a in schema.arguments), args)) | dict(kwargs)
    overwrite_only = {"self"} if func.overloadpacket.__name__ == "copy_" else set()
    for a in schema.arguments:
        value = named.get(a.name)
        tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        written = a.alias_info is not None and a.alias_info.is_write
        for t in tensors:
            if written:
                writes[_key(t)] = t
            if not (written and (a.is_out or a.name in overwrite_only)):
                reads[_key(t)] = t
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            writes[_key(t)] = t
    return reads, writes


def _custom_op_impl(func) -> Optional[Callable]:
    """The Python kernel of a fastres op (called directly: dispatching the op again would come
    straight back to the mode)."""
    if func.namespace != "fastres":
        return None
    from fastres.ops.library import IMPLS
    return IMPLS.get(func._schema.name.split("::")[1])


class _AtenMode(TorchDispatchMode):
    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if c._launch is not None or c.paused:   # the interpreter's own host copies around a launch
            return func(*args, **kwargs)
        impl = _custom_op_impl(func)
        if impl is not None:   # a fastres custom op: count what its Python implementation runs
            with _AtenMode(c):
                return impl(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
            with _AtenMode(c):   # below autograd (in a custom op) composite ops arrive whole: count their parts
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        c._aten(func, args, kwargs, out)
        return out


def aten_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the inputs and outputs of every aten op that `fn()` dispatches (a fastres custom op
    counted through what its implementation runs: a native kernel is one op). Needs no
    interpreter: the aten counter alone, as for an eager model."""
    counter = Counter()
    with _AtenMode(counter):
        fn()
    return counter.aten_bytes


@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """Count Triton launches (interpreted) and aten ops inside the block."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fastres.traffic counts kernels in Triton's interpreter: run with "
                           "TRITON_INTERPRET=1 set before triton is imported")
    from triton.runtime import interpreter as ti
    counter = Counter()
    builder, fn_cls = ti.InterpreterBuilder, ti.InterpretedFunction
    saved = {name: getattr(builder, name) for name in ("create_masked_load", "create_masked_store",
                                                       "create_atomic_rmw") if hasattr(builder, name)}
    run = fn_cls.run

    def load(self, ptrs, mask, *a, **k):
        counter._access(ptrs, mask, write=False)
        return saved["create_masked_load"](self, ptrs, mask, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        counter._access(ptrs, mask, write=True)
        return saved["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def rmw(self, op, ptr, val, mask, *a, **k):
        counter._access(ptr, mask, write=False)
        counter._access(ptr, mask, write=True)
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *a, **k)

    def launch(self, *args, grid, warmup, **kwargs):
        if warmup:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        counter._begin(self.fn.__name__)
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter._end()

    builder.create_masked_load, builder.create_masked_store = load, store
    if "create_atomic_rmw" in saved:
        builder.create_atomic_rmw = rmw
    fn_cls.run = launch
    try:
        with _AtenMode(counter):
            yield counter
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        fn_cls.run = run


# ---- one block, eager vs fused ------------------------------------------------------------------
Inputs = Union[torch.Tensor, list]


def _tensors(x: Inputs) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def conv_flops(model: nn.Module, x: Inputs) -> int:
    """2 x multiply-adds of every nn.Conv2d in one forward of `model` on `x`."""
    total = [0]

    def hook(m, inp, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


@dataclass
class Run:
    """One counted pass (forward, or forward + backward) of a model."""
    bytes: int
    kernel_bytes: int
    kernel_requested: int
    sector_use: float
    aten_bytes: int
    phases: dict[str, int]
    kernels: dict[str, dict[str, int]]   # phase -> kernel -> launches
    aten: dict[str, list[int]]
    decisions: dict[str, list[tuple[str, str, str]]]   # phase -> distinct (op, backend, why)


def _crop(x: Inputs, size: int = 8) -> Inputs:
    """A small spatial corner of the input(s): enough for a warm-up pass."""
    if isinstance(x, torch.Tensor):
        return x[..., :size, :size]
    return [t[..., :size, :size] for t in x]


def measure(model: nn.Module, x: Inputs, *, training: bool) -> Run:
    """Count one steady-state pass. Inference: eval, no grad, after an uncounted warm-up pass (on a
    small corner of the input) that fills any cache, e.g. BN-folded weights. Training: train mode,
    forward + backward of sum(output) with every input requiring grad, as inside a network; the
    loss's gradient (ones, in the output's layout) is made uncounted, the same for every model."""
    from fastres import backend as B
    model.train(training)
    decisions = {}
    if training:
        for p in model.parameters():
            p.grad = None
        xs = [t.detach().clone().requires_grad_(True) for t in _tensors(x)]
        x = xs[0] if isinstance(x, torch.Tensor) else xs
    else:
        with torch.no_grad():
            model(_crop(x))
    with counting() as c:
        with B.recording() as rec:
            if training:
                y = model(x)
            else:
                with torch.no_grad():
                    model(x)
        decisions["forward"] = list(dict.fromkeys((op, b, why) for _, op, b, why in rec))
        if training:
            c.paused = True
            grad = torch.ones_like(y)
            c.paused = False
            c.phase = "backward"
            with B.recording() as rec:
                y.backward(grad)
            decisions["backward"] = list(dict.fromkeys((op, b, why) for _, op, b, why in rec))
    kernels = {phase: c.kernels(phase) for phase in decisions}
    return Run(c.total, c.kernel_bytes, c.kernel_requested, c.sector_use, c.aten_bytes, dict(c.phases), kernels,
               dict(c.aten), decisions)


@dataclass
class Row:
    block: str
    family: str
    shape: str
    mode: str                     # inference | training
    batch: int                    # bytes per image are given at this batch
    eager_img: float              # bytes per image
    fused_img: float
    ratio: float
    goal: Optional[float]
    flops_img: float
    eager_us: float               # roofline us per image on H100
    fused_us: float
    eager_fixed: float            # bytes per batch that do not grow with it (weights, vectors)
    fused_fixed: float
    fused_kernel_img: float       # unique bytes of the Triton launches, per image
    fused_requested_img: float    # bytes the Triton launches requested (every program), per image
    eager_backward_img: float     # bytes of the backward pass, per image (0 in inference)
    fused_backward_img: float
    kernels: dict[str, int]       # forward Triton kernels -> launches
    fallbacks: list[str]          # fastres forward ops that did not run on triton, with why
    backward_kernels: dict[str, int]
    backward_reference: list[str]   # fastres backward ops that chose the reference
    top_aten: list[tuple[str, float]]   # the fused path's largest aten ops, bytes per image
    note: str = ""
    sector_use: float = float("nan")    # fused launches: bytes requested / bytes of the sectors fetched

    @property
    def met(self) -> Optional[bool]:
        return None if self.goal is None or self.ratio != self.ratio else self.ratio <= self.goal


def _per_image(b1: float, b2: float, n1: int, batch: int) -> tuple[float, float]:
    """(bytes per image at `batch`, bytes per batch) from counts b1 at batch n1 and b2 at 2*n1:
    b(n) = slope * n + fixed."""
    slope = (b2 - b1) / n1
    fixed = 2 * b1 - b2
    return slope + fixed / batch, fixed


def _unmeasured(name: str, family: str, shape: str, modes: Sequence[str], batch: int, why: str) -> list[Row]:
    nan = float("nan")
    return [Row(name, family, shape, m, batch, nan, nan, nan, GOALS.get((family, m)), *([0.0] * 9),
                {}, [], {}, [], [], note=why) for m in modes]


def roofline_us(nbytes: float, flops: float) -> float:
    return max(nbytes / H100_BYTES_PER_S, flops / H100_FLOPS) * 1e6


def compare(name: str, family: str, make_model: Callable[[], nn.Module],
            make_input: Callable[[int], Inputs], *, shape: str, modes: Sequence[str] = ("inference", "training"),
            batch: int = 256, batches: tuple[int, int] = (1, 2)) -> list[Row]:
    """Eager `make_model()` against its `fastres.convert(..., backend="triton")` copy, per mode;
    bytes per image at `batch` from counts at batch sizes `batches` (n and 2n)."""
    import fastres
    n1, n2 = batches
    if n2 != 2 * n1:
        raise ValueError(f"fastres.traffic: batches must be (n, 2n), got {batches}")
    torch.manual_seed(0)
    eager = make_model()
    rows = []
    try:
        fused = fastres.convert(eager, backend="triton", strict=True)
    except ValueError as e:
        return _unmeasured(name, family, shape, modes, batch, f"not converted: {e}")
    inputs = {n: make_input(n) for n in (n1, n2)}
    for mode in modes:
        training = mode == "training"
        runs = {}
        for tag, model in (("eager", eager), ("fused", fused)):
            m = copy.deepcopy(model)
            runs[tag] = {n: measure(m, inputs[n], training=training) for n in (n1, n2)}
        e1, e2, f1, f2 = runs["eager"][n1], runs["eager"][n2], runs["fused"][n1], runs["fused"][n2]
        e_img, e_fixed = _per_image(e1.bytes, e2.bytes, n1, batch)
        f_img, f_fixed = _per_image(f1.bytes, f2.bytes, n1, batch)
        kern_img = _per_image(f1.kernel_bytes, f2.kernel_bytes, n1, batch)[0]
        req_img = _per_image(f1.kernel_requested, f2.kernel_requested, n1, batch)[0]
        bwd_img = _per_image(f1.phases.get("backward", 0), f2.phases.get("backward", 0), n1, batch)[0]
        e_bwd_img = _per_image(e1.phases.get("backward", 0), e2.phases.get("backward", 0), n1, batch)[0]
        flops = conv_flops(copy.deepcopy(eager).eval(), inputs[n1]) / n1 * (3 if training else 1)
        fallbacks = [f"{op} on {b} ({why})" for op, b, why in f2.decisions["forward"] if b != "triton"]
        if not f2.kernels["forward"]:
            fallbacks.append("no Triton kernel ran")
        backward = sorted({op for op, b, _ in f2.decisions.get("backward", []) if b != "triton"})
        top = sorted(((op, (f2.aten[op][1] - f1.aten.get(op, [0, 0])[1]) / n1)
                      for op in f2.aten), key=lambda t: -t[1])[:4]
        rows.append(Row(name, family, shape, mode, batch, e_img, f_img, f_img / e_img,
                        GOALS.get((family, mode)), flops, roofline_us(e_img, flops),
                        roofline_us(f_img, flops), e_fixed, f_fixed, kern_img, req_img,
                        e_bwd_img, bwd_img, f2.kernels["forward"], fallbacks, f2.kernels.get("backward", {}), backward,
                        [(op, b) for op, b in top if b > 0], sector_use=f2.sector_use))
    return rows


# ---- the block families at their network's stage shapes ------------------------------------------
CL = torch.channels_last
DTYPE = torch.bfloat16


def _prep(m: nn.Module) -> nn.Module:
    """Non-trivial BN state (so nothing folds away), bf16, channels_last."""
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m.to(DTYPE).to(memory_format=CL)


def _image(c: int, hw: int) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.randn(n, c, hw, hw).to(DTYPE).to(memory_format=CL)


def _tv_bottleneck(inplanes: int, planes: int, stride: int, groups: int = 1, base_width: int = 64) -> nn.Module:
    from torchvision.models import resnet as tv
    ds = None
    if stride != 1 or inplanes != planes * 4:
        ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
    return _prep(tv.Bottleneck(inplanes, planes, stride, ds, groups=groups, base_width=base_width))


def _tv_basic(planes: int) -> nn.Module:
    from torchvision.models import resnet as tv
    return _prep(tv.BasicBlock(planes, planes))


def _timm_preact(cin: int, cout: int, stride: int) -> nn.Module:
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models import resnetv2
    proj = resnetv2.DownsampleConv if stride != 1 or cin != cout else None   # as timm's stages choose
    return _prep(resnetv2.PreActBottleneck(cin, cout, stride=stride, bottle_ratio=0.25, conv_layer=create_conv2d,
                                           norm_layer=BatchNormAct2d, proj_layer=proj))


def _timm_res2net(inplanes: int, planes: int) -> nn.Module:
    from timm.models import res2net
    return _prep(res2net.Bottle2neck(inplanes, planes, 1, None, base_width=26, scale=4, norm_layer=nn.BatchNorm2d))


def _timm_rexnet(cin: int, cout: int, se: bool) -> nn.Module:
    from timm.models import rexnet
    return _prep(rexnet.LinearBottleneck(cin, cout, 1, exp_ratio=6.0, se_ratio=1 / 12 if se else 0.0))


def _tv_dense_layer(cin: int) -> nn.Module:
    from torchvision.models import densenet
    return _prep(densenet._DenseLayer(cin, 32, 4, 0.0))


def _dense_features(hw: int) -> Callable[[int], list]:
    """The features a layer of densenet121's first block sees as its 3rd layer: 64 + 32 + 32 channels."""
    return lambda n: [_image(c, hw)(n) for c in (64, 32, 32)]


@dataclass(frozen=True)
class Block:
    family: str
    make_model: Callable[[], nn.Module]
    make_input: Callable[[int], Inputs]
    shape: str
    batches: tuple[int, int] = (1, 2)   # counted at these batch sizes (n, 2n)


BLOCKS: dict[str, Block] = {
    "resnet50 layer1.1": Block("Bottleneck", lambda: _tv_bottleneck(256, 64, 1), _image(256, 56), "256-64-256 56x56"),
    "resnet50 layer2.0": Block("Bottleneck", lambda: _tv_bottleneck(256, 128, 2), _image(256, 56),
                               "256-128-512 stride 2, projection, 56x56 in"),
    "resnet50 layer3.1": Block("Bottleneck", lambda: _tv_bottleneck(1024, 256, 1), _image(1024, 14),
                               "1024-256-1024 14x14"),
    "resnext50_32x4d layer1.1": Block("Bottleneck", lambda: _tv_bottleneck(256, 64, 1, groups=32, base_width=4),
                                      _image(256, 56), "256-128(32x4)-256 56x56"),
    "resnetv2_50 stages.0.1": Block("PreActBottleneck", lambda: _timm_preact(256, 256, 1), _image(256, 56),
                                    "256-64-256 56x56"),
    "resnetv2_50 stages.1.0": Block("PreActBottleneck", lambda: _timm_preact(256, 512, 2), _image(256, 56),
                                    "256-128-512 stride 2, projection, 56x56 in"),
    "res2net50_26w_4s layer1.1": Block("Bottle2neck", lambda: _timm_res2net(256, 64), _image(256, 56),
                                       "256-4x26-256 56x56"),
    # the SE's batch norm needs more than one value per channel in training: batches 2 and 4
    "rexnet_100 features.5": Block("LinearBottleneck", lambda: _timm_rexnet(50, 61, True), _image(50, 28),
                                   "50-300(dw, SE)-61 28x28", (2, 4)),
    "resnet18 layer1.1": Block("BasicBlock", lambda: _tv_basic(64), _image(64, 56), "64-64 56x56"),
    "densenet121 denseblock1.3": Block("DenseLayer", lambda: _tv_dense_layer(128), _dense_features(56),
                                       "[64,32,32]-128-32 56x56"),
}


def report(names: Optional[Sequence[str]] = None, *, batch: int = 256, progress: bool = True) -> list[Row]:
    rows = []
    for name in names or BLOCKS:
        blk = BLOCKS[name]
        if progress:
            print(f"  .. traffic: {name} ({blk.shape})", file=sys.stderr, flush=True)
        try:
            rows += compare(name, blk.family, blk.make_model, blk.make_input, shape=blk.shape, batch=batch,
                            batches=blk.batches)
        except Exception as e:  # one block that cannot run is a row saying why, not a lost table
            rows += _unmeasured(name, blk.family, blk.shape, ("inference", "training"), batch,
                                f"failed: {type(e).__name__}: {str(e)[:200]}")
    return rows


def _mb(b: float) -> str:
    return "n/a" if b != b else f"{b / 1e6:.2f}"


def format_table(rows: list[Row]) -> str:
    head = ("block", "shape", "mode", "eager MB/img", "fused MB/img", "fused/eager", "goal",
            "eager us/img", "fused us/img", "bwd MB eager/fused", "sector use", "kernels, fallbacks")
    lines = [head]
    for r in rows:
        goal = "" if r.goal is None else f"<= {r.goal:.1f} " + {True: "met", False: "NOT met", None: "n/a"}[r.met]
        what = ", ".join(f"{k.removesuffix('_kernel')} x{n}" for k, n in r.kernels.items())
        if r.fallbacks:
            what += "; fallback: " + "; ".join(r.fallbacks)
        bwd = ""
        if r.mode == "training":
            bwd = f"{_mb(r.eager_backward_img)}/{_mb(r.fused_backward_img)}"
            kern = ", ".join(f"{k.removesuffix('_kernel')} x{n}" for k, n in r.backward_kernels.items())
            what += "; backward: " + (kern or "no Triton kernel, aten only")
            if r.backward_reference:
                what += " (reference: " + ", ".join(r.backward_reference) + ")"
        lines.append((f"{r.block} ({r.family})", r.shape, r.mode, _mb(r.eager_img), _mb(r.fused_img),
                      "n/a" if r.ratio != r.ratio else f"{r.ratio:.2f}", goal,
                      f"{r.eager_us:.2f}", f"{r.fused_us:.2f}", bwd,
                      "n/a" if r.sector_use != r.sector_use else f"{r.sector_use:.0%}", r.note or what))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def summary(rows: list[Row]) -> str:
    b = rows[0].batch if rows else 0
    lines = [f"Modeled, not measured: bf16, channels_last, counted in Triton's interpreter at batch 1 and 2 "
             f"(2 and 4 where an SE batch norm needs more than one image), "
             f"bytes per image at batch {b} (per-image slope + per-batch weights / {b}); fused = unique "
             f"bytes of every Triton launch + every aten op still run; eager = inputs + outputs of every "
             f"eager op. Roofline on H100 SXM: max(bytes / 3.35 TB/s, conv FLOPs / 989 TFLOP/s)."]
    for r in rows:
        if r.top_aten and r.mode == "training":
            top = ", ".join(f"{op} {v / 1e6:.2f}" for op, v in r.top_aten)
            lines.append(f"{r.block} training, fused path's largest aten ops (MB/img): {top}")
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    """Inference and training side by side per block: MB per image eager -> fused, ratio, roofline."""
    by: dict[str, dict[str, Row]] = {}
    for r in rows:
        by.setdefault(f"{r.block} {r.family} {r.shape}", {})[r.mode] = r
    out = ["| block (stage shape) | inference MB/img eager → fused | ratio | µs/img | "
           "training MB/img eager → fused | ratio | µs/img |", "|---|---|---|---|---|---|---|"]
    for name, modes in by.items():
        cells = []
        for mode in ("inference", "training"):
            r = modes.get(mode)
            if r is None or r.ratio != r.ratio:
                cells += ["n/a", "n/a", "n/a"]
                continue
            cells += [f"{r.eager_img / 1e6:.1f} → {r.fused_img / 1e6:.1f}", f"{r.ratio:.2f}",
                      f"{r.eager_us:.1f} → {r.fused_us:.1f}"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def to_json(rows: list[Row]) -> list[dict]:
    return [{**asdict(r), "met": r.met} for r in rows]


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m fastres.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", nargs="+", choices=list(BLOCKS), help="default: every block")
    p.add_argument("--batch", type=int, default=256, help="batch the bytes per image are given at")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.add_argument("--readme", help="also write the Markdown table between the traffic markers of this file")
    p.add_argument("--load", metavar="JSON", help="render the rows of an earlier --json run instead of measuring")
    args = p.parse_args(argv)
    if args.load:
        with open(args.load) as f:
            rows = [Row(**{k: v for k, v in d.items() if k != "met"}) for d in json.load(f)]
    elif os.environ.get("TRITON_INTERPRET") != "1":
        p.error("run with TRITON_INTERPRET=1 (or use `fastres gpu-report --traffic`)")
    else:
        torch.manual_seed(0)
        rows = report(args.blocks, batch=args.batch)
    print(format_table(rows))
    print()
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows), f, indent=1)
    if args.readme:
        from fastres.benchmark import replace_between_markers
        replace_between_markers(args.readme, "traffic", markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
