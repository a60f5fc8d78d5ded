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


# ---- fastres bench: tiny runs; torch.compile is left out (10-30 s even on resnet18), `pytest bench --quick` runs it
BENCH_TINY = ["bench", "--model", "resnet18", "--batch", "1", "--size", "32", "--iters", "1", "--warmup", "0"]


def test_bench_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    from bench import report
    from fastres.benchmark import providers
    provs = ["eager", "eager_cl", providers()[-1]]  # the last fastres backend here: native where built
    js, png = tmp_path / "results" / "cpu.json", tmp_path / "speedups.png"
    assert cli.main([*BENCH_TINY, "--providers", *provs, "--json", str(js), "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert f"[{'#' * 30}] 6/6" in err and "resnet18 eager_cl: setup" in err  # the progress bar
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[head].split()[:6] == ["model", "provider", "ms/batch", "img/s", "vs", "eager"]
    rows = [line.split() for line in lines[head + 2:]]
    assert [r[:2] for r in rows] == [["resnet18", p] for p in provs]
    assert rows[0][4] == "1.00x" and rows[1][5] == "1.00x"  # vs eager, vs eager_cl columns
    groups = report.load([str(js)])  # the README table is generated from this file
    assert list(groups) == ["resnet18 (1, 3, 32, 32) fp32 infer"]
    assert set(groups["resnet18 (1, 3, 32, 32) fp32 infer"]) == set(provs)
    extra = json.loads(js.read_text())["benchmarks"][2]["extra_info"]
    assert extra["provider"] == provs[2] and extra["speedup_vs_eager"] > 0 and extra["max_rel_diff"] < 1e-4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bf16_compares_with_eager_in_bf16(tmp_path, capsys):
    from fastres.benchmark import providers
    js = tmp_path / "b.json"
    assert cli.main([*BENCH_TINY, "--dtype", "bf16", "--providers", "eager", providers()[-1], "--json", str(js)]) == 0
    assert "inference forward, batch 1, 32x32, bf16" in capsys.readouterr().out
    entries = json.loads(js.read_text())["benchmarks"]
    assert [b["group"] for b in entries] == ["resnet18 (1, 3, 32, 32) bf16 infer"] * 2
    assert entries[1]["extra_info"]["max_rel_diff"] < 5e-2  # vs eager in bf16, within bf16 rounding


def test_bench_training_step(tmp_path, capsys):
    from fastres.benchmark import providers
    js = tmp_path / "b.json"
    assert cli.main([*BENCH_TINY, "--batch", "2", "--mode", "train", "--providers", providers()[-1],
                     "--json", str(js)]) == 0
    assert "training step (forward, backward, SGD), batch 2" in capsys.readouterr().out
    entry, = json.loads(js.read_text())["benchmarks"]
    assert entry["group"] == "resnet18 (2, 3, 32, 32) fp32 train" and entry["extra_info"]["max_rel_diff"] is None


@pytest.mark.parametrize("args, message", [
    (["--model", "vgg16"], "argument --model: invalid choice: 'vgg16'"),
    (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["--device", "cuda"], "CUDA was asked for but no CUDA device is available"),
    (["--batch", "0"], "--batch and --iters must be at least 1"),
    (["--iters", "0"], "--batch and --iters must be at least 1"),
    (["--size", "16"], "--size must be at least 32"),
    (["--providers", "eager", "onnx"], "unknown provider(s) onnx on cpu; available: eager, eager_cl, compile"),
    (["--plot", "x.png"], "--plot needs matplotlib, which is not installed"),
])
def test_bench_bad_arguments_exit_2_with_one_line(args, message, capsys, monkeypatch):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert [line for line in err.splitlines() if "error:" in line] == [next(
        line for line in err.splitlines() if message in line)], err
    assert "Traceback" not in err


def test_gpu_report_json(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "report.json"
    out = run("gpu-report", "--arch", "80", "--json", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(path.read_text())
    assert rows and all(r["arch"] == 80 and not r["problems"] for r in rows)
    assert {"conv2d", "bn_act"} <= {r["kernel"] for r in rows}


def test_keep_heap_reuses_freed_memory_instead_of_faulting_it_in():
    """20 cycles of three 20 MiB tensors touched and freed: by default glibc returns them to the
    OS and every cycle faults them in again (about 10k page faults each here); after keep_heap
    the pages are reused."""
    code = (
        "import resource, torch\n"
        "from fastres.benchmark import keep_heap\n"
        "keep_heap()\n"
        "def cycle():\n"
        "    ts = [torch.ones(5 << 20) for _ in range(3)]\n"
        "    del ts\n"
        "cycle()\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    cycle()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    pages = (20 << 20) // 4096
    assert int(out) <= 2 * pages, f"{out.strip()} page faults in 20 cycles of {3 * pages} pages touched"


def test_bench_keep_heap_is_stated_in_the_header():
    out = run(*BENCH_TINY, "--providers", "eager", "--keep-heap")
    assert out.returncode == 0, out.stderr
    assert "malloc keeps freed memory (--keep-heap)" in out.stdout
