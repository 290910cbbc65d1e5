"""Static checks of dfm_fused's GPU code on a machine without a GPU.

Every GPU kernel must compile for the GPUs users have and fit their resources. Two checks, each
printing one row per kernel (registers per thread, spill stores/loads in bytes, shared memory per
block in bytes, for each architecture) and exiting non-zero on a compile error, a register spill
(Triton: beyond the known spills below), shared memory over the architecture's limit, or a kernel
it could not measure:

``triton``: compiles every Triton kernel of dfm_fused, for every dtype, specialisation and
autotune config the backends launch, for sm_90 and sm_80 (``triton.compile`` for a target needs no
GPU), and reads triton's own ``ptxas -v`` log of each compile (the ptxas, flags and target triton
uses). The shared memory is the block's (``metadata.shared``). A kernel must also have a config
within 99 KiB, the block limit of sm_86, sm_89 and sm_120, or it could not run there at all.

Known spills: every Triton kernel variant must have, on each architecture, a config without
spills for autotuning to pick. Other configs may spill only as ``scripts/known_spills.json``
records (the triton version, and the bytes per config and architecture): such a config passes
while its spill stays within the record (its row says ``known spill``); a new spill, a larger one,
or a recorded one that is gone (with the recorded triton: shrink the record) fails. ``--record``
rewrites the file from a full run. A recorded config stays in the autotune list until a GPU shows
it is never the fastest (a few spilled bytes can beat a smaller tile).

``cuda``: the CUDA extension's kernels (csrc/cuda) as built: the kernels each architecture's
cubin in the library holds (``cuobjdump -res-usage``: registers, static shared memory) and their
spills from the build log, which nvcc writes with ``--resource-usage``
(``DFM_FUSED_PTXAS_VERBOSE=1 bash scripts/build_wheel.sh > log``). Every kernel in the library
must appear in the log with the same register count. The kernels launch with no dynamic shared
memory, so their static shared memory is all they use; its limit is 48 KiB on every GPU.

Usage (from the repository root):
  PYTHONPATH=. python scripts/check_gpu_compile.py triton [--arch 90,80] [--quick] [--only SUBSTRING] [--jobs N]
                                                           [--record]
  python scripts/check_gpu_compile.py cuda --log BUILD_LOG (--wheel WHEEL | --library _C.so)
--quick: the first config of each kernel only; --only: kernels whose label contains SUBSTRING.
The Triton check needs triton >= 3.3 (ASTSource with tuple-keyed constexprs) and imports the
dfm_fused it finds (PYTHONPATH=. for the source tree); the CUDA check needs cuobjdump (the CUDA
toolkit's, or the one triton ships) and c++filt for readable names.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TRITON_ARCHS = (90, 80)
KNOWN_SPILLS = Path(__file__).with_name("known_spills.json")

# The shared part (scripts/ is sys.path[0] when this runs as a script; not when a test loads it).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptxas_report import (  # noqa: E402
    BLOCK_SHARED_LIMIT, SMALLEST_SHARED_LIMIT, STATIC_SHARED_LIMIT, Usage, arch_number, parse_ptxas_log,
    parse_resource_usage, print_table, problems_of,
)


# ------------------------------------------------------------------------------------------ Triton


def triton_cases():
    """(label, autotuner, signature, constexprs) for every kernel variant the Triton backends launch."""
    from dfm_fused.ops._triton import channel as decay
    from dfm_fused.ops._triton import group_norm as norm
    from dfm_fused.ops.feedback_input import triton_kernels as feedback

    for dt, p in {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}.items():
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


def _configs(tuner, const):
    configs = tuner.configs
    if tuner.early_config_prune is not None:
        configs = tuner.early_config_prune(configs, {}, **const)
    return configs


def config_text(config) -> str:
    """How a table row (and the record of known spills) names an autotune config."""
    return f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"


def config_labels() -> set[str]:
    """The label of every kernel variant and config the Triton check compiles (no compiling)."""
    return {f"{name} {config_text(config)}" for name, tuner, _, const in triton_cases()
            for config in _configs(tuner, const)}


def _compile_triton(job: tuple[int, int, int]) -> tuple[str, int, Usage | None, str]:
    """Compile config ``config_index`` of case ``case_index`` for ``arch``: (config text, arch, usage, error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case_index, config_index, arch = job
    name, tuner, sig, const = list(triton_cases())[case_index]
    config = _configs(tuner, const)[config_index]
    fn = tuner.fn
    full = {**const, **config.kwargs}
    missing = [a for a in fn.arg_names if a not in sig and a not in full]
    if missing:
        raise ValueError(f"{name}: the check gives no value for {missing}")
    signature = {a: sig[a] if a in sig else "constexpr" for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in full.items()})
    text = config_text(config)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas's report here
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # every failing config is reported, then the check fails
        lines = str(exc).strip().splitlines()
        return text, arch, None, f"compile error: {type(exc).__name__}: {lines[-1] if lines else ''}"
    kernels, _ = parse_ptxas_log(log.getvalue())
    entries = [usage for (sm, entry), usage in kernels.items()
               if entry == kernel.metadata.name and arch_number(sm) == arch]
    if len(entries) != 1:
        return text, arch, None, (f"not measured: triton's ptxas log names {len(entries)} entries "
                                  f"'{kernel.metadata.name}' for sm_{arch} (log: {log.getvalue()[-300:]!r})")
    usage = entries[0]
    usage.shared = kernel.metadata.shared  # the block's (dynamic) shared memory, which ptxas does not see
    return text, arch, usage, ""


def load_known_spills(path: Path = KNOWN_SPILLS) -> tuple[str | None, dict[str, dict[str, list[int]]]]:
    """(triton version, {config label: {"sm_XX": [spill stores, spill loads]}}) of the record; none if absent."""
    if not path.exists():
        return None, {}
    record = json.loads(path.read_text())
    return record["triton"], record["spills"]


def judge_spills(table, known: dict, same_triton: bool, compiled_archs: list[str]) -> list[str]:
    """Move each spill within ``known`` from a row's problems to a ``known spill`` note, in place;
    returns the failures for recorded spills that are gone (only when ``same_triton``)."""
    stale = []
    for index, (label, per_arch, problems) in enumerate(table):
        recorded = known.get(label, {})
        kept, notes = [], []
        for problem in problems:
            arch = problem.split(":", 1)[0]
            usage, limit = per_arch.get(arch), recorded.get(arch)
            if (problem.startswith(f"{arch}: spills") and limit is not None
                    and usage.spill_stores <= limit[0] and usage.spill_loads <= limit[1]):
                notes.append(f"{arch}: known spill {usage.spill_stores}/{usage.spill_loads} B")
            else:
                kept.append(problem)
        if same_triton:
            for arch, (stores, loads) in recorded.items():
                usage = per_arch.get(arch)
                if arch in compiled_archs and usage is not None and usage.measured() and not (
                        usage.spill_stores or usage.spill_loads):
                    stale.append(f"{label}: {arch}: recorded spill {stores}/{loads} B is gone; rewrite "
                                 f"{KNOWN_SPILLS.name} with --record")
        table[index] = (label, per_arch, kept + [f"({n})" for n in notes])
    return stale


def without_spill_free_config(compiled: list[tuple[str, str, Usage | None]]) -> list[tuple[str, str]]:
    """(kernel variant, arch) pairs none of whose configs compiled without spills: autotuning,
    whatever the record of known spills says, must have a config without spills to pick."""
    spill_free: dict[tuple[str, str], bool] = {}
    for variant, arch, usage in compiled:
        clean = usage is not None and usage.measured() and not (usage.spill_stores or usage.spill_loads)
        spill_free[variant, arch] = spill_free.get((variant, arch), False) or clean
    return sorted(key for key, clean in spill_free.items() if not clean)


def record_spills(table, path: Path = KNOWN_SPILLS) -> None:
    import triton

    spills = {label: {arch: [u.spill_stores, u.spill_loads] for arch, u in sorted(per_arch.items())
                      if u.measured() and (u.spill_stores or u.spill_loads)}
              for label, per_arch, _ in table}
    about = ("Triton configs that spill: bytes stored, loaded per architecture. Written by "
             "scripts/check_gpu_compile.py triton --record; see that script's docstring")
    entries = [f"  {json.dumps(label)}: {json.dumps(arch)}" for label, arch in sorted(spills.items()) if arch]
    path.write_text(f'{{\n "triton": {json.dumps(triton.__version__)},\n "about": {json.dumps(about)},\n'
                    ' "spills": {\n' + ",\n".join(entries) + "\n }\n}\n")
    print(f"recorded {len(entries)} spilling configs in {path}")


def check_triton(archs: list[int], quick: bool, only: str, jobs: int, record: bool = False) -> int:
    for var, bad in (("TRITON_INTERPRET", "1"), ("DFM_FUSED_AUTOTUNE", "0")):
        if os.environ.get(var) == bad:
            raise SystemExit(f"{var}={bad} narrows the kernels' configs to one; unset it for this check")
    # Read by triton when it compiles: recompile (no cache hit, which runs no ptxas) and print
    # ptxas's -v report; a fresh cache leaves the user's untouched.
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dfm_fused_triton_check_")
    import triton

    cases = list(triton_cases())
    jobs_list, labels = [], {}
    for i, (name, tuner, _, const) in enumerate(cases):
        if only not in name:
            continue
        configs = _configs(tuner, const)
        for j in range(1 if quick else len(configs)):
            labels[(i, j)] = name
            jobs_list += [(i, j, arch) for arch in archs]
    if not jobs_list:
        raise SystemExit(f"--only {only!r}: no Triton kernel label contains it")
    print(f"triton {triton.__version__}: compiling {len(labels)} kernel configs for "
          f"{', '.join(f'sm_{a}' for a in archs)} ({jobs} processes)", flush=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(_compile_triton, jobs_list))
    rows, failures = {}, 0
    best_shared: dict[str, int] = {}
    for (i, j, arch), (text, _, usage, error) in zip(jobs_list, results):
        key = (i, j)
        label = f"{labels[key]} {text}"
        _, per_arch, problems = rows.setdefault(key, (label, {}, []))
        if usage is None:
            problems.append(f"sm_{arch}: {error}")
            continue
        per_arch[f"sm_{arch}"] = usage
        problems += [f"sm_{arch}: {p}" for p in problems_of(usage, BLOCK_SHARED_LIMIT[arch])]
        if usage.shared is not None:
            best_shared[labels[key]] = min(best_shared.get(labels[key], usage.shared), usage.shared)
    table = list(rows.values())
    if record:
        record_spills(table)
    version, known = load_known_spills()
    if known and version != triton.__version__:
        print(f"{KNOWN_SPILLS.name} was recorded with triton {version}: recorded spills pass within their "
              "bytes, gone ones are not checked")
    stale = judge_spills(table, known, version == triton.__version__, [f"sm_{a}" for a in archs])
    failures = sum(1 for _, _, problems in table if any(not p.startswith("(") for p in problems))
    known_rows = sum(1 for _, _, problems in table if any(p.startswith("(") for p in problems))
    print_table("Triton kernels: registers, spill stores/loads (bytes), shared memory per block (bytes)",
                table, [f"sm_{a}" for a in sorted(archs)])
    too_big = sorted(name for name, shared in best_shared.items() if shared > SMALLEST_SHARED_LIMIT)
    for name in too_big:
        print(f"FAIL {name}: no config within {SMALLEST_SHARED_LIMIT} B of shared memory (sm_86, sm_89, sm_120)")
    for line in stale:
        print(f"FAIL {line}")
    always_spilling = without_spill_free_config(
        [(labels[(i, j)], f"sm_{arch}", usage) for (i, j, arch), (_, _, usage, _) in zip(jobs_list, results)])
    for name, arch in always_spilling:
        print(f"FAIL {name}: {arch}: every config spills")
    failures += len(too_big) + len(stale) + len(always_spilling)
    print(f"Triton: {len(table)} configs, {known_rows} with known spills ({KNOWN_SPILLS.name}), {failures} failure(s)")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------- CUDA


def find_cuobjdump() -> str:
    """cuobjdump: $CUOBJDUMP, the CUDA toolkit's ($CUDA_HOME/bin, PATH), or the one triton ships."""
    candidates = [os.environ.get("CUOBJDUMP", ""),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("cuobjdump not found: set CUOBJDUMP, or install the CUDA toolkit's or triton's")


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled kernel name -> a short readable one (c++filt, then namespaces and parameters dropped)."""
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = {}
    for name, readable in zip(names, out.splitlines()):
        readable = re.sub(r"^void ", "", readable)
        depth = 0
        for k in range(len(readable) - 1, -1, -1):  # drop the trailing "(parameters)"
            depth += {")": 1, "(": -1}.get(readable[k], 0)
            if depth == 0 and readable[k] == "(":
                readable = readable[:k]
                break
        short[name] = readable.replace("dfm_fused::cuda::", "").replace("c10::", "")
    return short


def cuda_report(log_text: str, resource_text: str):
    """The CUDA check on a build log and cuobjdump's ``-res-usage`` of the library built with it.

    Returns (rows, failures, archs): a table row per kernel (name, {arch: Usage}, problems), the
    failure messages (rows with problems, and device functions that spill), and the architectures.
    """
    binary = parse_resource_usage(resource_text)
    if not binary:
        return [], ["cuobjdump found no CUDA kernels in the library (built without CUDA?)"], []
    logged, spills = parse_ptxas_log(log_text)
    short = demangle(sorted({name for _, name in binary}))
    names = sorted(short, key=short.get)
    archs = sorted({arch for arch, _ in binary}, key=arch_number)
    rows, failures = [], []
    for name in names:
        per_arch, problems = {}, []
        for arch in archs:
            if (arch, name) not in binary:
                continue
            in_binary = binary[(arch, name)]
            usage = logged.get((arch, name))
            if usage is None:
                problems.append(f"{arch}: not in the build log (built without DFM_FUSED_PTXAS_VERBOSE=1?)")
                per_arch[arch] = Usage(registers=in_binary["REG"], shared=in_binary["SHARED"])
                continue
            usage.shared = in_binary["SHARED"]
            per_arch[arch] = usage
            if usage.registers != in_binary["REG"]:
                problems.append(f"{arch}: the log's {usage.registers} registers are not the library's "
                                f"{in_binary['REG']} (a log of another build?)")
            problems += [f"{arch}: {p}" for p in problems_of(usage, STATIC_SHARED_LIMIT)]
        rows.append((short[name], per_arch, problems))
        failures += [f"{short[name]}: {p}" for p in problems]
    # Spills in non-inlined device functions count against the kernels that call them.
    kernels = {name for _, name in binary}
    for function, (stores, loads) in sorted(spills.items()):
        if (stores or loads) and function not in kernels:
            failures.append(f"device function {demangle([function])[function]}: spills {stores} B / {loads} B")
    return rows, failures, archs


def check_cuda(log_path: Path, library: Path) -> int:
    resource_text = subprocess.run([find_cuobjdump(), "-res-usage", str(library)], capture_output=True, text=True,
                                   check=True).stdout
    rows, failures, archs = cuda_report(log_path.read_text(errors="replace"), resource_text)
    if rows:
        print_table(f"CUDA kernels ({library.name}): registers, spill stores/loads (bytes), "
                    "static shared memory (bytes)", rows, archs)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"CUDA: {len(rows)} kernels x {len(archs)} architectures ({', '.join(archs)}), {len(failures)} failure(s)")
    return 1 if failures else 0


def extension_from_wheel(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if re.fullmatch(r"dfm_fused/_C[^/]*\.(so|pyd)", n)]
        if len(members) != 1:
            raise SystemExit(f"{wheel}: expected one dfm_fused/_C*.so in the wheel; found {members}")
        return Path(zf.extract(members[0], into))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    tri = sub.add_parser("triton", help="compile every Triton kernel config for sm_90 and sm_80")
    tri.add_argument("--arch", default=",".join(map(str, TRITON_ARCHS)),
                     help=f"compute capabilities, comma-separated (default {','.join(map(str, TRITON_ARCHS))})")
    tri.add_argument("--quick", action="store_true", help="the first config of each kernel only")
    tri.add_argument("--only", default="", help="kernels whose label contains this")
    tri.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    tri.add_argument("--record", action="store_true",
                     help=f"rewrite {KNOWN_SPILLS.name} with the spills of this run (a full run: no --quick or --only)")
    cu = sub.add_parser("cuda", help="the CUDA extension's kernels, from a built library and its build log")
    cu.add_argument("--log", type=Path, required=True, help="the build's output (DFM_FUSED_PTXAS_VERBOSE=1)")
    src = cu.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="a built wheel")
    src.add_argument("--library", type=Path, help="a built dfm_fused/_C*.so")
    args = parser.parse_args(argv)
    if args.check == "triton":
        archs = [int(a) for a in args.arch.split(",")]
        unknown = [a for a in archs if a not in BLOCK_SHARED_LIMIT]
        if unknown:
            parser.error(f"--arch: expected capabilities among {sorted(BLOCK_SHARED_LIMIT)}; got {unknown}")
        if args.jobs < 1:
            parser.error(f"--jobs: expected >= 1; got {args.jobs}")
        if args.record and (args.quick or args.only or sorted(archs) != sorted(TRITON_ARCHS)):
            parser.error("--record: expected a full run (no --quick, --only or --arch)")
        return check_triton(archs, args.quick, args.only, args.jobs, args.record)
    if args.wheel is not None:
        with tempfile.TemporaryDirectory() as tmp:
            return check_cuda(args.log, extension_from_wheel(args.wheel, Path(tmp)))
    return check_cuda(args.log, args.library)


if __name__ == "__main__":
    sys.exit(main())
