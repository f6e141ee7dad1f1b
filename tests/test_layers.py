"""The package's shape: one installed namespace, and imports that only point down the layers

    core (fanformer.*) <- fanformer.quant <- fanformer.export <- fanformer.runtime <- fanformer.cli

Every import statement counts, those inside functions too: a lazy import up the layers is
still a cycle waiting to happen.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> the package it installs as (pyproject.toml's package-dir).
FOLDERS = {"fanformer": "fanformer", "quant": "fanformer.quant", "export": "fanformer.export",
           "runtime": "fanformer.runtime"}
LAYERS = ["core", "fanformer.quant", "fanformer.export", "fanformer.runtime", "fanformer.cli"]


def layer(module: str) -> int:
    for depth in range(len(LAYERS) - 1, 0, -1):
        if module == LAYERS[depth] or module.startswith(LAYERS[depth] + "."):
            return depth
    return 0


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every fanformer import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fanformer import quant` imports the subpackage: count each name that is one.
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "fanformer" or name.startswith("fanformer.")]


def test_imports_only_point_down():
    modules = project_modules()
    assert len(modules) > 40 and "fanformer.runtime.backend" in modules
    upward = []
    for module, path in modules.items():
        for line, target in imported(path):
            if layer(target) > layer(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[layer(module)]}) imports {target} "
                              f"({LAYERS[layer(target)]})")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_the_layer_check_sees_a_violation(tmp_path):
    """The check above is not vacuous: an upward import, even a lazy one, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fanformer.runtime import load_backend\n")
    assert [layer(t) for _, t in imported(bad)] == [3, 3]
    assert layer("fanformer.model") == 0 and layer("fanformer.cli.drift") == 4


@pytest.mark.parametrize("name", ["export", "quant", "runtime"])
def test_no_generic_top_level_packages(tmp_path, name):
    """Installed, the folders exist only as fanformer.<name> (run outside the checkout, whose
    root would otherwise be on sys.path)."""
    code = f"import importlib.util, fanformer.{name}; print(importlib.util.find_spec({name!r}) is None)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
