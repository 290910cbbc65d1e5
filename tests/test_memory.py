"""Graph memory of the three unroll modes and of the early stop, counted at the allocation."""
import pytest
import torch
from torch import nn

import dfm_fused
from dfm_fused.bench.memory import forward_live_bytes

MiB = 2**20


def _model(checkpoint):
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(8 + 8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 1),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return dfm_fused.FeedbackModel(
        nn.Conv2d(3, 8, 3, padding=1), body, head, in_channels=8, pred_channels=8, fb_channels=8,
        checkpoint=checkpoint,
    ).train()


def _graph_bytes(model, T, **kwargs):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 16, 16)
    live, out = forward_live_bytes(lambda: model(images, T, **kwargs))
    out.sum().backward()  # the graph that was counted back-propagates
    return live


def test_early_stop_keeps_graph_memory_flat():
    """With atol the loop runs in chunks of check_every steps; with
    checkpoint=True its graph must stay that of one step plus the states, as without atol."""
    model = _model(True)
    plain_T = _graph_bytes(model, 8)
    for check_every in (1, 3):
        # atol=0 never stops early here, so both run the same 8 steps.
        early = _graph_bytes(model, 8, atol=0.0, check_every=check_every)
        assert model.steps_run == 8
        assert early <= 1.05 * plain_T, (check_every, early / MiB, plain_T / MiB)


def test_modes_graph_memory():
    """True: flat in T (states aside); selective: less than the plain graph; plain: grows with T."""
    state_bytes = 2 * 16 * 16 * 16 * 4
    full = {T: _graph_bytes(_model(True), T) for T in (2, 8)}
    selective = _graph_bytes(_model("selective"), 8)
    plain = {T: _graph_bytes(_model(False), T) for T in (1, 8)}
    assert full[8] <= full[2] + 6 * state_bytes * 1.05, (full, state_bytes)
    assert plain[8] >= 5 * (plain[1] - plain[1] // 2)
    assert full[8] < 0.5 * plain[8], (full, plain)
    assert selective < 0.8 * plain[8], (selective, plain)
    assert selective > full[8]  # it keeps the convolution outputs


def test_bad_checkpoint_value():
    with pytest.raises(ValueError, match="checkpoint: expected True, 'selective' or False; got 'full'"):
        _model("full")
    with pytest.raises(ValueError, match="checkpoint: expected True, 'selective' or False; got 'yes'"):
        dfm_fused.unroll(lambda x, h, t: h, None, torch.zeros(1, 2), 2, checkpoint="yes")
