"""`fastres analyze`: the parts mathematics guarantees, and every command end to end in --quick mode
(valid JSON, a PNG), all on CPU in seconds."""
import argparse
import json

import pytest
import torch

from fastres.analyze import common as C
from fastres.analyze import lesion, register

PNG = b"\x89PNG\r\n\x1a\n"


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastres")
    register(p.add_subparsers(dest="cmd", required=True))
    return p.parse_args(["analyze", *argv])


def run_quick(tmp_path, name: str, *extra: str) -> dict:
    js, png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    # one thread: tiny nets gain nothing from two, and two stall badly on a busy machine
    args = parse(name, "--quick", "--threads", "1", "--json", str(js), "--plot", str(png), *extra)
    assert args.fn(args) == 0
    assert png.read_bytes()[:8] == PNG
    payload = json.loads(js.read_text())
    assert payload["command"] == name
    return payload


def test_shattered_residual_keeps_correlation_above_plain(tmp_path, capsys):
    out = run_quick(tmp_path, "shattered")
    deep = out["deepest"]
    assert deep["resnet"] > deep["plain"] and deep["preact"] > deep["plain-preact"]
    for fam in ("plain", "resnet"):
        assert out["results"][fam]["fit"]["points"] >= 2
    text = capsys.readouterr().out
    assert "exponential fit" in text and "power fit" in text


def test_rank_relu_below_silu_at_smallest_ratio(tmp_path, capsys):
    out = run_quick(tmp_path, "rank")
    res = out["results"]["10"]
    assert res["d_in"][0] == 1
    assert res["relu"]["mean"][0] <= 0.2 < res["silu"]["mean"][0]  # relu(wx) = |w| relu(+-x): rank <= 2
    # identity: the normalised rank is the ratio itself
    assert res["identity"]["mean"] == pytest.approx([max(1, round(r * 10)) / 10 for r in res["ratios"]])
    assert "relu" in capsys.readouterr().out


def test_lesion_quick(tmp_path):
    out = run_quick(tmp_path, "lesion")
    n = out["config"]["blocks"]
    assert len(out["lesions"]) == n and any(r["downsampling"] for r in out["lesions"])
    assert sum(out["paths"]["count"]) == 2 ** n
    assert sum(out["paths"]["grad_share"]) == pytest.approx(1.0)


def test_units_quick(tmp_path):
    out = run_quick(tmp_path, "units")
    assert set(out["summary"]) == set("abcde")
    assert out["paper"]["resnet110"] == {"a": 6.61, "b": 8.17, "c": 7.84, "d": 6.71, "e": 6.37}
    assert all(len(r) == 2 for r in out["runs"].values())


def test_degradation_quick(tmp_path):
    out = run_quick(tmp_path, "degradation")
    assert set(out["results"]) == {"plain-8", "plain-14", "resnet-8", "resnet-14"}
    assert all(r["steps"][-1] == 6 for r in out["results"].values())


def test_dag_quick(tmp_path):
    out = run_quick(tmp_path, "dag")
    res = out["results"]
    assert set(res) == {"residual", "dense", "learned"}
    layers = out["config"]["layers"]
    for r in res.values():
        assert len(r["train_loss"]) == 4 and 0 <= r["test_acc"] <= 100
        assert len(r["adjacency"]) == out["config"]["stages"]
    residual = torch.tensor(res["residual"]["adjacency"][0])
    assert torch.equal(residual, torch.ones(layers + 2, layers + 2).triu(1))
    learned = torch.tensor(res["learned"]["adjacency"][0])
    assert learned.shape == residual.shape and not torch.equal(learned, residual)   # the edges trained


def test_remove_shortcut_gives_the_plain_block():
    """A v1 block without its shortcut is relu(bn2(conv2(relu(bn1(conv1 x))))); a unit-e block is
    conv2(relu(bn2(conv1(relu(bn1 x)))))."""
    from fastres.nn.preact import PreActBasicBlock
    from fastres.nn.resnet import BasicBlock
    x = torch.randn(2, 8, 6, 6)
    b = C.remove_shortcut(BasicBlock(8, 8)).eval()
    ref = torch.relu(b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(x))))))
    torch.testing.assert_close(b(x), ref)
    e = C.remove_shortcut(PreActBasicBlock(8, 8, 1, variant="e")).eval()
    ref = e.conv2(torch.relu(e.norm2(e.conv1(torch.relu(e.norm1(x))))))
    torch.testing.assert_close(e(x), ref)


def test_paths_sum_to_the_full_gradient():
    """Path decomposition (Veit et al.): with the forward pass fixed, the gradients of the 2^n
    single-choice backward passes add up to the network's own gradient."""
    import itertools
    from fastres.models.cifar import cifar_resnet
    for model in (cifar_resnet(8), lesion.build("preact", 8)):
        model.eval()
        x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        with torch.no_grad():
            h0 = model.conv1(x)
            h0 = model.bn1(h0) if model.bn1 is not None else h0
        h0.requires_grad_(True)
        out = model.fc(model.norm(model.stages(h0)).mean((2, 3)))
        (full,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), h0)
        total = sum(lesion.path_grad(model, x, y, list(t)) for t in itertools.product([False, True], repeat=3))
        torch.testing.assert_close(total, full, rtol=1e-4, atol=1e-5)


def test_plot_without_matplotlib_is_one_line(monkeypatch, tmp_path, capsys):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    args = parse("rank", "--quick", "--plot", str(tmp_path / "x.png"))
    assert args.fn(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and "pip install" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_cifar_batches_from_a_folder(tmp_path):
    """--data reads CIFAR-10 python batches from disk (here tiny synthetic ones) and never downloads."""
    import pickle
    import numpy as np
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 20))}
        (tmp_path / name).write_bytes(pickle.dumps(d))
    data = C.load_data(str(tmp_path), size=16)
    assert data.xtr.shape == (100, 3, 16, 16) and data.xte.shape == (20, 3, 16, 16) and data.flip
    out = run_quick(tmp_path, "degradation", "--data", str(tmp_path))
    assert "CIFAR-10" in out["config"]["data"]
    (tmp_path / "test_batch").unlink()
    args = parse("units", "--quick", "--data", str(tmp_path))
    assert args.fn(args) == 2
