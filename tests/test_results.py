"""Every results table in the README is the committed file that `make results` generated from a run's own
results.json, and that file shows the run's own table (no figure typed by hand)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from csr import report
from retrieval import sweep

ROOT = Path(__file__).resolve().parent.parent


def test_every_results_block_in_the_readme_equals_its_generated_file():
    blocks = report.readme_blocks((ROOT / "README.md").read_text())
    assert {"demo", "demo-text-summary"} <= set(blocks), set(blocks)  # the quick start and the text headline
    for name, body in blocks.items():
        path = ROOT / "docs" / "results" / f"{name}.md"
        assert path.exists(), f"README block results:{name} has no generated file {path}"
        assert body == path.read_text(), f"README block results:{name} differs from {path}: run `make results`"


def test_generated_file_shows_the_runs_own_table_with_its_stamp(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("val", 100)):
        np.save(tmp_path / f"{split}_emb.npy", rng.random((n, 16), dtype=np.float32))
        np.save(tmp_path / f"{split}_labels.npy", rng.integers(0, 3, n))
    out = tmp_path / "results" / "fmnist"
    table = sweep.main(["--train-emb", str(tmp_path / "train_emb.npy"), "--eval-emb", str(tmp_path / "val_emb.npy"),
                        "--out", str(out), "--methods", "pca", "trunc", "full", "--ks", "2", "4",
                        "--ablation-k", "0", "--recipes"])
    (tmp_path / ".cache" / "fmnist").mkdir(parents=True)
    (tmp_path / ".cache" / "fmnist" / "stage_times.txt").write_text("images 5.5\nsweep 10\nsweep 12\n")
    assert report.available(tmp_path) == ["demo"]
    text = report.render("demo", tmp_path)
    res = json.loads((out / "results.json").read_text())
    assert table.rstrip() in text  # the table the run printed and wrote, unchanged
    assert (out / "table.md").read_text().rstrip() in text
    assert f"at commit {res['commit']}" in text and res["machine"]["cpu"] in text
    assert "Wall time per stage (s): images 6, sweep 12; total 18." in text and "`make demo`" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:demo -->\nold figures\n<!-- /results:demo -->\nend\n")
    report.write_all(tmp_path / "docs", tmp_path)
    assert report.sync_readme(readme, tmp_path / "docs") == ["demo"]
    assert report.readme_blocks(readme.read_text()) == {"demo": (tmp_path / "docs" / "demo.md").read_text()}
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("end\n")
