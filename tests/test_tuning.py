"""fastres.tuning: the measured per-shape choice (auto on CUDA: cuDNN + native kernels vs the Triton
conv). The timer is replaced by a fake that returns preset times, so what is checked is the
decision logic, its cache and file, and its wiring into backend selection, all without a GPU."""
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastres
from fastres import backend as B
from fastres import tuning
from fastres.ops import conv as conv_ops
from tests.utils import assert_close

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test: its own cache file, no decisions in memory, tuning off, the real timer back after."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "timer", tuning.default_timer)
    tuning.forget()
    with fastres.tune(False):
        yield
    tuning.forget()


class FakeTimer:
    """ms per candidate, keyed by what the candidate returns; counts the measurements."""

    def __init__(self, ms: dict):
        self.ms, self.calls = ms, []

    def __call__(self, fn):
        name = fn()
        self.calls.append(name)
        if isinstance(self.ms[name], Exception):
            raise self.ms[name]
        return self.ms[name]


CANDIDATES = [("native", lambda x: "native"), ("triton", lambda x: "triton")]


def test_key_depends_on_dtype_shape_strides_and_values():
    x = torch.randn(2, 3, 4, 5)
    k = tuning.key("conv2d", (x, [1, 1], "relu", None))
    assert k == tuning.key("conv2d", (torch.randn(2, 3, 4, 5), [1, 1], "relu", None))
    for other in [(x.half(), [1, 1], "relu", None), (x[:, :2], [1, 1], "relu", None),
                  (x.to(memory_format=torch.channels_last), [1, 1], "relu", None),
                  (x, [2, 2], "relu", None), (x, [1, 1], "silu", None), (x, [1, 1], "relu", x)]:
        assert tuning.key("conv2d", other) != k


def test_measures_once_per_key_and_keeps_the_faster(monkeypatch):
    timer = FakeTimer({"native": 2.0, "triton": 1.0})
    monkeypatch.setattr(tuning, "timer", timer)
    x = torch.randn(2, 3, 4, 4)
    with fastres.tune():
        name, fn, why = tuning.choose("conv2d", CPU, (x,), CANDIDATES)
        assert (name, fn(x)) == ("triton", "triton")
        assert why == "tuned (measured): native 2.000 ms, triton 1.000 ms"
        assert timer.calls == ["native", "triton"]
        name, _, why = tuning.choose("conv2d", CPU, (torch.randn(2, 3, 4, 4),), CANDIDATES)
        assert name == "triton" and why.startswith("tuned (cached)") and len(timer.calls) == 2
        tuning.choose("conv2d", CPU, (torch.randn(2, 3, 8, 8),), CANDIDATES)   # a new shape is measured
        assert len(timer.calls) == 4


@pytest.mark.parametrize("challenger_ms, winner", [(0.98, "native"), (0.96, "triton"), (1.5, "native")])
def test_the_default_keeps_ties(monkeypatch, challenger_ms, winner):
    monkeypatch.setattr(tuning, "timer", FakeTimer({"native": 1.0, "triton": challenger_ms}))
    with fastres.tune():
        assert tuning.choose("conv2d", CPU, (torch.randn(1, 2, 3, 3),), CANDIDATES)[0] == winner


def test_nothing_is_measured_unless_tuning_is_on(monkeypatch):
    timer = FakeTimer({"native": 2.0, "triton": 1.0})
    monkeypatch.setattr(tuning, "timer", timer)
    x = torch.randn(2, 3, 4, 4)
    assert tuning.choose("conv2d", CPU, (x,), CANDIDATES) is None and timer.calls == []
    with fastres.tune():
        tuning.choose("conv2d", CPU, (x,), CANDIDATES)
    assert not tuning.enabled()
    assert tuning.choose("conv2d", CPU, (x,), CANDIDATES)[0] == "triton"   # a known decision still counts
    assert len(timer.calls) == 2


def test_decisions_persist_in_the_cache_file(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "timer", FakeTimer({"native": 2.0, "triton": 1.0}))
    x = torch.randn(2, 3, 4, 4)
    with fastres.tune():
        tuning.choose("conv2d", CPU, (x,), CANDIDATES)
    saved = json.loads((tmp_path / "tuning.json").read_text())
    (env, table), = saved.items()
    assert f"fastres {fastres.__version__}" in env and f"torch {torch.__version__}" in env
    assert table[tuning.key("conv2d", (x,))] == {"choice": "triton", "ms": {"native": 2.0, "triton": 1.0}}
    tuning.forget()                   # a later process: nothing in memory, tuning off
    monkeypatch.setattr(tuning, "timer", FakeTimer({}))
    name, _, why = tuning.choose("conv2d", CPU, (x,), CANDIDATES)
    assert name == "triton" and why.startswith("tuned (cached)")


def test_an_unwritable_cache_warns_and_keeps_the_decision(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(tuning, "timer", FakeTimer({"native": 2.0, "triton": 1.0}))
    with fastres.tune(), pytest.warns(UserWarning, match="kept for this process only"):
        assert tuning.choose("conv2d", CPU, (torch.randn(1, 1, 2, 2),), CANDIDATES)[0] == "triton"
    assert tuning.choose("conv2d", CPU, (torch.randn(1, 1, 2, 2),), CANDIDATES)[0] == "triton"


def test_a_failing_candidate_is_left_out(monkeypatch):
    monkeypatch.setattr(tuning, "timer", FakeTimer({"native": 2.0, "triton": RuntimeError("out of resources")}))
    with fastres.tune(), pytest.warns(UserWarning, match="triton failed while tuned.*out of resources"):
        name, _, why = tuning.choose("conv2d", CPU, (torch.randn(1, 1, 2, 2),), CANDIDATES)
    assert name == "native" and why == "tuned (measured): native 2.000 ms"


def test_fake_tensors_are_never_timed(monkeypatch):
    timer = FakeTimer({"native": 2.0, "triton": 1.0})
    monkeypatch.setattr(tuning, "timer", timer)
    with fastres.tune(), FakeTensorMode():
        x = torch.empty(2, 3, 4, 4)
        assert tuning.choose("conv2d", CPU, (x,), CANDIDATES) is None
    assert tuning.choose("conv2d", CPU, (torch.empty(2, 3, 4, 4, device="meta"),), CANDIDATES) is None
    assert timer.calls == []


def _conv_args(x):
    w = torch.randn(4, 3, 3, 3)
    return (x, w, None, [1, 1], [1, 1], [1, 1], 1, None, None, None, None, "identity", False, None, None, "relu")


@pytest.mark.skipif(B.NATIVE_MISSING is not None, reason="auto's first choice must differ from the challenger")
def test_backend_choice_runs_the_measured_winner(monkeypatch):
    """Wired into `auto`: with a challenger declared for this device type (on CUDA: triton against
    native), the measured winner runs and explain's record says why; its result is the op's."""
    monkeypatch.setitem(B._MEASURED, "cpu", {"conv2d": ("reference",)})
    first = B._AUTO_ORDER["cpu"][0]
    times = iter([2.0, 1.0])   # the default first, then the challenger
    monkeypatch.setattr(tuning, "timer", lambda fn: (fn(), next(times))[1])
    x = torch.randn(2, 3, 6, 6)
    args = _conv_args(x)
    with fastres.tune(), B.recording() as rec:
        out = torch.ops.fastres.conv2d(*args, "auto")
    ((_, op, backend, why),) = rec
    assert (op, backend) == ("conv2d", "reference")
    assert why == f"auto: tuned (measured): {first} 2.000 ms, reference 1.000 ms"
    assert_close(out, torch.relu(torch.nn.functional.conv2d(x, args[1], padding=1)))
    with B.recording() as rec:   # tuning off: the decision is remembered
        torch.ops.fastres.conv2d(*_conv_args(torch.randn(2, 3, 6, 6)), "auto")
    assert rec[0][2] == "reference" and "cached" in rec[0][3]


def test_no_challenger_means_no_tuning(monkeypatch):
    monkeypatch.setattr(tuning, "timer", FakeTimer({}))
    with fastres.tune(), B.recording() as rec:
        torch.ops.fastres.conv2d(*_conv_args(torch.randn(2, 3, 6, 6)), "auto")
    assert "tuned" not in rec[0][3]


@pytest.mark.skipif(B.NATIVE_MISSING is not None, reason="needs the native kernels")
@pytest.mark.parametrize("act", ["identity", "relu", "relu6", "silu"])
@pytest.mark.parametrize("residual", [None, "full", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cudnn_composition_matches_the_reference(act, residual, dtype):
    """conv2d_cudnn (what native runs on CUDA) is device-generic: ATen's convolution, then the
    native residual_act_ pass. Checked here on CPU tensors against the reference op."""
    x = torch.randn(2, 6, 7, 7).to(dtype=dtype, memory_format=torch.channels_last)
    w = torch.randn(8, 3, 3, 3, dtype=dtype)
    b = torch.randn(8, dtype=dtype)
    r = {None: None, "full": torch.randn(2, 8, 4, 4), "partial": torch.randn(2, 5, 4, 4)}[residual]
    r = r.to(dtype=dtype, memory_format=torch.channels_last) if r is not None else None
    got = conv_ops.conv2d_cudnn(x, w, b, [2, 2], [1, 1], [1, 1], 2, r, act)
    want = torch.ops.fastres.conv2d(x, w, b, [2, 2], [1, 1], [1, 1], 2, None, None, None, None, "identity", False,
                                    None, r, act, "reference")
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, want, dtype=dtype, reduced=27)


def test_cudnn_path_states_what_it_needs():
    x = torch.randn(1, 2, 3, 3)
    assert "CUDA tensors" in conv_ops.cudnn_missing(x, torch.randn(2, 2, 1, 1))


def test_benchmark_providers_on_cuda_include_the_tuned_choice():
    """The provider list is a function of the device alone (no GPU needed to state it)."""
    from fastres.benchmark import fastres_backend, providers, tuned_if
    on_cpu = providers("cpu")
    assert "fastres-triton" not in on_cpu and "fastres-tuned" not in on_cpu
    if "triton" in fastres.available_backends("cuda"):
        assert providers("cuda")[-2:] == ["fastres-triton", "fastres-tuned"]
    assert fastres_backend("fastres-tuned") == ("auto", True)
    assert fastres_backend("fastres-native") == ("native", False)
    step = tuned_if(True, tuning.enabled)
    assert step() is True and not tuning.enabled()
    assert tuned_if(False, tuning.enabled)() is False


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"env": [1]}', '{"x": {"k": {"choice": 3}}}'])
def test_a_damaged_cache_file_is_ignored_and_rewritten(monkeypatch, tmp_path, text):
    (tmp_path / "tuning.json").write_text(text)
    monkeypatch.setattr(tuning, "timer", FakeTimer({"native": 2.0, "triton": 1.0}))
    x = torch.randn(1, 1, 2, 2)
    with fastres.tune():
        assert tuning.choose("conv2d", CPU, (x,), CANDIDATES)[0] == "triton"
    (table,) = [v for v in json.loads((tmp_path / "tuning.json").read_text()).values()
                if isinstance(v, dict) and tuning.key("conv2d", (x,)) in v]
    assert table[tuning.key("conv2d", (x,))]["choice"] == "triton"
