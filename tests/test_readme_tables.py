"""benchmarks/readme_tables.py: the README's performance tables are rendered from the
committed benchmark JSON, and the README in this checkout matches it."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "readme_tables.py"


@pytest.fixture(scope="module")
def tables():
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing")
    spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(kind, impl, median, **extra):
    case = {"kind": kind, "impl": impl, "time_s": {"median": median}, "memory": {"peak_bytes": 2**20}}
    case.update(extra)
    return case


def test_readme_matches_committed_json(tables, capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def test_renders_ratios_from_json(tables, tmp_path, monkeypatch):
    op = {"dtype": "float32", "shape": {"name": "tiny"}}
    cases = [
        _case("op", "reference", 2e-3, spec={"op": "exp_decay", "mode": "fwd"}, **op),
        _case("op", "reference", 4e-3, spec={"op": "exp_decay", "mode": "fwd+bwd"}, **op),
        _case("op", "torch", 1e-3, spec={"op": "exp_decay", "mode": "fwd"}, **op),
        _case("op", "torch", 1e-3, spec={"op": "exp_decay", "mode": "fwd+bwd"}, floor_fraction=0.25, **op),
        _case("e2e", "reference", 0.3, spec={"T": 4}),
        _case("e2e", "fused", 0.2, spec={"T": 4}),
    ]
    (tmp_path / "run.json").write_text(json.dumps({"meta": {}, "cases": cases}))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "TABLES", {
        "ops": (tables.ops_table, "run.json", {"impls": ["torch"]}),
        "e2e": (tables.e2e_table, "run.json", {"impls": ["fused"]}),
    })
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- table: ops -->\nstale\n<!-- /table -->\nb\n<!-- table: e2e -->\n<!-- /table -->\n")
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert tables.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| exp_decay | tiny | float32 | 2.00 / 4.00 | 2.00× / 4.00× | 25% |" in text
    assert "| 4 | 300.00 ms, 1.00 MiB | 200.00 ms (1.50×), 1.00 MiB |" in text
    assert "stale" not in text and text.startswith("a\n") and "\nb\n" in text
    assert tables.main(["--check", "--readme", str(readme)]) == 0


def test_unknown_table_name_is_an_error(tables, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table: nonesuch -->\n<!-- /table -->\n")
    with pytest.raises(KeyError, match="nonesuch"):
        tables.main(["--readme", str(readme)])
