"""The benchmark CLI runs at a tiny size and writes a complete, consistent JSON report."""
import json
import math
import pathlib
import subprocess
import sys
from collections import defaultdict

import pytest

import torch

from dfm_fused.bench import cases as C
from dfm_fused.bench.__main__ import main


@pytest.fixture(autouse=True)
def _restore_threads():
    # main(["--threads", ...]) sets the process-wide thread count.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_tiny_run_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main([
        "--device", "cpu", "--quick", "--ops", "state_update,feedback_input", "--modes", "fwd+bwd",
        "--shapes", "resnet18", "--T", "1", "--model", "small", "--budget", "0", "--threads", "1",
        "--json", str(out), "--png", str(tmp_path / "bench.png"),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # Two ops x (reference + each fused CPU backend here) + the end-to-end variants.
    n_cases = 2 * (1 + len(C.fused_impls("cpu"))) + len(C.E2E_IMPLS)
    assert f"[{n_cases}/{n_cases}]" in printed and "speed-up" in printed
    header = next(line for line in printed.splitlines() if line.startswith("| case |"))
    assert "IQR %" in header
    assert not {"launches", "device ms", "of floor"} & {c.strip() for c in header.split("|")}, header

    data = json.loads(out.read_text())
    assert data["meta"]["device_type"] == "cpu" and data["meta"]["torch"]
    records = data["cases"]
    assert len(records) == n_cases
    groups = defaultdict(list)
    for r in records:
        assert "error" not in r, r
        groups[r["group"]].append(r)
    for group, members in groups.items():
        impls = {r["impl"] for r in members}
        assert "reference" in impls, group
        assert impls - {"reference", "compile"}, f"{group}: no fused entry"
        reference = next(r for r in members if r["impl"] == "reference")
        for r in members:
            time_s = r["time_s"]
            assert time_s["median"] > 0 and time_s["repeats"] >= 3
            assert time_s["q25"] <= time_s["median"] <= time_s["q75"]
            assert time_s["iqr"] == pytest.approx(time_s["q75"] - time_s["q25"])
            assert isinstance(time_s["noisy"], bool) and isinstance(time_s["retimed"], bool)
            # The profiler counts launches on CUDA only (on the CPU it printed its own chatter).
            assert "launches" not in r and "device_time_s" not in r
            assert r["memory"]["saved_bytes"] > 0 and r["memory"]["peak_bytes"] >= 0
            assert math.isfinite(r["speedup"]) and r["speedup"] > 0, (group, r["impl"], r.get("speedup"))
            # A peak ratio needs a reference pass that grew the process (page granularity); a
            # fused pass at tiny size may grow it by less than a page, hence >= 0.
            if reference["memory"]["peak_bytes"] > 0:
                ratio = r["memory_ratio"]
                assert math.isfinite(ratio) and ratio >= 0, (group, r["impl"], ratio)
            # 0 when an implementation saves nothing but its inputs and parameters.
            assert math.isfinite(r["graph_memory_ratio"]) and r["graph_memory_ratio"] >= 0
        assert reference["speedup"] == 1.0 and reference["graph_memory_ratio"] == 1.0
    e2e = [r for r in records if r["kind"] == "e2e"]
    assert {r["impl"] for r in e2e} == {"reference", "fused", "fused-selective", "fused-nockpt"}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_interrupted_run_writes_the_cases_it_measured(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or ``timeout --signal=INT``) during a case: the cases before it are reported."""
    from dfm_fused.bench import runner

    measure_case, calls = runner.measure_case, []

    def interrupt_on_third(case, *args, **kwargs):
        calls.append(case.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return measure_case(case, *args, **kwargs)

    monkeypatch.setattr(runner, "measure_case", interrupt_on_third)
    out = tmp_path / "bench.json"
    rc = main(["--device", "cpu", "--quick", "--ops", "state_update", "--modes", "fwd", "--shapes", "resnet18",
               "--T", "1", "--model", "small", "--budget", "0", "--threads", "1", "--json", str(out),
               "--png", str(tmp_path / "bench.png")])
    assert rc == 130, capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["id"] for r in data["cases"]] == calls[:2]
    assert any(note.startswith("interrupted after 2 of ") for note in data["meta"]["notes"])


def test_memory_saving_keeps_less_graph_than_full_graph(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["--device", "cpu", "--quick", "--no-ops", "--T", "4", "--model", "small", "--budget", "0", "--threads", "1",
               "--no-rss", "--json", str(out), "--png", str(tmp_path / "b.png")])
    assert rc == 0
    saved = {r["impl"]: r["memory"]["saved_activation_bytes"] for r in json.loads(out.read_text())["cases"]}
    assert saved["fused"] < saved["fused-selective"] < saved["fused-nockpt"]
    assert saved["fused"] < saved["reference"]


@pytest.mark.parametrize("text", ["nope", "resnet18:B=0", "resnet18:Q=3", "resnet18:B=x", "resnet18:groups=7"])
def test_bad_shape_is_a_clear_error(text):
    with pytest.raises(ValueError, match="shape"):
        C.parse_shape(text, "cpu")


def test_shape_overrides():
    shape = C.parse_shape("resnet18:B=8,H=16,W=16", "cpu")
    assert (shape.B, shape.C, shape.H, shape.W) == (8, 520, 16, 16)


def test_python_dash_m_dfm_fused_is_the_benchmark():
    proc = subprocess.run([sys.executable, "-m", "dfm_fused", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dfm-fused-bench" in proc.stdout and "--quick" in proc.stdout


def test_bad_shape_flag_is_a_usage_error(capsys):
    """Before: ``--shapes bogus`` ended in a ValueError traceback from deep inside the planning."""
    with pytest.raises(SystemExit) as exited:
        main(["--device", "cpu", "--no-e2e", "--shapes", "bogus"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dfm-fused-bench") and "error: --shapes: shape: expected one of" in err and "'bogus'" in err


def test_every_flag_has_help_and_says_its_default_at_most_once():
    """Before: --ops, --modes, --no-ops and --no-e2e had no help, and ArgumentDefaultsHelpFormatter
    added "(default: None)" after helps that already gave the real default."""
    from dfm_fused.bench.__main__ import build_parser

    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help and len(action.help) > 10, f"{flag}: no help text"
        text = parser._get_formatter()._expand_help(action)
        assert text.count("default") <= 1, f"{flag}: {text!r}"
        assert "None" not in text, f"{flag}: {text!r}"


def test_default_output_goes_to_a_git_ignored_folder(tmp_path, monkeypatch, capsys):
    """Before: the JSON (and PNG) landed in the working directory, the repository root for run.sh."""
    from dfm_fused.bench.__main__ import RESULTS_DIR

    monkeypatch.chdir(tmp_path)
    rc = main(["--device", "cpu", "--quick", "--no-e2e", "--ops", "exp_decay", "--modes", "fwd", "--shapes",
               "resnet18", "--impls", "reference", "--budget", "0", "--threads", "1", "--no-rss"])
    assert rc == 0
    written = list((tmp_path / RESULTS_DIR).glob("dfm_fused_bench_*.json"))
    assert len(written) == 1 and not list(tmp_path.glob("*.json"))
    assert f"wrote {written[0]}" in capsys.readouterr().out  # the absolute path
    gitignore = pathlib.Path(__file__).resolve().parents[1] / ".gitignore"
    assert f"{RESULTS_DIR}/" in gitignore.read_text().split()


def test_run_sh_says_what_it_does_before_each_long_step(tmp_path):
    """Before: scripts/run.sh was silent for the ~3 minutes of the extension's compile (pip -q).
    Runs the script with a stub python that records its commands instead of installing anything."""
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    log = tmp_path / "log"
    stub = stub_bin / "python3"
    # `python3 -m venv DIR` makes DIR/bin/activate put the stub first on PATH as `python` too.
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "STUB python $*" >> "{log}"\n'
        f'echo "STUB python $*"\n'
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
        f'echo "export PATH={stub_bin}:\\$PATH" > "$3/bin/activate"; fi\n'
    )
    stub.chmod(0o755)
    (stub_bin / "python").symlink_to(stub)
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "run.sh"
    env = {"PATH": f"{stub_bin}:/usr/bin:/bin", "DFM_FUSED_VENV": str(tmp_path / "venv"), "DFM_FUSED_BUILD_CUDA": "0"}
    proc = subprocess.run(["bash", str(script), "--quick"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    build = next(i for i, line in enumerate(lines) if "STUB python -m pip install" in line and "-e ." in line)
    assert "compiling the C++ extension" in lines[build - 1] and "minutes" in lines[build - 1]
    torch_install = next(i for i, line in enumerate(lines) if "torch==" in line and line.startswith("STUB"))
    assert lines[torch_install - 1].startswith("run.sh: installing torch")
    assert lines[-1] == "STUB python -m dfm_fused --quick"


def test_cpu_run_prints_no_profiler_chatter_or_cuda_error():
    """Before: a CPU run printed a USDT profiler_start/stop line per op case (torch.profiler, for
    launch counts) and kineto's "gpuGetDeviceCount failed" error."""
    proc = subprocess.run(
        [sys.executable, "-m", "dfm_fused", "--device", "cpu", "--quick", "--no-e2e", "--ops", "exp_decay",
         "--shapes", "resnet18", "--budget", "0", "--threads", "1", "--no-rss", "--json", "/dev/null", "--png",
         "/dev/null"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    chatter = [line for line in (proc.stdout + proc.stderr).splitlines()
               if "usdt" in line.lower() or "error" in line.lower()]
    assert not chatter, chatter


def test_a_wide_spread_is_retimed_once_then_marked_noisy(monkeypatch):
    from dfm_fused.bench import measure

    def timed(iqr):
        return {"median": 1.0, "q25": 1.0, "q75": 1.0 + iqr, "iqr": iqr, "repeats": 3, "retimed": False}

    for spreads, retimed, noisy in (([0.1], False, False), ([0.5, 0.1], True, False), ([0.5, 0.4], True, True)):
        calls = iter(spreads)
        monkeypatch.setattr(measure, "_timed", lambda bench, min_repeats, budget_s: timed(next(calls)))
        result = measure.time_bench(None)
        assert (result["retimed"], result["noisy"]) == (retimed, noisy), spreads
        assert result["iqr"] == spreads[-1]
        assert next(calls, None) is None, f"{spreads}: timed {len(spreads) - 1} times too few"


def test_timer_gives_quartiles_over_at_least_min_repeats():
    from dfm_fused.bench import measure
    from dfm_fused.bench.cases import Bench

    x = torch.randn(64, 64)
    result = measure.time_bench(Bench(lambda: x @ x, None, [x], torch.device("cpu")), min_repeats=5, budget_s=0)
    assert result["repeats"] >= 5 and result["min"] <= result["q25"] <= result["median"] <= result["q75"]
    assert result["runs_per_block"] >= 1


def _record(impl, median, **extra):
    return {"group": "g", "impl": impl, "time_s": {"median": median, "iqr": 0.5 * median, "noisy": impl == "torch"},
            "memory": {"saved_activation_bytes": 0}, **extra}


def test_table_marks_noisy_cases_and_shows_gpu_columns_only_when_filled():
    from dfm_fused.bench import report

    cpu = report.format_table([_record("reference", 2e-3), _record("torch", 1e-3)])
    header = cpu.splitlines()[0]
    assert "IQR %" in header and "launches" not in header and "of floor" not in header
    assert "| 1.00 ~ | 50 |" in cpu and "~: noisy" in cpu
    gpu = report.format_table([_record("reference", 2e-3, launches={"device_ops": 7}, device_time_s=1e-4,
                                       floor_fraction=0.5)])
    assert "launches" in gpu.splitlines()[0] and "| 7 |" in gpu and "50%" in gpu and "~: noisy" not in gpu
    # Results recorded before the IQR was (committed JSON) still render.
    old = report.format_table([{"group": "g", "impl": "reference", "time_s": {"median": 1e-3},
                                "memory": {"saved_activation_bytes": 0}}])
    assert "| 1.00 | - |" in old


def _e2e(impl, T, seconds, peak):
    return {"kind": "e2e", "impl": impl, "time_s": {"median": seconds},
            "spec": {"model": "small", "mode": "train", "B": 2, "image": [32, 32], "dtype": "float32", "T": T},
            "memory": {"peak_bytes": peak, "saved_activation_bytes": 2**20, "peak_kind": "peak RSS (test)"}}


def test_chart_title_and_log_scale_for_an_outlier(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from dfm_fused.bench import report

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    records = [_e2e("reference", T, 0.1 * T, 2**20 * T) for T in (1, 2)]
    records += [_e2e("fused-selective", 1, 0.1, 2**20), _e2e("fused-selective", 2, 11.8, 2**21)]
    assert report.write_chart(tmp_path / "c.png", records, "cpu, torch x")
    (fig,) = saved
    title = fig.get_suptitle()
    assert "B=2" in title and "32x32" in title and "float32" in title and "peak: peak RSS (test)" in title
    time_axis, peak_axis, _ = fig.axes
    assert time_axis.get_yscale() == "log" and "log scale" in time_axis.get_ylabel()
    assert peak_axis.get_yscale() == "linear"
