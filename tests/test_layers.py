"""Imports go one way: the layers of lb/layers.py, checked on every module's source."""

from __future__ import annotations

import ast
from pathlib import Path

from lb.layers import CORE_FORBIDDEN, LAYERS, allowed, layer_of

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lb", "offload", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    """Every module of the product and the bench harness, by dotted name."""
    return {
        module_name(p): p
        for package in PACKAGES
        for p in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def imports(module: str, is_package: bool, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the source, at any depth (inside
    functions and `if TYPE_CHECKING:` too). `from a import b` is module a.b if that is a
    module, else a."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if sub in known else target))
    return list(dict.fromkeys(out))  # once per line and module


def violations(module: str, path: Path, source: str, known: set[str]) -> list[str]:
    layer = layer_of(module)
    if layer is None:
        return [f"{path}: {module} is in no layer: place it in lb/layers.py"]
    out = []
    for line, target in imports(module, path.name == "__init__.py", source, known):
        top = target.split(".")[0]
        where = f"{path.relative_to(ROOT)}:{line}: {module} ({layer}) imports {target}"
        if top in PACKAGES:
            theirs = layer_of(target)
            if theirs is None or not allowed(layer, theirs):
                out.append(f"{where} ({theirs}): a wrong-way import")
        elif layer == "core" and top in CORE_FORBIDDEN:
            out.append(f"{where}: the core does no I/O")
    return out


def test_imports_follow_the_layers() -> None:
    modules = sources()
    known = set(modules)
    found = []
    for module, path in modules.items():
        found += violations(module, path, path.read_text(encoding="utf-8"), known)
    assert not found, "\n".join(found)


def test_every_entry_of_the_table_names_a_module() -> None:
    known = set(sources())
    stale = [
        entry
        for entries in LAYERS.values()
        for entry in entries
        if entry.removesuffix(".*") not in known
    ]
    assert not stale, f"lb/layers.py names modules that do not exist: {stale}"


def test_the_check_sees_a_wrong_way_import_inside_a_function() -> None:
    known = set(sources())
    path = ROOT / "lb" / "model.py"
    source = "import enum\n\n\ndef f() -> None:\n    from offload.manager import OffloadManager\n"
    assert violations("lb.model", path, source, known) == [
        "lb/model.py:5: lb.model (core) imports offload.manager (app): a wrong-way import"
    ]
    io = violations("lb.plan", ROOT / "lb" / "plan.py", "import socket\n", known)
    assert io == ["lb/plan.py:1: lb.plan (core) imports socket: the core does no I/O"]
    sideways = violations(
        "lb.proxy.tcp", ROOT / "lb/proxy/tcp.py", "from offload import ipvs\n", known
    )
    assert sideways == [
        "lb/proxy/tcp.py:1: lb.proxy.tcp (userspace) imports offload.ipvs (kernel): "
        "a wrong-way import"
    ]
