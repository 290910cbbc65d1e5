"""The DFM's two claims on the noisy-triangle task, measured: noise robustness and few examples.

A feedforward network and the same network as a DFM (``triangle_task.py``: one body,
``dfm_fused.FeedbackModel`` around it) are trained on fixed training sets of N examples
(each a triangle plus Gaussian noise of a sigma drawn once from U[0, --train-sigma]; the
sets are nested: the first N of one draw per seed) for the same number of Adam steps with
the same batch size and cosine learning-rate decay. The DFM is trained on its whole decision
trajectory (``return_all=True``, per-step cross-entropies weighted by --traj-weights). For
every model and N the learning rate is picked from the same grid (--lrs) by seed 0's
foreground IoU on a validation set drawn like the training set; the other seeds train at
that rate. The models are scored on one test set (the same triangles and noise pattern at
every test sigma).

Writes to --out: ``results.json`` (configuration, command, timings, every run, the table
of means and spreads, the paired DFM - feedforward differences and a verdict per point),
``noise.png`` (IoU against test sigma at the largest N), ``data.png`` (IoU against N at the
--data-sigmas), ``steps.png`` (the DFM's prediction after each step at --step-sigma beside
the feedforward prediction and the truth; seed 0, largest N). Needs matplotlib.

    python examples/triangles_study.py --out study/           # defaults: 40 runs, about 390 CPU-s (3.5 min on 2 cores)
    python examples/triangles_study.py --quick --out /tmp/s   # smoke run, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dfm_fused.bench.runner import cpu_model
from triangle_task import (FeedForward, TRAJECTORY_WEIGHTS, have_matplotlib, iou, make_dfm, save_step_figure,
                           trajectory_loss, trajectory_weights, triangles)

MODELS = ("feedforward", "dfm")
# Two-sided 95% Student-t quantiles by degrees of freedom, for the paired differences' interval.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
TEST_SEED = 12345  # the test set is one draw for every model and seed
QUICK = dict(sizes=[16, 32], sigmas=[0.0, 7.0], data_sigmas=[0.0], seeds=2, lrs=[1e-3, 3e-3], iters=6, batch=8,
             image=16, width=4, T=2, val_samples=16, test_samples=16, step_rows=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024],
                        help="training-set sizes N")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0, 7.0],
                        help="test noise levels")
    parser.add_argument("--data-sigmas", type=float, nargs="+", default=[0.0, 2.0, 5.0],
                        help="test sigmas of the IoU-against-N figure (each one of --sigmas)")
    parser.add_argument("--step-sigma", type=float, default=7.0, help="test sigma of the step-by-step figure")
    parser.add_argument("--step-rows", type=int, default=4, help="test images in the step-by-step figure")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per point (>= 2): data, initialisation, batches")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3],
                        help="the learning-rate grid, the same for both models: searched on seed 0 per model and N "
                             "(validation IoU), the other seeds use the rate picked")
    parser.add_argument("--iters", type=int, default=300, help="Adam steps per training run, both models")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image", type=int, default=24, help="image side (even)")
    parser.add_argument("--width", type=int, default=8, help="channels of the networks")
    parser.add_argument("--pred", type=int, default=8, help="channels the head reads")
    parser.add_argument("--fb", type=int, default=2, help="DFM fed-back channels")
    parser.add_argument("--T", type=int, default=3, help="DFM steps, in training and test")
    parser.add_argument("--tau", type=float, default=3.0, help="DFM decay: step t's update is scaled by exp(-t/tau)")
    parser.add_argument("--traj-weights", choices=TRAJECTORY_WEIGHTS, default="uniform",
                        help="weights of the DFM's per-step losses")
    parser.add_argument("--train-sigma", type=float, default=3.0, help="training noise: sigma ~ U[0, this] per example")
    parser.add_argument("--val-samples", type=int, default=128)
    parser.add_argument("--test-samples", type=int, default=256, help="test images per sigma")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (torch.set_num_threads)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--out", default="triangles_study", help="output folder")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.image % 2:
        parser.error(f"--image: expected an even number; got {args.image}")
    for name in ("seeds", "iters", "batch", "width", "pred", "T", "jobs", "threads", "val_samples", "test_samples",
                 "step_rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1; got {getattr(args, name)}")
    if args.seeds < 2:
        parser.error(f"--seeds: expected >= 2 (a spread needs two); got {args.seeds}")
    if min(args.sizes) < 1:
        parser.error(f"--sizes: expected sizes >= 1; got {args.sizes}")
    for name in ("data_sigmas", "step_sigma"):
        wanted = getattr(args, name)
        missing = [s for s in (wanted if isinstance(wanted, list) else [wanted]) if s not in args.sigmas]
        if missing:
            parser.error(f"--{name.replace('_', '-')}: expected values among --sigmas {args.sigmas}; got {missing}")
    if not have_matplotlib():
        parser.error("the figures need matplotlib, which is not installed (`pip install matplotlib`)")
    return args


def build_model(kind: str, config: dict):
    if kind == "feedforward":
        return FeedForward(config["width"], config["pred"])
    return make_dfm(config["width"], config["pred"], config["fb"], config["tau"], checkpoint=False)


def training_set(seed: int, n: int, config: dict):
    """The first ``n`` of one draw of max(sizes) examples: the sets of one seed are nested."""
    g = torch.Generator().manual_seed(1000 * seed + 1)
    largest = max(config["sizes"])
    sigma = torch.rand(largest, generator=g) * config["train_sigma"]
    images, masks = triangles(largest, config["image"], sigma, g)
    return images[:n], masks[:n]


def validation_set(seed: int, config: dict):
    g = torch.Generator().manual_seed(1000 * seed + 2)
    sigma = torch.rand(config["val_samples"], generator=g) * config["train_sigma"]
    return triangles(config["val_samples"], config["image"], sigma, g)


def test_set(sigma: float, config: dict):
    return triangles(config["test_samples"], config["image"], sigma, torch.Generator().manual_seed(TEST_SEED))


def predict(model, kind: str, images: torch.Tensor, config: dict) -> list[torch.Tensor]:
    """Logits after each DFM step (T of them), or the feedforward logits as a list of one."""
    if kind == "feedforward":
        return [model(images)]
    return model(images, config["T"], return_all=True)


def train(model, kind: str, images, masks, lr: float, config: dict, generator: torch.Generator) -> float:
    """``config["iters"]`` Adam steps over epochs of shuffled batches; returns the last loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["iters"])
    weights = trajectory_weights(config["traj_weights"], config["T"])
    batch = min(config["batch"], len(images))
    order, at = torch.randperm(len(images), generator=generator), 0
    model.train()
    for _ in range(config["iters"]):
        if at + batch > len(order):
            order, at = torch.randperm(len(images), generator=generator), 0
        index = order[at:at + batch]
        at += batch
        outputs = predict(model, kind, images[index], config)
        loss = F.cross_entropy(outputs[0], masks[index]) if kind == "feedforward" else \
            trajectory_loss(outputs, masks[index], weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, kind: str, images, masks, config: dict) -> list[float]:
    """Foreground IoU after each step (one value for the feedforward model)."""
    model.eval()
    torch.manual_seed(0)  # the DFM's random initial state
    return [iou(logits, masks) for logits in predict(model, kind, images, config)]


def run_task(task: dict) -> dict:
    """Train one model at one (N, seed, learning rate), score it on validation and every test sigma."""
    config, kind, n, seed, lr = task["config"], task["model"], task["n"], task["seed"], task["lr"]
    wall, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = build_model(kind, config)
    images, masks = training_set(seed, n, config)
    last_loss = train(model, kind, images, masks, lr, config, torch.Generator().manual_seed(1000 * seed + 3))
    val_iou = evaluate(model, kind, *validation_set(seed, config), config)[-1]
    steps = {sigma: evaluate(model, kind, *test_set(sigma, config), config) for sigma in config["sigmas"]}
    record = {"model": kind, "n": n, "seed": seed, "lr": lr, "last_train_loss": last_loss, "val_iou": val_iou,
              "test_iou": [steps[s][-1] for s in config["sigmas"]],
              "test_iou_per_step": [steps[s] for s in config["sigmas"]] if kind == "dfm" else None,
              "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    if task["keep_weights"]:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        record["weights"] = buffer.getvalue()
    return record


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


@contextlib.contextmanager
def worker_pool(jobs: int, threads: int):
    """A function running a list of tasks in ``jobs`` processes (spawned: no state shared with
    this one) and returning their records in the order they finish."""
    start, done = time.perf_counter(), []

    def report(record, total):
        done.append(record)
        print(f"[{len(done)}/{total} {time.perf_counter() - start:5.0f}s] {record['model']:>11} N={record['n']:<5}"
              f" seed={record['seed']} lr={record['lr']:g}: val IoU {record['val_iou']:.3f}"
              f" ({record['cpu_s']:.0f} s CPU)", file=sys.stderr, flush=True)
        return record

    if jobs == 1:
        _init_worker(threads)
        yield lambda tasks, total: [report(run_task(task), total) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(jobs, _init_worker, (threads,)) as pool:
            yield lambda tasks, total: [report(r, total) for r in pool.imap_unordered(run_task, tasks)]


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "min": min(values),
            "max": max(values), "per_seed": values}


def paired(dfm: list[float], feedforward: list[float]) -> dict:
    """DFM - feedforward per seed (same data, batches and test set): mean, std, 95% t interval, verdict."""
    diffs = [a - b for a, b in zip(dfm, feedforward)]
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    df = len(diffs) - 1
    half = T_975[max(k for k in T_975 if k <= df)] * std / len(diffs) ** 0.5
    verdict = "DFM better" if mean - half > 0 else "DFM worse" if mean + half < 0 else "tie"
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "per_seed": diffs, "verdict": verdict}


def summarise(records: list[dict], config: dict) -> tuple[dict, list[dict]]:
    """The run per (model, N, seed) (for seed 0 the grid's best validation IoU), and the table rows."""
    picked = {}
    for r in sorted(records, key=lambda r: (r["model"], r["n"], r["seed"], r["lr"])):
        key = (r["model"], r["n"], r["seed"])
        if key not in picked or r["val_iou"] > picked[key]["val_iou"]:
            picked[key] = r
    seeds = range(config["seeds"])
    rows = []
    for n in config["sizes"]:
        for i, sigma in enumerate(config["sigmas"]):
            by_model = {m: [picked[(m, n, s)]["test_iou"][i] for s in seeds] for m in MODELS}
            row = {"n": n, "sigma": sigma, **{m: spread(by_model[m]) for m in MODELS},
                   "difference": paired(by_model["dfm"], by_model["feedforward"]),
                   "dfm_per_step_mean": [statistics.fmean(picked[("dfm", n, s)]["test_iou_per_step"][i][t] for s in seeds)
                                         for t in range(config["T"])],
                   "picked_lr": {m: [picked[(m, n, s)]["lr"] for s in seeds] for m in MODELS}}
            rows.append(row)
    return picked, rows


def plot_curves(path, rows, x_key: str, fixed: dict, xs, title: str, xlabel: str, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(fixed.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (label, match) in zip(axes[0], panels):
        chosen = sorted((r for r in rows if match(r)), key=lambda r: r[x_key])
        for model, colour in (("feedforward", "tab:blue"), ("dfm", "tab:orange")):
            x = [r[x_key] for r in chosen]
            ax.errorbar(x, [r[model]["mean"] for r in chosen], yerr=[r[model]["std"] for r in chosen],
                        color=colour, marker="o", capsize=3, label=model if model == "feedforward" else "DFM")
            for r in chosen:
                ax.plot([r[x_key]] * len(r[model]["per_seed"]), r[model]["per_seed"], ".", color=colour, alpha=0.35)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:g}" for v in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("foreground IoU (test)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def step_figure(path, picked, rows, config: dict) -> None:
    """The DFM after each step at ``step_sigma`` beside the feedforward prediction and the truth."""
    n, sigma = max(config["sizes"]), config["step_sigma"]
    models = {}
    for kind in MODELS:
        models[kind] = build_model(kind, config)
        models[kind].load_state_dict(torch.load(io.BytesIO(picked[(kind, n, 0)]["weights"])))
        models[kind].eval()
    images, masks = test_set(sigma, config)
    images, masks = images[:config["step_rows"]], masks[:config["step_rows"]]
    with torch.no_grad():
        torch.manual_seed(0)
        trajectory = predict(models["dfm"], "dfm", images, config)
        feedforward = models["feedforward"](images)
    seed0 = {kind: picked[(kind, n, 0)]["test_iou_per_step" if kind == "dfm" else "test_iou"]
             [config["sigmas"].index(sigma)] for kind in MODELS}
    titles = (["input"] + [f"DFM t={t + 1}\nset IoU {v:.2f}" for t, v in enumerate(seed0["dfm"])]
              + [f"feedforward\nset IoU {seed0['feedforward']:.2f}", "ground truth"])
    figure_rows = [(f"sigma={sigma:g}", [images[i, 0].numpy(), *(p[i].softmax(0)[1].numpy() for p in trajectory),
                                         feedforward[i].softmax(0)[1].numpy(), masks[i].float().numpy()])
                   for i in range(len(images))]
    save_step_figure(path, figure_rows, config["T"], titles=titles)


def markdown_table(rows) -> str:
    lines = ["| N | test sigma | feedforward IoU | DFM IoU | DFM - feedforward (95% CI) | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["difference"]
        lines.append(f"| {r['n']} | {r['sigma']:g} | {r['feedforward']['mean']:.3f} ± {r['feedforward']['std']:.3f} "
                     f"| {r['dfm']['mean']:.3f} ± {r['dfm']['std']:.3f} | {d['mean']:+.3f} ± {d['std']:.3f} "
                     f"({d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}) | {d['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "jobs", "threads")}
    n_max = max(args.sizes)

    def task(model, n, seed, lr):
        return {"config": config, "model": model, "n": n, "seed": seed, "lr": lr,
                "keep_weights": seed == 0 and n == n_max}

    # The grid on seed 0 (every model, N and rate), then the other seeds at the rate seed 0's
    # validation IoU picked for that model and N. The DFM runs first: the longest go first.
    grid = [task(m, n, 0, lr) for m in ("dfm", "feedforward") for n in args.sizes for lr in args.lrs]
    total = len(grid) + 2 * len(args.sizes) * (args.seeds - 1)
    print(f"{total} training runs, {args.jobs} at a time, {args.threads} thread(s) each", file=sys.stderr)
    load_before, wall, cpu = os.getloadavg(), time.perf_counter(), time.process_time()
    with worker_pool(args.jobs, args.threads) as run:
        records = run(grid, total)
        best = {}
        for r in sorted(records, key=lambda r: r["lr"]):
            if (r["model"], r["n"]) not in best or r["val_iou"] > best[(r["model"], r["n"])]["val_iou"]:
                best[(r["model"], r["n"])] = r
        records += run([task(m, n, s, best[(m, n)]["lr"]) for m in ("dfm", "feedforward") for s in range(1, args.seeds)
                        for n in args.sizes], total)
    picked, rows = summarise(records, config)
    plot_curves(out / "noise.png", rows, "sigma", {f"N = {n_max} training examples": lambda r: r["n"] == n_max},
                args.sigmas, "IoU against test noise\n(mean ± std over seeds; dots: single seeds)", "test noise sigma")
    plot_curves(out / "data.png", rows, "n", {f"test sigma = {s:g}": (lambda r, s=s: r["sigma"] == s)
                                              for s in args.data_sigmas},
                args.sizes, "IoU against training-set size\n(mean ± std over seeds; dots: single seeds)",
                "training examples N", log_x=True)
    step_figure(out / "steps.png", picked, rows, config)
    for r in records:
        r.pop("weights", None)
    results = {
        "command": "python examples/triangles_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config, "jobs": args.jobs, "threads": args.threads,
        "timing": {"wall_s": time.perf_counter() - wall, "cpu_s_all_runs": sum(r["cpu_s"] for r in records),
                   "cpu_s_main_process": time.process_time() - cpu,
                   "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": cpu_model(),
                        "cores": os.cpu_count()},
        "table": rows, "runs": sorted(records, key=lambda r: (r["model"], r["n"], r["seed"], r["lr"])),
        "files": ["results.json", "noise.png", "data.png", "steps.png"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown_table(rows))
    t = results["timing"]
    print(f"wall {t['wall_s']:.0f} s, CPU of the runs {t['cpu_s_all_runs']:.0f} s; written to {out}/: "
          + ", ".join(results["files"]))
    return results


if __name__ == "__main__":
    main()
