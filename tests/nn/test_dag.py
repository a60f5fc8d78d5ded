"""fastres.nn.DAGBlock against an eager twin (separate tensors, a Python sum, nn.Conv2d/BN/ReLU)
with the same weights in float64, for every connectivity, train and eval, both memory formats."""
import pytest
import torch
import torch.nn as nn

import fastres
from fastres import backend as B
from fastres.nn import DAGBlock
from fastres.nn.dag import adjacency
from tests.nn.blockcheck import assert_matches_float64, round_to
from tests.utils import randomize_bn

CL = torch.channels_last
CONNECTIVITY = ["residual", "dense", "learned"]


class EagerDAG(nn.Module):
    """The definition, term by term: h_0 = x, h_j = relu(bn_j(conv_j(sum_{i<j} A[i, j] h_i))),
    out = sum_{i<=L} A[i, L+1] h_i. Same parameter and buffer names as DAGBlock."""

    def __init__(self, block: DAGBlock) -> None:
        super().__init__()
        self.layers = block.layers
        if isinstance(block.adjacency, nn.Parameter):
            self.adjacency = nn.Parameter(block.adjacency.detach().clone())
        else:
            self.register_buffer("adjacency", block.adjacency.clone())
        self.convs = nn.ModuleList(nn.Conv2d(c.in_channels, c.out_channels, 3, padding=1, bias=False)
                                   for c in block.convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(b.num_features) for b in block.bns)
        self.load_state_dict(block.state_dict())

    def forward(self, x):
        a, hs = self.adjacency, [x]
        for j, (conv, bn) in enumerate(zip(self.convs, self.bns), start=1):
            hs.append(torch.relu(bn(conv(sum(a[i, j] * hs[i] for i in range(j))))))
        return sum(a[i, self.layers + 1] * hs[i] for i in range(self.layers + 1))


def _pair(connectivity, channels=6, layers=3, dtype=torch.float32):
    torch.manual_seed(0)
    block = DAGBlock(channels, layers, connectivity)
    if connectivity == "learned":   # away from the initial pattern, so every edge weight matters
        with torch.no_grad():
            block.adjacency.add_(torch.randn_like(block.adjacency).triu(1) * 0.3)
    randomize_bn(block)
    round_to(block, dtype)
    return EagerDAG(block).double(), block.to(dtype)


@pytest.mark.parametrize("connectivity", CONNECTIVITY)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_block_matches_eager_twin(connectivity, train, cl):
    ref64, block = _pair(connectivity)
    x = torch.randn(2, 6, 7, 7)
    if cl:
        x, block = x.to(memory_format=CL), block.to(memory_format=CL)
    with B.recording() as rec:
        y = assert_matches_float64(ref64, block, x, train=train)
    assert y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert sum(r[1] == "mix_conv2d" for r in rec) == 3, rec
    if connectivity == "learned" and train:
        assert block.adjacency.grad is not None and block.adjacency.grad.triu(1).abs().sum() > 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16_output_matches_float64(train):
    ref64, block = _pair("learned", dtype=torch.bfloat16)
    x = torch.randn(2, 6, 5, 5, dtype=torch.bfloat16).to(memory_format=CL)
    assert_matches_float64(ref64, block.to(memory_format=CL), x, train=train)


@pytest.mark.parametrize("layers", [1, 4])
def test_layer_counts(layers):
    ref64, block = _pair("dense", channels=3, layers=layers)
    assert_matches_float64(ref64, block, torch.randn(3, 3, 4, 4), train=True)


def test_patterns():
    a = adjacency("residual", 3)
    assert torch.equal(a, torch.ones(5, 5).triu(1))
    d = adjacency("dense", 3)
    assert torch.allclose(d.sum(0)[1:], torch.ones(4)) and torch.equal(d.tril(), torch.zeros(5, 5))
    learned, fixed = DAGBlock(4, 3, "learned"), DAGBlock(4, 3, "residual")
    assert isinstance(learned.adjacency, nn.Parameter) and torch.equal(learned.adjacency.detach(), a)
    assert "adjacency" in dict(fixed.named_buffers()) and "adjacency" not in dict(fixed.named_parameters())


def test_residual_is_the_unrolled_resnet():
    """connectivity="residual": the block equals x_j = x_{j-1} + relu(bn(conv(x_{j-1}))), L times."""
    block = randomize_bn(DAGBlock(4, 3, "residual")).eval()
    x = torch.randn(2, 4, 5, 5)
    h = x
    for conv, bn in zip(block.convs, block.bns):
        h = h + torch.relu(bn(conv(h)))
    torch.testing.assert_close(block(x), h, rtol=2e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="connectivity must be one of"):
        DAGBlock(4, 2, "random")
    with pytest.raises(ValueError, match="at least 1"):
        DAGBlock(4, 0)
    with pytest.raises(ValueError, match=r"DAGBlock: expected 4 input channels"):
        DAGBlock(4, 2)(torch.randn(1, 3, 5, 5))


def test_compiles_fullgraph():
    block = DAGBlock(4, 2, "learned")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    fastres.nn.DAGBlock.forward(block, x).sum().backward()
    torch.testing.assert_close(g, x.grad)
