"""The layer rule (docs/ARCHITECTURE.md): imports only point down.

    top      pipeline/cli.py, orchestrate.py, iterate.py, demo/         the only code that imports `stages`
    middle   stages/<stage>.py                                          imports the library, never another stage
    bottom   pipeline/<subpackage>/, pipeline/config, errors            never imports `stages` or the top

Every import statement counts, including one inside a function. Also the size limits that keep each file and
function readable on its own (500 lines a production file, 60 lines a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("pipeline.cli", "pipeline.orchestrate", "pipeline.iterate", "pipeline.demo")


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
