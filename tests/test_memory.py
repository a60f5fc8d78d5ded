"""memory_report counts what autograd saves for backward, each storage once."""
import pytest
import torch
import torch.nn as nn
import torchvision

import fastres
from fastres.memory import _models, _preact_resnet164_eager, saved_activation_bytes


def test_counts_each_storage_once_and_skips_parameters():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 4, 8, 8)
    # conv saves its input x (x needs no grad: only the weight grad needs x) and relu its output
    assert saved_activation_bytes(model, x) == 2 * x.numel() * 4


def test_preactivation_fused_into_the_conv_is_not_stored():
    torch.manual_seed(0)
    layer = torchvision.models.densenet._DenseLayer(16, 8, 4, 0.0)
    x = torch.randn(4, 16, 8, 8)
    report = fastres.memory_report(layer, x, name="dense layer")
    # eager keeps BN input, ReLU output (= conv input) per BN-ReLU-conv; fastres only the BN input
    assert report.fastres < 0.75 * report.eager, str(report)


@pytest.mark.parametrize("name, goal", [("preact_resnet164", 0.6), ("densenet121", 0.6), ("resnet50", 0.8),
                                        ("res2net50_26w_4s", 0.8)])
def test_activation_memory_goals(name, goal):
    """Bytes saved for one training step, fastres vs eager (deterministic, not a timing)."""
    build, shape = _models()[name]
    torch.manual_seed(0)
    report = fastres.memory_report(build(), torch.randn(2, *shape[1:]), name=name)
    assert report.ratio <= goal, str(report)


def test_preact_resnet164_eager_twin_matches_the_fastres_builder():
    """The twin the table measures is the same network as fastres.models.preact_resnet164."""
    twin, ours = _preact_resnet164_eager(), fastres.models.preact_resnet164()
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in ours.parameters())
    converted = fastres.convert(twin)
    assert not fastres.conversion_report(converted).skipped
    x = torch.randn(2, 3, 32, 32)
    assert saved_activation_bytes(converted, x) == saved_activation_bytes(ours, x)


@pytest.mark.parametrize("batch", ["1", "8,x", ""])
def test_table_rejects_bad_batch_sizes(batch, capsys):
    from fastres.memory import main
    with pytest.raises(SystemExit) as e:
        main(["--models", "resnet50", "--batch", batch])
    assert e.value.code == 2
    assert "--batch takes comma-separated batch sizes of at least 2" in capsys.readouterr().err


def test_module_runs_without_a_double_import_warning():
    """`python -m fastres.memory`, the README's command: importing fastres must not have loaded
    fastres.memory already (runpy then warns that it runs a second copy)."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fastres.memory", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "usage: python -m fastres.memory" in run.stdout
