"""``SyncBatchNorm`` inside a memory-saving step: its replay in backward normalises with the same
batch statistics and updates the running statistics and the step counter once per real step, as
``BatchNorm2d`` does (outside a process group SyncBatchNorm computes what BatchNorm2d does)."""
import pytest
import torch

import dfm_fused

from _helpers import assert_close


def _model(norm):
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), norm(8), torch.nn.ReLU())
    return torch.nn.ModuleList([body, dfm_fused.StateUpdate(8, 2, tau=1.0)]).train()


def _train_step(norm, checkpoint):
    model = _model(norm)
    torch.manual_seed(1)
    h0 = torch.randn(2, 8, 4, 4, requires_grad=True)
    hT = dfm_fused.unroll(lambda x, h, t: model[1](h, model[0](h), t), None, h0, 3, checkpoint=checkpoint,
                          module=model)
    grads = torch.autograd.grad(hT.square().sum(), [h0, model[0][0].weight, model[1].Q])
    bn = model[0][1]
    return [hT, *grads, bn.running_mean, bn.running_var], int(bn.num_batches_tracked)


@pytest.mark.parametrize("checkpoint", [True, "selective"])
def test_sync_batch_norm_replays_like_batch_norm(checkpoint):
    expected, expected_count = _train_step(torch.nn.BatchNorm2d, False)
    assert expected_count == 3
    for norm in (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm):
        got, count = _train_step(norm, checkpoint)
        assert count == 3, f"{norm.__name__}: num_batches_tracked {count}"
        for name, a, e in zip(("h_T", "grad h0", "grad conv", "grad Q", "running_mean", "running_var"), got, expected):
            assert_close(a, e, torch.float32, f"{norm.__name__} {name}")
