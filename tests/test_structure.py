"""The tree's shape, checked from the source: first-party imports form no cycle, and no module reaches into another's
private names (``from kvprobe.x import _y``, ``module._y``). Imports inside functions count (a cycle hides there);
imports under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("kvprobe", "datamodules", "reports")
SCANNED = FIRST_PARTY + ("benchmarks", "tests")


def module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, (ast.Name, ast.Attribute)) and \
                    getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports(root: Path, parts=SCANNED) -> dict[str, list[tuple[str, str, int, str]]]:
    """Per module: (imported module, imported name or "", line, file) of every first-party import."""
    files = {module_name(f, root): f for part in parts for f in (root / part).rglob("*.py")}
    out = {}
    for name, file in files.items():
        found = []
        for node in runtime_nodes(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                found += [(a.name, "", node.lineno, str(file)) for a in node.names if a.name.split(".")[0] in FIRST_PARTY]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in FIRST_PARTY:
                for a in node.names:  # `from package import submodule` imports the submodule
                    sub = f"{node.module}.{a.name}"
                    found.append((sub, "", node.lineno, str(file)) if sub in files else (node.module, a.name, node.lineno, str(file)))
        out[name] = found
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def private_uses(root: Path, parts=SCANNED) -> list[str]:
    """``from first_party import _name`` and ``first_party_module._name`` outside the module that defines it."""
    problems = []
    for part in parts:
        for file in (root / part).rglob("*.py"):
            tree = ast.parse(file.read_text(), str(file))
            aliases = {}
            for node in runtime_nodes(tree):
                if isinstance(node, ast.Import):
                    aliases |= {(a.asname or a.name): a.name for a in node.names if a.name.split(".")[0] in FIRST_PARTY}
                elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FIRST_PARTY:
                    for a in node.names:
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            problems.append(f"{file.relative_to(root)}:{node.lineno}: from {node.module} import {a.name}")
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            for node in runtime_nodes(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                        and node.attr.startswith("_") and not node.attr.startswith("__")):
                    problems.append(f"{file.relative_to(root)}:{node.lineno}: {node.value.id}.{node.attr}")
    return problems


def test_first_party_imports_form_no_cycle():
    graph = {m: {target for target, _, _, _ in found} for m, found in imports(REPO).items()}
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_no_module_uses_another_modules_private_names():
    problems = private_uses(REPO)
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def test_the_checks_find_a_cycle_and_a_private_import(tmp_path):
    (tmp_path / "kvprobe").mkdir()
    (tmp_path / "kvprobe" / "__init__.py").write_text("")
    (tmp_path / "kvprobe" / "a.py").write_text("from kvprobe.b import helper\n\ndef _hidden():\n    pass\n")
    (tmp_path / "kvprobe" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvprobe.c import Thing\n\n"
        "def helper():\n    from kvprobe import a\n    return a._hidden()\n")
    (tmp_path / "kvprobe" / "c.py").write_text("from kvprobe.b import helper\nfrom kvprobe.a import _hidden\n")
    graph = {m: {t for t, _, _, _ in found} for m, found in imports(tmp_path, ("kvprobe",)).items()}
    assert cycles(graph) == [["kvprobe.a", "kvprobe.b"]]  # b -> c under TYPE_CHECKING does not count
    assert sorted(p.split(": ", 1)[1] for p in private_uses(tmp_path, ("kvprobe",))) == ["a._hidden", "from kvprobe.a import _hidden"]
