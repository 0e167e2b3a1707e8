"""mrflight.physics is framework-free: no module in it imports the rest of the package."""

from __future__ import annotations

import ast
from pathlib import Path

PHYSICS = Path(__file__).resolve().parents[1] / "mrflight" / "physics"


def _imported(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in a module of mrflight.physics, relative imports
    resolved against the module's package (``from .. import x`` gives ``mrflight.x``)."""
    package = ["mrflight", *path.parent.relative_to(PHYSICS.parent).parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                out.append((node.lineno, module))
            else:  # from . import a, b: the names are modules of the package
                out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def _leaks(path: Path) -> list[str]:
    return [f"{path.relative_to(PHYSICS.parents[1])}:{line}: {name}"
            for line, name in _imported(path)
            if (name == "mrflight" or name.startswith("mrflight."))
            and not (name == "mrflight.physics" or name.startswith("mrflight.physics."))]


def test_physics_imports_nothing_of_the_package_outside_physics():
    files = sorted(PHYSICS.rglob("*.py"))
    assert len(files) > 5
    leaks = [leak for f in files for leak in _leaks(f)]
    assert not leaks, "mrflight.physics imports the package outside physics:\n" + "\n".join(leaks)


def test_the_import_check_sees_leaks(tmp_path, monkeypatch):
    """The check itself: absolute, relative and lazy (function-level) imports are all caught."""
    fake = tmp_path / "mrflight" / "physics"
    (fake / "sub").mkdir(parents=True)
    (fake / "a.py").write_text("from . import epg\nfrom .. import fileio\nimport mrflight.maps\n"
                               "def f():\n    from mrflight.fileio import load_mat\n")
    (fake / "sub" / "b.py").write_text("from ..epg import simulate\nfrom ...dictionary import x\n")
    monkeypatch.setitem(globals(), "PHYSICS", fake)
    found = [leak.split(": ", 1)[1] for f in sorted(fake.rglob("*.py")) for leak in _leaks(f)]
    assert found == ["mrflight.fileio", "mrflight.maps", "mrflight.fileio", "mrflight.dictionary"]
