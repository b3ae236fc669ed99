"""The packages are floors that follow a request's path: a module imports only from its own floor or the floors
below it, no two modules import each other (directly or round a longer circle), the front end never reaches the
worker or the model code directly, and the scheduler never imports torch. Every import counts: module level,
inside functions, and type-only ones under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "multimodal", "scheduler")
# top floor first; a module's floor is the longest prefix of its name listed here
FLOORS = (
    ("engine.entrypoints",),
    ("engine.frontend",),
    ("engine.core",),
    ("engine.worker",),
    ("engine.model_executor",),
    ("engine.checkpoint",),
    ("engine.errors", "engine.engine_config", "engine.grpc_gen", "engine"),
    ("multimodal",),
    ("scheduler",),
)
FRONT = ("engine.entrypoints", "engine.frontend")
MODEL_SIDE = ("engine.worker", "engine.model_executor")


def _modules() -> dict[str, Path]:
    """Dotted names below `omnistream` (engine.core.client) of every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The modules of ours that `name` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from its package (the module itself for a package's __init__)
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = (node.module or "").removeprefix("omnistream.")
                if module == (node.module or ""):
                    continue  # not ours
            for alias in node.names:  # `from pkg import module` imports the module itself
                targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return {t.removeprefix("omnistream.") for t in targets if t.removeprefix("omnistream.") in MODULES}


GRAPH = {name: _imports(name, path) - {name} for name, path in MODULES.items()}


def _floor(name: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{name} is on no floor: add it to FLOORS"
    return best


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_walk_sees_the_whole_tree():
    assert len(MODULES) > 100
    assert "engine.core.messages" in GRAPH["engine.frontend.async_llm"]
    assert "multimodal.mel_kernel" in GRAPH["multimodal.mel"]  # a relative `from . import module`


def test_no_module_imports_from_a_floor_above_it():
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
              if _floor(b) < _floor(a) and not b.startswith(a + ".")]  # a package may import its own modules
    assert not upward, "imports from a floor above:\n" + "\n".join(sorted(upward))


def test_the_front_end_never_imports_the_worker_or_the_model_code():
    reach = [f"{a} -> {b}" for a, targets in GRAPH.items() if _within(a, FRONT)
             for b in targets if _within(b, MODEL_SIDE)]
    assert not reach, "\n".join(sorted(reach))


def test_no_import_circles():
    """Tarjan's strongly connected components: any component of more than one module is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("module", sorted(n for n in MODULES if n.startswith("scheduler")))
def test_the_scheduler_never_imports_torch(module):
    tree = ast.parse(MODULES[module].read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(n == "torch" or n.startswith("torch.") for n in names)
