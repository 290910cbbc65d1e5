"""Train a DFM on several processes with DistributedDataParallel or FSDP2, launched by torchrun.

    torchrun --nproc-per-node 2 examples/train_distributed.py --strategy ddp
    torchrun --nproc-per-node 2 examples/train_distributed.py --strategy fsdp2

gloo on the CPU, NCCL on GPUs (one per process). The task is synthetic and fixed by a seed: an
image holds a bright square in one of its four quadrants, the class. Each optimizer step draws a
global batch from a generator seeded by the step's index; rank r takes rows r*B/N .. (r+1)*B/N-1 of
it, so a run resumed from a checkpoint sees the batches an uninterrupted run would.

A progress bar runs on rank 0. Every --save-every steps and at the end, the model, the optimizer
and the step are saved with torch.distributed.checkpoint into --checkpoint-dir; a later launch
with the same directory resumes from there (--fresh starts over). The checkpoint holds the
reference's state_dict keys: a single process loads it with dcp.load into model.state_dict().
"""
from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
import time

try:
    import dfm_fused  # noqa: F401  (installed)
except ImportError:  # a fresh clone, not installed: the package next to this folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)

import dfm_fused  # noqa: E402
import dfm_fused.distributed  # noqa: E402

CLASSES, SIZE = 4, 16


def parse_args(argv, world_size: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--model", choices=("small", "resnet18"), default="small",
                        help="a small GroupNorm FeedbackModel, or models.ResNet18 (BatchNorm; 64x64 images)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps in all (a resumed run stops there too)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, split evenly over the ranks")
    parser.add_argument("--T", type=int, default=4, help="DFM steps per forward")
    parser.add_argument("--checkpoint", choices=("true", "selective", "false"), default="true",
                        help="the unroll's memory mode")
    parser.add_argument("--atol", type=float, default=None,
                        help="early stop on sum |h| (the ranks agree on the step); default: exactly T steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint-dir", default="checkpoints/train_distributed")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --checkpoint-dir")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "T", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1; got {getattr(args, name)}")
    if args.batch_size % world_size:
        parser.error(f"--batch-size: expected a multiple of the world size {world_size} (each rank takes an equal "
                     f"share); got {args.batch_size}")
    if args.model == "resnet18" and args.batch_size // world_size < 2:
        parser.error(f"--batch-size: BatchNorm needs 2 images per rank at least; got {args.batch_size} over "
                     f"{world_size} ranks")
    return args


def batch(step: int, size: int, image: int, seed: int = 0):
    """The global batch of ``step``: (size, 3, image, image) noise with a bright square in the
    quadrant given by the label (size,)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    labels = torch.randint(0, CLASSES, (size,), generator=g)
    images = torch.randn(size, 3, image, image, generator=g) * 0.5
    half, side = image // 2, image // 4
    for i, label in enumerate(labels.tolist()):
        top, left = (label // 2) * half + side // 2, (label % 2) * half + side // 2
        images[i, :, top:top + side, left:left + side] += 2.0
    return images, labels


def build_model(name: str, checkpoint) -> nn.Module:
    torch.manual_seed(0)  # every rank builds the same model (the wrappers also broadcast rank 0's)
    if name == "resnet18":
        return dfm_fused.models.ResNet18(fb_filters=8, n_classes=CLASSES, shape=(64, 64), checkpoint=checkpoint)
    frontend = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU())
    body = nn.Sequential(
        nn.Conv2d(16 + 8, 32, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 24, 3, padding=1),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))
    return dfm_fused.FeedbackModel(frontend, body, head, in_channels=16, pred_channels=16, fb_channels=8,
                                   state_stride=2, groups=8, checkpoint=checkpoint)


class ProgressBar:
    """A one-line text bar on stderr (rank 0 only)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled, self.t0, self.start = total, enabled, time.monotonic(), start

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        done = int(30 * step / self.total)
        rate = (step - self.start) / max(time.monotonic() - self.t0, 1e-9)
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} {rate:.1f} step/s {text}  ")
        if step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(parse_args(argv, dist.get_world_size()), cuda)
        dist.barrier()  # no rank tears its group down while another still uses it
    finally:
        # train() has returned: the model, its DTensors and their device mesh, which hold the
        # process groups, are gone before the groups are destroyed (a mesh outliving them made
        # some FSDP2 runs abort at exit).
        gc.collect()
        dist.destroy_process_group()


def train(args: argparse.Namespace, cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    checkpoint = {"true": True, "false": False}.get(args.checkpoint, args.checkpoint)
    model = build_model(args.model, checkpoint).to(device)
    if args.strategy == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
    else:
        net = dfm_fused.distributed.fully_shard(model)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=args.lr)
    image = 64 if args.model == "resnet18" else SIZE
    rows = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    start = 0
    if not args.fresh and os.path.exists(os.path.join(args.checkpoint_dir, ".metadata")):
        # The model's state is read into its own tensors (state_dict() shares their storage),
        # which also covers the names the reference layout gives twice (conv1.weight and
        # frontend.0.weight): set_state_dict maps only the first of them.
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(net, opt),
                 "step": torch.zeros((), dtype=torch.int64)}
        dcp.load(state, checkpoint_id=args.checkpoint_dir)
        set_optimizer_state_dict(net, opt, optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir} at step {start}", file=sys.stderr)

    def save(step: int) -> None:
        # Running statistics (BatchNorm) are per rank: the checkpoint gets rank 0's.
        dfm_fused.distributed.broadcast_buffers(model)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(net, opt),
                  "step": torch.tensor(step)},
                 checkpoint_id=args.checkpoint_dir)

    bar = ProgressBar(args.steps, start, rank == 0)
    net.train()
    loss_value = float("nan")
    for step in range(start, args.steps):
        x, y = batch(step, args.batch_size, image)
        x, y = x[rows].to(device), y[rows].to(device)
        trajectory = net(x, args.T, return_all=True, atol=args.atol)
        loss = sum(nn.functional.cross_entropy(p, y) for p in trajectory) / len(trajectory)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        loss_value = mean_loss.item() / world
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(step + 1)
        bar.update(step + 1, loss=f"{loss_value:.3f}", T=model.steps_run)

    net.eval()
    x, y = batch(10**6, 64 // world * world, image)
    share = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    with torch.no_grad():
        correct = (net(x[share].to(device), args.T).argmax(1) == y[share].to(device)).sum().float()
    dist.all_reduce(correct)
    if rank == 0:
        print(f"{args.strategy} on {world} ranks: final loss {loss_value:.3f}, held-out accuracy "
              f"{correct.item() / len(y):.2f}, checkpoint {args.checkpoint_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
