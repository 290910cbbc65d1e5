"""Compile every Triton kernel config of dfm_fused for sm_90 (H100/H200) on a machine without a GPU.

Catches what only the GPU compile path sees (tl.dot shape/dtype rules, constexpr
arithmetic, shared-memory overflow, register spills) before a GPU run.
For each kernel, autotune config and dtype it prints shared memory and the ptxas
spill counts, and exits non-zero if a config fails to compile or needs more than
the 227 KiB of shared memory an sm_90 block may use.

Usage: PYTHONPATH=. python scripts/triton_compile_sm90.py [--quick] [--only SUBSTRING]
--quick: the first config of each kernel only; --only: kernels whose label contains SUBSTRING.
Needs triton >= 3.3 (ASTSource with tuple-keyed constexprs); it does not need a GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dfm_fused.ops._triton import channel as decay
from dfm_fused.ops._triton import group_norm as norm
from dfm_fused.ops.feedback_input import triton_kernels as feedback

SMEM_LIMIT = 227 * 1024
TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def cases():
    """(name, autotuner, signature, constexprs) for every kernel variant the backends launch."""
    for dt, p in DTYPES.items():
        for has_norm, has_res in ((False, False), (True, True)):
            # M is in the input's half type or float32; out is the input type or float32 (grad_n).
            sig = dict(x=p, m=p, h=p, scale="*fp32", shift="*fp32", out=p, N="i32", HW="i32", C="i32")
            for precision in ("ieee", "tf32") if dt == "fp32" else ("tf32",):
                const = dict(HAS_NORM=has_norm, HAS_RESIDUAL=has_res, INPUT_PRECISION=precision)
                yield f"channel_matmul[{dt},norm={has_norm},{precision}]", decay.channel_matmul_kernel, sig, const
        for has_norm in (False, True):
            sig = dict(x=p, g=p, scale="*fp32", shift="*fp32", part="*fp32", N="i32", HW="i32", C="i32",
                       SPLIT_LEN="i32")
            for precision in ("ieee", "tf32") if dt == "fp32" else ("tf32",):
                const = dict(HAS_NORM=has_norm, HALF_DOT=dt != "fp32", INPUT_PRECISION=precision)
                yield f"channel_outer[{dt},norm={has_norm},{precision}]", decay.channel_outer_kernel, sig, const
        yield (f"group_stats[{dt}]", norm.group_stats_kernel,
               dict(y=p, mean="*fp32", rstd="*fp32", L="i32", eps="fp32"), {})
        yield (f"group_norm_backward[{dt}]", norm.group_norm_backward_kernel,
               dict(dn="*fp32", y=p, mean="*fp32", rstd="*fp32", dy=p, L="i32"), {})
        geo = dict(Ch="i32", offset="i32", Hi="i32", Wi="i32", H="i32", W="i32", CG="i32", G="i32",
                   scale_h="fp32", scale_w="fp32")
        yield (f"feedback_stats[{dt}]", feedback.feedback_stats_kernel,
               dict(h=p, mean="*fp32", rstd="*fp32", **geo, eps="fp32"), {})
        for block_f in (8, 256, feedback.MAX_FB):
            yield (f"feedback_forward[{dt},BLOCK_F={block_f}]", feedback.feedback_forward_kernel,
                   dict(x=p, h=p, mean="*fp32", rstd="*fp32", out=p, Cx="i32", **geo), dict(BLOCK_F=block_f))
            yield (f"feedback_backward[{dt},BLOCK_F={block_f}]", feedback.feedback_backward_kernel,
                   dict(grad=p, h=p, mean="*fp32", rstd="*fp32", dn="*fp32", n="*fp32", part="*fp32", Cx="i32",
                        **geo, n_pb="i32"), dict(BLOCK_F=block_f))
        for block_kw in (8, 32):
            sig = dict(dn="*fp32", n="*fp32", coef="*fp32", grad_h=p, Ch="i32", offset="i32", fb="i32", Hi="i32",
                       Wi="i32", H="i32", W="i32", scale_h="fp32", scale_w="fp32", inv_scale_h="fp32",
                       inv_scale_w="fp32", KH="i32")
            yield (f"feedback_grad_h[{dt},BLOCK_KW={block_kw}]", feedback.feedback_grad_h_kernel, sig,
                   dict(BLOCK_KW=block_kw))


def spills(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spill = re.findall(r"(\d+) bytes spill stores", out)
    return f"regs={','.join(regs)} spill_stores={','.join(spill)}"


def main() -> int:
    quick = "--quick" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    failures = 0
    for name, tuner, sig, const in cases():
        if only not in name:
            continue
        fn = tuner.fn
        configs = tuner.configs
        if tuner.early_config_prune is not None:
            configs = tuner.early_config_prune(configs, {}, **const)
        for config in configs[:1] if quick else configs:
            full = {**const, **config.kwargs}
            signature = {a: sig[a] if a in sig else "constexpr" for a in fn.arg_names}
            missing = [a for a in fn.arg_names if a not in sig and a not in full]
            assert not missing, f"{name}: no value for {missing}"
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k),): v for k, v in full.items()})
            label = f"{name} {config.kwargs} warps={config.num_warps} stages={config.num_stages}"
            try:
                k = triton.compile(src, target=TARGET,
                                   options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            except Exception as exc:  # report every failure, then exit non-zero
                failures += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}")
                continue
            shared = k.metadata.shared
            ok = shared <= SMEM_LIMIT
            failures += not ok
            print(f"{'ok  ' if ok else 'SMEM'} {label} shared={shared} {spills(k.asm['ptx'])}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
