"""The house as docs/design.md describes it: imports flow one way (no cycle, at module level or inside
functions), the reading half (fastcifar.reporting) needs no torch, and no module outgrows one concern."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastcifar"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports, anywhere in it (functions included), resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import train` names a module
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle():
    deps = graph()
    # a package's __init__ is imported before any of its modules: an edge to it is not a cycle's edge
    edges = {k: {m for m in v if not PACKAGE.joinpath(*m.split(".")[1:], "__init__.py").is_file()}
             for k, v in deps.items()}
    try:
        list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def is_command_name(path: Path) -> bool:
    """A top-level module that only gives a command its documented name: it imports cli and main, nothing else."""
    tree = ast.parse(path.read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return bool(found) and all(isinstance(n, ast.ImportFrom) and {a.name for a in n.names} <= {"cli", "main"}
                               for n in found)


def test_training_half_imports_nothing_of_the_measurement_or_reading_half():
    later = ("fastcifar.benchmarks", "fastcifar.reporting")
    for name, deps in graph().items():
        path = PACKAGE / f"{name.split('.', 1)[1]}.py" if name.count(".") == 1 else None
        if path is None or not path.is_file() or is_command_name(path):
            continue
        assert not {d for d in deps if d.startswith(later)}, name


def test_reading_half_imports_no_torch_anywhere():
    """fastcifar.reporting and every fastcifar module it reaches: no `import torch`, not even in a function."""
    deps = graph()
    todo = [m for m in deps if m.startswith("fastcifar.reporting")]
    reached = set()
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += deps[m]
    for m in sorted(reached):
        path = PACKAGE.joinpath(*m.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        torchy = {i for i in imports(path) if i == "torch" or i.startswith(("torch.", "numba", "ffcv"))}
        assert not torchy, f"{m} imports {sorted(torchy)}"


def test_render_check_runs_without_torch(tmp_path):
    """`render --check` (make docs-check's renderer) with torch made unimportable: it still checks."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['render', '--check', '--root', sys.argv[1]]; "
            "from fastcifar.reporting.render import cli; cli()")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_module_outgrows_one_concern():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 460, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
