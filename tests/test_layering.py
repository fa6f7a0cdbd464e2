"""The package's bands, as folders: imports point down a band or stay inside one, never up, and no import
cycle anywhere. The bottom bands import no torch; DeepSpeed, FSDP2 and DTensor's styles are named in the
parallel band only; no module outside it branches on a backend's name; functions stay short."""

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "minigpt"

# bottom to top: a module may import modules of its own band or of a lower one
BANDS = [
    ("core", "analytic"),  # torch-free: config, plan, errors, formats, hardware; formulas, extrapolation
    ("nn", "data"),  # the model and its ops; corpus -> tokens -> batches
    ("parallel",),  # plan applied: torchrun, parallelize, backends
    ("run",),  # a run directory read and verified (load_run): below everything that reads runs
    ("interop",),  # Hugging Face folders <-> runs
    ("infer",),  # generation, serving, evaluation
    ("measure",),  # counted FLOPs, tracked memory, simulated ranks, benchmarks of the parts
    ("train",),  # the loop, checkpointer, metrics
    ("apps",),  # orchestration reusable from Python: quickstart, experiments that train, benchmarks assembled
    ("cli", "commands", "__main__"),  # flags and dispatch
]
BAND = {name: i for i, names in enumerate(BANDS) for name in names}
TORCH_FREE_BANDS = ("core", "analytic")
BACKEND_NAMES = {"ddp", "fsdp", "deepspeed"}


@functools.cache
def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("minigpt",) + parts)] = path
    return out


def band_of(module: str) -> int:
    """A package's `__main__` (`python -m minigpt.train`) is an entry point: the top band, like the CLI."""
    return BAND["__main__"] if module.endswith(".__main__") else BAND[module.split(".")[1]]


@functools.cache
def imports_of(path: Path) -> frozenset[str]:
    """Every minigpt module a file imports, at any depth (`from minigpt.x import y` counts y when y is a
    module)."""
    names = set()
    known = modules()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports name types for annotations; nothing runs them
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return frozenset(names)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def test_every_module_is_in_a_band():
    for name in modules():
        if name != "minigpt":
            assert name.split(".")[1] in BAND, f"{name} is in no band: add its folder to BANDS"


def test_imports_point_down_or_stay_in_their_band():
    for name, path in modules().items():
        if name == "minigpt":
            continue
        for dep in imports_of(path):
            assert not dep.startswith("scripts"), f"{name} imports {dep}"
            if dep.startswith("minigpt.") and dep in modules():
                assert band_of(dep) <= band_of(name), f"{name} (band {band_of(name)}) imports {dep} (band {band_of(dep)})"


def test_there_is_no_import_cycle():
    known = modules()
    graph = {n: {d for d in imports_of(p) if d in known and d != n and d != "minigpt"} for n, p in known.items()}
    state: dict[str, int] = {}

    def visit(n, trail):
        if state.get(n) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(n):] + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in sorted(graph[n]):
            visit(d, trail + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])


def test_the_bottom_bands_do_not_import_torch():
    names = [n for n in modules() if n.split(".")[1:2] and n.split(".")[1] in TORCH_FREE_BANDS]
    code = "import sys; " + "; ".join(f"import {m}" for m in names) + "; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("argv", [
    ["extrapolate", "--target", "gpt3-175b", "--json"],
    ["extrapolate", "--target", "gpt4", "--gpu", "H100", "--serve", "--markdown"],
    ["memory", "--params", "7.5e9", "--dp", "64"],
    ["flops", "--help"],
    ["train", "--help"],
])
def test_analytic_commands_do_not_import_torch(argv):
    code = ("import sys\nfrom minigpt.cli import main\ntry:\n    rc = main(%r)\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('torch' in sys.modules, rc, file=sys.stderr)" % argv)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stderr.strip().splitlines()[-1] in ("False 0", "False None"), r.stderr[-2000:]


def test_deepspeed_is_imported_in_its_backend_only():
    importers = {n for n, p in modules().items() if any(d.split(".")[0] == "deepspeed" for d in imports_of(p))}
    assert importers == {"minigpt.parallel.zero"}
    code = "import sys, minigpt.train.loop, minigpt.cli; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # imported lazily, only when the deepspeed backend is used


def test_fsdp_and_tensor_parallel_are_applied_in_the_parallel_band_only():
    """FSDP2 and DTensor's parallel styles are applied to the model from outside, by the parallel band."""
    names = ("torch.distributed.fsdp", "torch.distributed.tensor.parallel")
    users = {n for n, p in modules().items() if any(d.startswith(names) for d in imports_of(p))}
    assert users and all(n.startswith("minigpt.parallel.") for n in users), users
    assert "fsdp" not in (PKG / "nn" / "model.py").read_text().lower()


def test_no_module_outside_the_parallel_band_branches_on_a_backend():
    """Which backend runs is the parallel band's business: elsewhere no comparison with a backend's name (or
    with a `.backend` attribute), no lookup table keyed by one, no isinstance test of a backend class."""
    for name, path in modules().items():
        if name.startswith("minigpt.parallel."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
                text = ast.unparse(node)
                assert not names & BACKEND_NAMES and ".backend" not in text, f"{name} compares {text!r}"
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                assert not keys & BACKEND_NAMES, f"{name} keys a table by backend: {ast.unparse(node)[:80]}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                assert "Backend" not in ast.unparse(node), f"{name}: {ast.unparse(node)}"


def test_no_function_is_over_60_lines():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= 60, f"{name}:{node.name} is {lines} lines"
