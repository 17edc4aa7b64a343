"""The shape of tuner/: no import circles, and no lower layer importing a higher one.

Read from the source with ``ast`` (nothing is imported): every ``import`` counts, at the top of a module or
inside a function, except those under ``if TYPE_CHECKING:``, which never run."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TUNER = Path(__file__).resolve().parents[2] / "tuner"

# Pure or foundational modules: what every other part builds on. They must not reach up into the parts that
# run trials, drive servers or hosts, or talk to people.
LOWER = ("tuner.errors", "tuner.atomic", "tuner.paths", "tuner.durations", "tuner.proof_defaults",
         "tuner.yamlfile", "tuner.config", "tuner.build_knobs", "tuner.stats", "tuner.space", "tuner.probe",
         "tuner.model", "tuner.sizing", "tuner.cpu_lists", "tuner.host_sysfs")
# tuner.trial.protocol is a data contract: lower
HIGHER = ("tuner.cli", "tuner.commands", "tuner.tune", "tuner.pipeline", "tuner.search", "tuner.study",
          "tuner.verify", "tuner.report", "tuner.live", "tuner.fleet", "tuner.rollout", "tuner.lab",
          "tuner.trial.runner", "tuner.trial.worker", "tuner.server", "tuner.writeback", "tuner.safe_change")


def module_name(path: Path) -> str:
    parts = path.relative_to(TUNER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runs(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for stmt in child.orelse for n in [stmt, *_runs(stmt)])
            continue
        yield child
        yield from _runs(child)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The tuner modules ``path`` imports (a ``from package import module`` names the module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runs(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in modules} - {name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in TUNER.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan; pure)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_checks_see_a_circle_and_a_layer_breach() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "tuner.live.control" in graph["tuner.live.setup"], "function-level and from-imports are seen"
    assert "tuner.live.unit_connection" in graph["tuner.live.setup"], "an import inside a function counts"


def test_tuner_has_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_no_lower_layer_imports_a_higher_one() -> None:
    breaches = sorted(f"{name} imports {target}" for name, targets in import_graph().items() if within(name, LOWER)
                      for target in targets if within(target, HIGHER))
    assert breaches == []
