"""The triangle examples run end to end at a tiny size and write their figures (and the study its JSON)."""
from __future__ import annotations

import importlib
import json
import math
import pathlib
import sys

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch):
    """The examples import their shared module ``triangle_task`` as a script run from examples/ would;
    the study's spawned workers inherit this sys.path."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for name in ("triangle_task", "train_triangles", "triangles_study"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def _load(name="train_triangles"):
    return importlib.import_module(name)


def test_triangles_are_triangles_plus_noise():
    example = _load("triangle_task")
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


def test_trajectory_weights_sum_to_one_and_weigh_the_steps():
    task = _load("triangle_task")
    assert task.trajectory_weights("uniform", 4) == [0.25] * 4
    assert task.trajectory_weights("last", 3) == [0.0, 0.0, 1.0]
    assert task.trajectory_weights("linear", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(ValueError, match="expected one of"):
        task.trajectory_weights("mean", 3)
    logits = [torch.randn(2, 2, 4, 4) for _ in range(3)]
    masks = torch.randint(0, 2, (2, 4, 4))
    loss = task.trajectory_loss(logits, masks, task.trajectory_weights("last", 3))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[-1], masks))


def test_study_quick_writes_figures_and_finite_results(tmp_path, capsys):
    """The smoke run of the study: every file written, every number finite, one row per (N, sigma)."""
    study = _load("triangles_study")
    out = tmp_path / "study"
    results = study.main(["--quick", "--out", str(out)])
    for name in ("noise.png", "data.png", "steps.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(results["table"]))
    config = saved["config"]
    assert [(r["n"], r["sigma"]) for r in saved["table"]] == [(n, s) for n in config["sizes"] for s in config["sigmas"]]
    # seed 0 over the whole grid, the other seeds at the rate picked
    assert len(saved["runs"]) == 2 * len(config["sizes"]) * (len(config["lrs"]) + config["seeds"] - 1)
    for row in saved["table"]:
        for model in ("feedforward", "dfm"):
            assert len(set(row["picked_lr"][model])) == 1 and row["picked_lr"][model][0] in config["lrs"]
    for row in saved["table"]:
        for model in ("feedforward", "dfm"):
            assert len(row[model]["per_seed"]) == config["seeds"]
            assert all(0.0 <= v <= 1.0 for v in row[model]["per_seed"])
            assert all(math.isfinite(row[model][k]) for k in ("mean", "std", "min", "max"))
        assert all(math.isfinite(v) for v in [row["difference"]["mean"], row["difference"]["std"], *row["difference"]["ci95"]])
        assert row["difference"]["verdict"] in ("DFM better", "DFM worse", "tie")
        assert len(row["dfm_per_step_mean"]) == config["T"]
    for run in saved["runs"]:
        assert math.isfinite(run["last_train_loss"]) and run["cpu_s"] > 0
    assert "triangles_study.py --quick" in saved["command"]
    assert "| N | test sigma |" in capsys.readouterr().out


def test_study_paired_verdict():
    study = _load("triangles_study")
    assert study.paired([0.5, 0.52, 0.51], [0.40, 0.41, 0.40])["verdict"] == "DFM better"
    assert study.paired([0.40, 0.41, 0.40], [0.5, 0.52, 0.51])["verdict"] == "DFM worse"
    tie = study.paired([0.5, 0.3, 0.45], [0.4, 0.41, 0.40])
    assert tie["verdict"] == "tie" and tie["ci95"][0] < 0 < tie["ci95"][1]
    # 95% interval of a paired mean with 3 seeds: t(2) = 4.303
    d = study.paired([0.3, 0.2, 0.4], [0.0, 0.0, 0.0])
    assert d["ci95"][1] - d["mean"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5)


def test_study_rejects_a_step_sigma_outside_the_sigmas(capsys):
    study = _load("triangles_study")
    with pytest.raises(SystemExit):
        study.parse_args(["--sigmas", "0", "1", "--data-sigmas", "0", "--step-sigma", "7"])
    assert "--step-sigma: expected values among --sigmas [0.0, 1.0]; got [7.0]" in capsys.readouterr().err
