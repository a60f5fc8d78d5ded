"""fastres.traffic renders a saved run (--load) into the README block without measuring again."""
import json

import torch

from fastres import traffic


def _row(mode: str, eager: float, fused: float) -> traffic.Row:
    return traffic.Row(block="resnet50 layer1.1", family="Bottleneck", shape="256-64-256 56x56", mode=mode,
                       batch=256, eager_img=eager, fused_img=fused, ratio=fused / eager, goal=0.6, flops_img=1e9,
                       eager_us=traffic.roofline_us(eager, 1e9), fused_us=traffic.roofline_us(fused, 1e9),
                       eager_fixed=0.0, fused_fixed=0.0, fused_kernel_img=fused, fused_requested_img=fused,
                       eager_backward_img=0.0, fused_backward_img=0.0, kernels={"conv2d_kernel": 3}, fallbacks=[],
                       backward_kernels={}, backward_reference=[], top_aten=[])


def test_load_renders_the_readme_table(tmp_path):
    saved = tmp_path / "t.json"
    saved.write_text(json.dumps(traffic.to_json([_row("inference", 20e6, 6e6), _row("training", 40e6, 30e6)])))
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- traffic:begin -->\nold\n<!-- traffic:end -->\ny\n")
    assert traffic.main(["--load", str(saved), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("x\n") and text.endswith("y\n")
    assert "| resnet50 layer1.1 Bottleneck 256-64-256 56x56 | 20.0 → 6.0 | 0.30 |" in text
    assert "| 40.0 → 30.0 | 0.75 |" in text


def test_aten_bytes_without_the_interpreter():
    """Eager ops count inputs + outputs each; a fastres op on the native backend counts its kernel
    as the one op it is (x read, out written, the per-channel vectors)."""
    import fastres
    from fastres import functional as F
    x, y = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    nb = x.numel() * 4
    assert traffic.aten_bytes(lambda: torch.relu(x + y)) == 3 * nb + 2 * nb
    if "native" in fastres.available_backends():
        mean, var = torch.zeros(8), torch.ones(8)
        moved = traffic.aten_bytes(lambda: F.bn_act(x, mean, var, backend="native"))
        assert 2 * nb <= moved < 2 * nb + 8 * 4 * 8, moved
