"""The layers, enforced: base <- kernels <- runtime <- evaluation <- train <- export <- cli, each importing only
to its left.

Every module of the six folders is parsed with ``ast`` (imports inside functions count too) and each
import is resolved to the package it names. A module fails on an import of a higher layer, on torch
or open_clip below train, and on a private name (``_x``, or a ``_module``) of another package, whether
imported by name or reached as an attribute of an imported module.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (package, layer); the folders map onto i2p's subpackages (pyproject's package-dir)
LAYERS = {
    "base": ("i2p.base", 0),
    "kernels": ("i2p.kernels", 1),
    "runtime": ("i2p.runtime", 2),
    "evaluation": ("i2p.evaluation", 3),
    "train": ("i2p.train", 4),
    "export": ("i2p.export", 5),
    "cli": ("i2p", 6),
}
PACKAGE_LAYER = {package: layer for package, layer in LAYERS.values()}
TORCH_FREE = 3  # base, kernels, runtime and evaluation never import these: the lean install has none of them
TORCH = ("torch", "torchvision", "open_clip", "safetensors.torch")


def module_name(path: Path) -> str:
    """``runtime/backends/onnxruntime.py`` -> ``i2p.runtime.backends.onnxruntime``."""
    rel = path.relative_to(ROOT)
    package = LAYERS[rel.parts[0]][0]
    parts = [*rel.parts[1:-1], *([] if rel.stem == "__init__" else [rel.stem])]
    return ".".join([package, *parts])


def package_of(module: str) -> str | None:
    """The layer package a dotted ``i2p`` module belongs to (``i2p`` itself for the cli folder)."""
    if module != "i2p" and not module.startswith("i2p."):
        return None
    for package in sorted(PACKAGE_LAYER, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every wrong-way import, torch import below train, and cross-package private name in ``source``."""
    own = package_of(module)
    layer = PACKAGE_LAYER[own]
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> i2p module it is bound to

    def check(target: str, name: str | None, line: int) -> None:
        what = f"{target}.{name}" if name else target
        if layer <= TORCH_FREE and any(what == t or what.startswith(t + ".") for t in TORCH):
            found.append(f"{module}:{line}: imports {what} (no torch/open_clip below i2p.train)")
        other = package_of(target)
        if other is None:
            return
        if PACKAGE_LAYER[other] > layer:
            found.append(f"{module}:{line}: imports {what}, a higher layer ({other} above {own})")
        if other != own and (_private(target) or (name and name.startswith("_"))):
            found.append(f"{module}:{line}: imports private {what} from another package ({other})")

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                check(a.name, None, node.lineno)
                if a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, is_package)
            for a in node.names:
                submodule = f"{target}.{a.name}"
                if submodule in PACKAGE_LAYER or submodule in known_modules():  # from i2p import kernels
                    check(submodule, None, node.lineno)
                else:
                    check(target, a.name, node.lineno)
                aliases[a.asname or a.name] = submodule
    for node in ast.walk(tree):  # attribute reach-ins: preprocess._open(...)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            other = package_of(target) if target else None
            if other and other != own and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(
                    f"{module}:{node.lineno}: uses private {target}.{node.attr} from another package ({other})"
                )
    return found


@functools.cache
def known_modules() -> frozenset[str]:
    return frozenset(module_name(p) for p in sources())


def sources() -> list[Path]:
    files = sorted(p for folder in LAYERS for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 50, "the walker found too few modules; did the layout change?"
    return files


def test_every_import_points_down_the_layers():
    found = [
        v
        for path in sources()
        for v in violations(module_name(path), path.read_text(), path.name == "__init__.py")
    ]
    assert not found, "imports against the layers:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("i2p.runtime.detector", "from i2p.export.pipeline import run_export", "a higher layer"),
        ("i2p.kernels.compiler", "def f():\n    import i2p.runtime.cache\n", "a higher layer"),
        ("i2p.train.loop", "from ..export import pipeline", "a higher layer"),
        ("i2p.train.demo", "from i2p.cli import main", "a higher layer"),
        ("i2p.base.files", "from ..runtime import manifest", "a higher layer"),
        ("i2p.runtime.detector", "import torch.nn as nn", "no torch"),
        ("i2p.runtime.detector", "from i2p.evaluation.metrics import roc_auc", "a higher layer"),
        ("i2p.evaluation.robustness", "from i2p.train.checkpoint import load_model", "a higher layer"),
        ("i2p.evaluation.cli", "def f():\n    from ..train import cli\n", "a higher layer"),
        ("i2p.evaluation.metrics", "import torch", "no torch"),
        ("i2p.kernels.compiler", "from open_clip import create_model", "no torch"),
        ("i2p.base.tables", "from safetensors.torch import load_file", "no torch"),
        (
            "i2p.train.data",
            "from i2p.runtime.preprocess import _open",
            "private i2p.runtime.preprocess._open",
        ),
        ("i2p.export.x", "from i2p.runtime import _cache", "private"),
        ("i2p.export.x", "import i2p.runtime._cache as c", "private"),
        ("i2p.train.data", "from i2p.runtime import preprocess\npreprocess._open(1)", "uses private"),
    ],
)
def test_the_checker_catches(module, source, expected):
    found = violations(module, source)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        (
            "i2p.export.pipeline",
            "from i2p.train.checkpoint import load_model\nfrom ..runtime import manifest",
        ),
        ("i2p.runtime.detector", "from .backends import _tensorrt_module\nfrom . import _x"),  # own package
        ("i2p.demo", "from i2p.export.pipeline import run_export\nimport torch"),
        ("i2p.train.model", "import torch\nfrom open_clip.transformer import VisionTransformer"),
        ("i2p.runtime.detect_cli", "from i2p.base.files import sha256_file\nobj._private()"),
        ("i2p.evaluation.robustness", "from i2p.runtime.detector import Detector"),
        ("i2p.train.loop", "from i2p.evaluation.metrics import Metrics"),
    ],
)
def test_the_checker_allows(module, source):
    assert violations(module, source) == []


def test_relative_imports_resolve_from_a_package_init():
    assert violations("i2p.kernels", "from ..runtime import cache", is_package=True)
    assert violations("i2p.runtime.backends.x", "from i2p import export")
    assert not violations("i2p.runtime.backends.x", "from i2p import kernels")
    assert violations("i2p.runtime.backends.x", "from ... import demo")  # the cli folder's i2p.demo
    assert not violations("i2p.kernels", "from .build import compile_kernels", is_package=True)
