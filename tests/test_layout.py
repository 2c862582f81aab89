"""The shape of the package: imports flow one way (no cycles, counting
imports inside functions), and loading a model imports no tool."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package names they install as (pyproject.toml).
PACKAGES = {"mlx_kvq": "mlx_kvq", "converters": "mlx_kvq.converters",
            "apps": "mlx_kvq.apps", "apps/assistant": "mlx_kvq.apps.assistant"}


def _modules() -> dict:
    """{module name: path} of every module of the package."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """Package modules `name` imports, anywhere in its file."""
    is_package = path.stem == "__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            # `from pkg import mod` imports the module; `from mod import name`, mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not (is_package and name.startswith(t)):
                out.add(t)
    return out


def import_graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_and_finds_cycles():
    graph = import_graph()
    assert "mlx_kvq.cache" in graph["mlx_kvq.attention"]
    assert "mlx_kvq.kvplan" in graph["mlx_kvq.converters.calibrate"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


RUNTIME = ("mlx_kvq.__init__", "mlx_kvq.blas", "mlx_kvq.distributed", "mlx_kvq.spec", "mlx_kvq.quant",
           "mlx_kvq.cache", "mlx_kvq.batch_cache", "mlx_kvq.attention", "mlx_kvq.kernels",
           "mlx_kvq.metal_emu", "mlx_kvq.integration", "mlx_kvq.persist", "mlx_kvq.models",
           "mlx_kvq.kvplan", "mlx_kvq.files", "mlx_kvq.report", "mlx_kvq.gguf")
TOOLS = ("mlx_kvq.converters", "mlx_kvq.apps", "mlx_kvq.evaluate", "mlx_kvq.bench",
         "mlx_kvq.bench_ranks",
         "mlx_kvq.plan", "mlx_kvq.plots", "mlx_kvq.corpus", "mlx_kvq.generate",
         "mlx_kvq.fuzz", "mlx_kvq.fuzz_cache", "mlx_kvq.fuzz_files")


def test_the_runtime_imports_no_tool():
    graph = import_graph()
    for name in RUNTIME:
        name = "mlx_kvq" if name == "mlx_kvq.__init__" else name
        if name in graph:
            bad = [t for t in graph[name] if t.startswith(TOOLS)]
            assert not bad, f"{name} imports {bad}"


def test_loading_a_model_imports_no_tool():
    from mlx_kvq.models import default_model_dir

    if not (default_model_dir() / "config.json").is_file():
        pytest.skip("the default model is not converted (setup.sh converts it)")
    code = ("import sys, mlx_kvq; mlx_kvq.load(); "
            "print(sorted(m for m in sys.modules if m.startswith(%r)))" % (TOOLS,))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_the_kernel_supports_what_specs_allow():
    """kernels.py depends on MLX alone, so it states what the Metal kernel
    implements itself; that must stay within what a spec can ask for."""
    from mlx_kvq import kernels, spec

    assert set(kernels.SUPPORTED_BITS) <= set(spec.VALID_BITS) - {16}
    assert set(kernels.SUPPORTED_GROUP_SIZES) <= set(spec.VALID_GROUPS)
    graph = import_graph()
    assert not [m for m in graph["mlx_kvq.kernels"] if m != "mlx_kvq.metal_emu"]
