"""Noisy-triangle segmentation: a feedforward network against the same network as a DFM.

The task of the DFM blog post: images with a random filled triangle on a blank
background plus Gaussian noise of standard deviation sigma (the triangle has
intensity 1). Both models are trained on noise drawn uniformly from
[0, --train-sigma]; the script then prints the foreground IoU of each at every
--sigmas level and saves a figure (--out; with matplotlib, else it says so at
the start and skips it): one row per noise level with the input, the DFM's
prediction after each of its T steps, the feedforward prediction and the
ground truth.

    python examples/train_triangles.py                 # defaults: 2 CPU threads, a few minutes
    python examples/train_triangles.py --iters 20 --size 24 --out /tmp/tri.png   # smoke run
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import dfm_fused


def triangles(n: int, size: int, sigma, generator: torch.Generator):
    """``n`` images (n, 1, size, size) with one filled random triangle each, plus N(0, sigma^2) noise.

    ``sigma`` is a number or an (n,) tensor. Returns (images, masks) with masks (n, size, size) int64.
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
    """The feedforward baseline: frontend, body, 1x1 head."""

    def __init__(self, width: int, pred: int):
        super().__init__()
        self.frontend = conv_block(1, width)
        self.body = Body(width, pred, width)
        self.head = nn.Conv2d(pred, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.frontend(x)))


def make_dfm(width: int, pred: int, fb: int, T_tau: float) -> dfm_fused.FeedbackModel:
    """The same network as a DFM: the body also reads ``fb`` fed-back channels."""
    return dfm_fused.FeedbackModel(
        conv_block(1, width), Body(width + fb, pred + fb, width), nn.Conv2d(pred, 2, 1),
        in_channels=width, pred_channels=pred, fb_channels=fb, groups=2, fb_groups=fb, tau=T_tau,
    )


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, label: str, width: int = 30):
        self.total, self.label, self.width, self.start = total, label, width, time.time()

    def update(self, i: int, loss: float) -> None:
        done = (i + 1) / self.total
        bar = "#" * int(done * self.width)
        elapsed = time.time() - self.start
        eta = elapsed / done - elapsed
        sys.stderr.write(f"\r{self.label:>12} [{bar:<{self.width}}] {i + 1}/{self.total} loss {loss:.4f} "
                         f"{elapsed:5.0f}s eta {eta:4.0f}s")
        if i + 1 == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train(model, args, T: int | None, label: str, generator: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    bar = Progress(args.iters, label)
    model.train()
    for i in range(args.iters):
        sigma = torch.rand(args.batch, generator=generator) * args.train_sigma
        x, y = triangles(args.batch, args.size, sigma, generator)
        if T is None:
            loss = F.cross_entropy(model(x), y)
        else:  # the whole decision trajectory is optimised, not only the last step
            trajectory = model(x, T, return_all=True)
            loss = sum(F.cross_entropy(p, y) for p in trajectory) / len(trajectory)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(i, loss.item())


def iou(logits: torch.Tensor, masks: torch.Tensor) -> float:
    pred = logits.argmax(1).bool()
    truth = masks.bool()
    union = (pred | truth).sum().item()
    return (pred & truth).sum().item() / union if union else 1.0


def save_figure(path, rows, T: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = T + 3
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows)), squeeze=False)
    titles = ["input"] + [f"DFM t={t + 1}" for t in range(T)] + ["feedforward", "ground truth"]
    for r, (sigma, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray" if c == 0 else "viridis", vmin=None if c == 0 else 0, vmax=None if c == 0 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r][0].set_ylabel(f"sigma={sigma:g}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200, help="training iterations per model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="image side (even)")
    parser.add_argument("--width", type=int, default=16, help="channels of the networks")
    parser.add_argument("--T", type=int, default=4, help="DFM steps")
    parser.add_argument("--fb", type=int, default=2, help="fed-back channels")
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-sigma", type=float, default=1.5, help="training noise ~ U[0, this]")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="triangles_dfm.png", help="figure path (PNG)")
    args = parser.parse_args(argv)
    if args.size % 2:
        parser.error(f"--size: expected an even number; got {args.size}")
    return args


def have_matplotlib() -> bool:
    """Checked before training, so a missing matplotlib costs a message, not the run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: the IoU table only, no figure "
              "(`pip install matplotlib` for the figure)", file=sys.stderr, flush=True)
        return False
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    draw = have_matplotlib()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pred = 8
    feedforward = FeedForward(args.width, pred)
    dfm = make_dfm(args.width, pred, args.fb, args.tau)
    train(feedforward, args, None, "feedforward", torch.Generator().manual_seed(args.seed + 1))
    train(dfm, args, args.T, "DFM", torch.Generator().manual_seed(args.seed + 1))

    feedforward.eval()
    dfm.eval()
    results, rows = {"sigma": [], "iou_feedforward": [], "iou_dfm": []}, []
    print(f"{'sigma':>6} {'IoU feedforward':>16} {'IoU DFM':>8}")
    with torch.no_grad():
        for sigma in args.sigmas:
            x, y = triangles(args.eval_samples, args.size, sigma, torch.Generator().manual_seed(args.seed + 2))
            ff = feedforward(x)
            trajectory = dfm(x, args.T, return_all=True)
            results["sigma"].append(sigma)
            results["iou_feedforward"].append(iou(ff, y))
            results["iou_dfm"].append(iou(trajectory[-1], y))
            print(f"{sigma:6.2f} {results['iou_feedforward'][-1]:16.3f} {results['iou_dfm'][-1]:8.3f}")
            probs = [p[0].softmax(0)[1].numpy() for p in trajectory]
            rows.append((sigma, [x[0, 0].numpy(), *probs, ff[0].softmax(0)[1].numpy(), y[0].float().numpy()]))
    results["figure"] = None
    if draw:
        save_figure(args.out, rows, args.T)
        print(f"figure: {args.out}")
        results["figure"] = args.out
    return results


if __name__ == "__main__":
    main()
