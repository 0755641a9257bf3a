"""The package's shape, checked on its import graph (built by grimp from the source).

- No import circle inside ``app``: each module can be read, tested and moved after the ones it
  depends on. Imports under ``TYPE_CHECKING`` and inside functions count too: a circle hidden
  from the interpreter is still one a reader has to untangle.
- ``app`` never imports ``tools`` (the bench and the chaos run): the wheel and the Docker image
  ship ``app`` alone. A checkout's CLI reaches ``tools`` by name at run time, if at all.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGE = "app"
TOOLING = "tools"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # External packages stay in the graph (as one node each), so an import of `tools` shows
    # whether or not a `tools` package exists. cache_dir=None: nothing written to the checkout.
    return grimp.build_graph(PACKAGE, include_external_packages=True, cache_dir=None)


def _internal(graph: grimp.ImportGraph, module: str) -> set[str]:
    return {
        m
        for m in graph.find_modules_directly_imported_by(module)
        if m == PACKAGE or m.startswith(PACKAGE + ".")
    }


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Groups of modules that reach one another through imports (Tarjan), larger than one."""
    modules = sorted(m for m in graph.modules if m == PACKAGE or m.startswith(PACKAGE + "."))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(_internal(graph, v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    return groups


def a_cycle(graph: grimp.ImportGraph, group: list[str]) -> str:
    """One circle through the group, spelled ``a -> b -> a``, and the whole group after it."""
    start = group[0]
    members = set(group)
    for nxt in sorted(_internal(graph, start) & members):
        back = graph.find_shortest_chain(importer=nxt, imported=start)
        if back is not None:
            return " -> ".join((start, *back)) + f"  (all of: {', '.join(group)})"
    return ", ".join(group)


def test_app_has_no_import_circle(graph: grimp.ImportGraph) -> None:
    cycles = [a_cycle(graph, group) for group in strongly_connected(graph)]
    assert not cycles, "import circles in app/:\n" + "\n".join(cycles)


def test_app_does_not_import_tools(graph: grimp.ImportGraph) -> None:
    importers = sorted(
        graph.find_modules_that_directly_import(TOOLING) if TOOLING in graph.modules else ()
    )
    assert not importers, f"app/ imports {TOOLING}: " + ", ".join(importers)


def test_the_checks_see_a_circle_and_an_import_of_tools() -> None:
    """The two checks above on a graph made by hand: they can fail."""
    made = grimp.ImportGraph()
    for module in ("app", "app.a", "app.b", "app.c", "tools"):
        made.add_module(module)
    made.add_import(importer="app.a", imported="app.b")
    made.add_import(importer="app.b", imported="app.c")
    made.add_import(importer="app.c", imported="app.a")
    made.add_import(importer="app.c", imported="tools")
    assert [a_cycle(made, g) for g in strongly_connected(made)] == [
        "app.a -> app.b -> app.c -> app.a  (all of: app.a, app.b, app.c)"
    ]
    assert made.find_modules_that_directly_import(TOOLING) == {"app.c"}
