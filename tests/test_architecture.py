"""The package's modules form a DAG, counting imports inside functions (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_scoreflow"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Package modules imported anywhere in ``path`` (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            # `from . import module` imports the module; `from . import name` reads the package's namespace
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, known) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_modules_form_a_dag_counting_function_level_imports():
    graph = import_graph()  # a package's __init__ re-exports its modules: a module importing its package closes a cycle
    assert "pyro_scoreflow.distribution" in graph["pyro_scoreflow"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_math_never_imports_the_pyro_face():
    """The SDE, the fields and the samplers do not import the distribution, training, checkpoints or inference."""
    graph = import_graph()
    upper = {
        "pyro_scoreflow.distribution",
        "pyro_scoreflow.conditional",
        "pyro_scoreflow.training",
        "pyro_scoreflow.checkpoint",
        "pyro_scoreflow.cli",
        "pyro_scoreflow.infer",
    }
    for lower in ("sde", "checks", "options", "dynamics", "compiled", "samplers", "transforms", "scores"):
        name = f"pyro_scoreflow.{lower}"
        reached, todo = set(), [name]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in reached:
                    reached.add(nxt)
                    todo.append(nxt)
        assert not reached & upper, (name, sorted(reached & upper))
