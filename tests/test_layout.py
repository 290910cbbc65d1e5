"""The package layout CONTRIBUTING.md describes: op folders share code only through the shared
modules (``ops/_triton``, ``ops/_torch``, ``ops/_decay.py``, ``ops/_autograd.py``), and no Python
file of the package is over 400 lines."""
import ast
import importlib
import sys
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dfm_fused"
OPS = PACKAGE / "ops"
MAX_LINES = 400
OP_FOLDERS = sorted(p.name for p in OPS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            # ``from dfm_fused.ops import state_update`` imports the op package itself.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_op_folders_found():
    assert {"exp_decay", "feedback_input", "general_exp_decay", "state_update"} <= set(OP_FOLDERS)


@pytest.mark.parametrize("op", OP_FOLDERS)
def test_op_folder_imports_no_other_op(op):
    """Shared code lives in the shared modules, so an op folder never imports another op's folder."""
    offending = []
    for path in sorted((OPS / op).rglob("*.py")):
        for name in _imported_modules(path):
            parts = name.split(".")
            if parts[:2] == ["dfm_fused", "ops"] and len(parts) > 2 and parts[2] in OP_FOLDERS and parts[2] != op:
                offending.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offending, "\n".join(offending)


def test_shared_modules_import_no_op_folder():
    """The shared building blocks do not depend on any op folder either."""
    shared = [OPS / "_decay.py", OPS / "_autograd.py", *(OPS / "_torch").glob("*.py"), *(OPS / "_triton").glob("*.py")]
    offending = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in shared
        for name in _imported_modules(path)
        if name.split(".")[:2] == ["dfm_fused", "ops"] and len(name.split(".")) > 2 and name.split(".")[2] in OP_FOLDERS
    ]
    assert not offending, "\n".join(offending)


def test_no_long_python_files():
    long_files = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long_files, f"over {MAX_LINES} lines (split them): {long_files}"


_ENV_READS = re.compile(
    r"""(?:environ(?:\.get)?\(\s*|environ\[\s*|getenv\(\s*|setenv\(\s*|_ENV\s*=\s*|_VAR\s*=\s*|ENV\s*=\s*)["'](DFM_FUSED_\w+)["']"""
    r"""|\$\{?(DFM_FUSED_\w+)|\bexport\s+(DFM_FUSED_\w+)=|\benv\s+(?:\w+=\S+\s+)*(DFM_FUSED_\w+)="""
)


def test_readme_lists_every_environment_variable():
    """Every DFM_FUSED_* variable the package, its build, scripts and tests read is a row of the
    README's environment-variable table."""
    root = PACKAGE.parent
    sources = [*PACKAGE.rglob("*.py"), *(root / "csrc").rglob("*.[ch]*"), *(root / "scripts").glob("*"),
               *(root / "tests").glob("*.py"), root / "setup.py"]
    read = set()
    for path in sources:
        if path.is_file() and path.name != "test_layout.py":
            for match in _ENV_READS.finditer(path.read_text(errors="replace")):
                read.add(next(group for group in match.groups() if group))
    table = set(re.findall(r"^\| `(DFM_FUSED_\w+)` \|", (root / "README.md").read_text(), re.MULTILINE))
    assert {"DFM_FUSED_BACKEND", "DFM_FUSED_POISON", "DFM_FUSED_BUILD_CUDA"} <= read
    assert read <= table, f"not in the README table: {sorted(read - table)}"


@pytest.mark.parametrize("old, new, name", [
    ("dfm_fused.ops.common", "dfm_fused.ops._decay", "decay_vector"),
    ("dfm_fused.ops.common", "dfm_fused.ops._torch.channel", "outer_over_pixels"),
    ("dfm_fused.ops.triton_utils", "dfm_fused.ops._triton.host", "new_output"),
])
def test_moved_modules_still_import_with_a_deprecation_warning(old, new, name):
    if "triton" in old:
        pytest.importorskip("triton")
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.rsplit(".", 1)[-1]):
        module = importlib.import_module(old)
    alias = "channel_outer" if name == "outer_over_pixels" else name
    assert getattr(module, alias) is getattr(importlib.import_module(new), name)


def test_bench_small_dfm_still_builds_with_a_deprecation_warning():
    from dfm_fused.bench import models as old
    from dfm_fused.models.reference import ReferenceSmallDFM
    from dfm_fused.models.small import SmallDFM

    kwargs = dict(width=8, classes_ch=16, fb=8, n_classes=5)
    with pytest.warns(DeprecationWarning, match="dfm_fused.models.small.SmallDFM"):
        fused, ref = old.SmallDFM(True, checkpoint=False, **kwargs), old.SmallDFM(False, **kwargs)
    assert type(fused) is SmallDFM and fused.checkpoint is False and type(ref) is ReferenceSmallDFM
