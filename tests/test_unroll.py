"""unroll: memory-saving backward equals full backprop, buffers once per step, trajectory losses, memory."""
import copy

import pytest
import torch

import dfm_fused
from dfm_fused import reference

from _helpers import rel_err

CX, FB, C, GROUPS = 4, 4, 8, 2


class Step(torch.nn.Module):
    """A small DFM step: feedback concat -> conv/BN/ReLU/dropout body -> GroupNorm + decay + residual.

    ``literal=True`` runs the same parameters through the reference ops (the oracle loop).
    """

    def __init__(self, literal=False, dropout=0.2):
        super().__init__()
        self.literal = literal
        self.conv = torch.nn.Conv2d(CX + FB, C, 3, padding=1, stride=2)
        self.bn = torch.nn.BatchNorm2d(C)
        self.drop = torch.nn.Dropout(dropout)
        self.feedback = dfm_fused.FeedbackInput(FB, C - FB, GROUPS)
        self.update = dfm_fused.StateUpdate(C, GROUPS, tau=0.8)

    def forward(self, x, h, t):
        if self.literal:
            x_tilde = reference.feedback_input(x, h, C - FB, FB, GROUPS)
        else:
            x_tilde = self.feedback(x, h)
        y = self.drop(torch.relu(self.bn(self.conv(x_tilde))))
        if self.literal:
            u = self.update
            if u.training and t == 0:
                u.reorthogonalize(u.Q)
            return reference.state_update(h, y, u.Q, u.S, u.T * t, u.tau, u.alpha, GROUPS)
        return self.update(h, y, t)


def _make(dtype=torch.float64, dropout=0.2):
    torch.manual_seed(1)
    step = Step(dropout=dropout).to(dtype)
    with torch.no_grad():
        step.update.Q.add_(0.05 * torch.randn_like(step.update.Q))  # not orthogonal: the QR step matters
    return step


def _inputs(dtype=torch.float64):
    x = torch.randn(3, CX, 8, 6, dtype=dtype, requires_grad=True)
    h0 = (1e-3 * torch.randn(3, C, 4, 3, dtype=dtype)).requires_grad_()
    return x, h0


def _run(step, x, h0, T, mode, weights):
    """Trajectory loss sum_t w_t * <h_t, h_t> and its gradients, for one of the three loop variants."""
    torch.manual_seed(123)  # the same dropout masks in every variant
    if mode == "python_loop_reference":
        step.literal = True
        states, h = [], h0
        for t in range(T):
            h = step(x, h, t)
            states.append(h)
        step.literal = False
    else:
        checkpoint = {"checkpoint": True, "selective": "selective", "plain": False}[mode]
        states = dfm_fused.unroll(step, x, h0, T, checkpoint=checkpoint, return_states=True)
    loss = sum(w * (s * s).sum() for w, s in zip(weights, states))
    loss.backward()
    params = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    return states, params, x.grad.clone(), h0.grad.clone()


@pytest.mark.parametrize("memory_saving", ["checkpoint", "selective"])
@pytest.mark.parametrize("trajectory", [False, True])
def test_checkpoint_equals_plain_graph_and_reference_loop(trajectory, memory_saving):
    T = 4
    weights = [0.5, 1.0, 0.0, 2.0] if trajectory else [0.0, 0.0, 0.0, 1.0]
    base = _make()
    results, buffers = {}, {}
    for mode in (memory_saving, "plain", "python_loop_reference"):
        step = copy.deepcopy(base).train()
        torch.manual_seed(7)
        x, h0 = _inputs()
        results[mode] = _run(step, x, h0, T, mode, weights)
        buffers[mode] = {n: b.clone() for n, b in step.named_buffers()}
        buffers[mode]["Q"] = step.update.Q.detach().clone()
    states_c, params_c, gx_c, gh_c = results[memory_saving]
    for other in ("plain", "python_loop_reference"):
        states_o, params_o, gx_o, gh_o = results[other]
        for a, b in zip(states_c, states_o):
            assert rel_err(a, b) < 1e-12
        assert params_c.keys() == params_o.keys() and "update.Q" in params_c and "conv.weight" in params_c
        for name in params_c:  # conv.bias feeds BatchNorm, so its gradient is ~1e-15: atol matters
            assert torch.allclose(params_c[name], params_o[name], rtol=1e-9, atol=1e-12), name
        assert rel_err(gx_c, gx_o) < 1e-10 and rel_err(gh_c, gh_o) < 1e-10
        for name, value in buffers[memory_saving].items():
            # Bitwise against the plain graph (same kernels); to rounding against the reference ops.
            if other == "plain":
                assert torch.equal(value, buffers[other][name]), f"{name} differs from {other}"
            else:
                assert torch.allclose(value, buffers[other][name], rtol=1e-10, atol=1e-14), f"{name} vs {other}"
    assert int(buffers[memory_saving]["bn.num_batches_tracked"]) == T


def test_eval_mode_and_no_grad_paths():
    step = _make().eval()
    x, h0 = _inputs()
    with torch.no_grad():
        out_no_grad = dfm_fused.unroll(step, x, h0, 3)
    out = dfm_fused.unroll(step, x, h0, 3)
    out.sum().backward()
    assert torch.equal(out.detach(), out_no_grad)
    assert dfm_fused.unroll(step, x, h0, 0) is h0
    assert dfm_fused.unroll(step, x, h0, 0, return_states=True) == []


def test_parameter_gradients_accumulate_once_per_backward():
    step = _make()
    calls = {}
    for name, p in step.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x, h0 = _inputs()
    dfm_fused.unroll(step, x, h0, 5).sum().backward()
    assert calls and set(calls.values()) == {1}, calls


def _saved_bytes(fn):
    """Bytes the autograd graph keeps, counting each storage once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_checkpoint_graph_memory_is_one_step_plus_states():
    step = _make(torch.float32, dropout=0.0).train()
    x = torch.randn(4, CX, 32, 32, requires_grad=True)
    h0 = 1e-3 * torch.randn(4, C, 16, 16)
    state_bytes = h0.numel() * h0.element_size()
    x_bytes = x.numel() * x.element_size()
    # The kept last step back-propagates into its input state, so it saves what a step whose
    # state needs a gradient saves.
    h0_grad = h0.clone().requires_grad_()
    one_step, _ = _saved_bytes(lambda: dfm_fused.unroll(step, x, h0_grad, 1, checkpoint=False))
    plain8, _ = _saved_bytes(lambda: dfm_fused.unroll(step, x, h0, 8, checkpoint=False))
    ckpt8, out = _saved_bytes(lambda: dfm_fused.unroll(step, x, h0, 8, checkpoint=True))
    # The last step's graph, the input of the replays, and the states h_0 .. h_7.
    assert ckpt8 <= one_step + x_bytes + 8 * state_bytes, (ckpt8, one_step, x_bytes, state_bytes)
    assert plain8 >= 6 * one_step  # the plain graph grows with T
    out.sum().backward()  # and the checkpointed graph still back-propagates
    assert step.conv.weight.grad is not None


def test_checkpoint_recomputes_all_steps_but_the_last():
    step = _make(torch.float64, dropout=0.3).train()
    calls = []
    counted = lambda x, h, t: calls.append(t) or step(x, h, t)  # noqa: E731
    x, h0 = _inputs()
    torch.manual_seed(1)
    out = dfm_fused.unroll(counted, x, h0, 4, module=step)
    assert calls == [0, 1, 2, 3]
    out.sum().backward()
    assert calls == [0, 1, 2, 3, 2, 1, 0]


@pytest.mark.parametrize("checkpoint", [True, "selective"])
def test_second_backward_through_a_retained_graph_replays_the_last_step(checkpoint):
    step = _make(torch.float64, dropout=0.3).train()
    x, h0 = _inputs()
    torch.manual_seed(2)
    out = dfm_fused.unroll(step, x, h0, 3, checkpoint=checkpoint)
    inputs = [x, h0, step.conv.weight, step.bn.weight, step.update.Q]
    first = torch.autograd.grad(out.sum(), inputs, retain_graph=True)
    second = torch.autograd.grad(out.sum(), inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_summed_gradients_never_write_into_the_incoming_gradient():
    class AddBias(torch.nn.Module):  # d h_next / d bias is the incoming gradient itself
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(3, C, 4, 3, dtype=torch.float64))

        def forward(self, x, h, t):
            return h + self.bias

    step = AddBias()
    h0 = torch.randn(3, C, 4, 3, dtype=torch.float64, requires_grad=True)
    out = dfm_fused.unroll(step, None, h0, 4)
    g = torch.randn_like(out)
    g_before = g.clone()
    out.backward(g)
    assert torch.equal(g, g_before)
    torch.testing.assert_close(step.bias.grad, 4 * g_before, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(h0.grad, g_before, rtol=0, atol=0)


@pytest.mark.parametrize("checkpoint", [True, "selective"])
def test_closure_step_without_module_gets_the_plain_graph_gradients(checkpoint):
    """A plain function over captured modules and a captured parameter; neither x nor h0 needs a
    gradient, so every gradient comes from tensors the step captured (issue 12, item 3)."""
    base = _make()
    outside = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    results = {}
    for mode in (checkpoint, False):
        step = copy.deepcopy(base).train()
        scale = outside.detach().clone().requires_grad_()
        torch.manual_seed(3)  # the same inputs and dropout masks in both runs
        x, h0 = (t.detach() for t in _inputs())
        out = dfm_fused.unroll(lambda x, h, t: step(x, h, t) * scale, x, h0, 3, checkpoint=mode)
        assert out.grad_fn is not None
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
        results[mode] = grads, scale.grad.clone(), {n: b.clone() for n, b in step.named_buffers()}
    (grads_c, scale_c, buffers_c), (grads_p, scale_p, buffers_p) = results[checkpoint], results[False]
    assert grads_c.keys() == grads_p.keys() and "conv.weight" in grads_c
    for name in grads_c:
        assert torch.allclose(grads_c[name], grads_p[name], rtol=1e-9, atol=1e-12), name
    assert rel_err(scale_c, scale_p) < 1e-10
    for name in buffers_c:
        assert torch.equal(buffers_c[name], buffers_p[name]), name


class InPlaceAfterConv(torch.nn.Module):
    """Ops that write into convolution outputs the selective mode would keep: a ReLU(inplace=True)
    after a read of the value before it (which autograd does not guard: ``y * 2`` saves nothing of
    ``y``), and a non-idempotent add_."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1).double()
        self.conv2 = torch.nn.Conv2d(C, C, 3, padding=1).double()

    def forward(self, x, h, t):
        y = self.conv(h)
        before = y * 2.0
        torch.relu_(y)
        z = self.conv2(y)
        z.add_(y)
        return h + 0.1 * torch.tanh(z + before * before)


def test_selective_with_in_place_ops_on_kept_outputs():
    grads = {}
    for mode in ("selective", False):
        torch.manual_seed(0)
        step = InPlaceAfterConv()
        h0 = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
        dfm_fused.unroll(step, None, h0, 3, checkpoint=mode).square().sum().backward()
        grads[mode] = [h0.grad] + [p.grad for p in step.parameters()]
    for a, b in zip(grads["selective"], grads[False]):
        assert rel_err(a, b) < 1e-12


class CountingStep(torch.nn.Module):
    """Counts its steps in a frozen parameter as dfbmodels does (``constant_(self.T, self.T + 1)``)
    and reads the count, so a replay that sees another count gives other gradients."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.T = torch.nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)

    def forward(self, x, h, t):
        torch.nn.init.constant_(self.T, self.T + 1)
        count = self.T.detach().clone()  # what the graph saves: the next step bumps T in place
        return h + torch.tanh(self.weight * count * h)


@pytest.mark.parametrize("checkpoint", [True, "selective"])
@pytest.mark.parametrize("closure", [False, True])
def test_step_mutating_a_frozen_parameter_replays_with_its_forward_value(checkpoint, closure):
    """Issue 12, item 4: the counter ends at T and the gradient is the plain graph's."""
    grads = {}
    for mode in (checkpoint, False):
        step = CountingStep()
        h0 = torch.linspace(0.1, 1.0, 6, dtype=torch.float64).reshape(1, 6).requires_grad_()
        run = (lambda x, h, t: step(x, h, t)) if closure else step
        out = dfm_fused.unroll(run, None, h0, 4, checkpoint=mode)
        out.sum().backward()
        assert step.T.item() == 4
        grads[mode] = step.weight.grad.clone(), h0.grad.clone()
    for a, b in zip(grads[checkpoint], grads[False]):
        assert rel_err(a, b) < 1e-12


def test_replay_writing_a_tensor_outside_module_is_an_error():
    """A counter that is no module's buffer cannot be set back for the replay: raise, never
    back-propagate through a replay that saw another value."""
    counter = torch.zeros((), dtype=torch.float64)
    weight = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def step(x, h, t):
        counter.add_(1)
        return h + torch.tanh(weight * counter * h)

    h0 = torch.ones(1, 6, dtype=torch.float64, requires_grad=True)
    out = dfm_fused.unroll(step, None, h0, 3)
    with pytest.raises(RuntimeError, match=r"modified a tensor of shape \(\) in place"):
        out.sum().backward()


def test_step_mutating_parameters_during_replay_is_an_error():
    """The reference StateExpDecay re-orthogonalises on every call at T == 0, replay included."""
    torch.manual_seed(0)
    head = reference.StateExpDecay(C, (4, 3)).train()
    with torch.no_grad():
        head.Q.add_(0.1)

    def step(x, h, t):
        return h + head(h, T=t)

    h0 = torch.randn(2, C, 4, 3, requires_grad=True)
    out = dfm_fused.unroll(step, None, h0, 2, module=head)
    with pytest.raises(RuntimeError, match=r"modified a tensor of shape \(8, 8\) in place"):
        out.sum().backward()


def test_bad_arguments():
    step = _make()
    x, h0 = _inputs()
    with pytest.raises(ValueError, match="T: expected an int >= 0"):
        dfm_fused.unroll(step, x, h0, -1)
    with pytest.raises(TypeError, match="T: expected an int"):
        dfm_fused.unroll(step, x, h0, 2.5)
    with pytest.raises(ValueError, match=r"step: expected it to return a state of shape \(3, 8, 4, 3\)"):
        dfm_fused.unroll(lambda x, h, t: h[:, :4], x, h0, 2)
    with pytest.raises(TypeError, match="step: expected a callable"):
        dfm_fused.unroll(3, x, h0, 2)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_failed_unroll_leaves_buffers_and_Q_untouched(checkpoint):
    step = _make().train()
    x, h0 = _inputs()
    before = {n: t.detach().clone() for n, t in list(step.named_buffers()) + [("Q", step.update.Q)]}

    def bad_step(x, h, t):
        out = step(x, h, t)  # runs BatchNorm (stats updated) and the QR at t == 0
        return out if t < 2 else out[:, :1]

    with pytest.raises(ValueError, match="at t=2"):
        dfm_fused.unroll(bad_step, x, h0, 4, module=step, checkpoint=checkpoint)
    for name, value in list(step.named_buffers()) + [("Q", step.update.Q)]:
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("checkpoint", [True, False])
def test_failed_unroll_restores_Q_so_the_decay_leaves_the_scalar_path(checkpoint):
    """The QR at t=0 makes ``Q`` orthonormal (scalar-decay path); restoring the non-orthonormal
    ``Q`` after an error must take the module off that path, or its next forward is wrong."""
    step = _make().train()
    x, h0 = _inputs()

    def failing_step(x, h, t):
        out = step(x, h, t)
        if t == 1:
            raise ValueError("failing at t=1")
        return out

    with pytest.raises(ValueError, match="failing at t=1"):
        dfm_fused.unroll(failing_step, x, h0, 3, module=step, checkpoint=checkpoint)
    step.eval()  # no QR: the forward uses the restored Q as it is
    with torch.no_grad():
        fused = dfm_fused.unroll(step, x, h0, 2)
        step.literal = True
        oracle = dfm_fused.unroll(step, x, h0, 2)
    assert rel_err(fused, oracle) < 1e-12


def test_replay_leaves_buffers_saved_by_graphs_outside_the_step_usable():
    """A frontend BatchNorm runs once outside the loop; ``module`` holds it too."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.frontend = torch.nn.Sequential(torch.nn.Conv2d(3, CX, 3, padding=1), torch.nn.BatchNorm2d(CX))
    model.step = _make(torch.float32).train()
    images = torch.randn(3, 3, 8, 6)
    h0 = 1e-3 * torch.randn(3, C, 4, 3)
    out = dfm_fused.unroll(lambda x, h, t: model.step(x, h, t), model.frontend(images), h0, 3, module=model)
    out.square().sum().backward()
    assert model.frontend[0].weight.grad is not None and model.step.conv.weight.grad is not None


@pytest.mark.parametrize("checkpoint", [True, "selective"])
def test_replay_under_bfloat16_autocast_equals_the_plain_graph(checkpoint):
    """The replays run under the forward's autocast: the selective mode's kept convolution
    outputs are bfloat16 as produced, and the recomputed ops cast as in the forward."""
    grads = {}
    for mode in (checkpoint, False):
        step = _make(torch.float32, dropout=0.2).train()
        torch.manual_seed(5)
        x, h0 = (t.detach().float().requires_grad_() for t in _inputs())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dfm_fused.unroll(step, x, h0, 3, checkpoint=mode)
        out.float().square().sum().backward()
        grads[mode] = [x.grad, h0.grad] + [p.grad for p in step.parameters() if p.grad is not None]
    assert len(grads[checkpoint]) == len(grads[False])
    for a, b in zip(grads[checkpoint], grads[False]):
        # Same kernels on the same values; a replay without the autocast would differ at bfloat16 rounding.
        assert rel_err(a, b) < 1e-6


def _fake_cuda_graph_capture(monkeypatch):
    """What unroll sees inside ``torch.cuda.graph`` on a CPU-only host: a capturing stream, and an
    RNG state read that raises as the CUDA generator's does during capture."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def get_rng_state(*args, **kwargs):
        raise RuntimeError("Cannot call CUDAGeneratorImpl::current_seed during CUDA graph capture")

    monkeypatch.setattr(torch, "get_rng_state", get_rng_state)


@pytest.mark.parametrize("checkpoint", [True, "selective"])
def test_capture_replays_without_reading_the_rng_state(checkpoint, monkeypatch):
    """A step without random ops under capture: no RNG state read, the replay runs under the
    forward's autocast with its cache off (capture needs cache_enabled=False), and the gradients
    are the plain graph's."""
    grads, cache_flags = {}, []
    for mode in (checkpoint, False):
        step = _make(torch.float32, dropout=0.0).train()
        x, h0 = (t.detach().float().requires_grad_() for t in _inputs())
        with monkeypatch.context() as patch:
            if mode is not False:
                _fake_cuda_graph_capture(patch)
                # What dfm_fused.capture does: |S| read before the capture, the answer baked in.
                for module in step.modules():
                    if isinstance(module, dfm_fused.StateUpdate):
                        patch.setattr(module, "baked_uniform_S", module.uniform_S())

            def recorded(x, h, t):
                cache_flags.append(torch.is_autocast_cache_enabled())
                return step(x, h, t)

            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                out = dfm_fused.unroll(recorded, x, h0, 3, checkpoint=mode, module=step)
            out.float().square().sum().backward()
        grads[mode] = [x.grad, h0.grad] + [p.grad for p in step.parameters() if p.grad is not None]
    assert len(cache_flags) > 6 and not any(cache_flags)  # forwards and replays
    assert len(grads[checkpoint]) == len(grads[False])
    for a, b in zip(grads[checkpoint], grads[False]):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("checkpoint", [True, "selective"])
def test_capture_of_a_checkpointed_step_with_dropout_is_an_error(checkpoint, monkeypatch):
    """The replay could not redraw the forward's dropout mask under capture: raise, naming dropout
    and the way out, rather than back-propagate through another mask."""
    step = _make(torch.float32, dropout=0.2).train()
    x, h0 = (t.detach().float() for t in _inputs())
    _fake_cuda_graph_capture(monkeypatch)
    with pytest.raises(RuntimeError, match=r"draws random numbers .*dropout.*Use checkpoint=False"):
        dfm_fused.unroll(step, x, h0, 3, checkpoint=checkpoint)
    out = dfm_fused.unroll(step, x, h0, 3, checkpoint=False)  # the plain graph replays nothing
    assert out.grad_fn is not None
