"""CUDA graph capture (dfm_fused.capture): argument checks, errors and bookkeeping on the CPU; the
captured step and inference against eager on CUDA graphs simulated on the CPU (tests/_capture_sim.py:
what a graph keeps from its capture, and which changes to the model make it stale) and on a CUDA
device (skipped without one)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfm_fused
from dfm_fused import models
from dfm_fused.capture import _guards, _state
from dfm_fused.capture import _graph
from dfm_fused.models.reference import ReferenceResNet18
from tests._capture_sim import simulate_cuda_graphs
from tests._helpers import rel_err

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
# Parameters and statistics after replayed iterations against eager ones (the issue's bound).
TOL = 1e-5


def small_dfm(dropout: float = 0.0, checkpoint: bool = False) -> dfm_fused.FeedbackModel:
    """A DFM with BatchNorm in frontend and body (and optionally dropout), 16x16 inputs, 4x4 state."""
    torch.manual_seed(0)
    frontend = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    body = nn.Sequential(
        nn.Conv2d(8 + 8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return dfm_fused.FeedbackModel(frontend, body, head, in_channels=8, pred_channels=16, fb_channels=8,
                                   state_stride=4, checkpoint=checkpoint)


def batch(B=4, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 16, 16, generator=g).to(device), torch.randint(0, 5, (B,), generator=g).to(device)


# ---------------------------------------------------------------- argument checks (any device)

def _train_args(**overrides):
    model = small_dfm()
    args = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy,
                example_inputs=batch(), T=3)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, words", [
    (dict(model="net"), TypeError, ["model", "torch.nn.Module", "str"]),
    (dict(optimizer=None), TypeError, ["optimizer", "Optimizer", "NoneType"]),
    (dict(loss_fn=3), TypeError, ["loss_fn", "callable", "int"]),
    (dict(example_inputs=torch.zeros(2)), TypeError, ["example_inputs", "pair", "Tensor"]),
    (dict(example_inputs=(torch.zeros(2),)), TypeError, ["example_inputs", "pair", "length 1"]),
    (dict(T=-1), ValueError, ["T", ">= 0", "-1"]),
    (dict(T=2.5), TypeError, ["T", "int", "2.5"]),
    (dict(warmup=1), ValueError, ["warmup", ">= 2", "1"]),
    (dict(autocast_dtype=torch.float32), ValueError, ["autocast_dtype", "bfloat16", "float32"]),
    (dict(capture_error_mode="strict"), ValueError, ["capture_error_mode", "thread_local", "strict"]),
    (dict(atol=1e-2), ValueError, ["atol", "Early stop", "capture_inference"]),
])
def test_train_step_argument_errors(overrides, error, words):
    with pytest.raises(error) as info:
        dfm_fused.capture_train_step(**_train_args(**overrides))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_train_step_refuses_optimizer_that_is_not_capturable():
    model = small_dfm()
    with pytest.raises(ValueError, match=r"optimizer: Adam param_groups\[0\] has capturable=False.*capturable=True"):
        dfm_fused.capture_train_step(**_train_args(model=model, optimizer=torch.optim.Adam(model.parameters())))


@pytest.mark.parametrize("overrides, error, words", [
    (dict(model=nn.Linear(3, 3), atol=0.1), TypeError, ["model", "early stop", "Linear"]),
    (dict(atol=-0.1), ValueError, ["atol", ">= 0"]),
    (dict(check_every=0), ValueError, ["check_every", ">= 1"]),
    (dict(T=-2), ValueError, ["T", ">= 0"]),
])
def test_inference_argument_errors(overrides, error, words):
    model = small_dfm().eval()
    args = dict(model=model, example_input=batch()[0], T=4)
    args.update(overrides)
    with pytest.raises(error) as info:
        dfm_fused.capture_inference(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_inference_early_stop_needs_eval_mode():
    with pytest.raises(ValueError, match=r"model: early stop \(atol\) is captured in eval mode only"):
        dfm_fused.capture_inference(small_dfm().train(), batch()[0], 4, atol=0.1)


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_without_cuda_says_graphs_need_a_cuda_device_and_leaves_the_model_alone():
    model = small_dfm()
    before = copy.deepcopy(model.state_dict())
    for call in (lambda: dfm_fused.capture_train_step(**_train_args(model=model,
                                                                    optimizer=torch.optim.SGD(model.parameters(), lr=1))),
                 lambda: dfm_fused.capture_inference(model.eval(), batch()[0], 4)):
        with pytest.raises(RuntimeError, match=r"CUDA graphs need a CUDA device.*torch.cuda.is_available\(\) is False"):
            call()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x, y = batch()
    F.cross_entropy(model.train()(x, 3), y).backward()  # the rest of the package runs on the CPU
    assert all(p.grad is not None for p in model.body.parameters())


# ---------------------------------------------------------------- bookkeeping helpers (CPU tensors)

def _train_eagerly(model, optimizer, steps=2, T=3):
    for i in range(steps):
        x, y = batch(seed=10 + i)
        optimizer.zero_grad()
        F.cross_entropy(model(x, T), y).backward()
        optimizer.step()


@pytest.mark.parametrize("stepped_before", [False, True])
def test_snapshot_restores_what_iterations_change(stepped_before):
    model = small_dfm(dropout=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if stepped_before:
        _train_eagerly(model, optimizer, 1)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state_objects = {id(p): dict(s) for p, s in optimizer.state.items()}
    state_values = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    expected_rng = torch.randn(5)
    torch.set_rng_state(rng)
    snapshot = _state.Snapshot(model, optimizer, torch.device("cpu"))
    snapshot.clear_grads()
    assert all(p.grad is None for p in model.parameters())
    _train_eagerly(model, optimizer, 2)
    created = snapshot.created_state()
    assert bool(created) == (not stepped_before)  # momentum buffers appear at the first step
    versions = [t._version for t in (*model.parameters(), *model.buffers())]
    snapshot.restore()
    # Version counters stay: the values are exactly back (autograd checks saved tensors by version).
    assert versions == [t._version for t in (*model.parameters(), *model.buffers())]
    # What the iterations changed is back, in the same tensor objects.
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]), name
    assert all(p.grad is grad for p, grad in zip(model.parameters(), grads))
    assert {id(p) for p in optimizer.state} == set(state_objects)
    for p, entry in optimizer.state.items():
        for key, value in entry.items():
            assert value is state_objects[id(p)][key]
            assert torch.equal(value, state_values[id(p)][key])
    assert torch.equal(torch.randn(5), expected_rng)


def test_changed_hyperparameter_names_the_setting():
    lr = torch.tensor(0.1)
    model = small_dfm()
    optimizer = torch.optim.SGD([{"params": model.body.parameters()},
                                 {"params": model.head.parameters(), "lr": lr}], lr=0.1, momentum=0.9)
    recorded = _state.hyperparameters(optimizer)
    assert _state.changed_hyperparameter(optimizer, recorded) is None
    lr.fill_(0.05)  # a tensor changed in place is read by the graph: not a change
    assert _state.changed_hyperparameter(optimizer, recorded) is None
    optimizer.param_groups[0]["lr"] = 0.01
    assert _state.changed_hyperparameter(optimizer, recorded) == "param_groups[0]['lr']: 0.1 -> 0.01"
    optimizer.param_groups[0]["lr"] = 0.1
    optimizer.param_groups[1]["lr"] = torch.tensor(0.05)  # a new tensor object: the graph reads the old one
    assert _state.changed_hyperparameter(optimizer, recorded).startswith("param_groups[1]['lr']")


def test_cpu_tensor_use_flags_cpu_tensors_next_to_device_tensors():
    device = torch.device("meta")  # stands in for the CUDA device on this machine
    on_device = torch.ones(3, device=device, requires_grad=True)
    weight = torch.tensor(3.0)  # exists before the watched code: a graph would keep its value
    watch = _guards.CpuTensorUse(device)
    with watch:
        (on_device * 2.0 + 1).sum().backward()  # Python numbers are scalars: fine
        torch.ones(2) * weight  # CPU only: fine
        on_device * torch.tensor(0.5, dtype=torch.float64).to(torch.float32)  # made here: a constant
    assert watch.found is None
    with watch:
        on_device * weight
    assert "aten.mul.Tensor reads a CPU tensor of shape () and dtype torch.float32" in watch.found


def test_model_device_and_input_checks_name_the_tensor():
    with pytest.raises(ValueError, match=r"capture_train_step: T is on cpu; .*one CUDA device"):
        _guards.model_device("capture_train_step", small_dfm())
    with pytest.raises(ValueError, match=r"x: expected a tensor on meta \(the model's device\); got one on cpu"):
        _guards.input_tensor("x", torch.zeros(2), torch.device("meta"))
    with pytest.raises(TypeError, match="target: expected a torch.Tensor; got list"):
        _guards.input_tensor("target", [1], torch.device("meta"))


def test_capture_errors_explain_the_usual_causes():
    text = _guards.explain("capture_train_step", "capturing the training iteration",
                           RuntimeError("Cannot call CUDAGeneratorImpl::current_seed"))
    assert text.startswith("capture_train_step: capturing the training iteration failed")
    assert "get_rng_state" in text and "host sync" in text and "CPU tensor" in text


def test_fingerprint_names_what_moved_and_which_mode_changed():
    from dfm_fused.capture import _fingerprint

    model = small_dfm()
    optimizer = _sgd(model.parameters())
    _train_eagerly(model, optimizer, 1)
    grads = [("head.2.weight", torch.zeros_like(model.head[2].weight))]
    before = _fingerprint.scan(model, optimizer, grads)
    assert len(before.params) == len(list(model.parameters()))  # the optimizer's are the model's
    again = _fingerprint.scan(model, optimizer, grads)
    assert again.layout == before.layout and again.mode == before.mode

    def change(mutate):
        mutate()
        now = _fingerprint.scan(model, optimizer, grads)
        return _fingerprint.first_change(model, optimizer, grads, before.layout, now.layout)

    p = model.body[0].weight
    assert change(lambda: setattr(p, "data", p.data.clone())).startswith("body.0.weight moved (data_ptr 0x")
    before = _fingerprint.scan(model, optimizer, grads)
    assert change(lambda: model.to(memory_format=torch.channels_last)).endswith(
        "stride (27, 9, 3, 1) -> (27, 1, 9, 3))")
    before = _fingerprint.scan(model, optimizer, grads)
    state = optimizer.state[model.head[2].bias]
    index = [id(q) for q in model.parameters()].index(id(model.head[2].bias))
    assert change(lambda: state.update(momentum_buffer=state["momentum_buffer"].clone())) == (
        f"optimizer state 'momentum_buffer' of param_groups[0]['params'][{index}] was replaced by another tensor")
    before = _fingerprint.scan(model, optimizer, grads)
    assert change(lambda: grads[0][1].set_(torch.zeros(5, 16))).startswith("the fixed .grad of head.2.weight moved (data_ptr")
    before = _fingerprint.scan(model, optimizer, grads)
    model.frontend[1].eval()
    model.body[0].bias.requires_grad_(False)
    now = _fingerprint.scan(model, optimizer, grads)
    assert _fingerprint.mode_change(model, optimizer, before.mode, now.mode) == "frontend.1.training True -> False"
    model.frontend[1].train()
    now = _fingerprint.scan(model, optimizer, grads)
    assert _fingerprint.mode_change(model, optimizer, before.mode, now.mode) == "body.0.bias.requires_grad True -> False"


def test_qr_modules_finds_the_modules_that_reorthogonalise():
    fused, reference = _graph.qr_modules(small_dfm())
    assert [m.Q.shape[0] for m in fused] == [24] and reference == []
    fused, reference = _graph.qr_modules(ReferenceResNet18(fb_filters=8, n_classes=4, shape=(32, 32)))
    assert fused == [] and [m.Q.shape[0] for m in reference] == [520]
    # feedback_segmentation-style decay: no QR
    assert _graph.qr_modules(dfm_fused.StateExpDecay(6, (2, 2), output_map="Qinv")) == ([], [])


def _refuse_qr_capture(monkeypatch):
    def refuse(api, size, *args):
        raise _guards.CaptureError(f"{api}: capturing a {size}x{size} QR failed (simulated)")

    monkeypatch.setattr(_graph, "probe_qr", refuse)


def test_qr_that_cannot_be_captured_runs_eagerly_outside_the_graph(monkeypatch):
    """Where the QR cannot be captured it runs before each replay: ``before_forward`` does the
    reference's re-orthogonalisation and, while the graph is made, the forward skips its own."""
    _refuse_qr_capture(monkeypatch)
    model, notes = small_dfm(), []
    decay = model.error_head
    qr = _graph.TrainingQR("capture_train_step", model, torch.device("cpu"), None, "global", notes)
    qr.prepare(3)
    assert qr.eager and "runs eagerly before each replay" in notes[0] and "simulated" in notes[0]
    with torch.no_grad():
        decay.Q.add_(0.1 * torch.randn_like(decay.Q))  # off orthonormal, so that a QR shows
    before = decay.Q.detach().clone()
    qr.before_forward(3)
    torch.testing.assert_close(decay.Q.detach(), torch.linalg.qr(before, mode="complete")[0], rtol=0, atol=0)
    with torch.no_grad():
        decay.Q.copy_(before)
    with qr.making_graph(3):
        assert decay.qr_in_forward is False
        model(batch()[0], 3)
        assert torch.equal(decay.Q, before)  # the forward left the QR to the caller
    assert "qr_in_forward" not in vars(decay) and decay.qr_in_forward
    model(batch()[0], 3)
    assert not torch.equal(decay.Q, before)  # outside, the forward re-orthogonalises again
    for mode, T in (("eval", 3), ("train", 0)):
        model.train(mode == "train")
        current = decay.Q.detach().clone()
        qr.before_forward(T)
        with qr.making_graph(T):
            assert decay.qr_in_forward  # no QR in this forward: nothing to move out
        assert torch.equal(decay.Q, current)


def test_qr_that_cannot_be_captured_in_reference_modules_raises(monkeypatch):
    _refuse_qr_capture(monkeypatch)
    model = ReferenceResNet18(fb_filters=8, n_classes=4, shape=(32, 32))
    qr = _graph.TrainingQR("capture_train_step", model, torch.device("cpu"), None, "global", [])
    with pytest.raises(_guards.CaptureError, match=r"(?s)simulated.*StateExpDecay.*dfm_fused.patch"):
        qr.prepare(2)


# ---------------------------------------------------------------- graphs simulated on the CPU
# tests/_capture_sim.py replays recorded ops on the memory recorded at capture, as a CUDA graph
# replays its kernels: a graph that went stale shows as a result that differs from eager.

@pytest.fixture
def sim(monkeypatch):
    return simulate_cuda_graphs(monkeypatch)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


class Twins:
    """The same DFM trained eagerly and through a (simulated) captured step, call by call.
    ``uniform_S=False``: S spread over [0.6, 1.4], so that eager and graph take the general decay
    path, whatever the capture code decides about the scalar one."""

    def __init__(self, params=lambda model: model.parameters(), T=3, uniform_S=False, device="cpu"):
        self.device = device
        self.eager, self.graphed = small_dfm().to(device), small_dfm().to(device)
        if not uniform_S:
            for model in (self.eager, self.graphed):
                model.error_head.S.data.copy_(torch.linspace(0.6, 1.4, model.error_head.S.numel()))
        self.eager_opt, self.graphed_opt = _sgd(params(self.eager)), _sgd(params(self.graphed))
        self.step = dfm_fused.capture_train_step(self.graphed, self.graphed_opt, F.cross_entropy,
                                                 batch(device=device), T=T, warmup=2)
        self.calls = 0

    def both(self, change):
        change(self.eager)
        change(self.graphed)

    def call(self, T=3, optimizer_step=True, zero_grad=True):
        self.calls += 1
        x, y = batch(seed=100 + self.calls, device=self.device)
        if zero_grad:
            self.eager_opt.zero_grad()
        torch.manual_seed(self.calls)  # the initial state's draw
        loss = F.cross_entropy(self.eager(x, T), y)
        loss.backward()
        if optimizer_step:
            self.eager_opt.step()
        if zero_grad:
            self.graphed_opt.zero_grad()
        torch.manual_seed(self.calls)
        graphed_loss = self.step(x, y, optimizer_step=optimizer_step, T=T)
        assert rel_err(graphed_loss, loss.detach()) <= TOL, (self.calls, graphed_loss, loss)

    def assert_same(self):
        # floor: the biases of convolutions followed by BatchNorm have gradients ~1e-9 (zero but for rounding)
        for (name, a), b in zip(self.graphed.state_dict().items(), self.eager.state_dict().values()):
            assert a.stride() == b.stride(), name
            assert rel_err(a.float(), b.float(), floor=1e-12) <= TOL, f"{name}: {rel_err(a.float(), b.float(), floor=1e-12):.2e}"
        for (name, a), b in zip(self.graphed.named_parameters(), self.eager.parameters()):
            assert (a.grad is None) == (b.grad is None), f"{name}.grad: {a.grad is None} != {b.grad is None}"
            if a.grad is not None:
                err = rel_err(a.grad, b.grad, floor=1e-6)
                assert err <= TOL, f"{name}.grad: {err:.2e}"


@pytest.mark.parametrize("uniform_S", [False, True])
def test_simulated_replays_equal_eager_with_accumulation_and_zero_grad(uniform_S, sim):
    twins = Twins(uniform_S=uniform_S)
    for optimizer_step, zero_grad in [(True, True), (False, True), (True, False), (True, True), (False, False)]:
        twins.call(optimizer_step=optimizer_step, zero_grad=zero_grad)
        twins.assert_same()
    assert twins.step.counts["replays"] >= 3 and twins.step.counts["eager"] == 1, twins.step.counts


def _assign_copy(model):
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)


def _new_storage(model):
    for p in model.body.parameters():
        p.data = p.data.clone()


CHANGES = {
    "submodule eval (frozen BatchNorm)": lambda model: model.frontend[1].eval(),
    "requires_grad_(False)": lambda model: model.body[0].weight.requires_grad_(False),
    "channels_last": lambda model: model.to(memory_format=torch.channels_last),
    "load_state_dict(assign=True)": _assign_copy,
    "p.data = new tensor": _new_storage,
    # .cpu().cuda() on a GPU; here a round trip through float64, which rebinds p.data the same way
    "round trip to another dtype": lambda model: model.double().float(),
}


@pytest.mark.parametrize("change", CHANGES)
def test_simulated_step_after_a_change_to_the_model_equals_eager(change, sim):
    """Each change moves a storage, a stride, a module's mode or the parameters that get gradients:
    a replay of the graph captured before it would be stale."""
    twins = Twins()
    twins.call()
    twins.call()
    twins.assert_same()
    twins.both(CHANGES[change])
    for _ in range(2):
        twins.call()
        twins.assert_same()


@needs_cuda
@pytest.mark.parametrize("change", [*CHANGES, ".cpu().cuda()"])
def test_step_after_a_change_to_the_model_equals_eager_on_cuda(change, deterministic):
    """The simulated cases above on real CUDA graphs, where a stale graph reads freed memory."""
    twins = Twins(device="cuda")
    twins.call()  # eager: SGD creates its momentum buffers at its first step
    twins.call()
    twins.assert_same()
    twins.both(CHANGES.get(change, lambda model: model.cpu().cuda()))
    for _ in range(2):
        twins.call()
        twins.assert_same()
    assert twins.step.counts["replays"] >= 2, twins.step.counts


@needs_cuda
def test_T0_calls_outside_parameters_and_one_pool_on_cuda(deterministic):
    twins = Twins(params=lambda model: model.body.parameters(), device="cuda", uniform_S=True)
    for T, zero_grad in ((3, True), (0, True), (3, False), (0, False), (3, True)):
        twins.call(T=T, zero_grad=zero_grad)
        twins.assert_same()
    assert any("scalar" in note for note in twins.step.notes), twins.step.notes
    S = torch.linspace(0.2, 3.0, twins.eager.error_head.S.numel(), device="cuda")
    twins.both(lambda model: model.error_head.S.data.copy_(S))
    twins.call()
    twins.assert_same()
    step_graphs = twins.step._graphs.values()
    assert len(step_graphs) >= 2 and len({g.graph.pool() for g in step_graphs}) == 1


def test_simulated_T0_call_gives_no_gradient_to_the_steps(sim):
    """A T=0 call runs no step: the body gets no gradient and the optimizer skips it (momentum
    and weight decay included), as in eager."""
    twins = Twins()
    for T in (3, 0, 0, 3):
        twins.call(T=T)
        twins.assert_same()
    twins.call(T=0, optimizer_step=False)
    twins.call(T=3, zero_grad=False)
    twins.assert_same()


def test_simulated_parameters_outside_the_optimizer_accumulate_their_gradients(sim):
    """The optimizer's zero_grad() leaves the frontend's and head's gradients, so they accumulate
    over calls, from none after ``model.zero_grad()``."""
    twins = Twins(params=lambda model: model.body.parameters())
    twins.call()
    twins.both(lambda model: model.zero_grad())
    for zero_grad in (True, True, False):
        twins.call(zero_grad=zero_grad)
        twins.assert_same()
    assert twins.graphed.head[2].weight.grad is not None


def test_simulated_graphs_share_one_memory_pool(sim):
    twins = Twins()
    probes = len(sim.graphs)  # the QR probe's, captured when the step was built
    twins.call()
    twins.call(optimizer_step=False)
    twins.call(optimizer_step=False, zero_grad=False)
    twins.call(zero_grad=False)
    graphs = sim.graphs[probes:]
    assert len(graphs) >= 3, len(graphs)
    assert len({g.pool for g in graphs}) == 1 and graphs[0].pool is not None, [g.pool for g in graphs]


def test_simulated_scalar_decay_is_baked_and_rechecked_before_each_replay(sim):
    """With |S| uniform the training graph takes the scalar path (M = d I); S written through
    ``.data`` (no version bump) is seen before the next replay, which is captured anew."""
    twins = Twins(uniform_S=True)
    twins.call()
    twins.call()
    assert any("scalar" in note and "error_head" in note for note in twins.step.notes), twins.step.notes
    captures = twins.step.counts["captures"]
    torch.manual_seed(7)
    S = torch.empty(twins.eager.error_head.S.shape).uniform_(0.2, 3.0)
    twins.both(lambda model: model.error_head.S.data.copy_(S))
    twins.call()
    twins.assert_same()
    assert twins.step.counts["captures"] == captures + 1, twins.step.counts


def test_simulated_lr_scheduler_made_after_capture_is_no_change(sim):
    """A scheduler adds ``initial_lr`` to each param group, which the optimizer's step never reads."""
    twins = Twins()
    twins.call()
    twins.call()
    twins.both(lambda model: None)
    torch.optim.lr_scheduler.StepLR(twins.eager_opt, step_size=10)
    torch.optim.lr_scheduler.StepLR(twins.graphed_opt, step_size=10)
    twins.call()
    twins.assert_same()
    twins.graphed_opt.param_groups[0]["lr"] = 0.01
    with pytest.raises(dfm_fused.CaptureError, match=r"param_groups\[0\]\['lr'\]: 0.1 -> 0.01"):
        twins.step(*batch())


def test_simulated_iteration_that_rebinds_a_parameter_cannot_be_captured(sim):
    """A forward that gives a parameter new storage each call: every replay would use the storage
    it had at capture."""
    model = small_dfm()
    model.head.register_forward_hook(lambda module, args, out: setattr(module[2].bias, "data", module[2].bias.data.clone()))
    with pytest.raises(dfm_fused.CaptureError, match=r"the training iteration itself rebinds .*head\.2\.bias moved"):
        dfm_fused.capture_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, batch(),
                                     T=2, warmup=2)


@pytest.mark.parametrize("change", ["submodule train (BatchNorm)", "p.data = new tensor", "channels_last"])
def test_simulated_inference_after_a_change_to_the_model_equals_eager(change, sim):
    model = small_dfm().eval()
    x = batch()[0]
    infer = dfm_fused.capture_inference(model, x, T=3, warmup=2)
    changes = {"submodule train (BatchNorm)": lambda: model.body[1].train(),
               "p.data = new tensor": lambda: _new_storage(model),
               "channels_last": lambda: model.to(memory_format=torch.channels_last)}
    for i in range(3):
        if i == 1:
            changes[change]()
            with torch.no_grad():  # new values (e.g. trained elsewhere), written in place
                for p in model.parameters():
                    p.mul_(0.9)
        torch.manual_seed(i)
        out = infer(x)
        torch.manual_seed(i)
        with torch.no_grad():
            expected = model(x, 3)
        assert rel_err(out, expected) <= TOL, (i, rel_err(out, expected))


# ---------------------------------------------------------------- on a CUDA device

@pytest.fixture
def deterministic():
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _resnet(checkpoint):
    torch.manual_seed(0)
    return models.ResNet18(fb_filters=16, n_classes=10, shape=(32, 32), checkpoint=checkpoint).cuda()


def _batches(n, B=4, image=32, classes=10):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(B, 3, image, image, generator=g).cuda(), torch.randint(0, classes, (B,), generator=g).cuda())
            for _ in range(n)]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3, capturable=True),
}


def _assert_same_model(graphed, eager, tol=TOL):
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        if a.is_floating_point():
            assert rel_err(a, b, floor=1e-12) <= tol, f"{name}: {rel_err(a, b, floor=1e-12):.2e}"
        else:
            assert torch.equal(a, b), name  # num_batches_tracked


def _eager_steps(model, optimizer, batches, T, autocast_dtype=None):
    torch.manual_seed(1)
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(x, T), y)
        loss.backward()
        optimizer.step()


@needs_cuda
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_replayed_iterations_equal_eager(optimizer_name, checkpoint, deterministic):
    """Parameters and BatchNorm statistics after 3 replays equal 3 eager iterations (the first
    call runs eagerly: the optimizer creates its state at its first step)."""
    eager, graphed = _resnet(checkpoint), _resnet(checkpoint)
    eager_opt, graphed_opt = OPTIMIZERS[optimizer_name](eager.parameters()), OPTIMIZERS[optimizer_name](graphed.parameters())
    batches, T = _batches(4), 3
    _eager_steps(eager, eager_opt, batches, T)
    step = dfm_fused.capture_train_step(graphed, graphed_opt, F.cross_entropy, batches[0], T=T)
    _assert_same_model(graphed, _resnet(checkpoint))  # the warm-up changed nothing
    torch.manual_seed(1)
    for x, y in batches:
        graphed_opt.zero_grad()
        step(x, y)
    assert step.counts["replays"] == 3 and step.counts["eager"] == 1, step.counts
    _assert_same_model(graphed, eager)
    assert any("QR of Q" in note for note in step.notes), step.notes


@needs_cuda
def test_replayed_iterations_equal_eager_with_the_qr_outside_the_graph(monkeypatch, deterministic):
    """Where the QR cannot be captured (simulated), it runs eagerly before each replay and the
    iterations still equal eager ones."""
    _refuse_qr_capture(monkeypatch)
    eager, graphed = _resnet(False), _resnet(False)
    eager_opt, graphed_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, graphed))
    batches, T = _batches(3), 3
    _eager_steps(eager, eager_opt, batches, T)
    step = dfm_fused.capture_train_step(graphed, graphed_opt, F.cross_entropy, batches[0], T=T)
    _assert_same_model(graphed, _resnet(False))
    torch.manual_seed(1)
    for x, y in batches:
        graphed_opt.zero_grad()
        step(x, y)
    assert step.counts["replays"] == 3, step.counts
    _assert_same_model(graphed, eager)
    assert any("runs eagerly before each replay" in note for note in step.notes), step.notes


@needs_cuda
def test_dropout_masks_equal_eager_with_graph_safe_rng(deterministic):
    eager, graphed = small_dfm(dropout=0.5).cuda(), small_dfm(dropout=0.5).cuda()
    eager_opt, graphed_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, graphed))
    batches = [tuple(t.cuda() for t in batch(seed=s)) for s in range(4)]
    _eager_steps(eager, eager_opt, batches, 3)
    step = dfm_fused.capture_train_step(graphed, graphed_opt, F.cross_entropy, batches[0], T=3)
    torch.manual_seed(1)
    for x, y in batches:
        graphed_opt.zero_grad()
        step(x, y)
    assert step.counts["replays"] == 4, step.counts  # SGD without momentum has no lazy state
    _assert_same_model(graphed, eager)


@needs_cuda
def test_gradient_accumulation_and_zero_grad_as_in_eager(deterministic):
    eager, graphed = _resnet(False), _resnet(False)
    eager_opt, graphed_opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, graphed))
    batches = _batches(6)
    step = dfm_fused.capture_train_step(graphed, graphed_opt, F.cross_entropy, batches[0], T=2)
    torch.manual_seed(1)
    for model, opt, run in ((eager, eager_opt, None), (graphed, graphed_opt, step)):
        torch.manual_seed(1)
        for i, (x, y) in enumerate(batches):
            if i % 3 == 0 and i != 3:  # iteration 3 accumulates on top of the previous step's gradients
                opt.zero_grad(set_to_none=i == 0)
            last = i % 3 == 2
            if run is None:
                F.cross_entropy(model(x, 2), y).backward()
                if last:
                    opt.step()
            else:
                run(x, y, optimizer_step=last)
    assert step.counts["replays"] >= 4, step.counts
    _assert_same_model(graphed, eager)
    for a, b in zip(graphed.parameters(), eager.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert rel_err(a.grad, b.grad, floor=1e-12) <= TOL


@needs_cuda
def test_autocast_bfloat16_equals_eager_autocast(deterministic):
    eager, graphed = _resnet(False), _resnet(False)
    eager_opt, graphed_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, graphed))
    batches = _batches(3)
    _eager_steps(eager, eager_opt, batches, 3, torch.bfloat16)
    step = dfm_fused.capture_train_step(graphed, graphed_opt, F.cross_entropy, batches[0], T=3,
                                        autocast_dtype=torch.bfloat16)
    torch.manual_seed(1)
    for x, y in batches:
        graphed_opt.zero_grad()
        step(x, y)
    assert step.counts["replays"] == 3
    _assert_same_model(graphed, eager, tol=1e-3)


@needs_cuda
def test_what_cannot_be_captured_raises_naming_it():
    model = small_dfm().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = (t.cuda() for t in batch())
    with pytest.raises(dfm_fused.CaptureError, match=r"warm-up iteration 2 of 3.*sync"):
        dfm_fused.capture_train_step(model, opt, lambda out, y: F.cross_entropy(out, y) * (out.sum().item() > 0),
                                     (x, y), T=2)
    weight = torch.tensor(2.0)
    with pytest.raises(dfm_fused.CaptureError, match="uses a CPU tensor on the device"):
        dfm_fused.capture_train_step(model, opt, lambda out, y: F.cross_entropy(out, y) * weight, (x, y), T=2)
    step = dfm_fused.capture_train_step(model, opt, F.cross_entropy, (x, y), T=2)
    with pytest.raises(ValueError, match=r"x: expected a tensor on cuda:\d \(the model's device\); got one on cpu"):
        step(x.cpu(), y)
    opt.param_groups[0]["lr"] = 0.01
    with pytest.raises(dfm_fused.CaptureError, match=r"param_groups\[0\]\['lr'\]: 0.1 -> 0.01"):
        step(x, y)


@needs_cuda
@pytest.mark.parametrize("checkpoint", [False, True])
def test_inference_at_fixed_T_equals_eager(checkpoint):
    model = _resnet(checkpoint).eval()
    x = _batches(1, B=8)[0][0]
    infer = dfm_fused.capture_inference(model, x, T=8)
    with torch.no_grad():
        expected = model(x, 8)
    for _ in range(2):
        logits = infer(x)
        assert rel_err(logits, expected) <= TOL
    assert infer.steps_run == 8 and infer.counts["replays"] == 2


@needs_cuda
@pytest.mark.parametrize("where", ["early", "middle", "never"])
def test_inference_early_stop_matches_eager_and_reference(where):
    model = _resnet(False).eval()
    reference = ReferenceResNet18(fb_filters=16, n_classes=10, shape=(32, 32)).cuda().eval()
    models.load_reference_state_dict(reference, model.state_dict(), strict=False)
    x, T = _batches(1, B=8)[0][0], 8
    with torch.no_grad():  # the moves of sum|h| of the first T-1 steps, to put atol between them
        z = model.encode(x)
        h, sums = torch.zeros(model.initial_state(z).shape, device="cuda"), []
        for t in range(T - 1):
            h = model.step(z, h, t)
            sums.append(h.abs().sum().double().item())
    moves = sorted(abs(b - a) for a, b in zip(sums, sums[1:]))
    atol = {"early": (moves[-1] + moves[-2]) / 2, "middle": (moves[2] + moves[3]) / 2, "never": moves[0] / 2}[where]
    infer = dfm_fused.capture_inference(model, x, T, atol=atol, check_every=3)
    logits = infer(x)
    with torch.no_grad():
        expected = model(x, T, atol=atol, check_every=3)
        reference_logits = reference(x, T, atol=atol)
    assert infer.steps_run == model.steps_run == reference.steps_run
    assert rel_err(logits, expected) <= TOL
    assert rel_err(logits, reference_logits) <= 1e-4
    if where == "never":
        assert infer.steps_run == T


# ---------------------------------------------------------------- benchmark cases (no timing)

def test_target_benchmark_cases_carry_the_issue_settings():
    from dfm_fused.bench import cases as C
    from dfm_fused.bench.e2e import target_e2e_cases

    cases = target_e2e_cases("cuda")
    settings = {(c.shape["mode"], c.B, c.image, c.T) for c in cases}
    assert settings == {("train", 128, (64, 64), 5), ("eval", 8, (64, 64), 8), ("train", 64, (224, 224), 5)}
    for setting in settings:
        impls = {c.impl for c in cases if (c.mode, c.B, c.image, c.T) == setting}
        assert {"reference", "reference-compiled", "fused", "fused-nockpt", "graphed"} <= impls, setting
    eval_case = next(c for c in cases if c.mode == "eval")
    assert eval_case.shape == {"B": 8, "image": [64, 64], "T": 8, "mode": "eval"}
    assert C.case_from_spec(eval_case.spec()) == eval_case
    assert "eval" in eval_case.group and "eval" not in next(c for c in cases if c.mode == "train").group
    cpu = {c.impl for c in target_e2e_cases("cpu")}
    assert {"reference", "fused", "fused-nockpt"} <= cpu and not cpu & {"graphed", "reference-compiled"}


def test_bench_cli_refuses_graphed_without_cuda_and_unknown_impls():
    from dfm_fused.bench.__main__ import build_parser, plan

    with pytest.raises(SystemExit, match="--e2e-impls graphed: CUDA graphs need a CUDA device"):
        plan(build_parser().parse_args(["--device", "cpu", "--no-ops", "--e2e-impls", "reference,graphed"]))
    with pytest.raises(SystemExit, match="--e2e-impls: expected some of .*; got 'jit'"):
        plan(build_parser().parse_args(["--device", "cpu", "--no-ops", "--e2e-impls", "reference,jit"]))
    _, cases, _ = plan(build_parser().parse_args(["--device", "cpu", "--no-ops", "--e2e-mode", "eval", "--T", "3"]))
    assert {c.mode for c in cases} == {"eval"} and {c.T for c in cases} == {3}


def test_busy_fraction_merges_overlapping_intervals():
    from dfm_fused.bench.e2e import merged_length

    assert merged_length([(0, 10), (5, 15), (20, 25)]) == 20
    assert merged_length([(3, 4), (0, 10)]) == 10
    assert merged_length([]) == 0


def _op_inputs(op, device):
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    Q = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0].float().to(device).requires_grad_()
    S = (torch.rand(16, generator=g) + 0.5).to(device)
    if op == "exp_decay":
        x = rand(2, 16, 3, 3)
        return (x, Q, S, 2.0, 1.0, 1.0), [x, Q]
    if op == "state_update":
        h, y = rand(2, 16, 3, 3), rand(2, 16, 3, 3)
        return (h, y, Q, S, 2.0, 1.0, 1.0, 4), [h, y, Q]
    x, h = rand(2, 4, 6, 6), rand(2, 16, 3, 3)
    return (x, h, 8, 8, 2), [x, h]


@needs_cuda
@pytest.mark.parametrize("backend", ["extension", "torch", "triton"])
@pytest.mark.parametrize("op", ["exp_decay", "feedback_input", "state_update"])
def test_each_op_forward_and_backward_is_capture_safe(op, backend):
    """Each fused op, forward and backward, warms up with host syncs raising and CPU tensors
    refused, captures, and replays on new input values as eager computes them."""
    from dfm_fused.capture import _graph

    if backend not in dfm_fused.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available: {dfm_fused.backend_status('cuda')[backend]}")
    device = torch.device("cuda", torch.cuda.current_device())
    args, inputs = _op_inputs(op, device)
    fn = getattr(dfm_fused, op)
    out_shape = fn(*args, backend=backend).shape
    grad_out = torch.randn(out_shape, device=device)

    def run():
        out = fn(*args, backend=backend)
        return (out, *torch.autograd.grad(out, inputs, grad_out))

    stream = torch.cuda.Stream(device)
    _graph.warm_up("test", lambda i: run(), 3, stream, device)
    graph, static = _graph.capture("test", run, stream, "global", op)
    _, new_inputs = _op_inputs(op, device)
    with torch.no_grad():
        for a, b in zip(inputs, new_inputs):
            a.copy_(b.detach() * 0.5 + 0.1)
    expected = [t.detach().clone() for t in run()]
    graph.replay()
    for name, got, want in zip(["out", *range(len(inputs))], static, expected):
        assert rel_err(got, want) <= TOL, f"{op} {backend} {name}: {rel_err(got, want):.2e}"
