"""Test oracle: the decay module of the public repository DCalhas/feedback_segmentation
(``feedback_segmentation.layers.state.StateExpDecay``) and a small model wired like its
``NeumannFeedback``, transcribed from their maths (not their code).

The module, per pixel with ``x`` as a column vector, ``Delta = -(1/tau) |S|**alpha``:

- forward ``out = Qinv diag(exp(t Delta)) Q x`` with ``t = self.T * T``; ``Qinv`` is its own
  parameter, there is no QR;
- backward through the decay stage ``z -> exp(t Delta) z`` is a Neumann-series surrogate,
  not the derivative: with ``n = int(t)`` (a host read) the stage passes back
  ``g * sum_{i=1..n+1} exp(i Delta)`` and gives ``Delta`` the mean over batch and pixels
  of that times ``z``; ``t`` gets nothing. ``Q`` and ``Qinv`` get autograd's gradients
  around that stage, ``S`` (trainable) gets one through ``Delta``.
- parameters, in this order: ``tau``, ``T``, ``alpha`` (0-d, frozen), ``W`` (C, C, frozen,
  Xavier-uniform), ``S`` (C, ones, trainable), ``Q`` (C, C, frozen: eigenvectors of
  ``W W^T``), ``Qinv`` (C, C, frozen: the inverse of ``Q``); attribute ``state``.
"""
from __future__ import annotations

import torch


class NeumannDecayStage(torch.autograd.Function):
    """``z (B, C, H, W) -> z * exp(t * Delta)`` per channel, with the surrogate backward."""

    @staticmethod
    def forward(ctx, z, t, delta):
        ctx.save_for_backward(z, t, delta)
        return z * torch.exp(t * delta)[None, :, None, None]

    @staticmethod
    def backward(ctx, g):
        z, t, delta = ctx.saved_tensors
        ratio = torch.exp(delta)[None, :, None, None]
        term, series = g, g
        for _ in range(int(t.item())):  # the host read of the original
            term = term * ratio
            series = series + term
        grad_z = series * ratio
        grad_delta = (grad_z * z).mean(dim=(0, 2, 3))
        return grad_z, None, grad_delta


def _per_pixel(matrix, x):
    return torch.einsum("ij,bjhw->bihw", matrix, x)


class SegmentationStateExpDecay(torch.nn.Module):
    def __init__(self, filters, shape, tau=0.1, alpha=1.0):
        super().__init__()
        self.filters = filters
        self.tau = torch.nn.Parameter(torch.tensor(float(tau)), requires_grad=False)
        self.T = torch.nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.alpha = torch.nn.Parameter(torch.tensor(float(alpha)), requires_grad=False)
        self.state = torch.zeros((1, filters, *shape))
        self.W = torch.nn.Parameter(torch.empty(filters, filters), requires_grad=False)
        torch.nn.init.xavier_uniform_(self.W)
        _, vectors = torch.linalg.eigh(self.W @ self.W.T)
        self.S = torch.nn.Parameter(torch.ones(filters))
        self.Q = torch.nn.Parameter(vectors.contiguous(), requires_grad=False)
        self.Qinv = torch.nn.Parameter(torch.linalg.inv(vectors), requires_grad=False)

    def forward(self, x, T=5):
        delta = (1 / self.tau) * -1.0 * torch.abs(self.S) ** self.alpha
        z = _per_pixel(self.Q, x)
        return _per_pixel(self.Qinv, NeumannDecayStage.apply(z, self.T * T, delta))


class TinyNeumannFeedback(torch.nn.Module):
    """A small model wired like feedback_segmentation's ``NeumannFeedback``: a state holder
    module, a body (a conv net here, a U-Net there), LayerNorms over the spatial shape, the
    decay as error head with Xavier-initialised trainable ``Q``/``Qinv`` and frozen ``S``, a
    fractional-order step ``(Tf dt - t dt)**(alpha-1) / Gamma(alpha)`` and a step counter
    ``T`` passed to the error head as a 0-d tensor."""

    def __init__(self, in_filters=3, fb_filters=2, class_filters=4, shape=(8, 8), tau=0.2, alpha=1.5):
        super().__init__()
        C = class_filters + fb_filters
        self.fb_filters, self.class_filters = fb_filters, class_filters
        self.h_class = SegmentationStateExpDecay(C, shape, tau=1e3)
        self.function = torch.nn.Sequential(
            torch.nn.Conv2d(in_filters + fb_filters, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, C, 3, padding=1),
        )
        self.layernorm_error = torch.nn.LayerNorm(shape)
        self.layernorm_input = torch.nn.LayerNorm(shape)
        self.error_head = SegmentationStateExpDecay(C, shape, tau=tau)
        self.error_head.Q.requires_grad_(True)
        self.error_head.Qinv.requires_grad_(True)
        self.error_head.S.requires_grad_(False)
        torch.nn.init.xavier_uniform_(self.error_head.Q)
        torch.nn.init.xavier_uniform_(self.error_head.Qinv)
        self.head = torch.nn.Conv2d(class_filters, 2, 1)
        self.T = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.alpha = torch.nn.Parameter(torch.tensor(alpha), requires_grad=False)
        self.dt = torch.nn.Parameter(torch.tensor(0.2), requires_grad=False)
        self.Tf = torch.nn.Parameter(torch.tensor(5.0), requires_grad=False)

    def forward(self, x, T=2):
        with torch.no_grad():
            self.T.zero_()
            self.dt.fill_(1.0 / T)
            self.Tf.fill_(float(T))
        state = torch.zeros((x.shape[0], *self.h_class.state.shape[1:]), dtype=x.dtype)
        gamma = torch.exp(torch.special.gammaln(self.alpha))
        for _ in range(T):
            fed_back = self.layernorm_input(state[:, self.class_filters:self.class_filters + self.fb_filters])
            y = self.layernorm_error(self.function(torch.cat((x, torch.softmax(fed_back, dim=1)), dim=1)))
            error = self.error_head(y, T=self.T)
            state = state + error * (self.Tf * self.dt - self.T * self.dt) ** (self.alpha - 1) / gamma
            with torch.no_grad():
                self.T.add_(1)
        self.h_class.state = state
        return self.head(state[:, :self.class_filters])
