"""Imports point one way: the front ends, the launchers and the build tool on top, the runtime's
core below them, config and engine-format types at the bottom; and no module imports itself
back through others. Read from the source with `ast`, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dist_runtime", "sharding", "launch")

# Paths from the repository root; one ending in "/" stands for every module under it.
TOP = [
    "dist_runtime/__init__.py",  # the public API: LLM
    "dist_runtime/llm.py",  # picks a launcher
    "dist_runtime/engine_cache.py",  # builds a model's engine on first use
    "dist_runtime/cli.py",
    "dist_runtime/server/",
    "dist_runtime/bench.py",
    "dist_runtime/bench_http.py",
    "dist_runtime/gpu_clocks.py",
    "dist_runtime/demo.py",
    "dist_runtime/accuracy.py",
    "dist_runtime/plan_report.py",
    "launch/",
    "sharding/",  # the build tool: it reads the runtime's models; the runtime never reads it
]
CORE = [
    "dist_runtime/coordinator.py",
    "dist_runtime/engine_loop.py",
    "dist_runtime/scheduler.py",
    "dist_runtime/block_manager.py",
    "dist_runtime/sequence.py",
    "dist_runtime/model_runner.py",
    "dist_runtime/cuda_graphs.py",
    "dist_runtime/sampler.py",
    "dist_runtime/tuning.py",
    "dist_runtime/executor.py",  # the interface the launchers implement
    "dist_runtime/worker.py",
    "dist_runtime/world.py",
    "dist_runtime/liveness.py",
    "dist_runtime/tokenizer.py",
    "dist_runtime/detokenizer.py",
    "dist_runtime/models/",
    "dist_runtime/layers/",
    "dist_runtime/kernels/",
    "dist_runtime/comm/",
]
BOTTOM = [
    "dist_runtime/config.py",
    "dist_runtime/runtime_config.py",
    "dist_runtime/records.py",
    "dist_runtime/presets.py",
    "dist_runtime/plan.py",
    "dist_runtime/engine.py",
    "dist_runtime/quantization.py",
    "dist_runtime/int4.py",
    "dist_runtime/errors.py",
    "dist_runtime/sampling_params.py",
    "dist_runtime/step.py",
    "dist_runtime/mapping.py",
    "dist_runtime/outputs.py",
    "dist_runtime/rank_info.py",
    "dist_runtime/logs.py",
]
LAYERS = {"top": TOP, "core": CORE, "bottom": BOTTOM}  # from the top down


def holds(entry: str, path: str) -> bool:
    return path == entry or (entry.endswith("/") and path.startswith(entry))


def module_paths() -> dict[str, str]:
    """Dotted module name -> its path from the repository root."""
    modules = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            parts = path.removesuffix(".py").split("/")
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_paths()


def layer_of(path: str) -> str:
    found = [name for name, entries in LAYERS.items() for entry in entries if holds(entry, path)]
    assert len(found) == 1, f"{path} is in {found or 'no layer'}: put it in one of TOP, CORE, BOTTOM"
    return found[0]


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Our modules that the statement loads (a name imported from a package may be a submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].endswith("__init__.py") else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module and name not in found:
            found.append(name)
    return found


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, whether it runs when `module` is imported) for every import
    statement of `module`: those inside a function run only when it is called."""
    found = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, child.lineno, not in_function) for target in _resolve(module, child))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse((ROOT / MODULES[module]).read_text()), False)
    return found


EDGES = {module: _imports(module) for module in MODULES}


def test_every_module_is_in_exactly_one_layer():
    for path in MODULES.values():
        layer_of(path)
    for name, entries in LAYERS.items():
        for entry in entries:
            assert any(holds(entry, path) for path in MODULES.values()), f"{name} lists {entry}, which holds no module"


def test_imports_point_down_the_layers():
    order = list(LAYERS)
    upward = []
    for module, imports in EDGES.items():
        here = layer_of(MODULES[module])
        for target, line, _ in imports:
            there = layer_of(MODULES[target])
            if order.index(there) < order.index(here):
                upward.append(f"{MODULES[module]}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_a_package_loads_nothing_above_its_modules():
    """Importing a module runs its packages' __init__ first: one that imported a higher layer at
    module level would load that layer under every module of the package (sbatch's preflight,
    which imports launch.rank_info alone, once failed on such a cycle)."""
    order = list(LAYERS)
    for package, path in MODULES.items():
        if not path.endswith("__init__.py"):
            continue
        lowest = max(order.index(layer_of(p)) for m, p in MODULES.items() if m.startswith(package + "."))
        for target, line, at_module_level in EDGES[package]:
            assert not at_module_level or order.index(layer_of(MODULES[target])) >= lowest, \
                f"{path}:{line} imports {target} at module level, above {order[lowest]} modules of {package}"


def test_no_module_imports_itself_back():
    graph = {module: sorted({target for target, _, _ in imports}) for module, imports in EDGES.items()}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for target in graph[module]:
            visit(target, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles)


def test_every_module_imports():
    """The fast tier loads every module at least: one that cannot even import fails here, not in
    a slow test or on a GPU. Modules of the GPU extra (CuPy) are skipped where it is missing. In
    a process of its own: importing mpi4py starts MPI."""
    import subprocess
    import sys

    script = (
        "import importlib, importlib.util, sys\n"
        "for module in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "    except ImportError as e:\n"
        "        if not (e.name == 'cupy' and importlib.util.find_spec('cupy') is None):\n"
        "            print(f'{module}: {e}')\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *sorted(MODULES)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0 and not out.stdout, out.stdout + out.stderr[-3000:]
