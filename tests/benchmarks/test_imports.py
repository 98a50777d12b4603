"""Benchmarks stand on the package alone: no import of the tests, and no import cycle among themselves.

Every module under ``benchmarks/`` is parsed with ``ast``; imports inside functions count, and so do
imports in code strings run in a child interpreter (``python -c SCRIPT``). What the tests and the
benchmarks both build lives in ``benchmarks/support/``; ``tests.support`` re-exports it, so the
dependency points one way: tests -> benchmarks.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path, root: Path) -> str:
    """``benchmarks/support/corpus.py`` -> ``benchmarks.support.corpus``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted target) of every import in ``source``, ``from x import y`` giving ``x.y``."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            with contextlib.suppress(SyntaxError):  # a script for a child interpreter
                found += [(node.lineno, target) for _, target in imports(module, node.value)]
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """benchmarks module -> the benchmarks modules it imports (``from benchmarks import x`` names x)."""
    paths = {module_name(p, root): p for p in sorted((root / "benchmarks").rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = {t for _, t in imports(name, path.read_text(), path.stem == "__init__")}
        # "benchmarks.perf.table" is the module benchmarks.perf: the longest known prefix
        edges[name] = {
            max((m for m in paths if t == m or t.startswith(m + ".")), key=len)
            for t in targets
            if any(t == m or t.startswith(m + ".") for m in paths)
        } - {name}
    return edges


def imports_of_tests(root: Path) -> list[str]:
    """Every import of the tests package from a benchmark, as ``module:line: imports target``."""
    found = []
    for path in sorted((root / "benchmarks").rglob("*.py")):
        name = module_name(path, root)
        for line, target in imports(name, path.read_text(), path.stem == "__init__"):
            if target == "tests" or target.startswith("tests."):
                found.append(f"{name}:{line}: imports {target}")
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected loop found by depth-first search, as the path a -> ... -> a."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def test_benchmarks_do_not_import_the_tests() -> None:
    assert (ROOT / "benchmarks" / "leak_check.py").is_file(), "the walker found no benchmarks"
    assert imports_of_tests(ROOT) == []


def test_benchmarks_import_graph_has_no_cycle() -> None:
    edges = graph(ROOT)
    assert "benchmarks.perf_report" in edges["benchmarks.perf"], "the walker missed a known import"
    assert cycles(edges) == []


def test_the_checks_catch_each_kind_of_violation(tmp_path: Path) -> None:
    """A tree with each violation: top-level, inside a function, in a child's script, and relative."""
    bench = tmp_path / "benchmarks"
    (bench / "support").mkdir(parents=True)
    (bench / "__init__.py").write_text("")
    (bench / "support" / "__init__.py").write_text("")
    (bench / "a.py").write_text("from tests.support.corpus import encode\nfrom benchmarks import b\n")
    (bench / "b.py").write_text("def f():\n    import tests.support.fake_artifact\n    from .c import x\n")
    (bench / "c.py").write_text(
        'SCRIPT = """\nimport json\nfrom tests import support\n"""\nimport benchmarks.a\n'
    )
    (bench / "support" / "d.py").write_text("from ..a import y\nfrom . import e\n")
    (bench / "support" / "e.py").write_text("from benchmarks.support import d\n")
    assert imports_of_tests(tmp_path) == [
        "benchmarks.a:1: imports tests.support.corpus.encode",
        "benchmarks.b:2: imports tests.support.fake_artifact",
        "benchmarks.c:1: imports tests.support",
    ]
    edges = graph(tmp_path)
    assert edges["benchmarks.support.d"] == {"benchmarks.a", "benchmarks.support.e"}
    assert cycles(edges) == [
        ["benchmarks.a", "benchmarks.b", "benchmarks.c", "benchmarks.a"],
        ["benchmarks.support.d", "benchmarks.support.e", "benchmarks.support.d"],
    ]
