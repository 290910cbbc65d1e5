"""Data parallelism with one-process semantics, on a GroupNorm FeedbackModel: 2 CPU processes
(gloo, loopback) under DistributedDataParallel and under FSDP2 (dfm_fused.distributed.fully_shard)
end with the parameters of one process running the same per-rank micro-batches with gradient
averaging: every checkpoint mode, SGD+momentum and Adam, gradient accumulation (no_sync, FSDP2's
set_requires_gradient_sync) and the early stop (atol), whose stopping step the ranks agree on.

Every distributed configuration of a model runs in one spawn of two workers (a spawn costs more
than the training); the workers run each configuration, rank 0 saves the parameters, and the
one-process runs and comparisons happen here. tests/test_fsdp.py reuses this machinery."""
from __future__ import annotations

import contextlib
import datetime
import gc
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dfm_fused
from dfm_fused.distributed import fully_shard
from dfm_fused.modules import _DecayParameters

from _helpers import TOLERANCE, assert_close, rel_err

WORLD, STEPS = 2, 3
CONFIGS = [(checkpoint, optimizer) for checkpoint in (False, True, "selective") for optimizer in ("sgd", "adam")]
# A process group that stalls (a rank lost, the store's host gone first) fails within this many
# seconds instead of hanging the suite; the whole spawn gets a deadline too.
TIMEOUT_S = 60

# Threads per worker; the one-process runs use as many (as_in_a_worker), since CPU kernels sum in
# another order with more threads, and a ReLU or max-pool kink turns that rounding into a 5e-4
# relative difference of a ResNet's weights after one step (measured).
WORKER_THREADS = 1

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo needed")


# --- the machinery (also used by tests/test_fsdp.py) ---------------------------------------------

def _entry(rank, world, port, job, path):
    torch.set_num_threads(WORKER_THREADS)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        results = job(rank)
        if rank == 0:
            torch.save(results, path)
        # Rank 0 hosts the TCP store: no rank tears the group down while another still uses it
        # (a rank left alone in destroy_process_group once hung a torch 2.13 run).
        dist.barrier()
    finally:
        gc.collect()  # FSDP2's device meshes hold process groups: gone before the groups are
        dist.destroy_process_group()


@contextlib.contextmanager
def as_in_a_worker():
    """Run the body with the workers' torch thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(job, tmp_path, deadline_s: float):
    """Run ``job(rank)`` on 2 gloo processes; returns what rank 0's job returned. Fails the test
    if the workers are not done within ``deadline_s`` seconds."""
    path = tmp_path / f"{job.__name__}.pt"
    workers = mp.spawn(_entry, args=(WORLD, _free_port(), job, str(path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + deadline_s
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the workers of {job.__name__} did not finish within {deadline_s} s (exit codes "
                        f"{[process.exitcode for process in workers.processes]})")
    return torch.load(path, weights_only=False)


def make_optimizer(name, parameters):
    trainable = [p for p in parameters if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=0.05, momentum=0.9)
    # Adam's step m / sqrt(v) magnifies the rounding differences of a gradient component whose
    # sign changes between steps; at this rate such a step moves the weights by less than the
    # float32 tolerance, while every weight still moves by more than 100 times it (checked).
    return torch.optim.Adam(trainable, lr=1e-4)


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (a collective for FSDP2's sharded ones: every rank calls it)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def distributed_training(case, strategy, checkpoint, optimizer, rank, accumulate=1, **forward):
    """``case``'s model trained for STEPS optimizer steps on this rank's micro-batches under
    ``strategy`` (``"ddp"`` or ``"fsdp2"``); returns the whole parameters and the steps run."""
    model = case.model(checkpoint)
    if strategy == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        net = fully_shard(model)
    opt = make_optimizer(optimizer, net.parameters())
    data = case.data()
    steps_run = []
    for s in range(STEPS):
        opt.zero_grad()
        for j in range(accumulate):
            last = j == accumulate - 1
            if strategy == "fsdp2":
                net.set_requires_gradient_sync(last)
            with net.no_sync() if strategy == "ddp" and not last else contextlib.nullcontext():
                case.loss(net, data, s, j, rank, **forward).backward()
            steps_run.append(model.steps_run)
        opt.step()
    return full_parameters(model), steps_run


@as_in_a_worker()
def one_process_training(case, checkpoint, optimizer, accumulate=1, **forward):
    """What the ranks compute, in one process: per optimizer step and accumulation round, the decay
    QR once (each rank runs it once per forward, on the same Q), then every rank's micro-batch,
    its loss divided by the world size (the gradient average)."""
    model = case.model(checkpoint)
    decays = [m for m in model.modules() if isinstance(m, _DecayParameters)]
    for decay in decays:
        decay.qr_in_forward = False  # the QR runs below, once per round, as on each rank
    opt = make_optimizer(optimizer, model.parameters())
    data = case.data()
    for s in range(STEPS):
        opt.zero_grad()
        for j in range(accumulate):
            for decay in decays:
                decay.orthogonalize_Q()
            for rank in range(WORLD):
                (case.loss(model, data, s, j, rank, **forward) / WORLD).backward()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_parameters(actual, expected, label, initial=None, tol=None):
    assert actual.keys() == expected.keys(), label
    for name, value in expected.items():
        # Relative 2-norm at the dtype's tolerance (or tol): the ranks' gradients are summed in
        # another order than in one process.
        assert_close(actual[name], value, value.dtype, f"{label}: {name}", tol=tol)
    if initial is not None:  # training moved the weights well beyond the tolerance: not vacuous
        moved = [name for name, value in expected.items()
                 if rel_err(value, initial[name], 1e-12) > 100 * TOLERANCE[value.dtype]]
        assert len(moved) >= len(expected) // 2, f"{label}: only {moved} moved"


def assert_strategies_match_one_process(runs, case, checkpoint, optimizer, tol=None):
    """``runs[strategy, checkpoint, optimizer]`` of DDP and of FSDP2 against one process training
    ``case`` the same way, and against each other."""
    expected = one_process_training(case, checkpoint, optimizer)
    initial = dict(case.model(checkpoint).named_parameters())
    label = f"checkpoint={checkpoint!r}, {optimizer}"
    for strategy in ("ddp", "fsdp2"):
        assert_same_parameters(runs[strategy, checkpoint, optimizer], expected, f"{strategy}, {label}", initial, tol)
    assert_same_parameters(runs["fsdp2", checkpoint, optimizer], runs["ddp", checkpoint, optimizer],
                           f"fsdp2 against ddp, {label}", tol=tol)


# --- the GroupNorm FeedbackModel -----------------------------------------------------------------

class GroupNormCase:
    """A small FeedbackModel with GroupNorm only (no batch statistics). Convolutions followed by a
    norm have no bias: its gradient is zero in exact arithmetic, and Adam would turn the rounding
    noise in it into full-size steps of either sign."""

    T, MICRO = 3, 2

    @staticmethod
    def model(checkpoint) -> dfm_fused.FeedbackModel:
        torch.manual_seed(0)
        nn = torch.nn
        frontend = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        body = nn.Sequential(
            nn.Conv2d(8 + 4, 16, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 12, 3, padding=1),
        )
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        return dfm_fused.FeedbackModel(frontend, body, head, in_channels=8, pred_channels=8, fb_channels=4,
                                       state_stride=2, groups=4, checkpoint=checkpoint)

    @classmethod
    def data(cls, rounds=2):
        g = torch.Generator().manual_seed(1)
        shape = (STEPS, rounds, WORLD, cls.MICRO)
        x = torch.randn(*shape, 3, 10, 10, generator=g)
        x[:, :, 1] *= 4  # rank 1's images stand apart, so its state settles at another step alone
        y = torch.randint(0, 3, shape, generator=g)
        h0 = torch.randn(*shape, 12, 5, 5, generator=g) * 1e-3
        return x, y, h0

    @classmethod
    def loss(cls, net, data, s, j, rank, T=None, **forward):
        x, y, h0 = data
        trajectory = net(x[s, j, rank], T or cls.T, h0=h0[s, j, rank], return_all=True, **forward)
        return sum(torch.nn.functional.cross_entropy(p, y[s, j, rank]) for p in trajectory)


# Early stop: T steps at most, the sums read every 2 steps; ATOL makes the ranks' batches settle at
# different steps when judged alone (checked below), so agreeing is needed.
EARLY_T, ATOL = 8, 8.67


def _group_norm_job(rank):
    case = GroupNormCase
    out = {}
    for checkpoint, optimizer in CONFIGS:
        for strategy in ("ddp", "fsdp2"):
            out[strategy, checkpoint, optimizer] = distributed_training(case, strategy, checkpoint, optimizer, rank)[0]
    for strategy in ("ddp", "fsdp2"):
        out[strategy, "accumulate"] = distributed_training(case, strategy, True, "sgd", rank, accumulate=2)[0]
        params, steps = distributed_training(case, strategy, True, "sgd", rank, T=EARLY_T, atol=ATOL, check_every=2)
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, steps)
        out[strategy, "early_stop"] = params, everyone
    return out


@pytest.fixture(scope="module")
def group_norm_runs(tmp_path_factory):
    return spawn(_group_norm_job, tmp_path_factory.mktemp("ddp"), deadline_s=8 * TIMEOUT_S)


@needs_gloo
@pytest.mark.parametrize("checkpoint,optimizer", CONFIGS)
def test_ddp_and_fsdp2_match_one_process(group_norm_runs, checkpoint, optimizer):
    assert_strategies_match_one_process(group_norm_runs, GroupNormCase, checkpoint, optimizer)


@needs_gloo
def test_gradient_accumulation_matches_one_process(group_norm_runs):
    """DDP's no_sync and FSDP2's set_requires_gradient_sync(False) over 2 rounds per step (each
    round's forward runs the decay QR again, on every rank, as one process would per round)."""
    expected = one_process_training(GroupNormCase, True, "sgd", accumulate=2)
    initial = dict(GroupNormCase.model(True).named_parameters())
    for strategy in ("ddp", "fsdp2"):
        assert_same_parameters(group_norm_runs[strategy, "accumulate"], expected, f"{strategy} accumulation", initial)


def _steps_alone(rank_rows_only: int) -> list[int]:
    """The steps the early stop runs on one rank's micro-batches judged alone, per step s."""
    case, model = GroupNormCase, GroupNormCase.model(True)
    x, _, h0 = case.data()
    steps = []
    with torch.no_grad():
        for s in range(STEPS):
            model(x[s, 0, rank_rows_only], EARLY_T, h0=h0[s, 0, rank_rows_only], atol=ATOL, check_every=2)
            steps.append(model.steps_run)
    return steps


@as_in_a_worker()
def _one_process_early_stop():
    """One process with both ranks' micro-batches as one batch (the GroupNorm model treats each
    image alone, and the mean loss over both is the ranks' average): its parameters and the steps
    its early stop ran per optimizer step."""
    model = GroupNormCase.model(True)
    x, y, h0 = GroupNormCase.data()
    opt = make_optimizer("sgd", model.parameters())
    steps = []
    for s in range(STEPS):
        trajectory = model(x[s, 0].flatten(0, 1), EARLY_T, h0=h0[s, 0].flatten(0, 1), return_all=True, atol=ATOL,
                           check_every=2)
        steps.append(model.steps_run)
        loss = sum(torch.nn.functional.cross_entropy(p, y[s, 0].flatten(0, 1)) for p in trajectory)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, steps


@needs_gloo
def test_early_stop_ranks_agree_and_match_one_process(group_norm_runs):
    """With atol, the ranks add their sums of |h| and stop at one step: the step one process
    stops at for both micro-batches as one batch, with the same parameters after training."""
    # Judged alone, the two ranks' batches stop at different steps: agreeing is needed.
    assert _steps_alone(0)[0] != _steps_alone(1)[0]
    expected, together = _one_process_early_stop()
    assert any(n < EARLY_T for n in together), f"the early stop never stopped early: {together}"
    for strategy in ("ddp", "fsdp2"):
        params, steps = group_norm_runs[strategy, "early_stop"]
        assert steps[0] == steps[1], f"{strategy}: the ranks ran {steps}"
        assert steps[0] == together, f"{strategy}: ran {steps[0]}, one process {together}"
        assert_same_parameters(params, expected, f"{strategy} early stop")
