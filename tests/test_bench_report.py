"""bench/report.py: pytest-benchmark JSON -> Markdown table and PNG."""
import json

from bench import report


def _json(tmp_path, rows):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [
        {"name": f"test[{p}]", "group": g, "stats": {"mean": t}, "extra_info": {"provider": p}} for g, p, t in rows]}))
    return str(path)


def test_table_and_plot(tmp_path):
    path = _json(tmp_path, [("resnet50 infer", "eager", 0.2), ("resnet50 infer", "fastres-native", 0.1),
                            ("resnet50 infer", "compile", 0.16)])
    png = tmp_path / "s.png"
    assert report.main([path, "--plot", str(png)]) == 0
    text = report.table(report.load([path]))
    assert text.splitlines()[0] == "| group | eager | compile | fastres-native |"
    assert "| resnet50 infer | 200.00 ms (1.00x) | 160.00 ms (1.25x) | 100.00 ms (2.00x) |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_setup_seconds_table(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": [
        {"name": "a", "group": "g", "stats": {"mean": 0.2}, "extra_info": {"provider": "compile", "setup_s": 12.5}},
        {"name": "b", "group": "g", "stats": {"mean": 0.1}, "extra_info": {"provider": "fastres-native", "setup_s": 0.25}}]}))
    text = report.setup_table(report.load_setup([str(path)]))
    assert "| g | 12.50 | 0.25 |" in text
    assert report.setup_table({}) == ""


def test_bad_json_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert report.main([str(bad)]) == 2
    assert "cannot read benchmark JSON" in capsys.readouterr().err


def test_readme_block_is_replaced_between_markers(tmp_path):
    path = _json(tmp_path, [("resnet50 infer", "eager", 0.2), ("resnet50 infer", "fastres-native", 0.1)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.BEGIN}\n| old | table |\n{report.END}\nafter\n")
    assert report.main([path, "--plot", str(tmp_path / "docs" / "s.png"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| old | table |" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{report.END}\nafter\n")
    assert "| resnet50 infer | 200.00 ms (1.00x) | 100.00 ms (2.00x) |" in text
    assert "![speedups vs eager](docs/s.png)" in text


def test_readme_without_markers_is_one_line(tmp_path, capsys):
    path = _json(tmp_path, [("g", "eager", 0.2)])
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert report.main([path, "--readme", str(readme)]) == 2
    assert "needs one '<!-- results:begin -->' line" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"
