"""Every third-party module the source imports is a declared dependency of the part of the tree that imports it.

kvprobe/ and datamodules/ may import only `[project].dependencies`, kvprobe/serve/ also the `serve` extra;
benchmarks/ and reports/ also the `bench` extra; tests/ also `test`, `bench` and `serve` (the suite runs the
benchmarks reduced). A part's subfolder that is a part of its own follows its own rule. Imports inside functions count:
that is where a missing one hides until a user reaches it (matplotlib did, in the test figure).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = {"kvprobe": (), "kvprobe/serve": ("serve",), "datamodules": (), "benchmarks": ("bench", "serve"),
         "reports": ("bench",), "tests": ("test", "bench", "serve")}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> dict[str, set[str]]:
    """Normalised distribution names per extra ("" = the core dependencies); self-references are expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    raw = {"": project.get("dependencies", [])} | project.get("optional-dependencies", {})
    own = _norm(project["name"])
    pattern = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")

    def expand(extra: str, seen: frozenset = frozenset()) -> set[str]:
        names = set()
        for req in raw.get(extra, []):
            name, extras = pattern.match(req).groups()
            if _norm(name) == own:
                for sub in (e.strip() for e in (extras or "").split(",") if e.strip()):
                    if sub not in seen:
                        names |= expand(sub, seen | {sub})
            else:
                names.add(_norm(name))
        return names

    return {extra: expand(extra) for extra in raw}


def imported_modules(file: Path) -> list[tuple[str, int]]:
    """(top-level module, line) of every absolute import in ``file``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def undeclared(root: Path, parts: dict[str, tuple[str, ...]]) -> list[str]:
    """One line per import of a distribution that ``parts[folder]``'s extras (plus the core) do not declare."""
    deps = declared(root / "pyproject.toml")
    dists = packages_distributions()
    local = {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))} | {p.stem for p in root.glob("*.py")}
    problems = []
    for part, extras in parts.items():
        allowed = deps[""].union(*(deps.get(e, set()) for e in extras))
        inner = [root / p for p in parts if p.startswith(part + "/")]
        for file in sorted(f for f in (root / part).rglob("*.py") if not any(f.is_relative_to(i) for i in inner)):
            siblings = {p.stem for p in file.parent.glob("*.py")}  # scripts import their neighbours (benchmarks' common)
            for module, line in imported_modules(file):
                if module in sys.stdlib_module_names or module in local or module in siblings:
                    continue
                owners = {_norm(d) for d in dists.get(module, [])}
                if not owners & allowed:
                    where = f"{file.relative_to(root)}:{line}"
                    if owners:
                        problems.append(f"{where}: imports {module!r} (distribution {', '.join(sorted(owners))}), "
                                        f"not declared for {part}/ (pyproject: core{''.join(' + ' + e for e in extras)})")
                    else:
                        problems.append(f"{where}: imports {module!r}, which no installed distribution provides")
    return problems


def test_the_source_declares_what_it_imports():
    problems = undeclared(REPO, PARTS)
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_the_check_names_each_undeclared_import(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "fake"\nversion = "0"\ndependencies = ["torch>=2", "PyYAML"]\n'
        '[project.optional-dependencies]\nbench = ["numpy"]\ndev = ["fake[bench]"]\n')
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "__init__.py").write_text("import json\nimport torch\nfrom fake import core\n")
    (tmp_path / "fake" / "core.py").write_text(
        "import yaml\n\ndef plot():\n    import numpy as np\n    from matplotlib import pyplot\n    from . import core\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "common.py").write_text("import os\n")
    (tmp_path / "benchmarks" / "speed.py").write_text("import common\nimport numpy\nimport not_a_module_anyone_ships\n")
    problems = undeclared(tmp_path, {"fake": (), "benchmarks": ("bench",)})
    assert len(problems) == 3, problems
    numpy_in_core, matplotlib_in_core, unknown = problems
    assert numpy_in_core.startswith("fake/core.py:4: imports 'numpy'") and "not declared for fake/" in numpy_in_core
    assert matplotlib_in_core.startswith("fake/core.py:5: imports 'matplotlib'")
    assert unknown.startswith("benchmarks/speed.py:3: imports 'not_a_module_anyone_ships'") and "no installed" in unknown
    assert declared(tmp_path / "pyproject.toml")["dev"] == {"numpy"}
