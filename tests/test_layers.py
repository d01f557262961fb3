"""The package keeps its documented shape: imports flow one way, down the list in
``batchrunner/__init__.py``'s docstring, and a few libraries stay in their one module.

The checks read the source (``ast``), so a lazy import inside a function counts as much as
one at the top of a module: both are a dependency of the code on the module imported.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import batchrunner

PACKAGE = Path(batchrunner.__file__).parent


def documented_layers() -> list[str]:
    """The layer names in the package docstring's list, top first."""
    doc = batchrunner.__doc__ or ""
    return re.findall(r"^    (\w+)\s", doc, flags=re.MULTILINE)


def package_modules() -> Iterator[tuple[str, Path]]:
    """Every module of the package as (dotted name below ``batchrunner``, path)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts[0] != "__main__":
            yield ".".join(parts), path


def imported_modules(path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``path`` imports, absolute, with the line of the import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


def layer_of(dotted: str) -> str:
    return dotted.split(".")[0]


def test_every_module_is_in_the_documented_list() -> None:
    layers = documented_layers()
    assert layers[0] == "errors" and "cli" in layers, "the docstring's list was not found"
    missing = sorted({layer_of(name) for name, _ in package_modules()} - set(layers) - {""})
    assert missing == [], f"modules missing from batchrunner/__init__.py's list: {missing}"


def test_imports_flow_down_the_documented_list() -> None:
    rank = {name: position for position, name in enumerate(documented_layers())}
    wrong = []
    for name, path in package_modules():
        if not name:
            continue
        own = layer_of(name)
        for imported, line in imported_modules(path):
            if not imported.startswith("batchrunner."):
                continue
            target = layer_of(imported.removeprefix("batchrunner."))
            if target in rank and rank[target] > rank[own]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {target}")
    assert wrong == [], "a module imports one below it in the list:\n" + "\n".join(wrong)


# (library, the only modules that may import it, a prefix of a dotted module name)
CONFINED = [
    ("aiohttp", ("client", "service")),
    ("typer", ("cli",)),
    ("ray", ("engines.ray",)),
]


@pytest.mark.parametrize(("library", "owners"), CONFINED, ids=[c[0] for c in CONFINED])
def test_a_library_stays_in_its_module(library: str, owners: tuple[str, ...]) -> None:
    wrong = []
    for name, path in package_modules():
        if any(name == owner or name.startswith(owner + ".") for owner in owners):
            continue
        for imported, line in imported_modules(path):
            if imported == library or imported.startswith(library + "."):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {imported}")
    assert wrong == [], "\n".join(wrong)


def test_aiohttp_web_stays_in_the_service_package() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for name, path in package_modules()
        if not name.startswith("service")
        for imported, line in imported_modules(path)
        if imported.startswith("aiohttp.web")
    ]
    assert wrong == []


def test_only_the_cli_prints() -> None:
    wrong = []
    for name, path in package_modules():
        if name == "cli" or name.startswith("cli."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert wrong == [], "print() outside cli.py: " + ", ".join(wrong)


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    names = {name for name, _ in package_modules()}
    for name, path in package_modules():
        targets = set()
        for imported, _ in imported_modules(path):
            dotted = imported.removeprefix("batchrunner.")
            if imported.startswith("batchrunner.") and dotted in names and dotted != name:
                targets.add(dotted)
        graph[name] = targets - {""}
    # A package imports its own modules to re-export them; that is not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, route = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*route, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*route, nxt]))
    assert cycles == [], "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_neither_engine_imports_the_other() -> None:
    # Both build on ``wiring``; what one engine needs from the other belongs there. The
    # Ray engine is four modules (see the package docstring).
    ray = {"engines.ray", "engines.blocks", "engines.blockscoring", "engines.blockcommit"}
    sides = [{"engines.local"}, ray]
    wrong = [
        f"{path.relative_to(PACKAGE)}:{line} imports {imported}"
        for own, other in (sides, sides[::-1])
        for name, path in package_modules()
        if name in own or any(name.startswith(module + ".") for module in own)
        for imported, line in imported_modules(path)
        if any(
            imported == f"batchrunner.{module}" or imported.startswith(f"batchrunner.{module}.")
            for module in other
        )
    ]
    assert wrong == [], "\n".join(wrong)
