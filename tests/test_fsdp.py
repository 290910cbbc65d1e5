"""FSDP2 (dfm_fused.distributed.fully_shard) on every model the package builds or patches, on 2 gloo
processes: one-process semantics on a BatchNorm ResNet-style DFM (statistics per rank, as under
DDP), the decay QR written into the sharded Q, ResNet18/34/50 and a patched reference model,
torch.distributed.checkpoint both ways (the reference key layout included), and the error for a
module that writes a parameter in its forward. Machinery from tests/test_ddp.py."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

import dfm_fused
from dfm_fused import models
from dfm_fused.distributed import broadcast_buffers, fully_shard, load_full_state_dict
from dfm_fused.models.reference import ReferenceResNet18

from _helpers import assert_close
from test_ddp import (CONFIGS, STEPS, TIMEOUT_S, WORLD, GroupNormCase, as_in_a_worker, assert_same_parameters,
                      assert_strategies_match_one_process, distributed_training, full_parameters, make_optimizer,
                      needs_gloo, spawn)

nn = torch.nn


class BatchNormCase:
    """A small SegmentationDFM with BatchNorm (residual stages, atrous pyramid, decoder). Each rank
    normalises its micro-batch with its own statistics, as one process running the micro-batches
    one after the other does. ``to_state.bias`` is frozen: the per-channel GroupNorm of the state
    update removes it, so its gradient is rounding noise that Adam would make full-size steps of.

    In float64: several BatchNorm biases here get gradients near zero by cancellation (their
    values after 3 steps are ~1e-5 of the weights'), whose float32 rounding differs between one
    process and two by up to 1e-3 of their own size, and the float64 rounding by up to 2.4e-10;
    TOLERANCE (1e-8) is float64's, widened for that cancellation, and 1000 times float32's."""

    T, MICRO = 2, 2
    TOLERANCE = 1e-8

    @staticmethod
    def model(checkpoint) -> models.SegmentationDFM:
        torch.manual_seed(0)
        model = models.SegmentationDFM(3, classes=2, fb_filters=2, class_filters=6, width=8, blocks=(1, 1, 1),
                                       rates=(2,), norm="batch", checkpoint=checkpoint).double()
        model.to_state.bias.requires_grad_(False)
        return model

    @classmethod
    def data(cls, rounds=1):
        g = torch.Generator().manual_seed(2)
        shape = (STEPS, rounds, WORLD, cls.MICRO)
        x = torch.randn(*shape, 3, 16, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (*shape, 16, 16), generator=g)
        h0 = torch.randn(*shape, 8, 4, 4, generator=g, dtype=torch.float64) * 1e-3
        return x, y, h0

    @classmethod
    def loss(cls, net, data, s, j, rank):
        x, y, h0 = data
        return nn.functional.cross_entropy(net(x[s, j, rank], cls.T, h0=h0[s, j, rank]), y[s, j, rank])


def _zero_d(model):
    return {p for p in model.parameters() if p.dim() == 0}


def _batch_norm_job(rank):
    out = {}
    for checkpoint, optimizer in CONFIGS:
        for strategy in ("ddp", "fsdp2"):
            out[strategy, checkpoint, optimizer] = distributed_training(BatchNormCase, strategy, checkpoint,
                                                                        optimizer, rank)[0]
    return out


@pytest.fixture(scope="module")
def batch_norm_runs(tmp_path_factory):
    return spawn(_batch_norm_job, tmp_path_factory.mktemp("fsdp_bn"), deadline_s=8 * TIMEOUT_S)


@needs_gloo
@pytest.mark.parametrize("checkpoint,optimizer", CONFIGS)
def test_batch_norm_dfm_ddp_and_fsdp2_match_one_process(batch_norm_runs, checkpoint, optimizer):
    assert_strategies_match_one_process(batch_norm_runs, BatchNormCase, checkpoint, optimizer, BatchNormCase.TOLERANCE)


# --- ResNets, a patched reference model, checkpoints, bad input -----------------------------------

# 64x64 images (the operating point: a 2x2 state); at 32x32 the last stage's BatchNorm normalises
# 2 values per channel and the first step's gradients reach 3e5, so the weights blow up.
RESNET_T, RESNET_B, FB, SIZE = 2, 2, 8, 64  # FB: fed-back filters (the reference needs some)
RESNET = dict(fb_filters=FB, n_classes=10, shape=(SIZE, SIZE))


def _resnet_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD, RESNET_B, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 10, (WORLD, RESNET_B), generator=g)
    h0 = torch.randn(WORLD, RESNET_B, 512 + FB, SIZE // 32, SIZE // 32, generator=g) * 1e-3
    return x, y, h0


def _resnet18():
    torch.manual_seed(0)
    return models.ResNet18(**RESNET, checkpoint=True)


def _patched_reference():
    torch.manual_seed(0)
    model = ReferenceResNet18(**RESNET)
    dfm_fused.patch(model)
    return model


def _resnet_loss(model, rank, reference=False):
    x, y, h0 = _resnet_data()
    # The reference's own early stop (atol, per rank) is off: atol=-1 never stops early.
    kwargs = {"atol": -1.0} if reference else {}
    return nn.functional.cross_entropy(model(x[rank], RESNET_T, h0=h0[rank], **kwargs), y[rank])


def _one_step(model, rank, reference=False):
    """One SGD step on this rank's micro-batch; returns Q gathered after the forward."""
    opt = make_optimizer("sgd", model.parameters())
    loss = _resnet_loss(model, rank, reference)
    after_forward = full_parameters(model.error_head)["Q"]
    loss.backward()
    opt.step()
    return after_forward


@as_in_a_worker()
def _eval_logits(model):
    x, _, h0 = _resnet_data()
    model.eval()
    with torch.no_grad():
        return model(x.flatten(0, 1), RESNET_T, h0=h0.flatten(0, 1))


class _DriftingScale(nn.Module):
    """Halves its own parameter in every forward: FSDP2 would drop the write."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        with torch.no_grad():
            self.scale.mul_(0.5)
        return x * self.scale


def _models_job(rank, reverse_path, checkpoint_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    out = {}
    # Plain fully_shard refuses the 0-d parameters (FSDP2's rule) ...
    try:
        torch_fully_shard(_resnet18())
    except ValueError as error:
        out["plain"] = str(error)
    # ... and with them ignored, the QR still lands in the sharded Q (GroupNorm FeedbackModel).
    model = GroupNormCase.model(True)
    torch_fully_shard(model, ignored_params=_zero_d(model))
    opt = make_optimizer("sgd", model.parameters())
    GroupNormCase.loss(model, GroupNormCase.data(), 0, 0, rank).backward()
    opt.step()
    out["plain_ignored"] = full_parameters(model)

    model = fully_shard(_resnet18())
    out["resnet18_local_Q"] = tuple(model.error_head.Q.to_local().shape)
    out["resnet18_Q_after_forward"] = _one_step(model, rank)
    out["resnet18"] = full_parameters(model)
    # A torch.distributed.checkpoint save of the sharded model (running statistics made rank 0's first).
    broadcast_buffers(model)
    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint_dir)
    out["resnet18_logits"] = _eval_logits(model)

    model = fully_shard(_patched_reference())
    out["patched_Q_after_forward"] = _one_step(model, rank, reference=True)
    out["patched"] = full_parameters(model)

    # The same steps under DDP. The reference model holds a trainable parameter its forward never
    # uses (layernorm_weight): without find_unused_parameters DDP never reduces the bucket holding
    # it, and this step's gradients would be each rank's own (measured: 0.98 relative off).
    for name, build in (("resnet18", _resnet18), ("patched", _patched_reference)):
        model = build()
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=name == "patched")
        opt = make_optimizer("sgd", net.parameters())
        _resnet_loss(net, rank, reference=name == "patched").backward()
        opt.step()
        out[name + "_ddp"] = full_parameters(model)

    # The reverse: a single-process checkpoint in the reference key layout, loaded under FSDP2.
    model = fully_shard(_resnet18())
    load_full_state_dict(model, torch.load(reverse_path, weights_only=True))
    out["reverse_logits"] = _eval_logits(model)

    for name, build in (("resnet34", models.ResNet34), ("resnet50", models.ResNet50)):
        torch.manual_seed(0)
        model = fully_shard(build(**RESNET))
        x, _, _ = _resnet_data()
        model(x[rank], 1)  # a training forward: the QR at step 0
        out[name + "_Q"] = full_parameters(model.error_head)["Q"]

    # A module writing its parameter in forward: a clear error, on every rank alike.
    torch.manual_seed(0)
    frontend = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _DriftingScale())
    body = nn.Sequential(nn.Conv2d(12, 12, 3, stride=2, padding=1))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model = dfm_fused.FeedbackModel(frontend, body, head, in_channels=8, pred_channels=8, fb_channels=4,
                                    state_stride=2, groups=4)
    fully_shard(model)
    try:
        model(torch.randn(2, 3, 10, 10), 2)
    except RuntimeError as error:
        out["drifting"] = str(error)
    return out


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_models")
    torch.manual_seed(5)
    reference = ReferenceResNet18(**RESNET)
    with torch.no_grad():  # running statistics away from their initial values
        reference(torch.randn(4, 3, SIZE, SIZE), 2, atol=-1.0)
    torch.save(reference.state_dict(), root / "reference.pt")
    job = functools.partial(_models_job, reverse_path=str(root / "reference.pt"), checkpoint_dir=str(root / "dcp"))
    functools.update_wrapper(job, _models_job)
    return spawn(job, root, deadline_s=8 * TIMEOUT_S), root


@as_in_a_worker()
def _one_process_step(model, reference=False):
    """Both ranks' micro-batches in one process: the QR once, then each micro-batch's loss / WORLD."""
    decay = model.error_head
    decay.qr_in_forward = False
    decay.orthogonalize_Q()
    after_forward = decay.Q.detach().clone()
    opt = make_optimizer("sgd", model.parameters())
    for rank in range(WORLD):
        (_resnet_loss(model, rank, reference) / WORLD).backward()
    opt.step()
    return after_forward, {name: p.detach().clone() for name, p in model.named_parameters()}


@needs_gloo
@pytest.mark.parametrize("checkpoint", [False, True, "selective"])
def test_fsdp2_on_one_rank_matches_one_process(tmp_path, checkpoint):
    """FSDP2 with a single rank (one GPU): it gathers parameters by a plain copy, not its own ops,
    which the memory-saving replay accepts (it refused it before: 'the step modified a tensor of
    shape (41472,) in place')."""
    x, y, h0 = _resnet_data()

    def one_step(model):
        opt = make_optimizer("sgd", model.parameters())
        nn.functional.cross_entropy(model(x[0], RESNET_T, h0=h0[0]), y[0]).backward()
        opt.step()
        return full_parameters(model)

    def build():
        torch.manual_seed(0)
        return models.ResNet18(**RESNET, checkpoint=checkpoint)

    with as_in_a_worker():
        expected = one_step(build())
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            actual = one_step(fully_shard(build()))
        finally:
            dist.destroy_process_group()
    assert_same_parameters(actual, expected, f"one rank, checkpoint={checkpoint!r}", dict(build().named_parameters()))
    # The caller's ignored_params stay whole beside the 0-d ones.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    try:
        model = build()
        fully_shard(model, ignored_params={model.fc.weight})
        assert type(model.fc.weight) is nn.Parameter and type(model.conv1.weight) is not nn.Parameter
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_plain_fully_shard(model_runs):
    runs, _ = model_runs
    assert "fully_shard doesn't support scalar parameters" in runs["plain"]
    # One step, one rank's micro-batch each, against one process (the QR once).
    model = GroupNormCase.model(True)
    model.error_head.qr_in_forward = False
    model.error_head.orthogonalize_Q()
    opt = make_optimizer("sgd", model.parameters())
    data = GroupNormCase.data()
    for rank in range(WORLD):
        (GroupNormCase.loss(model, data, 0, 0, rank) / WORLD).backward()
    opt.step()
    assert_same_parameters(runs["plain_ignored"], dict(model.named_parameters()), "plain fully_shard, ignored 0-d")


@needs_gloo
@pytest.mark.parametrize("name,build", [("resnet18", _resnet18), ("patched", _patched_reference)])
def test_resnet_step_matches_one_process(model_runs, name, build):
    """The sharded Q after the forward is the QR one process computes (orthonormal), and the
    parameters after the step are one process's."""
    runs, _ = model_runs
    Q_after_forward, expected = _one_process_step(build(), reference=name == "patched")
    Q = runs[name + "_Q_after_forward"]
    assert_close(Q, Q_after_forward, torch.float32, f"{name}: Q after the forward")
    identity = torch.eye(Q.shape[0])
    assert (Q.T @ Q - identity).abs().max() < 1e-5
    assert_same_parameters(runs[name], expected, name, dict(build().named_parameters()))
    assert_same_parameters(runs[name + "_ddp"], expected, f"{name} under DDP")
    if name == "resnet18":
        assert runs["resnet18_local_Q"] == (Q.shape[0] // WORLD, Q.shape[1])  # Q is sharded, not ignored


@needs_gloo
@pytest.mark.parametrize("name,build", [("resnet34", models.ResNet34), ("resnet50", models.ResNet50)])
def test_deeper_resnets_shard_and_keep_the_qr(model_runs, name, build):
    runs, _ = model_runs
    torch.manual_seed(0)
    Q0 = build(**RESNET).error_head.Q.detach()
    assert_close(runs[name + "_Q"], torch.linalg.qr(Q0, mode="complete")[0], torch.float32, name)


@needs_gloo
def test_distributed_checkpoint_loads_in_one_process_and_the_reference(model_runs):
    import torch.distributed.checkpoint as dcp

    runs, root = model_runs
    fused = _resnet18()
    state = fused.state_dict()
    with warnings.catch_warnings():  # torch says it assumes one process: it is one process
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(root / "dcp"), no_dist=True)
    fused.load_state_dict(state)
    assert_close(_eval_logits(fused), runs["resnet18_logits"], torch.float32, "one process")
    reference = ReferenceResNet18(**RESNET)
    assert set(reference.state_dict()) == set(state)
    models.load_reference_state_dict(reference, state)
    x, _, h0 = _resnet_data()
    reference.eval()
    with torch.no_grad():
        logits = reference(x.flatten(0, 1), RESNET_T, h0=h0.flatten(0, 1), atol=-1.0)
    assert_close(logits, runs["resnet18_logits"], torch.float32, "reference")


@needs_gloo
def test_reference_checkpoint_loads_under_fsdp2(model_runs):
    runs, root = model_runs
    reference = ReferenceResNet18(**RESNET)
    reference.load_state_dict(torch.load(root / "reference.pt", weights_only=True))
    x, _, h0 = _resnet_data()
    reference.eval()
    with torch.no_grad():
        logits = reference(x.flatten(0, 1), RESNET_T, h0=h0.flatten(0, 1), atol=-1.0)
    assert_close(runs["reverse_logits"], logits, torch.float32, "reference checkpoint under FSDP2")


@needs_gloo
def test_a_parameter_written_in_forward_is_refused(model_runs):
    runs, _ = model_runs
    message = runs["drifting"]
    assert "_DriftingScale ('frontend.1')" in message and "'scale'" in message, message
