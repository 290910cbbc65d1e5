"""DistributedDataParallel over a memory-saving DFM: 2 CPU processes (gloo, loopback) end
with the same parameters as one process training on the whole batch."""
from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dfm_fused

from _helpers import assert_close

STEPS, T, BATCH, LR = 3, 3, 4, 0.05
# A process group that stalls (a rank lost, the store's host gone first) fails within this many
# seconds instead of hanging the suite; the whole spawn gets three times as long.
TIMEOUT_S = 60


def _model() -> dfm_fused.FeedbackModel:
    torch.manual_seed(0)
    frontend = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    body = torch.nn.Sequential(
        torch.nn.Conv2d(8 + 4, 16, 3, stride=2, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 12, 3, padding=1),
    )
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    return dfm_fused.FeedbackModel(frontend, body, head, in_channels=8, pred_channels=8, fb_channels=4,
                                   state_stride=2, groups=4, checkpoint=True)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 3, 10, 10, generator=g)
    y = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    h0 = torch.randn(STEPS, BATCH, 12, 5, 5, generator=g) * 1e-3
    return x, y, h0


def _train(model, x, y, h0, rows):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for s in range(STEPS):
        trajectory = model(x[s, rows], T, h0=h0[s, rows], return_all=True)
        loss = sum(torch.nn.functional.cross_entropy(p, y[s, rows]) for p in trajectory)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        _train(ddp, *_data(), rows)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
        # Rank 0 hosts the TCP store: no rank tears the group down while another still uses it
        # (a rank left alone in destroy_process_group once hung a torch 2.13 run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo needed")
def test_ddp_two_processes_match_one_process(tmp_path):
    path = tmp_path / "ddp.pt"
    workers = mp.spawn(_worker, args=(2, _free_port(), str(path)), nprocs=2, join=False)
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the two DDP workers did not finish within {3 * TIMEOUT_S} s (exit codes "
                        f"{[process.exitcode for process in workers.processes]})")
    distributed = torch.load(path, weights_only=True)
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, *_data(), slice(0, BATCH))
    single = model.state_dict()
    moved = 0
    for name, value in single.items():
        # Relative 2-norm: gloo sums the two halves' gradients in another order than one process.
        assert_close(distributed[name], value, torch.float32, name)
        moved += not torch.equal(value, initial[name])
    assert moved >= 8  # training changed the weights, so the comparison is not vacuous
