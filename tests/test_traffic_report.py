"""fastres.traffic renders a saved run (--load) into the README block without measuring again."""
import json

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
