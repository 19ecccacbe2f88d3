"""The folder tree is the architecture: this test keeps the imports in line with it.

- no import cycle between the project's modules;
- analysis/ (pure Python over text) imports neither the ASR core nor the service;
- the ASR core (gateway/asr) imports no service, client, launcher or wire-protocol code;
- export/ may use the shared audio front end (gateway.asr), never the service;
- model_repository/ (loaded by Triton's Python backend, alone on a server) imports nothing of
  the project outside its own folder.
Imports inside functions count as much as top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "analysis", "export", "model_repository", "bench", "tools")
SKIPPED_PARTS = ("_generated", "__pycache__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            if not any(part in SKIPPED_PARTS for part in path.parts):
                modules[module_name(path)] = path
    return modules


MODULES = project_modules()


def imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name imported by the module (absolute, relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def project_imports(name: str) -> set[str]:
    """The project modules ``name`` imports (a name resolves to its longest module prefix)."""
    found = set()
    for imported in imported_names(MODULES[name], name):
        parts = imported.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in MODULES:
                if candidate != name:
                    found.add(candidate)
                break
    return found


GRAPH = {name: project_imports(name) for name in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items() if _in(name, source)
        for target in targets if any(_in(target, f) for f in forbidden)
    )


def test_no_import_cycles():
    assert strongly_connected(GRAPH) == []


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "source,forbidden",
    [
        ("analysis", ("gateway", "export", "model_repository", "bench", "tools")),
        ("gateway.asr", ("gateway.service", "gateway.clients", "gateway.launch", "gateway.protocol", "analysis")),
        ("export", ("gateway.service", "gateway.clients", "gateway.launch", "gateway.protocol")),
        ("gateway.service", ("gateway.clients", "gateway.launch")),
    ],
)
def test_layer_does_not_reach_up(source, forbidden):
    assert violations(source, forbidden) == []


def test_model_repository_is_self_contained():
    outside = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items() if _in(name, "model_repository")
        for target in targets if not _in(target, "model_repository")
    )
    assert outside == []
    # model.py files are loaded by path by the backend stub: they import their helpers by
    # plain name, which must resolve inside model_repository/ too
    for path in (PROJECT_ROOT / "model_repository").rglob("*.py"):
        for imported in imported_names(path, module_name(path)):
            top = imported.split(".")[0]
            assert top not in PACKAGES or top == "model_repository", f"{path}: imports {imported}"


def test_the_checks_see_imports():
    """The graph is not empty: the service reaches the core, the core reaches its parts."""
    assert "gateway.asr.transcriber" in GRAPH["gateway.service.server"]
    assert "gateway.asr.window_decoder" in GRAPH["gateway.asr.transcriber"]
    assert "analysis" in {t.split(".")[0] for t in GRAPH["gateway.clients.batch"]}
