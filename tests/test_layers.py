"""The package's layers point one way, and importing fastcd changes nothing outside it."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the fastcd packages it must never import (layers above it).
LOWER = {"data_prep": ("fastcd.engine", "fastcd.commands", "fastcd.bench"),
         "kernels": ("fastcd.engine", "fastcd.commands", "fastcd.bench", "fastcd.data", "fastcd.models"),
         "fastcd/models": ("fastcd.engine", "fastcd.commands", "fastcd.bench"),
         "fastcd/losses": ("fastcd.engine", "fastcd.commands", "fastcd.bench"),
         "fastcd/data": ("fastcd.engine", "fastcd.commands", "fastcd.bench"),
         "fastcd/engine": ("fastcd.commands", "fastcd.bench"),
         "fastcd/commands": ("fastcd.bench",)}


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_imports_a_layer_above_it():
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for folder, above in LOWER.items() for path in (ROOT / folder).rglob("*.py")
             for name in imported(path) if name.startswith(above)]
    assert not wrong, wrong


def test_importing_fastcd_sets_nothing_in_the_environment():
    """TRITON_INTERPRET in particular: set by an import, it would leak into every Triton user of the process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, fastcd.config, fastcd.kernels, fastcd.losses, fastcd.engine.trainer; "
            "print(os.environ.get('TRITON_INTERPRET'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
