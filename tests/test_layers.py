"""The package's layers point one way, with no import circle, and importing fastcd changes nothing outside it.

The layer order is written once, in the README's layout section; this test reads it from there.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders and the names they import as (setup.py's package_dir).
FOLDERS = {"fastcd": "fastcd", "kernels": "fastcd.kernels", "data_prep": "fastcd.data_prep", "bench": "fastcd.bench"}


def readme_layers(text: str) -> dict[str, int]:
    """Listed name -> its layer (1 = lowest), from the numbered list in the README's layout section."""
    section = text.split("## Layout and data flow", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for number, names in re.findall(r"^(\d+)\. ((?:`[\w.]+` ?)+):", section, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", names):
            assert name not in layers, f"{name} is listed twice in the README's layers"
            layers[name] = int(number)
    return layers


def modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: set[str], leaves: frozenset[str] = frozenset()) -> set[str]:
    """The package's modules that `name` imports, at any depth (lazy imports inside functions count), with
    the packages whose `__init__` each import runs (except `name`'s own, already running, and `leaves`:
    packages whose `__init__` imports nothing)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    own = {name.rsplit(".", k)[0] for k in range(name.count(".") + 1)}
    found = set()
    for target in targets:
        parts = target.split(".")
        runs = {".".join(parts[:k]) for k in range(1, len(parts))} - own - leaves
        found.update(m for m in (runs | {target}) if m in known)
    return found


def layer_of(name: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest listed name that is `name` or a package holding it."""
    holders = [n for n in layers if name == n or name.startswith(n + ".")]
    return layers[max(holders, key=len)] if holders else None


def check(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """One line per unlisted module, upward import, and import circle."""
    problems = [f"{m} is in no layer of the README's list" for m in graph if layer_of(m, layers) is None]
    problems += [f"{m} (layer {layer_of(m, layers)}) imports {t} (layer {layer_of(t, layers)})"
                 for m, targets in graph.items() for t in sorted(targets)
                 if (layer_of(t, layers) or 0) > (layer_of(m, layers) or 0)]
    return problems + [" -> ".join(c) for c in circles(graph)]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected group of modules (depth-first search)."""
    state: dict[str, int] = {}
    found, stack = [], []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                found.append([*stack[stack.index(t):], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    mods = modules()
    direct = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    leaves = frozenset(name for name, path in mods.items() if path.name == "__init__.py" and not direct[name])
    return {name: imports(name, path, set(mods), leaves) for name, path in mods.items()}


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_ones():
    assert not check(package_graph(), readme_layers((ROOT / "README.md").read_text()))


def test_the_check_finds_an_unlisted_module_an_upward_import_and_a_circle():
    layers = {"fastcd": 1, "fastcd.config": 2, "fastcd.engine": 3}
    assert check({"fastcd.config": {"fastcd"}, "fastcd.engine.a": {"fastcd.config"}}, layers) == []
    assert check({"fastcd.config": {"fastcd.engine.a"}, "fastcd.engine.a": set()}, layers) == \
        ["fastcd.config (layer 2) imports fastcd.engine.a (layer 3)"]
    assert check({"fastcd.engine.a": {"fastcd.engine.b"}, "fastcd.engine.b": {"fastcd.engine.a"}}, layers) == \
        ["fastcd.engine.a -> fastcd.engine.b -> fastcd.engine.a"]
    assert check({"other.x": set()}, layers) == ["other.x is in no layer of the README's list"]


def test_imports_resolve_relative_names_and_the_packages_they_run(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from . import b\nfrom ..c import d\nimport fastcd.x.y\n")
    known = {"fastcd", "fastcd.a", "fastcd.a.b", "fastcd.a.m", "fastcd.c", "fastcd.x", "fastcd.x.y"}
    assert imports("fastcd.a.m", path, known) == {"fastcd.a.b", "fastcd.c", "fastcd.x", "fastcd.x.y"}
    assert imports("fastcd.a.m", path, known, frozenset({"fastcd.x"})) == {"fastcd.a.b", "fastcd.c", "fastcd.x.y"}


def test_loading_a_config_imports_neither_torch_nor_the_kernels():
    code = ("import sys, fastcd.config as c; c.load_config('configs/fashion-mnist/s_resnet18.t_resnet34.cd.kdv2."
            "lrdv2.yaml'); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or "
            "m.startswith(('fastcd.kernels', 'fastcd.losses', 'fastcd.schedules'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_fastcd_sets_nothing_in_the_environment():
    """TRITON_INTERPRET in particular: set by an import, it would leak into every Triton user of the process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, fastcd.config, fastcd.kernels, fastcd.losses, fastcd.engine.trainer; "
            "print(os.environ.get('TRITON_INTERPRET'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
