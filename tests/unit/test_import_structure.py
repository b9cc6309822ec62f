"""The import structure of the code base, read from the source with ``ast`` (nothing is imported).

Layering: ``nbp_common`` (neutral utilities) <- ``data_prep`` (tokenizer, shards, video io) <-
``megatron_nbp`` (model, training, inference). Checked here:

* no import cycle among the modules of ``megatron_nbp``, ``data_prep`` and ``nbp_common``, counting
  imports inside functions (lazy imports) and under ``if TYPE_CHECKING:`` as well;
* ``nbp_common`` imports neither ``data_prep`` nor ``megatron_nbp``; ``data_prep`` never imports
  ``megatron_nbp``;
* nothing under ``megatron_nbp``, ``data_prep``, ``nbp_common``, ``launchers`` or ``bench`` imports
  ``tests``, ``bench`` or ``launchers``.

An edge A -> B means module A names module B in an import statement: ``import a.b.c`` and
``from a.b import c`` (c a submodule) point at ``a.b.c``; ``from a.b import name`` (name defined in
a/b/__init__.py or a/b.py) points at ``a.b``. The parent packages that Python initialises on the way
are not edges: a package's ``__init__`` re-exporting its submodules would otherwise close a loop with
every submodule that imports a sibling.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("nbp_common", "data_prep", "megatron_nbp")
SCRIPT_FOLDERS = ("launchers", "bench")
FORBIDDEN_TARGETS = ("tests", "bench", "launchers")


def module_files(folders: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``folders`` (relative to the repository;
    ``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """Every import statement of ``module`` (in ``path``), anywhere in the file (inside functions too), as
    (the module it names, the names it takes from it, its line): ``import a.b`` gives ``("a.b", [], n)``,
    ``from a import b, c`` gives ``("a", ["b", "c"], n)``; relative imports are resolved against
    ``module``'s package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules`` (None for other libraries)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(folders: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Module -> {imported module of ``folders``: line of the first such import} (self-imports dropped).

    ``from a import b`` is an import of ``a.b`` when that is a module, else of ``a`` (b a name defined
    in ``a``)."""
    modules = module_files(folders)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for base, names, line in imported_names(module, path):
            targets = [f"{base}.{name}" if f"{base}.{name}" in modules else resolve(base, modules)
                       for name in names] if names else [resolve(base, modules)]
            for target in targets:
                if target is not None and target != module:
                    edges.setdefault(target, line)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list; [] when
    the graph is acyclic (self-edges are dropped by :func:`import_graph`)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:
        nonlocal counter
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
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

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(components)


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """The edges inside one cycle, as ``a -> b (line n)``."""
    members = set(component)
    return "; ".join(f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items())
                     if b in members)


def imports_of_top_packages(folders: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Module of ``folders`` -> {top-level name it imports (``tests``, ``torch``, ...): first line}."""
    result = {}
    for module, path in module_files(folders).items():
        tops: dict[str, int] = {}
        for base, _, line in imported_names(module, path):
            tops.setdefault(base.split(".")[0], line)
        result[module] = tops
    return result


def test_the_graph_builder_sees_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    """The helpers on a small made-up tree: a lazy import inside a function, a relative import and a
    ``from package import submodule`` are edges; a cycle through them is found, an acyclic tree has none."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..c import g\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    import pkg.a\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)  # the helpers read REPO from this module
    graph = import_graph(("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b": 2}
    assert graph["pkg.sub.b"] == {"pkg.c": 1} and graph["pkg.c"] == {"pkg.a": 4}
    assert graph["pkg"] == {"pkg.a": 1}
    assert find_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycles(import_graph(("pkg",))) == []


def test_no_import_cycles_among_the_packages():
    """No module of megatron_nbp / data_prep / nbp_common reaches itself again through imports, lazy
    ones (inside functions) included."""
    graph = import_graph(PACKAGES)
    assert len(graph) > 50, sorted(graph)  # the packages were found
    cycles = find_cycles(graph)
    assert cycles == [], "\n".join(describe(graph, c) for c in cycles)


def test_layering_nbp_common_then_data_prep_then_megatron_nbp():
    """nbp_common imports neither package; data_prep never imports megatron_nbp."""
    allowed = {"nbp_common": {"nbp_common"}, "data_prep": {"nbp_common", "data_prep"},
               "megatron_nbp": {"nbp_common", "data_prep", "megatron_nbp"}}
    wrong = []
    for module, tops in imports_of_top_packages(PACKAGES).items():
        own = module.split(".")[0]
        wrong += [f"{module} imports {top} (line {line})" for top, line in sorted(tops.items())
                  if top in PACKAGES and top not in allowed[own]]
    assert wrong == [], wrong


def test_nothing_imports_tests_bench_or_launchers():
    """The packages, the launchers and the benchmarks never import ``tests``, ``bench`` or ``launchers``
    (launchers and benchmarks are entry points, tests import the code, not the other way round)."""
    tops = imports_of_top_packages(PACKAGES + SCRIPT_FOLDERS)
    assert any(m.startswith("launchers.") for m in tops) and any(m.startswith("bench.") for m in tops)
    wrong = [f"{module} imports {top} (line {line})" for module, found in sorted(tops.items())
             for top, line in sorted(found.items()) if top in FORBIDDEN_TARGETS]
    assert wrong == [], wrong
