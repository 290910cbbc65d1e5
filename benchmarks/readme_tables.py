"""Render the README's performance tables from the committed benchmark JSON.

Each table in README.md sits between two markers::

    <!-- table: NAME -->
    | ... rendered rows ... |
    <!-- /table -->

and ``TABLES`` below says which JSON file and which renderer make table NAME. The JSON is
what ``python -m dfm_fused.bench --json ...`` writes (``meta`` plus a list of ``cases``, each
with ``kind``, ``impl``, ``spec``, ``shape``, ``dtype``, ``time_s.median``, ``memory`` and, for
op cases on a GPU, ``floor_fraction``).

Usage::

    python benchmarks/readme_tables.py          # rewrite the tables in README.md
    python benchmarks/readme_tables.py --check  # exit 1 if README.md differs from the JSON

Only the standard library is needed, so the check runs anywhere (CI runs it).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MIB = 2**20
MARKER = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load_cases(path: str) -> list[dict]:
    with open(RESULTS / path) as f:
        return json.load(f)["cases"]


def _ms(case: dict) -> str:
    return f"{case['time_s']['median'] * 1e3:.2f}"


def _ratio(case: dict, reference: dict) -> str:
    """Speed-up of ``case`` against ``reference``: reference time / case time."""
    return f"{reference['time_s']['median'] / case['time_s']['median']:.2f}×"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:.2f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ops_table(path: str, impls: list[str], reference: str = "reference") -> str:
    """One row per (op, shape, dtype): the reference's forward / forward+backward time, each
    implementation's speed-up in both modes, and the best implementation's floor fraction
    (forward+backward; GPU runs only)."""
    cases = [c for c in load_cases(path) if c["kind"] == "op"]
    index = {(c["spec"]["op"], c["shape"]["name"], c["dtype"], c["spec"]["mode"], c["impl"]): c for c in cases}
    rows, seen = [], []
    for c in cases:
        key = (c["spec"]["op"], c["shape"]["name"], c["dtype"])
        if key in seen:
            continue
        seen.append(key)
        ref = [index.get((*key, mode, reference)) for mode in ("fwd", "fwd+bwd")]
        if None in ref:
            raise ValueError(f"{path}: no {reference} case for {key}")
        row = [*key, f"{_ms(ref[0])} / {_ms(ref[1])}"]
        for impl in impls:
            got = [index.get((*key, mode, impl)) for mode in ("fwd", "fwd+bwd")]
            row.append(" / ".join("—" if g is None else _ratio(g, r) for g, r in zip(got, ref)))
        floors = [index[(*key, "fwd+bwd", i)].get("floor_fraction") for i in impls if (*key, "fwd+bwd", i) in index]
        floors = [f for f in floors if f is not None]
        row.append(f"{max(floors):.0%}" if floors else "—")
        rows.append(row)
    header = ["op", "shape", "dtype", "reference (ms)", *(f"`{i}`" for i in impls), "of floor"]
    return _table(header, rows)


def e2e_table(path: str, impls: list[str], reference: str = "reference", memory: str = "peak_bytes") -> str:
    """One row per T: each implementation's time (and speed-up against the reference) and
    ``memory`` (``peak_bytes`` or ``saved_activation_bytes``, the autograd graph)."""
    cases = [c for c in load_cases(path) if c["kind"] == "e2e"]
    by_T: dict[int, dict[str, dict]] = {}
    for c in cases:
        by_T.setdefault(c["spec"]["T"], {})[c["impl"]] = c
    rows = []
    for T, group in sorted(by_T.items()):
        ref = group[reference]
        row = [str(T)]
        for impl in [reference, *impls]:
            c = group.get(impl)
            if c is None:
                row.append("—")
                continue
            speed = "" if impl == reference else f" ({_ratio(c, ref)})"
            row.append(f"{_ms(c)} ms{speed}, {_mib(c['memory'].get(memory))}")
        rows.append(row)
    return _table(["T", *(f"`{i}`" for i in [reference, *impls])], rows)


def extension_runs_table(runs: list[tuple[str, str]], backends: list[str]) -> str:
    """``benchmarks/bench_extension.py`` runs side by side: one row per case (op and shape),
    the reference's median time in the first run, then each run's speed-up of each backend
    against the reference measured in that run (``runs``: ``(label, JSON file)`` pairs)."""
    loaded = []
    for _, path in runs:
        with open(RESULTS / path) as f:
            loaded.append(json.load(f)["results"])
    rows = []
    for case, first in loaded[0].items():
        row = [first["op"], first["shape"]["name"], f"{first['median_ms']['reference']:.2f}"]
        for results in loaded:
            speedups = results[case]["speedup_vs_reference"]
            row.append(" / ".join(f"{speedups[b]:.2f}×" for b in backends))
        rows.append(row)
    header = ["op", "shape", "reference (ms)", *(f"{label}: {' / '.join(f'`{b}`' for b in backends)}" for label, _ in runs)]
    return _table(header, rows)


def modes_table(runs: list[str], T: int, rss_T: tuple[int, int]) -> str:
    """``benchmarks/bench_resnet_dfm.py`` runs side by side: one row per implementation at ``T``
    steps, its CPU time against the plain graph's (fastest repeats; each run), its graph (first
    run: MiB, against the plain graph's, against the plain graph's at T=1) and its peak RSS
    against the reference's at each of ``rss_T`` (each run)."""
    loaded = []
    for path in runs:
        with open(RESULTS / path) as f:
            loaded.append(json.load(f))
    names = {"fused": "`True`", "fused-selective": '`"selective"`', "fused-nockpt": "`False`", "reference": "reference"}
    rows = []
    for impl, label in names.items():
        first = loaded[0]["summary"][f"{impl}/T={T}"]
        times = " / ".join(f"{run['summary'][f'{impl}/T={T}']['min_cpu_time_vs_plain']:.2f}×" for run in loaded)
        peaks = ", ".join(
            " / ".join(f"{run['summary'][f'{impl}/T={t}']['peak_vs_reference']:.2f}" for t in rss_T) for run in loaded
        )
        graph = loaded[0]["runs"][f"{impl}/T={T}"]["graph_bytes"] / MIB
        rows.append([label, times, f"{graph:.2f}", f"{first['graph_vs_plain']:.2f}", f"{first['graph_vs_plain_T1']:.2f}", peaks])
    header = [f"at T={T}", "CPU time vs plain graph (fastest repeats; each run)", "graph MiB", "graph vs plain",
              "graph vs T=1 plain graph", f"peak RSS vs reference, T={rss_T[0]} / T={rss_T[1]} (each run)"]
    return _table(header, rows)


H200 = "h200_2026-11-27_torch2.11.0_triton3.6.0/bench_cli.json"
CPU_MODES = [f"cpu_2026-12-01/resnet18_dfm_modes_1thread{suffix}.json"
             for suffix in ("_run4", "_run5_steady_malloc", "_run6_steady_malloc")]
CPU_OPERATING_POINT = [
    ("2 threads", "cpu_2026-12-01/extension_operating_point_run4.json"),
    ("1 thread", "cpu_2026-12-01/extension_operating_point_1thread_run2.json"),
    ("2 threads, steady malloc", "cpu_2026-12-01/extension_operating_point_run5_steady_malloc.json"),
    ("1 thread, steady malloc", "cpu_2026-12-01/extension_operating_point_1thread_steady_malloc.json"),
]

# name -> (renderer, JSON file under benchmarks/results/ or None when the arguments name the files,
# renderer arguments)
TABLES = {
    "h200-ops": (ops_table, H200, {"impls": ["cuda", "torch", "triton"]}),
    "h200-e2e": (e2e_table, H200, {"impls": ["fused", "fused-nockpt"]}),
    "cpu-operating-point": (extension_runs_table, None, {"runs": CPU_OPERATING_POINT, "backends": ["torch", "cpp"]}),
    "cpu-modes": (modes_table, None, {"runs": CPU_MODES, "T": 5, "rss_T": (4, 8)}),
}


def render(readme: str) -> str:
    """``readme`` with every marked table re-rendered; unknown names raise."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"README table {name!r} has no entry in TABLES ({', '.join(TABLES)})")
        renderer, path, kwargs = TABLES[name]
        table = renderer(**kwargs) if path is None else renderer(path, **kwargs)
        return match.group(1) + table + match.group(4)

    return MARKER.sub(replace, readme)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the rendered tables")
    parser.add_argument("--readme", type=pathlib.Path, default=ROOT / "README.md", help="README to render (default: %(default)s)")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    rendered = render(text)
    names = [m["name"] for m in MARKER.finditer(text)]
    if args.check:
        if rendered != text:
            print(f"{args.readme}: tables differ from the JSON; run python benchmarks/readme_tables.py", file=sys.stderr)
            return 1
        print(f"{args.readme}: {len(names)} tables match the JSON ({', '.join(names)})")
        return 0
    args.readme.write_text(rendered)
    print(f"{args.readme}: rendered {len(names)} tables ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
