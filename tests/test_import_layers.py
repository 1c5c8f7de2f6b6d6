"""hf_ext's modules import downwards only: no import cycle inside the package (module-level or deferred imports), and
the layers keep their order (pure math and maps, kernels, optimizers and PEFT layers, trainers, scripts, CLI)."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "hf_ext"
# Lower layers never import higher ones; a module not listed is unconstrained (e.g. papers, versions, embedded).
LAYERS = (
    ("hf_ext.losses", "hf_ext.kernels"),
    ("hf_ext.optim", "hf_ext.peft"),
    ("hf_ext.hub",),
    ("hf_ext.trainers",),
    ("hf_ext.scripts",),
    ("hf_ext.cli",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The hf_ext modules ``name`` imports anywhere in its source (``from pkg import sub`` counts ``pkg.sub`` when
    that is a module, else ``pkg``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_no_import_cycle_inside_hf_ext():
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def layer(name: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    return None


def test_imports_point_down_the_layers():
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if layer(name) is not None and layer(target) is not None and layer(target) > layer(name)
    ]
    assert not upward, "imports that point up the layers: " + ", ".join(sorted(upward))


def test_the_graph_sees_imports():
    """The reading above is not vacuous: known edges are found."""
    assert "hf_ext.kernels.quant4" in GRAPH["hf_ext.optim.adamw4bit"]
    assert "hf_ext.trainers.grpo_loss" in GRAPH["hf_ext.trainers.grpo_ba"]
