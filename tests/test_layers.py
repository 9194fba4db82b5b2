"""The packages form layers that import only downward (README, "Layout"). Every import counts,
at module level or inside a function: an upward one is a cycle waiting to happen."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Bottom to top. Units in one layer are siblings: they may import the layers below, not each other.
LAYERS = [
    ["emf_dist"],                                       # base: model, objective, samplers, configs, storage, scenes
    ["data_prep", "emf_dist.train", "emf_dist.eval"],   # data prep, training, evaluation
    ["pipelines"],                                      # steps, runs, cache, registry, lock, retrain
    ["cluster"],                                        # local head, job submission, recipes
    ["emf_app"],                                        # the `emf` command line and the demo
    ["benchmarks"],                                     # measurements of everything below
]
UNITS = sorted((unit for layer in LAYERS for unit in layer), key=len, reverse=True)  # most specific first


def unit_of(module: str) -> str | None:
    for unit in UNITS:
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import sub` may name a submodule: count it as importing pkg.sub
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def upward_imports() -> list[str]:
    problems = []
    for layer in LAYERS:
        for top in {unit.split(".")[0] for unit in layer}:
            for path in sorted((ROOT / top).rglob("*.py")):
                source = unit_of(module_name(path))
                for line, target in imported_modules(path):
                    dest = unit_of(target)
                    if dest is None or dest == source:
                        continue
                    if layer_of(dest) >= layer_of(source):
                        problems.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {target} ({dest})")
    return sorted(set(problems))


def test_every_import_points_down_the_layers():
    problems = upward_imports()
    assert not problems, "imports that point up or sideways:\n" + "\n".join(problems)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    # The oracle for the checker itself: a planted upward import, inside a function, must be found.
    module = ROOT / "emf_dist" / "_layer_probe.py"
    module.write_text("def f():\n    from pipelines import run\n    from .train import driver\n")
    try:
        problems = upward_imports()
    finally:
        module.unlink()
    assert any("_layer_probe.py:2" in p and "pipelines" in p for p in problems)
    assert any("_layer_probe.py:3" in p and "emf_dist.train" in p for p in problems)


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == {unit.split(".")[0] for layer in LAYERS for unit in layer}
