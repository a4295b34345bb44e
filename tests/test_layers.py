"""The layers import one way only (README "How it works"): a test fails when an import crosses a boundary.

    kernels   know plans (vidsparse.plan, vidsparse.config), never methods, models or the runtime
    methods   know tensors and layouts (vidsparse.plan/layout/config, kernels), never models, pipelines or eval
    core      vidsparse.*, methods, kernels, pipelines: never the CLI (vidsparse.commands) nor eval
    eval      may use the core, never the CLI
    commands  the CLI: may use everything

Imports are read from the source with ``ast`` (top-level and function-local alike), so a lazy import inside a
function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Top-level folders of the checkout mapped into ``vidsparse.*`` (see vidsparse/__init__.py).
MAPPED = ("kernels", "pipelines", "eval")

#: (importer prefix, forbidden imported prefixes, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    (
        "vidsparse.kernels",
        (
            "vidsparse.methods",
            "vidsparse.pipelines",
            "vidsparse.eval",
            "vidsparse.commands",
            "vidsparse.hooks",
            "vidsparse.integration",
            "diffusers",
        ),
        "kernels know plans, not methods or models",
    ),
    (
        "vidsparse.methods",
        (
            "vidsparse.pipelines",
            "vidsparse.eval",
            "vidsparse.commands",
            "vidsparse.hooks",
            "vidsparse.integration",
            "diffusers",
        ),
        "methods know tensors and layouts, not models",
    ),
    ("vidsparse", ("vidsparse.commands",), "only the CLI imports the CLI"),
    ("vidsparse", ("vidsparse.eval",), "the core never imports eval"),
]
#: The importers a rule does not cover: the CLI itself, and eval for the eval rule.
EXEMPT: dict[str, tuple[str, ...]] = {
    "only the CLI imports the CLI": ("vidsparse.commands", "vidsparse.cli", "vidsparse.__main__"),
    "the core never imports eval": ("vidsparse.commands", "vidsparse.cli", "vidsparse.__main__", "vidsparse.eval"),
}
#: Single edges a rule would refuse, each with its reason.
ALLOWED_EDGES = {
    # The GPU benchmark is a script that sits in kernels/ so that gpu_check.sh runs it without diffusers: it times
    # each method's plan, so it asks the methods for their density options (the kernels themselves never do).
    ("vidsparse.kernels.bench_gpu", "vidsparse.methods"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] in MAPPED:
        parts.insert(0, "vidsparse")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from x import y`` also yields ``x.y``: y may be one)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def sources(root: Path) -> list[Path]:
    files = [*root.glob("vidsparse/**/*.py")]
    for folder in MAPPED:
        files += root.glob(f"{folder}/**/*.py")
    return sorted(files)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def allowed(importer: str, target: str) -> bool:
    return any(importer == a and within(target, b) for a, b in ALLOWED_EDGES)


def crossings(root: Path = ROOT) -> list[str]:
    """Every import in the tree under ``root`` that breaks a rule, as readable lines."""
    bad = []
    for path in sources(root):
        importer = module_name(path, root)
        imported = imports_of(path, root)
        for importer_prefix, forbidden, why in RULES:
            if not within(importer, importer_prefix):
                continue
            if any(within(importer, e) for e in EXEMPT.get(why, ())):
                continue
            for target in sorted(imported):
                hit = next((f for f in forbidden if within(target, f)), None)
                if hit is None or allowed(importer, target):
                    continue
                # "from vidsparse.methods import radial" also names the package: judge the module it names.
                if target == hit and any(allowed(importer, t) for t in imported if t != hit and within(t, hit)):
                    continue
                bad.append(f"{importer} imports {target} ({why})")
    return bad


def test_no_import_crosses_a_layer_boundary():
    assert crossings() == []


def test_the_check_sees_a_crossing(tmp_path):
    """The checker itself: a method importing a pipeline inside a function is reported."""
    (tmp_path / "vidsparse" / "methods").mkdir(parents=True)
    (tmp_path / "vidsparse" / "methods" / "bad.py").write_text("def f():\n    from vidsparse.pipelines import x\n")
    assert crossings(tmp_path) == [
        "vidsparse.methods.bad imports vidsparse.pipelines (methods know tensors and layouts, not models)",
        "vidsparse.methods.bad imports vidsparse.pipelines.x (methods know tensors and layouts, not models)",
    ]


@pytest.mark.parametrize("name", ["vidsparse.plan", "vidsparse.layout", "vidsparse.config"])
def test_module_names_are_not_shadowed(name):
    """``import vidsparse.plan as p`` gives the module (the planning function is ``vidsparse.make_plan``)."""
    import importlib
    import types

    module = importlib.import_module(name)
    parent, _, child = name.rpartition(".")
    assert isinstance(getattr(importlib.import_module(parent), child), types.ModuleType)
    assert getattr(importlib.import_module(parent), child) is module
