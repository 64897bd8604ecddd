"""Tests for repic_ray/evaluation/report.py: markdown table and plots across methods."""

import json

from repic_ray.evaluation.report import main


def test_report_table_and_plots(tmp_path):
    zero_shot = [
        ["a.jpg", ["<Bo>"], "A dog on grass.", "q"],
        ["b.jpg", ["<Bo>", "<Anya>"], "Anya and a dog.", "q"],
    ]
    rl = [
        ["a.jpg", ["<Bo>"], "Bo on grass.", "q"],
        ["b.jpg", ["<Bo>", "<Anya>"], "Anya and Bo.", "q"],
    ]
    files = []
    for name, rows in (("zs", zero_shot), ("rl", rl)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
        files.append(f"{name}={path}")
    out_dir = tmp_path / "report"
    assert main(["--method", files[0], "--method", files[1], "--out", str(out_dir)]) == 0
    text = (out_dir / "report.md").read_text()
    # zs: slots 3, hits 1 (Anya), no MISS -> P 100, R 33.3, F1 = 2*1*(1/3)/(4/3) = 50;
    # R@1 = 0/1, R@2 = 1/2.
    assert "| zs | 100.0 | 33.3 | 50.0 | 0.0 | 50.0 |" in text
    # rl: every slot hit -> 100 everywhere.
    assert "| rl | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |" in text
    for png in ("recall_by_k.png", "f1_by_k.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
