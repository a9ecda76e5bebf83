"""The import layers docs/DESIGN.md states, read from the source (every import: top-level, in a function, or only
for type checking): phase 1's sub-packages import only downwards and never in a loop; phase 2 imports only phase
1's shared layers; the kernels import nothing of ours."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = {"genrecal_cache": ROOT / "genrecal_cache", "genrecal_train": ROOT / "genrecal_train",
            "genrecal_kernels": ROOT / "kernels"}
# genrecal_cache's layers, bottom up: a module imports its own sub-package or a strictly lower layer.
CACHE_LAYERS = {"core": 0, "data": 1, "store": 1, "teacher": 2, "job": 3, "inspection": 4, "spot_check": 4, "cli": 5, "__main__": 6}
SHARED = ("core", "data", "store")  # what genrecal_train may import of genrecal_cache


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in sorted(root.rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((pkg, *parts))] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that `name` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            targets = [s for s in subs if s in known] if all(s in known for s in subs) else [mod, *subs]
        else:
            continue
        for t in targets:
            t = "genrecal_kernels" + t[len("kernels"):] if t == "kernels" or t.startswith("kernels.") else t
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a module's own packages load before it anyway
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cache_layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_module_map_is_read():
    g = graph()
    assert len([m for m in g if m.startswith("genrecal_cache.")]) >= 20
    assert "genrecal_cache.store.reader" in g["genrecal_cache.store.verify"]
    assert "genrecal_cache.core.errors" in g["genrecal_train.trainer"]


def test_phase_one_imports_only_downwards():
    bad = []
    for mod, deps in graph().items():
        if not mod.startswith("genrecal_cache."):
            continue
        for dep in deps:
            if dep.startswith(("genrecal_train", "genrecal_kernels")):
                bad.append(f"{mod} -> {dep} (phase 1 imports nothing of phase 2 or the kernels)")
            elif dep.startswith("genrecal_cache"):
                a, b = cache_layer(mod), cache_layer(dep)
                if b != "__init__" and a != b and CACHE_LAYERS[b] >= CACHE_LAYERS[a]:
                    bad.append(f"{mod} -> {dep} ({b} is not below {a})")
    assert not bad, "\n".join(bad)


def test_phase_two_imports_only_the_shared_layers():
    bad = [f"{mod} -> {dep}" for mod, deps in graph().items() if mod.startswith("genrecal_train")
           for dep in deps if dep.startswith("genrecal_cache") and cache_layer(dep) not in SHARED]
    assert not bad, "genrecal_train may import genrecal_cache." + "/".join(SHARED) + " only:\n" + "\n".join(bad)


def test_kernels_import_nothing_of_ours():
    bad = [f"{mod} -> {dep}" for mod, deps in graph().items() if mod.startswith("genrecal_kernels")
           for dep in deps if not dep.startswith("genrecal_kernels")]
    assert not bad, "\n".join(bad)


def test_no_import_loop():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    loops = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                loops.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_design_names_every_module_where_it_lives():
    """docs/DESIGN.md's "Where things are" lists each package's modules, every one and no other."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    section = design.split("## Where things are\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.split(r"^\*\*`(\w+)/`\*\*", section, flags=re.M)[1:]  # [package folder, its text, ...]
    listed = {folder: set(re.findall(r"`([\w/]+\.py)`", text)) for folder, text in zip(blocks[::2], blocks[1::2])}
    for pkg, root in PACKAGES.items():
        actual = {f.relative_to(root).as_posix() for f in root.rglob("*.py") if f.name != "__init__.py"}
        named = listed.get(root.name, set())
        assert actual == named, (f"{root.name}/: missing from docs/DESIGN.md {sorted(actual - named)}, listed but "
                                 f"absent {sorted(named - actual)}")


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, f"split these by job: {long}"
