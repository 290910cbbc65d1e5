"""examples/train_distributed.py under torchrun (2 gloo processes): DDP and FSDP2 train, save a
torch.distributed.checkpoint, and a second launch resumes from it; a batch the ranks cannot split
evenly is refused by the argument checks. Each launch has a deadline."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
DEADLINE_S = 180

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo needed")


def _launch(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(EXAMPLE), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S, env=env)


@pytest.mark.parametrize("model", ["small", "resnet18"])  # resnet18: the reference layout's aliased keys
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_trains_saves_and_resumes(tmp_path, strategy, model):
    ckpt = tmp_path / "ckpt"
    common = ("--strategy", strategy, "--model", model, "--checkpoint-dir", ckpt, "--batch-size", "8", "--T", "2")
    first = _launch(*common, "--steps", "2", "--save-every", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (ckpt / ".metadata").exists()
    assert "2/2" in first.stderr  # rank 0's progress bar reached the end
    loss = re.search(r"final loss ([0-9.]+), held-out accuracy ([0-9.]+)", first.stderr)
    assert loss, first.stderr[-2000:]
    second = _launch(*common, "--steps", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {ckpt} at step 2" in second.stderr
    assert "3/3" in second.stderr
    # The resumed run ends where an uninterrupted one does (the last step's loss, the accuracy).
    straight = _launch("--strategy", strategy, "--model", model, "--checkpoint-dir", tmp_path / "straight",
                       "--batch-size", "8", "--T", "2", "--steps", "3")
    assert straight.returncode == 0, straight.stderr[-3000:]
    final = re.compile(r"final loss [0-9.]+, held-out accuracy [0-9.]+")
    assert final.search(second.stderr).group() == final.search(straight.stderr).group()


def test_a_batch_the_ranks_cannot_split_is_refused(tmp_path):
    run = _launch("--batch-size", "7", "--steps", "1", "--checkpoint-dir", tmp_path / "ckpt")
    assert run.returncode != 0
    assert "--batch-size: expected a multiple of the world size 2" in run.stderr, run.stderr[-2000:]
