"""20 SGD-with-momentum steps of converted models leave parameters and running statistics equal
to eager's, and the loss curves match. Run in float64 with 16 images (8 at 64x64): BN over the
1x1 last stage of a 32x32 input amplifies rounding about tenfold per step (with 4 images even
float64 runs drift apart by O(1) within 20 steps, eager against eager in another layout alike)."""

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import fastres
from tests.utils import assert_close, assert_same_buffers

STEPS = 20
CASES = [  # (name, build, input shape)
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=5), (16, 3, 32, 32)),
    ("preact_resnet18", lambda: timm.create_model("resnetv2_18", num_classes=5), (16, 3, 32, 32)),
    ("res2net50_26w_4s", lambda: timm.create_model("res2net50_26w_4s", num_classes=5), (8, 3, 64, 64)),
    ("densenet121", lambda: torchvision.models.densenet121(num_classes=5), (16, 3, 32, 32)),
]


def _train(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name, build, shape", CASES, ids=[c[0] for c in CASES])
def test_twenty_steps_match_eager(name, build, shape):
    torch.manual_seed(0)
    eager = build().double()
    fused = fastres.convert(eager)
    assert fastres.conversion_report(fused).replaced
    g = torch.Generator().manual_seed(1)
    # one batch, fitted for 20 steps: the loss must fall, so the curve says the models learn
    xs = torch.randn(*shape, generator=g, dtype=torch.float64).expand(STEPS, *shape)
    ys = torch.randint(0, 5, (shape[0],), generator=g).expand(STEPS, shape[0])
    want, got = _train(eager, xs, ys), _train(fused, xs, ys)
    assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), name="loss curve")
    assert want[-1] < 0.5 * want[0]
    fused_params = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        assert_close(fused_params[name], p, name=name)
    assert_same_buffers(fused, eager, dtype=torch.float64)
