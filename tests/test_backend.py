"""Backend selection, visible fallback and explain()."""
import warnings

import pytest
import torch
import torchvision

import fastres
from fastres import backend as B


def test_set_backend_is_a_call_and_a_context_manager():
    before = fastres.get_backend()
    with fastres.set_backend("reference"):
        assert fastres.get_backend() == "reference"
    assert fastres.get_backend() == before
    fastres.set_backend("reference")
    try:
        assert fastres.get_backend() == "reference"
    finally:
        fastres.set_backend(before)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; expected one of"):
        fastres.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        fastres.convert(torch.nn.Identity(), backend="nope")


@pytest.mark.parametrize("name", ["reference", "auto"])
def test_env_var_selects_backend(name):
    import os
    import subprocess
    import sys
    env = dict(os.environ, FASTRES_BACKEND=name)
    out = subprocess.run([sys.executable, "-c", "import fastres; print(fastres.get_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == name


def test_available_backends_lists_reference():
    names = fastres.available_backends("cpu")
    assert names[0] == "reference"
    assert ("native" in names) == (B.NATIVE_MISSING is None)


def test_triton_on_cpu_falls_back_visibly_once():
    x = torch.randn(2, 3, 4, 4)
    B._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = fastres.functional.add_act(x, x, backend="triton")
    msgs = [str(w.message) for w in caught if "falls back" in str(w.message)]
    assert len(msgs) == 1 and "bn_act falls back from triton to reference" in msgs[0]
    torch.testing.assert_close(y, torch.relu(2 * x))


def test_explain_lists_every_replaced_block_and_op():
    model = fastres.convert(torchvision.models.resnet18().eval(), backend="reference")
    text = str(fastres.explain(model, torch.randn(1, 3, 32, 32)))
    assert "13 module(s) replaced" in text  # the ResNet (fused stem), its 4 layers (Stage) and 8 blocks
    assert "replaced layer2: torch.nn.modules.container.Sequential -> fastres.nn.inference.Stage" in text
    for path in ("layer1.0", "layer4.1"):
        assert f"replaced {path}: torchvision.models.resnet.BasicBlock -> fastres.nn.resnet.BasicBlock" in text
    assert "conv2d" in text and "requested" in text


def test_explain_names_the_native_cpu_build():
    text = str(fastres.explain(fastres.models.resnet18().eval(), torch.randn(1, 3, 32, 32)))
    expect = (f"native kernels: CPU build {B.NATIVE_CPU_ISA}" if B.NATIVE_MISSING is None
              else f"native kernels: unavailable ({B.NATIVE_MISSING})")
    assert expect in text.splitlines()


def test_explain_does_not_change_the_model():
    model = fastres.convert(torchvision.models.resnet18().train())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fastres.explain(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
