"""No import cycles under ``pipeline/``, counting the imports inside functions.

An import moved into a function still makes the two modules need each other; it only hides
the cycle until the call. This reads every module's imports (top level and nested) from its
syntax tree, resolves them to modules of the package, and fails on any strongly connected
group of two or more modules, naming the imports that close it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a package is its __init__)."""
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its body: for ``from a
    import b`` the module ``a.b`` when it exists, else ``a`` (the nearest known module)."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def nearest(dotted: str) -> str:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {nearest(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {nearest(f"{base}.{alias.name}") for alias in node.names}
    return found - {"", name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def import_graph(package: Path) -> dict[str, set[str]]:
    files = module_files(package)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50, sorted(graph)  # the walk found the package
    found = cycles(graph)
    described = [
        " ; ".join(f"{a} imports {b}" for a in group for b in sorted(graph[a]) if b in group)
        for group in found
    ]
    assert not found, "import cycles (an import inside a function counts):\n" + "\n".join(described)


def test_the_walk_finds_a_cycle_hidden_inside_a_function(tmp_path):
    """The check itself: two modules that import each other, one of them inside a function."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (package / "c.py").write_text("from pkg import a\n")  # imports into the cycle, not part of it
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    (package / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert cycles(import_graph(package)) == []


def test_training_never_imports_the_offline_dataset_tools():
    """``pipeline.data.prep`` (synth, verify, stats, the shard writer) runs before training: the
    runtime feed, the loop, the models and the drivers read what it writes without importing it."""
    graph = import_graph(PACKAGE)
    runtime = ("pipeline.data", "pipeline.train", "pipeline.models", "pipeline.driver", "pipeline.store")
    offending = {
        name: sorted(m for m in imports if m.startswith("pipeline.data.prep"))
        for name, imports in graph.items()
        if name.startswith(runtime) and not name.startswith("pipeline.data.prep")
    }
    assert {k: v for k, v in offending.items() if v} == {}
