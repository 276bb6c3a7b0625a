"""The layer rule (docs/ARCHITECTURE.md): imports only point down.

    top      pipeline/cli.py, orchestrate.py, iterate.py, demo/         the only code that imports `stages`
    middle   stages/<stage>.py                                          imports the library, never another stage
    bottom   pipeline/<subpackage>/, pipeline/config, errors            never imports `stages` or the top

Every import statement counts, including one inside a function. Inside the bottom layer, the library's packages
import each other one way: `PACKAGE_GRAPH` lists the edges allowed (docs/ARCHITECTURE.md draws them), and the graph
has no cycle. Also the size limits that keep each file and function readable on its own (500 lines a production
file, 60 lines a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("pipeline.cli", "pipeline.orchestrate", "pipeline.iterate", "pipeline.demo")

# The library's packages and the others each may import (its own modules and the leaf modules pipeline/errors.py and
# pipeline/faults.py aside). Ordered bottom up: a package imports only packages listed before it.
PACKAGE_GRAPH: dict[str, set[str]] = {
    "config": set(),
    "store": {"config"},                                              # storage, fingerprints, checkpoint layout
    "data": {"config", "store"},                                      # sources, rows, models and tokenizers
    "runtime": {"config", "store"},                                   # Ray session, console, trackers, cluster
    "dpo": {"config", "data"},                                        # losses, log-probs, batching, step, FSDP2
    "training": {"config", "data", "dpo", "runtime", "store"},        # a training worker's checkpoints, metrics log
    "caches": {"config", "data", "runtime", "store"},                 # the cache's layout, shards, token files
    "engines": {"config", "data", "dpo", "runtime", "store"},         # scorers, engine actors, rewards, judge
    "evaluation": {"caches", "config", "data", "engines", "runtime", "store"},
    "onpolicy": {"config", "data", "engines"},                        # pair rules, scored pairs
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for d in ("pipeline", "stages") for p in sorted((ROOT / d).rglob("*.py"))}


def imported_modules(source: str) -> set[str]:
    """Every module an import statement in `source` names (`from a import b` names `a` and `a.b`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_violations(module: str, imports: set[str]) -> list[str]:
    """What `module` imports against the layer rule, as readable lines."""
    problems = []
    is_top = any(_within(module, t) for t in TOP)
    is_stage = _within(module, "stages")
    for name in sorted(imports):
        if _within(name, "stages") and name != "stages":
            stage = name.split(".")[1]
            if not is_top and not is_stage:
                problems.append(f"{module} (library) imports the stage {name}")
            elif is_stage and module.split(".")[1] != stage:
                problems.append(f"{module} imports another stage: {name}")
        if name == "stages" and not is_top:
            problems.append(f"{module} imports the stages package")
        if not is_top and any(_within(name, t) for t in TOP):
            problems.append(f"{module} imports the top layer: {name}")
    return problems


def test_the_checker_catches_upward_and_sideways_imports():
    assert layer_violations("pipeline.dpo.step", imported_modules("from stages import train\n"))
    assert layer_violations("pipeline.caches.layout", imported_modules("def f():\n    import stages.cache\n"))
    assert layer_violations("stages.evaluate", imported_modules("from stages.train import find_cache\n"))
    assert layer_violations("stages.train", imported_modules("from pipeline.orchestrate import plan\n"))
    assert layer_violations("pipeline.data.rows", imported_modules("from pipeline.demo import tiny\n"))
    assert not layer_violations("pipeline.cli", imported_modules("from stages import cache, evaluate, train\n"))
    assert not layer_violations("pipeline.demo.experiment", imported_modules("from stages import evaluate\n"))
    assert not layer_violations("stages.train", imported_modules("from pipeline.dpo.step import StepCompute\n"))


def test_imports_only_point_down():
    modules = _modules()
    assert "stages.train" in modules and "pipeline.dpo.losses" in modules  # the walk found the code
    problems = [line for name, path in modules.items()
                for line in layer_violations(name, imported_modules(path.read_text()))]
    assert not problems, "\n".join(problems)


def package_edges(modules: dict[str, str]) -> set[tuple[str, str]]:
    """(package, package it imports) over the library's modules, given as name -> source."""
    edges = set()
    for name, source in modules.items():
        parts = name.split(".")
        if parts[0] != "pipeline" or len(parts) < 3 or parts[1] not in PACKAGE_GRAPH:
            continue
        for imported in imported_modules(source):
            other = imported.split(".")
            if other[0] == "pipeline" and len(other) > 1 and other[1] in PACKAGE_GRAPH and other[1] != parts[1]:
                edges.add((parts[1], other[1]))
    return edges


def graph_problems(edges: set[tuple[str, str]], allowed: dict[str, set[str]]) -> list[str]:
    """Edges `allowed` does not list, and any cycle among `edges` (as `a -> b -> a`)."""
    problems = [f"pipeline/{a} imports pipeline/{b}: not in PACKAGE_GRAPH" for a, b in sorted(edges)
                if b not in allowed.get(a, set())]
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                loop = path[path.index(nxt):]
                first = loop.index(min(loop))  # each cycle once, from its first package in name order
                loop = loop[first:] + loop[:first]
                problems.append("cycle: " + " -> ".join(loop + loop[:1]))
            elif len(path) < len(graph) + 1:
                walk(nxt, path + [nxt])
    for start in sorted(graph):
        walk(start, [start])
    return sorted(set(problems))


def test_the_package_check_catches_a_new_edge_and_a_cycle():
    store_reads_data = {"pipeline.store.storage": "from pipeline.data.rows import tokenize_rows\n",
                        "pipeline.data.rows": "from pipeline.store.storage import Store\n"}
    problems = graph_problems(package_edges(store_reads_data), PACKAGE_GRAPH)
    assert "pipeline/store imports pipeline/data: not in PACKAGE_GRAPH" in problems
    assert any(p.startswith("cycle: ") and "data -> store" in p for p in problems), problems
    lazy = {"pipeline.engines.actors": "def f():\n    from pipeline.evaluation import summary\n"}
    assert graph_problems(package_edges(lazy), PACKAGE_GRAPH) == [
        "pipeline/engines imports pipeline/evaluation: not in PACKAGE_GRAPH"]
    # The allowed graph itself has no cycle: each package lists only packages above it in PACKAGE_GRAPH.
    order = list(PACKAGE_GRAPH)
    assert all(order.index(b) < order.index(a) for a, bs in PACKAGE_GRAPH.items() for b in bs)


def test_the_library_packages_import_each_other_one_way():
    sources = {name: path.read_text() for name, path in _modules().items()}
    edges = package_edges(sources)
    assert ("evaluation", "engines") in edges  # the walk found the code
    problems = graph_problems(edges, PACKAGE_GRAPH)
    assert not problems, "\n".join(problems)


def test_files_and_functions_stay_readable(limit_file=500, limit_function=60):
    too_long = []
    for path in _modules().values():
        source = path.read_text()
        if len(source.splitlines()) > limit_file:
            too_long.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit_function:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
