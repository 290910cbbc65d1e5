"""README code that a user copies must run as written: each snippet is taken from README.md and
executed in a fresh directory (files it writes land there), then its results are checked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    """The first ```python block of the README section that starts with ``heading``."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(text, start)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


def test_whole_models_snippet_runs_as_written(tmp_path, monkeypatch):
    code = _python_block_after("## Whole models")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Whole models)", "exec"), namespace)

    # It wrote the checkpoint it loads, and the fused model holds the reference's weights.
    # The training-mode forwards change buffers, the decay's step counter T and (by its QR at t=0) Q;
    # no optimizer ran, so every other trainable parameter is still the reference's.
    saved = torch.load(tmp_path / "dfbmodels_resnet18.pt")
    trainable = {name: p for name, p in namespace["model"].named_parameters()
                 if p.requires_grad and not name.endswith(".Q")}
    assert len(trainable) > 20, f"expected the ResNet18's weights; got {sorted(trainable)}"
    for name, param in trainable.items():
        assert name in saved, f"{name}: in the fused model, not in the saved reference checkpoint"
        torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0, msg=name)

    logits, trajectory = namespace["logits"], namespace["trajectory"]
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    assert len(trajectory) == 5 and all(p.shape == (4, 10) for p in trajectory)
    assert namespace["model"].checkpoint is False


@pytest.mark.parametrize("heading", ["## Example", "## Whole models"])
def test_snippet_sections_exist(heading):
    """The sections the snippet tests read are still there (a renamed heading fails here, not silently)."""
    assert _python_block_after(heading).strip()
