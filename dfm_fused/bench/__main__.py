"""``python -m dfm_fused.bench`` / ``dfm-fused-bench``: dfm_fused against the reference.

Runs the op cases (``exp_decay``, ``feedback_input``, ``state_update``; forward and
forward + backward) and the end-to-end DFM training step at several T, prints a
table of speed-ups and memory ratios against the reference measured in the same
process, writes the JSON and, with matplotlib, a chart of time and memory against T.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import torch

from dfm_fused.bench import cases as C
from dfm_fused.bench import measure, report, runner
from dfm_fused.bench.e2e import target_e2e_cases
from dfm_fused.bench.e2e_cases import E2E_ALL_IMPLS as E2E_ALL


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


# Where the JSON and chart go unless --json says otherwise; git-ignored in the repository.
RESULTS_DIR = "bench_results"


class FlagError(ValueError):
    """A flag value that only :func:`plan` can judge (it depends on the device); reported as a usage error."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfm-fused-bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device to time on; auto (default): cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, T=1,2, few repeats (a smoke run)")
    p.add_argument("--shapes", type=_shape_list, default=None,
                   help="op shapes: presets operating-point (B=128, 528x2x2 state, 16x16 map), "
                        "resnet18, segmentation (the last two scaled down on the CPU), each optionally with "
                        "overrides, e.g. 'resnet18:B=8,H=16,W=16'; ';' separates shapes with overrides "
                        "(default: all three presets)")
    p.add_argument("--dtypes", type=_csv, default=None,
                   help="comma-separated, of float32, bfloat16, float16 (default: float32 on the CPU, "
                        "float32,bfloat16 on a GPU)")
    p.add_argument("--ops", type=_csv, default=list(C.OPS),
                   help=f"comma-separated ops to time (default: all, {','.join(C.OPS)})")
    p.add_argument("--modes", type=_csv, default=list(C.MODES),
                   help=f"comma-separated passes to time: fwd (forward only), fwd+bwd (forward and backward) "
                        f"(default: {','.join(C.MODES)})")
    p.add_argument("--impls", type=_csv, default=None,
                   help="op implementations: reference, reference-compiled (torch.compile of the reference) and "
                        "dfm_fused backends; default: reference, the available backends, and reference-compiled on CUDA")
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference (slow to compile on a CPU)")
    p.add_argument("--T", type=_ints, default=None, help="steps of the end-to-end cases (default 1,4,8)")
    p.add_argument("--model", choices=("auto", "resnet18", "small"), default="auto",
                   help="end-to-end model; auto (default): resnet18 when dfm_fused.models is importable, else small")
    p.add_argument("--batch", type=int, default=None,
                   help="end-to-end batch size (default: 64 on a GPU, 2 on the CPU and with --quick)")
    p.add_argument("--image", type=_ints, default=None,
                   help="end-to-end image size H,W (default: 224 on a GPU, 64 on the CPU, 32 with --quick)")
    p.add_argument("--e2e-mode", choices=C.E2E_MODES, default="train",
                   help="end-to-end: train (forward, backward, SGD step; default) or eval (forward without gradients)")
    p.add_argument("--e2e-impls", type=_csv, default=None,
                   help=f"end-to-end implementations, some of {', '.join(E2E_ALL)} (default: {', '.join(C.E2E_IMPLS)})")
    p.add_argument("--targets", action="store_true",
                   help="end-to-end: the target settings of docs/design.md, 'Targets' (ResNet18-DFM: train B=128 "
                        "64x64 T=5, eval B=8 64x64 T=8, train B=64 224x224 T=5), every implementation (or --e2e-impls); ignores --T, --batch, "
                        "--image, --e2e-mode")
    p.add_argument("--no-ops", action="store_true", help="skip the op cases (only the end-to-end training step)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training step (only the op cases)")
    p.add_argument("--no-rss", action="store_true", help="skip the CPU peak-RSS subprocess")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed runs per case, at least 3 blocks (default: 1, 0.1 with --quick); a case "
                        "whose interquartile range exceeds a quarter of its median is timed once more")
    p.add_argument("--json", default=None,
                   help=f"output JSON path (default: {RESULTS_DIR}/dfm_fused_bench_<device>_<date>.json)")
    p.add_argument("--png", default=None, help="chart path (default: the JSON path with .png)")
    return p


def _shape_list(text: str) -> list[str]:
    # Overrides use commas, so shapes with overrides are separated by ';'.
    return [item.strip() for item in re.split(";" if ":" in text else "[;,]", text) if item.strip()]


def plan(args) -> tuple[str, list, list[str]]:
    """(device type, cases, notes) from the arguments."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FlagError("--device cuda: no CUDA device is available")
    notes = []
    cases: list = []
    if not args.no_ops:
        try:
            shapes = [C.parse_shape(s, device, args.quick) for s in args.shapes or C.default_shapes(device, args.quick)]
        except ValueError as exc:
            raise FlagError(f"--shapes: {exc}") from None
        dtypes = args.dtypes or (["float32", "bfloat16"] if device == "cuda" else ["float32"])
        for name in dtypes:
            if name not in C.DTYPES:
                raise FlagError(f"--dtypes: expected some of {', '.join(C.DTYPES)}; got {name!r}")
        for name in args.ops:
            if name not in C.OPS:
                raise FlagError(f"--ops: expected some of {', '.join(C.OPS)}; got {name!r}")
        for name in args.modes:
            if name not in C.MODES:
                raise FlagError(f"--modes: expected some of {', '.join(C.MODES)}; got {name!r}")
        fused = C.fused_impls(device)
        impls = args.impls or ["reference", *(["reference-compiled"] if device == "cuda" or args.compile else []),
                               *fused]
        if args.compile and "reference-compiled" not in impls:
            impls.append("reference-compiled")
        for name in impls:
            if name not in (*C.REFERENCE_IMPLS, *fused):
                raise FlagError(f"--impls: {name!r} is not available on {device}; available: "
                                f"{', '.join((*C.REFERENCE_IMPLS, *fused))}")
        if "reference-compiled" not in impls:
            notes.append("torch.compile of the reference not timed (add --compile; ~30 s of compile per case on a CPU)")
        cases += C.op_cases(device, shapes, dtypes, impls, args.ops, args.modes)
    if not args.no_e2e:
        model = args.model
        missing = C.models_available()
        if model == "auto":
            model = "resnet18" if missing is None else "small"
            if missing:
                notes.append(f"end-to-end on the small DFM: {missing}")
        elif model == "resnet18" and missing:
            raise FlagError(f"--model resnet18: {missing}")
        Ts = args.T or ([1, 2] if args.quick else [1, 4, 8])
        if args.quick:
            B, image = args.batch or 2, args.image or [32, 32]
        elif device == "cuda":
            B, image = args.batch or 64, args.image or [224, 224]
        else:
            B, image = args.batch or 2, args.image or [64, 64]
        if len(image) == 1:
            image = image * 2
        impls = args.e2e_impls or list(C.E2E_IMPLS)
        for name in impls:
            if name not in E2E_ALL:
                raise SystemExit(f"--e2e-impls: expected some of {', '.join(E2E_ALL)}; got {name!r}")
        if "reference" not in impls:
            raise SystemExit("--e2e-impls: expected 'reference' among them (ratios are against it)")
        if "graphed" in impls and device != "cuda":
            raise SystemExit("--e2e-impls graphed: CUDA graphs need a CUDA device")
        if args.targets:
            cases += target_e2e_cases(device, impls=impls if args.e2e_impls else None)
        else:
            cases += C.e2e_cases(device, model, Ts, B, image, impls=impls, mode=args.e2e_mode)
    return device, cases, notes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected a positive integer; got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        device, cases, notes = plan(args)
    except FlagError as exc:
        parser.error(str(exc))
    meta = runner.environment(device)
    print(f"dfm_fused {meta['dfm_fused']} benchmark on {meta['device']}")
    print(f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; "
          f"backends: {', '.join(k for k, v in meta['backends'].items() if v is None)}")
    for note in notes:
        print(f"note: {note}")
    peaks = None
    if device == "cuda":
        print("measuring copy bandwidth and matmul peak ...", flush=True)
        peaks = {dtype: measure.device_peaks(torch.device("cuda"), C.DTYPES[dtype])
                 for dtype in sorted({c.dtype for c in cases if c.kind == "op"})}
        for dtype, p in peaks.items():
            print(f"  {dtype}: {p['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, {p['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s")
        meta["peaks"] = peaks
    meta["notes"] = notes
    timing = {"budget_s": args.budget if args.budget is not None else (0.1 if args.quick else 1.0), "min_repeats": 3}
    records = runner.run_cases(cases, peaks=peaks, rss=not args.no_rss, **timing)
    interrupted = len(records) < len(cases)
    if interrupted:
        meta["notes"].append(f"interrupted after {len(records)} of {len(cases)} cases")
    report.add_ratios(records)
    print()
    print(report.format_table(records))
    stem = args.json or os.path.join(RESULTS_DIR, _default_name(meta))
    if os.path.dirname(stem):
        os.makedirs(os.path.dirname(stem), exist_ok=True)
    report.write_json(stem, meta, records)
    print(f"\nwrote {os.path.abspath(stem)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no chart")
    else:
        png = args.png or re.sub(r"\.json$", "", stem) + ".png"
        if report.write_chart(png, records, f"{meta['device']}, torch {meta['torch']}, {meta['date']}"):
            print(f"wrote {os.path.abspath(png)}")
    if interrupted:
        return 130
    return 1 if any("error" in r for r in records) else 0


def _default_name(meta: dict) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"].split("(")[0]).strip("-").lower()
    return f"dfm_fused_bench_{device}_{datetime.date.today().isoformat()}.json"


if __name__ == "__main__":
    sys.exit(main())
