"""Ratios against the reference, the printed table, the JSON file and the chart."""
from __future__ import annotations

import json
import math
from collections import defaultdict

__all__ = ["add_ratios", "format_table", "write_chart", "write_json"]

MiB = 1024 * 1024


def _ratio(num, den):
    if num is None or den is None or den == 0:
        return None
    return num / den


def add_ratios(records: list[dict]) -> None:
    """Fill each record's ratios against the reference record of its group (same run).

    ``speedup``: reference median time / this median time. ``memory_ratio``: this
    peak memory / the reference's (CUDA: allocated; CPU: resident set).
    ``graph_memory_ratio``: the same for the activation bytes the autograd graph
    saves (inputs and parameters left out; 0 when an implementation saves only those).
    ``floor_fraction`` (CUDA op cases): floor / this median time (docs/design.md, 'The floor').
    """
    references = {r["group"]: r for r in records if r["impl"] == "reference" and "error" not in r}
    for r in records:
        ref = references.get(r["group"])
        if ref is None or "error" in r:
            continue
        mem = r["memory"]
        r["speedup"] = _ratio(ref["time_s"]["median"], r["time_s"]["median"])
        r["memory_ratio"] = _ratio(mem.get("peak_bytes"), ref["memory"].get("peak_bytes"))
        r["graph_memory_ratio"] = _ratio(mem["saved_activation_bytes"], ref["memory"]["saved_activation_bytes"])
        if r.get("floor_s") is not None:
            r["floor_fraction"] = r["floor_s"] / r["time_s"]["median"]


def _fmt(value, spec, suffix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def format_table(records: list[dict]) -> str:
    """A Markdown table, one row per case, grouped as measured. ``device ms`` and ``launches``
    (CUDA op cases): the device's busy time and its operations in one pass."""
    head = ["case", "impl", "median ms", "device ms", "launches", "speed-up", "peak MiB", "peak ratio", "graph MiB",
            "graph ratio", "of floor"]
    rows = [head, ["---"] * len(head)]
    for r in records:
        if "error" in r:
            rows.append([r["group"], r["impl"], f"error: {r['error'][:60]}"] + [""] * (len(head) - 3))
            continue
        mem = r["memory"]
        peak = mem.get("peak_bytes")
        rows.append([
            r["group"],
            r["impl"] if r["impl"] == r.get("backend", r["impl"]) else f"{r['impl']} ({r['backend']})",
            _fmt(r["time_s"]["median"] * 1e3, ".2f"),
            _fmt(r["device_time_s"] * 1e3 if r.get("device_time_s") is not None else None, ".3f"),
            _fmt((r.get("launches") or {}).get("device_ops"), "d"),
            _fmt(r.get("speedup"), ".2f", "x"),
            _fmt(peak / MiB if peak is not None else None, ".1f"),
            _fmt(r.get("memory_ratio"), ".2f"),
            _fmt(mem["saved_activation_bytes"] / MiB, ".2f"),
            _fmt(r.get("graph_memory_ratio"), ".2f"),
            _fmt(100 * r["floor_fraction"] if r.get("floor_fraction") is not None else None, ".0f", "%"),
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def write_json(path, meta: dict, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "cases": records}, f, indent=1)
        f.write("\n")


def write_chart(path, records: list[dict], title: str) -> bool:
    """Time and memory of the end-to-end cases against T; False if there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)  # (model, impl) -> [(T, seconds, peak MiB, graph MiB)]
    for r in records:
        if r["kind"] == "e2e" and "error" not in r:
            peak = r["memory"].get("peak_bytes")
            series[r["spec"]["model"], r["impl"]].append(
                (r["spec"]["T"], r["time_s"]["median"], None if peak is None else peak / MiB,
                 r["memory"]["saved_activation_bytes"] / MiB)
            )
    if not series:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (model, impl), points in sorted(series.items()):
        points.sort()
        Ts = [p[0] for p in points]
        for ax, column in zip(axes, (1, 2, 3)):
            values = [p[column] for p in points]
            if all(v is not None for v in values):
                ax.plot(Ts, values, marker="o", label=f"{model} {impl}")
    for ax, label in zip(axes, ("training step time (s)", "peak memory (MiB)", "autograd graph activations (MiB)")):
        ax.set_xlabel("T (feedback steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
