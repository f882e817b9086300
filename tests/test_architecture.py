"""The house rules, checked on the source: no import cycles, and one model seam.

Both read the package's source with :mod:`ast`, so they see function-local
imports and ``if TYPE_CHECKING:`` blocks too: a type-only import is an arrow as well.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lens_rome"
SEAM = PACKAGE / "model"
# The paper's code transcribed on TransformerLens hooks: an oracle, independent of the seam by design.
ORACLES = PACKAGE / "reference"
# a string that is (a piece of) a TransformerLens hook point name
HOOK_LITERAL = re.compile(r"^(blocks\.|\.?((attn|mlp)\.)?hook_\w+$|hook_\w+$)")
# attributes of a model that only the seam may read
MODEL_INTERNALS = {"cfg", "blocks", "bos_token_id", "ln_final", "unembed", "W_E"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lens_rome modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    found.add(target)
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def seam_violations(path: Path, text: str | None = None) -> list[str]:
    """Hook-name literals and reads of model internals in one file (``text``: its source)."""
    tree = ast.parse(path.read_text() if text is None else text)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                and HOOK_LITERAL.match(node.value)):
            found.append(f"{where}: hook name {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in MODEL_INTERNALS:
            found.append(f"{where}: .{node.attr}")
    return found


def test_the_import_graph_sees_the_package():
    graph = import_graph()
    assert "lens_rome.tracing.engine" in graph and "lens_rome.model.adapter" in graph
    assert "lens_rome.model.adapter" in graph["lens_rome.tracing.engine"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_cli():
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if t.startswith("lens_rome.cli"))
                 for name, targets in graph.items() if not name.startswith("lens_rome.cli") and name != "lens_rome.__main__"}
    assert {n: t for n, t in offenders.items() if t} == {}


def test_only_the_model_seam_knows_hook_names_and_model_internals():
    violations = [v for path in sorted(PACKAGE.rglob("*.py"))
                  if SEAM not in path.parents and ORACLES not in path.parents
                  for v in seam_violations(path)]
    assert violations == []


def test_seam_check_catches_a_hook_name_and_a_config_read():
    text = 'def f(model, layer):\n    return f"blocks.{layer}.hook_resid_pre", model.cfg.d_model\n'
    found = seam_violations(PACKAGE / "tracing" / "probe.py", text)
    assert any("'blocks.'" in v for v in found) and any("'.hook_resid_pre'" in v for v in found)
    assert any(v.endswith(": .cfg") for v in found)
    prose = '"""Reads ``blocks.{l}.hook_resid_pre``."""\nHELP = "the attn.hook_z output of a head"\n'
    assert seam_violations(PACKAGE / "tracing" / "probe.py", prose) == []


# Which folder may import which (docs/architecture.md draws the same picture).  The
# shared leaves (errors, checks, storage) may be imported by everyone.
LEAVES = {"errors", "checks", "storage", "_lazy"}
ALLOWED = {
    "model": set(),
    "data": {"model"},
    "tracing": {"model", "data", "views"},  # views only from a result's .plot()/.show()
    "editing": {"model", "data"},
    "evaluation": {"model", "data", "editing"},
    "views": {"tracing.kinds"},
    "reference": {"model"},
    "cli": {"model", "data", "tracing", "editing", "evaluation", "views"},
}


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for source, targets in graph.items():
        here = folder(source)
        if here not in ALLOWED:  # lens_rome/__init__, _moved, __main__, the leaves
            continue
        for target in sorted(targets):
            there = folder(target)
            if there in (here, "", *LEAVES):
                continue
            allowed = ALLOWED[here]
            if there not in allowed and target.removeprefix("lens_rome.") not in allowed:
                found.append(f"{source} -> {target}")
    return found


def test_folders_import_only_what_they_stand_on():
    assert layering_violations(import_graph()) == []


def test_layering_check_catches_a_wrong_arrow():
    graph = {"lens_rome.model.adapter": {"lens_rome.tracing.engine"},
             "lens_rome.views.trace": {"lens_rome.tracing.kinds", "lens_rome.tracing.result"}}
    assert layering_violations(graph) == ["lens_rome.model.adapter -> lens_rome.tracing.engine",
                                          "lens_rome.views.trace -> lens_rome.tracing.result"]
