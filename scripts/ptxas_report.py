"""What ptxas and cuobjdump report of GPU kernels, parsed, judged and printed as a table: the
shared part of scripts/check_gpu_compile.py (see its docstring)."""
from __future__ import annotations

import re
from dataclasses import dataclass

KIB = 1024
# Shared memory one block may use (dynamic, opted in), per compute capability (CUDA programming
# guide, "Technical specifications per compute capability").
BLOCK_SHARED_LIMIT = {80: 163 * KIB, 86: 99 * KIB, 89: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 120: 99 * KIB}
# The smallest of those among the release GPUs: a Triton kernel needs one config within it.
SMALLEST_SHARED_LIMIT = min(BLOCK_SHARED_LIMIT.values())
# Static __shared__ arrays: 48 KiB per block on every GPU.
STATIC_SHARED_LIMIT = 48 * KIB

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class Usage:
    """What ptxas reports for one kernel on one architecture; None where it said nothing."""

    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None

    def measured(self) -> bool:
        return None not in (self.registers, self.spill_stores, self.spill_loads)


def parse_ptxas_log(text: str) -> tuple[dict[tuple[str, str], Usage], dict[str, tuple[int, int]]]:
    """``ptxas -v`` output -> ({(arch, entry): Usage}, {function: (spill stores, loads)}).

    The first holds every entry function (kernel) ptxas compiled; shared memory is its static
    ``smem`` (0 when ptxas names none). The second holds the spills of every function whose
    properties ptxas printed, entries and non-inlined device functions alike.
    """
    kernels: dict[tuple[str, str], Usage] = {}
    spills: dict[str, tuple[int, int]] = {}
    entry = properties_of = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = (m.group(2), m.group(1))
            kernels[entry] = Usage()
        elif m := _PROPERTIES.search(line):
            properties_of = m.group(1)
        elif m := _FRAME.search(line):
            stores, loads = int(m.group(2)), int(m.group(3))
            if properties_of is not None:
                previous = spills.get(properties_of, (0, 0))
                spills[properties_of] = (max(previous[0], stores), max(previous[1], loads))
            if entry is not None and properties_of == entry[1]:
                kernels[entry].spill_stores, kernels[entry].spill_loads = stores, loads
            properties_of = None
        elif (m := _USED.search(line)) and entry is not None:
            usage = kernels[entry]
            usage.registers = int(m.group(1))
            smem = _SMEM.search(line)
            usage.shared = int(smem.group(1)) if smem else 0
            entry = None
    return kernels, spills


def parse_resource_usage(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """``cuobjdump -res-usage`` output -> {(arch, kernel): {"REG": .., "SHARED": .., "STACK": .., ...}}."""
    usage: dict[tuple[str, str], dict[str, int]] = {}
    arch = function = None
    for line in text.splitlines():
        stripped = line.strip()
        if m := re.fullmatch(r"arch = (sm_\w+)", stripped):
            arch = m.group(1)
        elif m := re.fullmatch(r"Function (\S+):", stripped):
            function = m.group(1)
        elif function is not None and stripped.startswith("REG:"):
            if arch is None:
                raise ValueError(f"cuobjdump: resource usage of {function} before any 'arch =' line")
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", stripped)}
            function = None
    return usage


def arch_number(arch: str) -> int:
    """'sm_90' / 'sm_90a' -> 90."""
    m = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
    if not m:
        raise ValueError(f"architecture: expected sm_<number>; got {arch!r}")
    return int(m.group(1))


def problems_of(usage: Usage, shared_limit: int) -> list[str]:
    """Why a measured kernel fails the check (empty when it passes)."""
    if not usage.measured():
        return ["not measured (ptxas reported no registers or spills)"]
    found = []
    if usage.spill_stores or usage.spill_loads:
        found.append(f"spills {usage.spill_stores} B stored / {usage.spill_loads} B loaded")
    if usage.shared is None:
        found.append("shared memory not measured")
    elif usage.shared > shared_limit:
        found.append(f"shared memory {usage.shared} B > {shared_limit} B")
    return found


def print_table(title: str, rows: list[tuple[str, dict[str, Usage], list[str]]], archs: list[str]) -> None:
    """One row per kernel: for each arch registers, spill stores/loads (bytes), shared memory (bytes)."""
    print(f"\n{title}")
    first = max([len("kernel")] + [len(name) for name, _, _ in rows])
    cells = [f"{a + ': regs spill(st/ld) smem':>36}" for a in archs]
    print(f"{'kernel':<{first}} | " + " | ".join(cells) + " | result")
    print("-" * (first + 3 + 39 * len(archs) + 10))
    for name, per_arch, problems in rows:
        out = []
        for arch in archs:
            u = per_arch.get(arch)
            if u is None:
                out.append(f"{'-':>36}")
                continue
            regs = "?" if u.registers is None else str(u.registers)
            spill = "?" if u.spill_stores is None else f"{u.spill_stores}/{u.spill_loads}"
            smem = "?" if u.shared is None else str(u.shared)
            out.append(f"{regs:>12} {spill:>13} {smem:>9}")
        print(f"{name:<{first}} | " + " | ".join(out) + " | " + ("; ".join(problems) if problems else "ok"))
