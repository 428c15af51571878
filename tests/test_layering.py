"""The floors of the house (docs/architecture.md): what each may import, checked on the source with `ast`.

An import counts with everything it loads: importing `sim.a.b` runs `sim/__init__.py` and `sim/a/__init__.py`
too, and whatever those import. Imports under `if TYPE_CHECKING:` are for type checkers only and never run.
"""

import ast
from functools import cache
from pathlib import Path

import pytest

SIM = Path(__file__).resolve().parents[1] / "sim"
SCHEMA = {"sim.scenario", "sim.catalog", "sim.resolve", "sim.simulate", "sim.report", "sim.cli", "sim.calibrate",
          "sim.calibrate_cuda", "sim.calibrate_cuda_child", "sim.plot", "sim.validate", "sim.snapshot",
          "sim.snapshot_import", "sim.chrome_trace", "sim.compare", "sim.fit", "sim.sweep",
          "sim.advise"}  # the schema and the floors above it
MODELLING = ("sim.workload", "sim.schedule", "sim.parallel")


def module_name(path: Path) -> str:
    parts = path.relative_to(SIM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SIM.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module named by an import anywhere in the file (functions included), TYPE_CHECKING blocks left out."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return {name for name in names if name in MODULES}


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The sim modules `module` loads itself, each with the packages above it."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    loaded = set()
    for name in _imported_names(ast.parse(path.read_text()), package):
        parts = name.split(".")
        loaded.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(loaded & MODULES.keys() - {module})


def transitive_imports(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for name in direct_imports(todo.pop()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen - {module}


def below(*prefixes: str) -> list[str]:
    return sorted(m for m in MODULES if any(m == p or m.startswith(p + ".") for p in prefixes))


ENGINE_ROOM = below("sim.engine", "sim.timeline", "sim.event_order", "sim.drivers", "sim.allocator", "sim.cost", "sim.trace",
                    "sim.ops")
UNDER_THE_PLAN = below("sim.vocab", "sim.plan", "sim.runtime", "sim.units", "sim.errors", "sim.versions", *MODELLING) + ENGINE_ROOM


@pytest.mark.parametrize("module", UNDER_THE_PLAN)
def test_nothing_under_the_plan_reaches_the_schema(module: str) -> None:
    assert transitive_imports(module) & SCHEMA == set()


@pytest.mark.parametrize("module", ENGINE_ROOM)
def test_the_engine_room_knows_no_model(module: str) -> None:
    assert [m for m in transitive_imports(module) if m.startswith(MODELLING)] == []


def test_the_steady_state_proof_knows_only_the_engine_room() -> None:
    # sim/steady.py runs above the engine (sim/simulate.py calls it) but reasons on ops, events and allocator states
    assert transitive_imports("sim.steady") & (SCHEMA | set(below(*MODELLING))) == set()


def test_the_vocabulary_is_the_ground_floor() -> None:
    assert transitive_imports("sim.vocab") <= {"sim"}


def test_the_rule_sees_an_import_inside_a_function() -> None:
    # the check would pass vacuously if it missed imports: a function-level import of the schema must count,
    # one under TYPE_CHECKING must not
    source = "import typing\nif typing.TYPE_CHECKING:\n    from sim import report\ndef f():\n    from sim.scenario import Scenario\n"
    assert _imported_names(ast.parse(source), "sim") == {"sim.scenario"}
    assert "sim.scenario" in transitive_imports("sim.resolve")
