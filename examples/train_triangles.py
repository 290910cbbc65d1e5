"""Noisy-triangle segmentation: a feedforward network against the same network as a DFM.

The task of the DFM blog post: images with a random filled triangle on a blank
background plus Gaussian noise of standard deviation sigma (the triangle has
intensity 1). Both models are trained on noise drawn uniformly from
[0, --train-sigma]; the script then prints the foreground IoU of each at every
--sigmas level and saves a figure (--out; with matplotlib, else it says so at
the start and skips it): one row per noise level with the input, the DFM's
prediction after each of its T steps, the feedforward prediction and the
ground truth. The task and the networks are in ``triangle_task.py``; ``triangles_study.py``
measures the DFM's claims over seeds, noise levels and training-set sizes.

    python examples/train_triangles.py                 # defaults: 2 CPU threads, under a minute (42 s on 2 cores)
    python examples/train_triangles.py --iters 20 --size 24 --out /tmp/tri.png   # smoke run
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from triangle_task import (FeedForward, have_matplotlib, iou, make_dfm, save_step_figure, trajectory_loss,
                           trajectory_weights, triangles)


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
            loss = trajectory_loss(model(x, T, return_all=True), y, trajectory_weights("uniform", T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(i, loss.item())


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    draw = have_matplotlib()
    if not draw:  # said before training, so a missing matplotlib costs a message, not the run
        print("matplotlib is not installed: the IoU table only, no figure "
              "(`pip install matplotlib` for the figure)", file=sys.stderr, flush=True)
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
            rows.append((f"sigma={sigma:g}", [x[0, 0].numpy(), *probs, ff[0].softmax(0)[1].numpy(), y[0].float().numpy()]))
    results["figure"] = None
    if draw:
        save_step_figure(args.out, rows, args.T)
        print(f"figure: {args.out}")
        results["figure"] = args.out
    return results


if __name__ == "__main__":
    main()
