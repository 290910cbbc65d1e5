"""The package layout CONTRIBUTING.md describes: op folders share code only through the shared
modules (``ops/_triton``, ``ops/_torch``, ``ops/_decay.py``, ``ops/_autograd.py``), and no Python
file of the package is over 400 lines."""
import ast
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, dict[str, int]]:
    """``{module: {module it imports: line}}`` over dfm_fused's modules.

    Every import statement counts, those inside functions too (a lazy import still makes the two
    modules depend on each other), and so does ``importlib.import_module`` of a literal name.
    ``from package import name`` is an edge to ``package.name`` when that is a module, else to
    ``package``."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}

        def add(target: str, line: int) -> None:
            if target in paths and target != name:
                edges.setdefault(target, line)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base, node.lineno)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                add(node.args[0].value, node.lineno)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until a module repeats
            target = next(t for t in sorted(graph[path[-1]]) if t in group)
            path.append(target)
            if target in seen:
                cycles.append(path[path.index(target):])
                break
            seen.add(target)
    return cycles


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e2": 5}, "e2": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    """No two dfm_fused modules import each other, directly or through others."""
    graph = _import_graph()
    assert {"dfm_fused._dispatch", "dfm_fused.bench.e2e", "dfm_fused.functional"} <= set(graph)
    described = [" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
                 for cycle in _cycles(graph)]
    assert not described, "import cycles:\n" + "\n".join(described)
