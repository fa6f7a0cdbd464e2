"""Print the [[run]] entries of held-out set 5 (benchmarks/llm_foundry_a100_2023.toml) from a clone of MosaicML
llm-foundry: every 2,048-token row of the README's two A100 tables at commit b2a43a147, each model's shape from that
commit's yamls. No row is chosen by hand; the file's header (family, assumptions) is kept by hand.

    python scripts/llm_foundry_rows.py PATH_TO_LLM_FOUNDRY_CLONE > rows.toml
"""

import subprocess
import sys

COMMIT = "b2a43a147"
TABLES = {"A100 80GB": "A100-80GB", "A100 40GB": "A100-40GB"}
SIZES = ("125m", "350m", "760m", "1b", "3b", "7b", "13b", "30b", "70b")


def show(repo: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{COMMIT}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def shape(yaml: str) -> tuple[int, int, int]:
    """(n_layers, n_heads, d_model) of an MPT pretraining yaml."""
    def get(key):
        return int(next(l.split(":")[1].split("#")[0] for l in yaml.splitlines() if l.strip().startswith(key + ":")))
    return get("n_layers"), get("n_heads"), get("d_model")


def rows(readme: str) -> list[tuple[str, list[str]]]:
    """(table, cells) of every 2,048-token row of the A100 tables."""
    out, table = [], None
    for line in readme.splitlines():
        if line.startswith("## "):
            table = next((t for t in TABLES if line.startswith("## " + t)), None)
        elif table and line.startswith("|  ") and line.split("|")[1].strip()[:1].isdigit():
            cells = [x.strip() for x in line.split("|")[1:-1]]
            if int(cells[1]) == 2048:
                out.append((table, cells))
    return out


def entry(table: str, cells: list[str], shapes: dict, twin: bool) -> str:
    m, _, gpus, _, _, _, _, mb, accum, gbs, _, _, tpsg, _, prec, mp, shard, ckpt, offload, nparams = cells
    assert offload == "False" and shard in ("FULL_SHARD", "SHARD_GRAD_OP"), cells
    n_layer, n_head, n_embd = shapes[m]
    name = f"MPT-{m} {gpus} GPUs {table.split()[1]}" + (f" micro-batch {mb}" if twin else "")
    return f'''[[run]]
name = "{name}"
family = "llm-foundry-a100-2023"
set = "held-out"
source = "MosaicML llm-foundry {COMMIT} (the rows unchanged to 5e85bd62d), scripts/train/benchmarking/README.md, {table} (RoCE) table, mpt-{m} 2048 {gpus} GPUs micro-batch {mb} x {accum} (NumParams {nparams}; {prec}, {mp}, {shard})"
gpu = "{TABLES[table]}"
dtype = "bf16"
model = {{ n_layer = {n_layer}, n_head = {n_head}, n_embd = {n_embd} }}
plan = "dp={gpus},zero={3 if shard == 'FULL_SHARD' else 2}"
micro_batch = {mb}
global_batch = {gbs}
recompute = "{'full' if ckpt == 'True' else 'none'}"
grad_bytes = {2 if mp == 'PURE' else 4}
published = {{ tokens_per_s_per_gpu = {tpsg} }}
'''


def main(repo: str) -> None:
    shapes = {m: shape(show(repo, f"scripts/train/yamls/pretrain/mpt-{m}.yaml")) for m in SIZES}
    found = rows(show(repo, "scripts/train/benchmarking/README.md"))
    same = lambda t, c: sum(1 for t2, c2 in found if t2 == t and c2[0] == c[0] and c2[2] == c[2])
    print("\n".join(entry(t, c, shapes, same(t, c) > 1) for t, c in found), end="")


if __name__ == "__main__":
    main(sys.argv[1])
