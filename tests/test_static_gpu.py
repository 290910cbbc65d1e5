"""The static GPU checks (scripts/check_gpu_compile.py) measure, and fail on what they must.

scripts/test.sh runs the checks themselves on the built wheel and every Triton config; here their
parsing and verdicts are tested on ptxas and cuobjdump output of the formats they read (taken from
real runs of ptxas and cuobjdump 13), and one Triton kernel is compiled and measured for real.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_gpu_compile.py"
_spec = importlib.util.spec_from_file_location("check_gpu_compile", SCRIPT)
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # dataclasses look their module up there
_spec.loader.exec_module(check)

MANGLED = "_ZN9dfm_fused4cuda20outer_partial_kernelIffLb0EEEvNS0_11OuterParamsIT_T0_EE"
OTHER = "_ZN9dfm_fused4cuda16sum_parts_kernelIfEEvPKT_llPS2_"


def ptxas_entry(name: str, arch: str, regs: int, stores: int = 0, loads: int = 0, smem: int = 0) -> str:
    smem_text = f", {smem} bytes smem" if smem else ""
    frame = 8 if stores or loads else 0
    return (f"ptxas info    : Compiling entry function '{name}' for '{arch}'\n"
            f"ptxas info    : Function properties for {name}\n"
            f"    {frame} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads\n"
            f"ptxas info    : Used {regs} registers, used 1 barriers{smem_text}, 432 bytes cmem[0]\n"
            f"ptxas info    : Compile time = 197.352 ms\n")


def resource_usage(entries: list[tuple[str, str, int, int]]) -> str:
    """cuobjdump -res-usage text for (arch, kernel, registers, shared) entries, one fatbin section per arch."""
    text = ""
    for arch in dict.fromkeys(a for a, _, _, _ in entries):
        text += (f"\nFatbin elf code:\n================\narch = {arch}\ncode version = [1,8]\nhost = linux\n"
                 f"compile_size = 64bit\n\nResource usage:\n Common:\n  GLOBAL:28 CONSTANT[4]:224\n")
        for a, name, regs, shared in entries:
            if a == arch:
                text += (f" Function {name}:\n  REG:{regs} STACK:0 SHARED:{shared} LOCAL:0 CONSTANT[0]:432 "
                         f"TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    return text


def test_ptxas_log_parsed_per_arch_and_kernel():
    log = ("[2/3] /usr/local/cuda/bin/nvcc ... -c csrc/cuda/exp_decay.cu\n"
           + ptxas_entry(MANGLED, "sm_80", 64, 8, 8, smem=8320) + ptxas_entry(MANGLED, "sm_90", 64, smem=8320)
           + "ptxas info    : 0 bytes gmem\n" + ptxas_entry(OTHER, "sm_90", 28))
    kernels, spills = check.parse_ptxas_log(log)
    assert kernels[("sm_80", MANGLED)] == check.Usage(64, 8, 8, 8320)
    assert kernels[("sm_90", MANGLED)] == check.Usage(64, 0, 0, 8320)
    assert kernels[("sm_90", OTHER)] == check.Usage(28, 0, 0, 0)
    assert spills[MANGLED] == (8, 8)


def test_unmeasured_and_failing_kernels_fail():
    assert check.problems_of(check.Usage(), 1024) == ["not measured (ptxas reported no registers or spills)"]
    assert check.problems_of(check.Usage(registers=40), 1024)  # registers without a spill line
    assert check.problems_of(check.Usage(40, 0, 0, 1024), 1024) == []
    assert check.problems_of(check.Usage(40, 4, 0, 0), 1024) == ["spills 4 B stored / 0 B loaded"]
    assert check.problems_of(check.Usage(40, 0, 0, 1025), 1024) == ["shared memory 1025 B > 1024 B"]


def test_cuda_report_passes_a_clean_build():
    log = ptxas_entry(MANGLED, "sm_80", 64, smem=8320) + ptxas_entry(MANGLED, "sm_90", 64, smem=8320)
    rows, failures, archs = check.cuda_report(log, resource_usage([("sm_80", MANGLED, 64, 8320),
                                                                   ("sm_90", MANGLED, 64, 9344)]))
    assert failures == []
    assert archs == ["sm_80", "sm_90"]
    [(name, per_arch, problems)] = rows
    assert "outer_partial_kernel" in name and problems == []
    assert per_arch["sm_90"] == check.Usage(64, 0, 0, 9344)  # the library's shared memory, reserve included


@pytest.mark.parametrize("case", ["spill", "missing_from_log", "other_build", "shared", "empty_log", "no_kernels",
                                  "device_function_spill"])
def test_cuda_report_fails(case):
    entries = [("sm_90", MANGLED, 64, 8320), ("sm_90", OTHER, 28, 0)]
    log = ptxas_entry(MANGLED, "sm_90", 64, smem=8320) + ptxas_entry(OTHER, "sm_90", 28)
    if case == "spill":
        log = ptxas_entry(MANGLED, "sm_90", 64, 8, 8, smem=8320) + ptxas_entry(OTHER, "sm_90", 28)
    elif case == "missing_from_log":
        log = ptxas_entry(MANGLED, "sm_90", 64, smem=8320)
    elif case == "other_build":
        entries[1] = ("sm_90", OTHER, 30, 0)
    elif case == "shared":
        entries[0] = ("sm_90", MANGLED, 64, check.STATIC_SHARED_LIMIT + 4)
    elif case == "empty_log":
        log = ""
    elif case == "no_kernels":
        entries = []
    elif case == "device_function_spill":
        log += "ptxas info    : Function properties for _Z6helperv\n    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
    _, failures, _ = check.cuda_report(log, resource_usage(entries))
    assert failures, case


def test_resource_usage_without_an_arch_is_an_error():
    with pytest.raises(ValueError, match="before any 'arch ='"):
        check.parse_resource_usage(f" Function {MANGLED}:\n  REG:64 STACK:0 SHARED:0 LOCAL:0\n")


def test_triton_kernel_compiled_and_measured_for_sm80_and_sm90():
    """One small kernel through the real path: triton's compile for each target and its ptxas log."""
    pytest.importorskip("triton.backends.nvidia")
    import dfm_fused

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DFM_FUSED_AUTOTUNE")}
    env["PYTHONPATH"] = str(Path(dfm_fused.__file__).resolve().parents[1])  # the dfm_fused under test
    run = subprocess.run([sys.executable, str(SCRIPT), "triton", "--quick", "--only", "group_stats[fp32]",
                          "--jobs", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    [row] = [line for line in run.stdout.splitlines() if line.startswith("group_stats[fp32]")]
    cells = [cell.split() for cell in row.split("|")[1:3]]  # sm_80, sm_90: regs, spills, smem
    for regs, spill, smem in cells:
        assert int(regs) > 0 and spill == "0/0" and int(smem) >= 0, row
    assert "Triton: 1 configs, 0 with known spills" in run.stdout and "0 failure(s)" in run.stdout


def _row(label, **per_arch):
    """A table row as check_triton makes it: spills (stores, loads) per arch, problems as found."""
    usages = {arch: check.Usage(registers=255, spill_stores=st, spill_loads=ld, shared=0)
              for arch, (st, ld) in per_arch.items()}
    problems = [f"{arch}: {p}" for arch, u in usages.items() for p in check.problems_of(u, 1 << 20)]
    return (label, usages, problems)


def test_known_spills_pass_within_the_record_and_nothing_else():
    known = {"k {a}": {"sm_90": [8, 8]}, "gone {b}": {"sm_80": [4, 4]}}
    table = [_row("k {a}", sm_90=(8, 8), sm_80=(0, 0)),       # as recorded: passes, noted
             _row("k {c}", sm_90=(8, 8)),                     # not recorded: fails
             _row("gone {b}", sm_80=(0, 0)),                  # recorded, gone: stale
             _row("grown {d}", sm_90=(16, 8))]
    known["grown {d}"] = {"sm_90": [8, 8]}                   # larger than recorded: fails
    stale = check.judge_spills(table, known, same_triton=True, compiled_archs=["sm_80", "sm_90"])
    verdicts = {label: problems for label, _, problems in table}
    assert verdicts["k {a}"] == ["(sm_90: known spill 8/8 B)"]
    assert verdicts["k {c}"] == ["sm_90: spills 8 B stored / 8 B loaded"]
    assert verdicts["grown {d}"] == ["sm_90: spills 16 B stored / 8 B loaded"]
    assert len(stale) == 1 and stale[0].startswith("gone {b}: sm_80: recorded spill 4/4 B is gone")
    # With another triton a gone spill is not a failure (the record is that version's).
    table = [_row("gone {b}", sm_80=(0, 0))]
    assert check.judge_spills(table, known, same_triton=False, compiled_archs=["sm_80"]) == []


def test_a_kernel_variant_needs_a_config_without_spills_on_every_arch():
    def usage(spill):
        return check.Usage(registers=200, spill_stores=spill, spill_loads=spill, shared=0)

    compiled = [("a", "sm_80", usage(8)), ("a", "sm_80", usage(0)), ("a", "sm_90", usage(4)),
                ("a", "sm_90", usage(4)), ("b", "sm_90", None), ("b", "sm_90", usage(0))]
    assert check.without_spill_free_config(compiled) == [("a", "sm_90")]


def test_the_record_names_configs_the_kernels_have():
    """Every recorded config is one the check compiles: a label of the record that no kernel
    variant and config makes would pass nothing and hide a rename."""
    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("DFM_FUSED_AUTOTUNE") == "0":
        pytest.skip("the interpreter and the autotune test hook narrow the configs to one")
    record = check.load_known_spills()[1]
    assert record, "scripts/known_spills.json is empty or missing"
    labels = check.config_labels()
    assert len(labels) > 100
    for label, per_arch in record.items():
        assert label in labels, f"{label}: recorded but no kernel config is named so"
        assert set(per_arch) <= {"sm_80", "sm_90"} and all(st >= 0 and ld >= 0 for st, ld in per_arch.values())
        assert any(st or ld for st, ld in per_arch.values()), label
