"""Dependencies point one way: torch-free config at the bottom, the model, data and runtime
plumbing, then training and generation, the CLI on top. Nothing in minigpt imports scripts/."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "minigpt"

# a module may import only modules of a strictly lower rank
RANK = {
    "errors": 0,
    "config": 1, "hardware": 1, "torch_private": 1,
    "flops": 2,
    "memory": 3, "model": 3,
    "extrapolate": 4,
    "optim": 4, "data": 4, "checkpoint": 4, "distributed": 4, "zero": 4,
    "measure": 5, "bench": 5, "generate": 5,
    "report": 6, "sweep": 6,
    "train": 7,
    "cli": 8,
}
TORCH_FREE = ["minigpt.errors", "minigpt.config", "minigpt.flops", "minigpt.memory", "minigpt.hardware", "minigpt.extrapolate"]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "minigpt":
                names.update(f"minigpt.{a.name}" for a in node.names)
    return names


def test_every_module_has_a_rank():
    modules = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert modules == set(RANK), f"give new modules a rank: {modules ^ set(RANK)}"


def test_imports_point_down():
    for path in PKG.glob("*.py"):
        if path.stem == "__init__":
            continue
        for name in imports_of(path):
            assert not name.startswith("scripts"), f"{path.name} imports {name}"
            if name.startswith("minigpt."):
                dep = name.split(".")[1]
                assert RANK[dep] < RANK[path.stem], f"{path.stem} (rank {RANK[path.stem]}) imports {dep} (rank {RANK[dep]})"


def test_bottom_layer_does_not_import_torch():
    code = "import sys; " + "; ".join(f"import {m}" for m in TORCH_FREE) + "; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_deepspeed_is_imported_in_one_module_only():
    importers = {p.stem for p in PKG.glob("*.py") if any(n.split(".")[0] == "deepspeed" for n in imports_of(p))}
    assert importers == {"zero"}
    code = "import sys, minigpt.train, minigpt.cli; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # imported lazily, only when the deepspeed backend is used
