"""memory_report counts what autograd saves for backward, each storage once."""
import torch
import torch.nn as nn
import torchvision

import fastres
from fastres.memory import saved_activation_bytes


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
