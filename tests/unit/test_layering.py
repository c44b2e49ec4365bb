"""The import graph, read with `ast` from every module of the project (imports inside functions, under
`TYPE_CHECKING` and in `lazy_exports` maps included): no cycle between modules, and every edge between
top-level packages points the way the layout says.

    cfvit         the model library: imports nothing of the project
    cfvit_common  shared infrastructure: imports cfvit only
    serve         the Serve application: cfvit, cfvit_common
    jobs          train, tune, calibrate, ops, reproduce, pipeline: cfvit, cfvit_common (pipeline: serve too)
    benchmarks    anything but the CLI; nothing imports it but the CLI
    cfvit_cli     the root `cfvit` command: adds every package's own commands
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cfvit", "cfvit_common", "serve", "jobs", "benchmarks", "cfvit_cli")
ALLOWED = {
    "cfvit": set(),
    "cfvit_common": {"cfvit"},
    "serve": {"cfvit", "cfvit_common"},
    "jobs": {"cfvit", "cfvit_common", "serve"},
    "benchmarks": {"cfvit", "cfvit_common", "jobs", "serve"},
    "cfvit_cli": {"cfvit", "cfvit_common", "serve", "jobs", "benchmarks"},
}
ONLY_FROM = {("jobs", "serve"): "jobs.pipeline"}  # the main job starts the Serve app; no other job does


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (`a.b.c` → the longest prefix that is a module)."""
    while name and name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name or None


def _imports(module: str, path: Path):
    """(target module, line, inside a function) for every import of a project module in `path`."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([child.module] if child.module else []))
                names = [f"{base}.{a.name}" for a in child.names] or [base]
            elif isinstance(child, ast.Call) and getattr(child.func, "id", "") == "lazy_exports":
                # `__getattr__ = lazy_exports(__name__, {"name": ".module"})`: edges all the same
                table = child.args[1] if len(child.args) > 1 else None
                for value in getattr(table, "values", []):
                    target = value.value
                    names.append(package + target if target.startswith(".") else target)
            for name in names:
                target = _resolve(name)
                if target and target != module:
                    found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_the_graph_was_read():
    assert len(MODULES) > 60 and sum(map(len, GRAPH.values())) > 300


def test_no_import_cycle_between_modules():
    edges = {m: {t for t, _, _ in imps} for m, imps in GRAPH.items()}
    # a cycle through a package's own __init__ (a submodule importing its parent) is real too
    state: dict[str, int] = {}
    cycles = []

    def walk(m, stack):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                walk(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m, [m])
    # a package's __init__ naming its own submodules lazily (`lazy_exports`) is not a cycle back from them
    real = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, "import cycles:\n" + "\n".join(" → ".join(c) for c in real)


@pytest.mark.parametrize("package", PACKAGES)
def test_edges_between_packages_point_one_way(package):
    bad = []
    for m, imps in GRAPH.items():
        if m.split(".")[0] != package:
            continue
        for target, line, _ in imps:
            other = target.split(".")[0]
            if other == package:
                continue
            only = ONLY_FROM.get((package, other))
            if other not in ALLOWED[package] or (only and not (m == only or m.startswith(only + "."))):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_say_why():
    """Outside the command modules (whose docstrings say why: `cfvit --help` starts without torch), an import
    inside a function carries its reason in a comment on its line or the line above."""
    bad = []
    for path in MODULES.values():
        if path.name in ("cli.py", "__main__.py") or path.parent.name == "cfvit_cli":
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    here, above = lines[inner.lineno - 1], lines[inner.lineno - 2]
                    if "#" not in here.split("import", 1)[-1] and "#" not in above:
                        bad.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {here.strip()}")
    assert not bad, "imports inside functions without a reason:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.e2e  # a subprocess
def test_cfvit_help_loads_no_heavy_library():
    """The root command and every package's command module import without torch, Ray, timm or MLflow."""
    import json
    import sys

    from tests.fixtures.procs import run

    code = ("import sys, json, cfvit_cli\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'timm', 'mlflow'})))")
    out = run([sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
