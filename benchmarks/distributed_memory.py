"""Memory per rank of one training step of models.ResNet18 (64x64) under DDP and FSDP2.

    torchrun --nproc-per-node 2 benchmarks/distributed_memory.py --strategy ddp --json OUT.json
    torchrun --nproc-per-node 2 benchmarks/distributed_memory.py --strategy fsdp2 --json OUT.json

One strategy per launch (the peak RSS of a process only grows); each launch adds its entry to
OUT.json. Per rank: the bytes this rank holds of the parameters, the gradients and the Adam state
after one step (FSDP2: its shards; DDP: whole, the gradients as views into DDP's buckets, so the
buckets are counted once), and the peak resident set size (ru_maxrss) of the process before and
after the step.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import resource
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dfm_fused  # noqa: E402
import dfm_fused.distributed  # noqa: E402


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--T", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        if args.batch_size % dist.get_world_size():
            parser.error(f"--batch-size: expected a multiple of the world size {dist.get_world_size()}; "
                         f"got {args.batch_size}")
        measure(args)
        dist.barrier()  # no rank tears its group down while another still uses it
    finally:
        gc.collect()  # the model and its device mesh go before the process groups
        dist.destroy_process_group()


def measure(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = dfm_fused.models.ResNet18(fb_filters=8, n_classes=200, shape=(64, 64), checkpoint=True)
    if args.strategy == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        net = dfm_fused.distributed.fully_shard(model)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    per_rank = args.batch_size // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(per_rank, 3, 64, 64, generator=g)
    y = torch.randint(0, 200, (per_rank,), generator=g)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(net(x, args.T), y)
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - start
    params = list(model.parameters())
    entry = {
        "parameter_bytes": local_bytes(params),
        "gradient_bytes": local_bytes(p.grad for p in params),
        "optimizer_state_bytes": local_bytes(v for s in opt.state.values() for v in s.values()
                                             if isinstance(v, torch.Tensor)),
        "peak_rss_bytes_before_step": rss_before,
        "peak_rss_bytes_after_step": peak_rss_bytes(),
        "step_seconds": seconds,
    }
    entry["parameter_gradient_optimizer_bytes"] = (entry["parameter_bytes"] + entry["gradient_bytes"]
                                                   + entry["optimizer_state_bytes"])
    everyone = [None] * world
    dist.all_gather_object(everyone, entry)
    if rank == 0:
        path = pathlib.Path(args.json)
        results = json.loads(path.read_text()) if path.exists() else {}
        results.setdefault("meta", {}).update({
            "command": "torchrun --nproc-per-node 2 benchmarks/distributed_memory.py --strategy {ddp,fsdp2} "
                       f"--json {args.json}",
            "model": "dfm_fused.models.ResNet18(fb_filters=8, n_classes=200, shape=(64, 64), checkpoint=True)",
            "input": f"global batch {args.batch_size} of 3x64x64 float32, T={args.T}, Adam, one step",
            "world_size": world, "backend": "gloo (CPU)", "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "ddp": "gradient_as_bucket_view=True (gradients are views into the reducer's buckets)",
            "fsdp2": "dfm_fused.distributed.fully_shard: per block, 0-d frozen parameters replicated",
        })
        results[args.strategy] = {"per_rank": everyone}
        if "ddp" in results and "fsdp2" in results:
            key = "parameter_gradient_optimizer_bytes"
            results["fsdp2_over_ddp"] = {key: [f[key] / d[key] for f, d in zip(results["fsdp2"]["per_rank"],
                                                                                results["ddp"]["per_rank"])]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({args.strategy: everyone}, indent=2))


if __name__ == "__main__":
    main()
