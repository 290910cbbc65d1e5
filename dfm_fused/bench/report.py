"""Ratios against the reference, the printed table, the JSON file and the chart."""
from __future__ import annotations

import json
import math
from collections import defaultdict

__all__ = ["add_ratios", "format_table", "format_time", "write_chart", "write_json"]

MiB = 1024 * 1024
# Printed after the median of a case whose spread stayed wide after a re-time.
NOISY_MARK = "~"


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


def _spread(time_s: dict):
    """IQR / median, or None for results recorded before the IQR was."""
    return time_s["iqr"] / time_s["median"] if "iqr" in time_s and time_s["median"] else None


def format_time(time_s: dict) -> str:
    """``12.34 ms (IQR 8%)``: the median and the IQR over it; a noisy case is marked."""
    spread = _spread(time_s)
    text = f"{time_s['median'] * 1e3:.2f} ms" + ("" if spread is None else f" (IQR {100 * spread:.0f}%)")
    return text + (f" {NOISY_MARK} noisy" if time_s.get("noisy") else "")


# Columns that only CUDA runs fill; a table without any value in them leaves them out.
_GPU_ONLY = ("device ms", "launches", "of floor")


def format_table(records: list[dict]) -> str:
    """A Markdown table, one row per case, grouped as measured. ``IQR %``: the interquartile range
    of the repeats over their median; a median marked with ``~`` stayed that spread-out after a
    re-time. ``device ms`` and ``launches`` (CUDA op cases): the device's busy time and its
    operations in one pass; ``of floor`` (CUDA op cases) the floor's share of the median."""
    head = ["case", "impl", "median ms", "IQR %", "device ms", "launches", "speed-up", "peak MiB", "peak ratio",
            "graph MiB", "graph ratio", "of floor"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["group"], r["impl"], f"error: {r['error'][:60]}"] + [""] * (len(head) - 3))
            continue
        mem, time_s = r["memory"], r["time_s"]
        peak = mem.get("peak_bytes")
        spread = _spread(time_s)
        rows.append([
            r["group"],
            r["impl"] if r["impl"] == r.get("backend", r["impl"]) else f"{r['impl']} ({r['backend']})",
            _fmt(time_s["median"] * 1e3, ".2f") + (f" {NOISY_MARK}" if time_s.get("noisy") else ""),
            _fmt(100 * spread if spread is not None else None, ".0f"),
            _fmt(r["device_time_s"] * 1e3 if r.get("device_time_s") is not None else None, ".3f"),
            _fmt((r.get("launches") or {}).get("device_ops"), "d"),
            _fmt(r.get("speedup"), ".2f", "x"),
            _fmt(peak / MiB if peak is not None else None, ".1f"),
            _fmt(r.get("memory_ratio"), ".2f"),
            _fmt(mem["saved_activation_bytes"] / MiB, ".2f"),
            _fmt(r.get("graph_memory_ratio"), ".2f"),
            _fmt(100 * r["floor_fraction"] if r.get("floor_fraction") is not None else None, ".0f", "%"),
        ])
    keep = [i for i, name in enumerate(head)
            if name not in _GPU_ONLY or any(row[i] not in ("-", "") for row in rows)]
    table = [[head[i] for i in keep], ["---"] * len(keep)] + [[row[i] for i in keep] for row in rows]
    text = "\n".join("| " + " | ".join(row) + " |" for row in table)
    if any(r.get("time_s", {}).get("noisy") for r in records):
        text += (f"\n\n{NOISY_MARK}: noisy, the IQR stayed above a quarter of the median after a re-time "
                 "(another load on the machine, or a bimodal case); compare such medians with care.")
    return text


def write_json(path, meta: dict, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "cases": records}, f, indent=1)
        f.write("\n")


# An axis whose largest value is this many times its smallest positive one is drawn on a log scale
# (or, if it has zeros, clipped), so that one slow or large case does not flatten the others.
_WIDE_RANGE = 10.0


def _setting(r: dict) -> tuple:
    spec = r["spec"]
    return spec["model"], spec.get("mode", "train"), spec["B"], tuple(spec["image"]), spec["dtype"]


def _describe(setting: tuple) -> str:
    model, mode, B, (H, W), dtype = setting
    return f"{model} DFM {'training step' if mode == 'train' else 'inference'}, B={B}, {H}x{W}, {dtype}"


def _fit_axis(ax, values: list[float], label: str) -> None:
    """Log scale (or clipping, when there are zeros) for a wide range, said in the axis label."""
    positive = [v for v in values if v > 0]
    if not positive or max(positive) <= _WIDE_RANGE * min(positive):
        ax.set_ylabel(label)
        return
    if len(positive) == len(values):
        ax.set_yscale("log")
        ax.set_ylabel(f"{label}, log scale")
        return
    top = _WIDE_RANGE * sorted(positive)[len(positive) // 2]
    ax.set_ylim(0, top)
    ax.set_ylabel(f"{label}, clipped at {top:.3g}")
    for line in ax.lines:
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            if y > top:
                ax.annotate(f"{y:.3g}", (x, top), ha="center", va="top", fontsize=7, color=line.get_color())


def write_chart(path, records: list[dict], title: str) -> bool:
    """Time and memory of the end-to-end cases against T; False if there is nothing to draw.

    The title says the setting (model, batch, image size, dtype) and what "peak" measures; axes
    with a wide range are drawn on a log scale (clipped if they hold zeros), as their labels say."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in records if r["kind"] == "e2e" and "error" not in r]
    if not e2e:
        return False
    settings = sorted({_setting(r) for r in e2e})
    series = defaultdict(list)  # (setting, impl) -> [(T, seconds, peak MiB, graph MiB)]
    for r in e2e:
        peak = r["memory"].get("peak_bytes")
        series[_setting(r), r["impl"]].append(
            (r["spec"]["T"], r["time_s"]["median"], None if peak is None else peak / MiB,
             r["memory"]["saved_activation_bytes"] / MiB)
        )
    peak_kinds = sorted({r["memory"]["peak_kind"] for r in e2e if "peak_kind" in r["memory"]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    labels = ("step time (s)" if settings[0][1] == "train" else "time (s)", "peak memory (MiB)",
              "autograd graph activations (MiB)")
    drawn: list[list[float]] = [[], [], []]
    for (setting, impl), points in sorted(series.items()):
        points.sort()
        Ts = [p[0] for p in points]
        name = impl if len(settings) == 1 else f"{_describe(setting)}: {impl}"
        for i, (ax, column) in enumerate(zip(axes, (1, 2, 3))):
            values = [p[column] for p in points]
            if all(v is not None for v in values):
                ax.plot(Ts, values, marker="o", label=name)
                drawn[i] += values
    for ax, label, values in zip(axes, labels, drawn):
        ax.set_xlabel("T (feedback steps)")
        _fit_axis(ax, values, label)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    setting_line = _describe(settings[0]) if len(settings) == 1 else f"{len(settings)} settings (see legends)"
    peak_line = "peak: " + ("; ".join(peak_kinds) if peak_kinds else "not measured")
    fig.suptitle(f"{setting_line}\n{peak_line}\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
