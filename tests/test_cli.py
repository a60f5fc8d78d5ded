"""The command line: output and exit codes."""
import json
import subprocess
import sys

import pytest

from fastres import cli


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastres", *args], capture_output=True, text=True, timeout=600)


def test_demo_small_prints_the_table():
    out = run("demo", "--model", "resnet18", "--batch", "1", "--size", "64", "--iters", "1", "--no-compile")
    assert out.returncode == 0, out.stderr
    assert "numerics vs eager: max abs error" in out.stdout and "(ok)" in out.stdout
    assert "eager (channels_last)" in out.stdout and "fastres (auto)" in out.stdout


def test_explain_lists_blocks():
    out = run("explain", "resnet18")
    assert out.returncode == 0, out.stderr
    assert "replaced layer4.1: torchvision.models.resnet.BasicBlock" in out.stdout


def test_validate_passes_and_reports_per_block(capsys):
    assert cli.main(["validate", "--model", "resnet18", "--batch", "2", "--size", "64", "--verbose"]) == 0
    text = capsys.readouterr().out
    assert "resnet18: PASS" in text and "eval layer1.0" in text and "train parameter grads (median" in text


def test_validate_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A deliberately wrong op must make validate fail with a non-zero exit."""
    from fastres.ops import reference as ref
    real = ref.bn_act
    monkeypatch.setattr(ref, "bn_act", lambda x, *a: real(x, *a) * 1.001)
    import fastres.backend as B
    monkeypatch.setitem(B._TABLES["bn_act"], "reference", B.Impl(ref.bn_act, lambda *a: None))
    import fastres
    with fastres.set_backend("reference"):
        assert cli.main(["validate", "--model", "resnet18", "--batch", "2", "--size", "64"]) == 1
    assert "resnet18: FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["demo", "--model", "vgg16"], "invalid choice: 'vgg16'"),
    (["demo", "--device", "cuda"], "CUDA was asked for but no CUDA device is available"),
    (["demo", "--batch", "0"], "--batch and --iters must be at least 1"),
    (["validate"], "one of the arguments --model --all is required"),
])
def test_bad_arguments_give_one_clear_line(args, message):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_gpu_report_json(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "report.json"
    out = run("gpu-report", "--arch", "80", "--json", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(path.read_text())
    assert rows and all(r["arch"] == 80 and not r["problems"] for r in rows)
    assert {"conv2d", "bn_act"} <= {r["kernel"] for r in rows}
