"""The architecture holds: no import circles between modules, engine/ and kernels/ never import
Ray or jobs/, every method module registers what the methods package says, and the installed
package exposes nothing named `engine` at the top level."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from tests.conftest import REPO

PACKAGES = {"engine": "poolscout.engine", "jobs": "poolscout.jobs", "kernels": "poolscout.kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this project imported at module level (imports inside functions are lazy)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                up = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                mod = ".".join(up + ([mod] if mod else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def test_no_import_circles():
    mods = _modules()
    graph = {m: _module_level_imports(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ importing its own submodules (methods/__init__) is how plug-ins load
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") and mods[m].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 40  # the walk saw the project


def test_engine_and_kernels_never_import_ray_or_jobs():
    for name, path in _modules().items():
        if name.startswith("poolscout.jobs"):
            continue
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):  # lazy imports count too
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith(("ray", "poolscout.jobs")), f"{path}: imports {n}"


def test_methods_package_registers_every_method():
    from poolscout.engine.acquisition.selectors import SELECTORS
    from poolscout.engine.acquisition.signals import SIGNALS

    assert {"random", "entropy", "margin", "least_confidence", "bald", "cald", "dcus"} <= set(SIGNALS.names())
    assert {"topk", "retrieve", "coreset", "cald_rerank", "weighted_l2", "ccms"} <= set(SELECTORS.names())


def test_installed_as_one_namespace():
    assert importlib.util.find_spec("poolscout.engine") is not None
    assert importlib.util.find_spec("poolscout.jobs.api") is not None
    origin = Path(importlib.util.find_spec("poolscout.engine").origin).resolve()
    assert origin == (REPO / "engine" / "__init__.py").resolve()
