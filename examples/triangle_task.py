"""The noisy-triangle segmentation task and its two networks, shared by the triangle examples.

The task of the DFM blog post: images with one random filled triangle (intensity 1) on a
blank background plus Gaussian noise of standard deviation sigma; the target is the
triangle's mask. The two networks share one body: :class:`FeedForward` runs it once,
:func:`make_dfm` wraps it in :class:`dfm_fused.FeedbackModel`, where it also reads the
fed-back channels and runs T times.

Used by ``train_triangles.py`` (one run, a figure) and ``triangles_study.py`` (the seed's
claims measured over seeds, noise levels and training-set sizes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dfm_fused

# Trajectory-loss weightings: the weight of the prediction after step t (1-based) of T.
TRAJECTORY_WEIGHTS = ("uniform", "linear", "last")


def triangles(n: int, size: int, sigma, generator: torch.Generator):
    """``n`` images (n, 1, size, size) float32 with one filled random triangle each, plus N(0, sigma^2) noise.

    ``sigma`` is a number or an (n,) tensor. Returns (images, masks) with masks (n, size, size) int64.
    The triangles and the unit noise are drawn from ``generator`` in the same order whatever
    ``sigma`` is, so one generator seed gives the same triangles and noise pattern at every sigma.
    """
    # Fat triangles: corners around a centre, at roughly equal angles.
    centre = (0.3 + 0.4 * torch.rand(n, 1, 2, generator=generator)) * size
    radius = (0.2 + 0.2 * torch.rand(n, 1, 1, generator=generator)) * size
    angle = 2 * math.pi * (torch.rand(n, 1, generator=generator) + torch.arange(3) / 3)
    angle = angle + 0.8 * (torch.rand(n, 3, generator=generator) - 0.5)
    corners = centre + radius * torch.stack([angle.cos(), angle.sin()], -1)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    p = torch.stack([xx, yy], -1).view(1, size, size, 2)

    def edge(a, b):  # sign of the cross product: which side of edge a->b each pixel lies on
        a, b = a.view(n, 1, 1, 2), b.view(n, 1, 1, 2)
        return (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (p[..., 0] - a[..., 0])

    e0, e1, e2 = edge(corners[:, 0], corners[:, 1]), edge(corners[:, 1], corners[:, 2]), edge(corners[:, 2], corners[:, 0])
    mask = ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
    noise = torch.randn(n, 1, size, size, generator=generator) * sigma
    return mask.float().unsqueeze(1) + noise, mask.long()


def conv_block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(4, cout),
        nn.ReLU(inplace=True),
    )


class Body(nn.Module):
    """A small encoder-decoder: (B, cin, H, W) -> (B, cout, H, W) (H, W even)."""

    def __init__(self, cin: int, cout: int, width: int):
        super().__init__()
        self.enc = nn.Sequential(conv_block(cin, width), conv_block(width, 2 * width, stride=2),
                                 conv_block(2 * width, 2 * width, dilation=2))
        self.dec = nn.Sequential(conv_block(2 * width + cin, width), nn.Conv2d(width, cout, 1))

    def forward(self, x):
        deep = F.interpolate(self.enc(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.dec(torch.cat([deep, x], dim=1))


class FeedForward(nn.Module):
    """The feedforward baseline: frontend, body, 1x1 head. (B, 1, H, W) -> logits (B, 2, H, W)."""

    def __init__(self, width: int, pred: int):
        super().__init__()
        self.frontend = conv_block(1, width)
        self.body = Body(width, pred, width)
        self.head = nn.Conv2d(pred, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.frontend(x)))


def make_dfm(width: int, pred: int, fb: int, T_tau: float, checkpoint: bool | str = True) -> dfm_fused.FeedbackModel:
    """The same network as a DFM: the body also reads ``fb`` fed-back channels.

    ``T_tau`` is the decay's tau; ``checkpoint`` as for :func:`dfm_fused.unroll` (``False``:
    the plain graph, fastest at these small sizes).
    """
    return dfm_fused.FeedbackModel(
        conv_block(1, width), Body(width + fb, pred + fb, width), nn.Conv2d(pred, 2, 1),
        in_channels=width, pred_channels=pred, fb_channels=fb, groups=2, fb_groups=fb, tau=T_tau,
        checkpoint=checkpoint,
    )


def trajectory_weights(kind: str, T: int) -> list[float]:
    """Weights (summing to 1) of the T per-step losses: ``uniform`` (the mean over the decision
    trajectory), ``linear`` (step t weighs t) or ``last`` (the final prediction only)."""
    if kind not in TRAJECTORY_WEIGHTS:
        raise ValueError(f"trajectory weights: expected one of {TRAJECTORY_WEIGHTS}; got {kind!r}")
    raw = {"uniform": [1.0] * T, "linear": [float(t + 1) for t in range(T)],
           "last": [0.0] * (T - 1) + [1.0]}[kind]
    return [w / sum(raw) for w in raw]


def trajectory_loss(trajectory: list[torch.Tensor], masks: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted sum of the cross-entropies of each step's logits (B, 2, H, W) against masks (B, H, W)."""
    if len(weights) != len(trajectory):
        raise ValueError(f"weights: expected {len(trajectory)} (one per step); got {len(weights)}")
    return sum(w * F.cross_entropy(p, masks) for w, p in zip(weights, trajectory) if w)


def iou(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """Foreground IoU over the whole set: logits (n, 2, H, W), masks (n, H, W) int64."""
    pred = logits.argmax(1).bool()
    truth = masks.bool()
    union = (pred | truth).sum().item()
    return (pred & truth).sum().item() / union if union else 1.0


def have_matplotlib() -> bool:
    """Whether matplotlib imports (checked before training, so a missing one costs a message, not the run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_step_figure(path, rows, T: int, titles=None) -> None:
    """A grid of images: one row per entry of ``rows`` = (label, [input, DFM step 1..T, feedforward, truth]).

    The input in grey, the probability maps in [0, 1]; ``titles`` replaces the column titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = T + 3
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)
    titles = titles or ["input"] + [f"DFM t={t + 1}" for t in range(T)] + ["feedforward", "ground truth"]
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray" if c == 0 else "viridis", vmin=None if c == 0 else 0, vmax=None if c == 0 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
