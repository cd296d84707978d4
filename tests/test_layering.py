"""The core's layering, checked on the source: no Prefect in lsaq/, argparse only in the CLI, no import cycles,
no private names imported across modules, and the plan stage free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lsaq"
CLI_LAYER = ("lsaq.cli", "lsaq.commands")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import statement of a file, at any depth (lazy imports inside functions count):
    ``(module, imported names, line)``; relative imports are resolved against the file's package."""
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    """lsaq module -> the lsaq modules it imports (``from pkg import mod`` points at the submodule)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, names, _ in imports(path):
            if not target.startswith("lsaq"):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in subs or [target]:
                if t != mod:
                    edges[mod].add(t)
    return edges


def test_the_scan_sees_the_package():
    assert {"lsaq.planning.stage", "lsaq.models.families", "lsaq.cli", "lsaq.commands.plan"} <= set(MODULES)
    assert "lsaq.models.families" in graph()["lsaq.planning.stage"]


def test_no_prefect_in_the_core():
    found = [f"{m}:{line}" for m, p in MODULES.items() for t, _, line in imports(p) if t.split(".")[0] == "prefect"]
    assert not found, f"lsaq/ must not import prefect: {found}"


def test_argparse_only_in_the_cli_layer():
    found = [f"{m}:{line}" for m, p in MODULES.items() for t, _, line in imports(p)
             if t == "argparse" and not m.startswith(CLI_LAYER)]
    assert not found, f"argparse outside lsaq.cli / lsaq.commands: {found}"


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_reaches_back_up_to_the_package_above_it():
    """``lsaq/__init__`` only re-exports the stages (lazily); a module of lsaq imports what it needs from the
    module that defines it (``lsaq.version`` for the version), never from a package above it."""
    found = [f"{m}:{line} imports {n} from {t}" for m, p in MODULES.items() for t, names, line in imports(p)
             for n in names if m.startswith(t + ".") and m != t and not (ROOT / t.replace(".", "/") / n).exists()
             and not (ROOT / t.replace(".", "/") / f"{n}.py").exists()]
    assert not found, found


def test_no_private_names_across_modules():
    found = [f"{m}:{line} imports {n} from {t}" for m, p in MODULES.items() for t, names, line in imports(p)
             if t.startswith("lsaq") for n in names if n.startswith("_") and n != "__version__"]
    assert not found, found


@pytest.mark.parametrize("module", ["lsaq.planning.stage", "lsaq.commands.plan", "lsaq.importance.record",
                                    "lsaq.models.families", "lsaq.models.configs", "lsaq.quantization.record",
                                    "lsaq.store.stage", "lsaq.store.objects", "lsaq.store.select",
                                    "lsaq.commands.store"])
def test_planning_and_the_store_need_no_torch(module):
    """Planning needs no weights and the store only moves files, so both load without torch (fast CLI, light
    pipeline workers and device-side downloads)."""
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} pulls in {out}"


def test_the_python_api_exports_every_stage():
    import lsaq

    for name in ("calibrate", "score", "resolve_device", "plan", "quantize", "evaluate", "open_store", "publish",
                 "list_builds", "download"):
        assert callable(getattr(lsaq, name)), name
    for name in lsaq.__all__:
        assert getattr(lsaq, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lsaq.nope  # noqa: B018


PIPELINE = {module_name(p): p for d in ("tasks", "flows") for p in sorted((ROOT / d).rglob("*.py"))}


def test_the_pipeline_wraps_the_core_without_reaching_into_it():
    """tasks/ and flows/ import no private lsaq names, flows/ reach lsaq only through records and options (the
    stages run in tasks), and lsaq/ never imports the pipeline."""
    private = [f"{m}:{line} imports {n} from {t}" for m, p in PIPELINE.items() for t, names, line in imports(p)
               if t.startswith(("lsaq", "tasks", "flows")) for n in names if n.startswith("_") and n != "__version__"]
    assert not private, private
    stages = {"lsaq.importance.stage", "lsaq.quantization.stage", "lsaq.quantization.artifact",
              "lsaq.models.loading", "lsaq.store.publish"}
    flows_calling_stages = [(m, t) for m, p in PIPELINE.items() if m.startswith("flows")
                            for t, _, _ in imports(p) if t in stages]
    assert not flows_calling_stages, flows_calling_stages
    upward = [(m, t) for m, p in MODULES.items() for t, _, _ in imports(p) if t.startswith(("tasks", "flows"))]
    assert not upward, upward
