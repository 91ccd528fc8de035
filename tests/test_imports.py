"""The package's import graph has no circles.

Every module of ``craft_runner`` is parsed (not imported) and every ``import craft_runner...`` /
``from craft_runner... import ...`` statement in it counts as an edge — at module level, inside
functions, under ``if`` — so a lazy import that only hides a circle from Python is a circle here too.

How a statement becomes an edge (the rule, kept simple):

- ``import a.b.c`` → module ``a.b.c``;
- ``from a.b import y`` → ``a.b.y`` when that is a module (a submodule import), else ``a.b`` (a name
  taken from the module, or from the package's ``__init__.py`` when ``a.b`` is a package);
- an edge to a package is an edge to its ``__init__.py``. Python runs ``a/b/__init__.py`` before
  ``a.b.c``, but that implied import is not counted: a package whose ``__init__`` re-exports its
  submodules would otherwise put every submodule that imports a sibling on a circle. A submodule
  that imports its own package by name (``from a.b import name``) is counted, and is a circle when
  that ``__init__`` imports it.

Imports by computed name (``importlib.import_module(f"...")``: the registries' discovery of their
plugins) are not statements and are not counted.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import craft_runner

PKG = "craft_runner"


def _modules() -> dict[str, Path]:
    """Module name → source file, the package itself included."""
    root = Path(craft_runner.__file__).parent
    found = {PKG: root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix=PKG + "."):
        rel = Path(*info.name.split(".")[1:])
        found[info.name] = root / rel / "__init__.py" if info.ispkg else (root / rel).with_suffix(".py")
    return found


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    """The absolute name a (possibly relative) ``from`` import refers to."""
    if not level:
        return target or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = _modules() if modules is None else modules
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(name, is_pkg, node.level, node.module)
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    edges.add(sub if sub in modules else src)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle as [m0, m1, ..., m0], or None (iterative depth-first search, sorted for a stable answer)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20 and "craft_runner.compress.quant" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_schema_imports_no_family_module():
    """The shared schema module is below every family (compress, optim own their schemas)."""
    assert import_graph()["craft_runner.schema"] == set()


def _write(tmp_path, files: dict[str, str]) -> dict[str, Path]:
    out = {}
    for name, text in files.items():
        parts = name.split(".")
        path = tmp_path.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def test_the_walker_sees_lazy_relative_and_package_imports(tmp_path):
    """The rule on a hand-made package: each kind of statement gives the edge the docstring says."""
    mods = _write(tmp_path, {
        "craft_runner.__init__": "",
        "craft_runner.p.__init__": "from craft_runner.p.a import f\n",
        "craft_runner.p.a": "def f():\n    from . import b\n    return b\n",
        "craft_runner.p.b": "import craft_runner.q\nfrom craft_runner.p import f\n",
        "craft_runner.q": "from craft_runner.p.a import f as g\n",
    })
    graph = import_graph(mods)
    assert graph == {"craft_runner": set(), "craft_runner.p": {"craft_runner.p.a"},
                     "craft_runner.p.a": {"craft_runner.p.b"}, "craft_runner.p.b": {"craft_runner.q", "craft_runner.p"},
                     "craft_runner.q": {"craft_runner.p.a"}}
    assert find_cycle(graph) == ["craft_runner.p", "craft_runner.p.a", "craft_runner.p.b", "craft_runner.p"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_report_never_reaches_the_pipeline():
    """craft-report reads what results.json records (the key's inputs included, craft_runner.identity): no
    module of report/ imports the pipeline, directly or through another module, lazily or not."""
    graph = import_graph()
    report = [m for m in graph if m.startswith(PKG + ".report")]
    assert len(report) > 5
    assert {m: sorted(_reach(graph, m) & {PKG + ".pipeline", PKG + ".run"}) for m in report} == {m: [] for m in report}
    assert _reach({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}


def test_run_identity_sits_on_the_schema_alone():
    """The roles' one home imports only the schema (no torch, no family): the report and the runner both use it."""
    assert import_graph()["craft_runner.identity"] == {"craft_runner.schema"}
