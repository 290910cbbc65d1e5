"""The triangle example runs end to end at a tiny size and writes its figure."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_triangles.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_triangles", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triangles_are_triangles_plus_noise():
    example = _load()
    clean, masks = example.triangles(8, 24, 0.0, torch.Generator().manual_seed(0))
    assert clean.shape == (8, 1, 24, 24) and masks.shape == (8, 24, 24)
    assert torch.equal(clean[:, 0], masks.float())
    area = masks.float().mean((1, 2))
    assert (area > 0.03).all() and (area < 0.6).all()
    noisy, same = example.triangles(8, 24, 2.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, masks)
    assert 1.6 < (noisy - clean).std().item() < 2.4


def test_example_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the example draws its figure with matplotlib")
    example = _load()
    out = tmp_path / "tri.png"
    results = example.main(
        ["--iters", "2", "--batch", "4", "--size", "16", "--width", "8", "--T", "2",
         "--sigmas", "0", "1", "--eval-samples", "4", "--threads", "1", "--out", str(out)]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert results["sigma"] == [0.0, 1.0]
    assert all(0.0 <= v <= 1.0 for v in results["iou_dfm"] + results["iou_feedforward"])
    printed = capsys.readouterr().out
    assert "IoU feedforward" in printed and "IoU DFM" in printed


def test_without_matplotlib_it_says_so_first_and_skips_the_figure(tmp_path, capsys, monkeypatch):
    """Before: both models trained, then ``No module named 'matplotlib'`` ended the run."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    example = _load()
    out = tmp_path / "tri.png"
    results = example.main(
        ["--iters", "1", "--batch", "2", "--size", "8", "--width", "4", "--T", "1",
         "--sigmas", "0", "--eval-samples", "2", "--threads", "1", "--out", str(out)]
    )
    assert results["figure"] is None and not out.exists()
    assert len(results["iou_dfm"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("matplotlib is not installed") and "pip install matplotlib" in captured.err
