"""The shape issue 12 asked for, kept: what a newcomer reads from the tree must stay true.

Read from the source with ``ast``, not imported: a module that breaks a rule is named.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "imagefs"
# The composition roots: the commands and the mount build a LocalStore and hand out its protocols.
ROOTS = {"cli", "fs/mount.py", "pull.py", "gc.py", "fsck.py", "status.py", "copy.py", "inspect.py", "rm.py"}


def modules(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, resolved to ``imagefs.…`` for relative imports."""
    package = ["imagefs", *rel(path).split("/")[:-1]]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_only_content_and_the_roots_know_local_store():
    offenders = []
    for path in modules():
        name = rel(path)
        if name.startswith("content/") or name.split("/")[0] in ROOTS or name in ROOTS or name.startswith("testing/"):
            continue
        if any(n.endswith("LocalStore") or n.startswith("imagefs.content.local") for n in imported(path)):
            offenders.append(name)
    assert offenders == [], "take the content protocols (content/store.py), not LocalStore"


def test_registry_modules_stay_small():
    sizes = {rel(p): len(p.read_text().splitlines()) for p in modules("registry")}
    assert {name: n for name, n in sizes.items() if n >= 400} == {}


def test_pull_copy_and_the_registry_never_import_the_filesystem():
    for path in [*modules("registry"), PACKAGE / "pull.py", PACKAGE / "copy.py", PACKAGE / "copysource.py"]:
        assert not any(n == "imagefs.fs" or n.startswith("imagefs.fs.") for n in imported(path)), rel(path)


def test_layers_never_open_a_registry_stream():
    for path in modules("layers"):
        tree = ast.parse(path.read_text())
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr == "open" and isinstance(node.func.value, ast.Attribute | ast.Name)
                 and getattr(node.func.value, "attr", getattr(node.func.value, "id", "")) == "fetcher"]
        assert calls == [], f"{rel(path)} opens a registry stream: read through BlobRanges"


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("imagefs")):
                offenders += [f"{rel(path)}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert offenders == []
