#!/usr/bin/env bash
# The GPU checks the README lists as not yet run, in one command, for a machine with a CUDA GPU:
#
#     bash scripts/gpu_checks.sh [OUT_DIR]      (default: benchmarks)
#
# 1. `minigpt bench hardware --sweep`: this GPU's measured bf16/fp32 matmul peaks, copy bandwidth and the
#    bf16 GEMM curve over 180 shapes, the norm / activation passes and attention, then `minigpt backtest
#    --hardware` on it (the step-time model with measured GEMMs, passes and attention for the runs on this
#    GPU; an H200's curve also for the H100 runs' GEMMs, the same die) beside the cited rates;
# 2. scripts/bench_train.py on GPT-2 small (124M, bf16, T = 1024, micro-batch 16): minigpt compiled
#    and eager beside the SDPA baseline, tokens/s and MFU against the datasheet's dense bf16 peak
#    and the measured one (the target: >= 45% MFU compiled);
# 3. scripts/bench_generate.py on GPT-2 small, bf16, batch 1 and 8: decode tokens/s eager and
#    compiled (CUDA graphs), and the fraction of the HBM-bandwidth bound;
# 4. `minigpt bench decode --compile`: the decode curve (JSON + PNG) over batch sizes.
# Every result names the device; files are named after it (e.g. *_h100.jsonl).
set -euo pipefail
out=${1:-benchmarks}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device: these are the GPU checks; run them on a machine with a GPU" >&2
    exit 2
fi
mkdir -p "$out"
dev=$(python -c "import re, torch; n = torch.cuda.get_device_name(); m = re.search(r'[A-Z]\d{2,4}', n); print((m.group(0) if m else 'gpu').lower())")
echo "device: $(python -c 'import torch; print(torch.cuda.get_device_name())') -> *_$dev.*" >&2
minigpt bench hardware --sweep --out "$out/bench_hardware_$dev.json"
if minigpt backtest --hardware "$out/bench_hardware_$dev.json" --markdown > "$out/backtest_measured_$dev.md"; then
    tail -8 "$out/backtest_measured_$dev.md"
else
    echo "backtest --hardware: no published run on this GPU (see the error above); the sweep is kept" >&2
    rm -f "$out/backtest_measured_$dev.md"
fi
python scripts/bench_train.py --config gpt2-small --steps 20 --warmup 3 --set train.micro_batch_size=16 \
    --peak-from "$out/bench_hardware_$dev.json" | tee -a "$out/bench_train_gpt2_small_$dev.jsonl"
python scripts/bench_generate.py --config gpt2-small --dtype bf16 --batch 1 --batch 8 \
    | tee -a "$out/bench_generate_gpt2_small_$dev.jsonl"
minigpt bench decode --config gpt2-small --dtype bf16 --compile --out "$out/decode_curve_gpt2_small_$dev.json"
# minigpt serve against transformers serve --continuous-batching on the same export, both on the GPU (fp32), on a
# 6 x 384 run trained briefly here (docs/serve.md: "Against transformers serve")
minigpt train --config tiny --set model.n_layer=6 --set model.n_head=6 --set model.n_embd=384 --set model.block_size=512 \
    --set train.max_steps=30 --set train.micro_batch_size=4 --set train.batch_size_tokens=2048 \
    --set train.out_dir="\"$out/serve-6x384_$dev\"" > /dev/null
python scripts/bench_serve_peer.py --run "$out/serve-6x384_$dev" --device cuda --rounds 3 --out "$out/bench_serve_peer_$dev.jsonl"
rm -rf "$out/serve-6x384_$dev"
# the experts as grouped GEMMs against the loop over experts (model.moe_grouped_mm), bf16
python scripts/bench_moe.py --device cuda --n-embd 1024 --n-expert 8 --k 2 --tokens 16384 --out "$out/bench_moe_$dev.jsonl"
# 5. with two or more GPUs: the collectives' bus bandwidth (bench hardware --collectives) and the pipeline bubble on NCCL ranks (scripts/bench_pipeline.py runs gloo on the
#    CPU; on GPUs, a pipelined training run of GPT-2 small over 2 ranks records its step time instead)
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    torchrun --standalone --nproc_per_node "$(python -c 'import torch; print(torch.cuda.device_count())')" \
        -m minigpt bench hardware --collectives --out "$out/bench_collectives_$dev.json"
    torchrun --standalone --nproc_per_node 2 -m minigpt train --config gpt2-small --plan pp=2 \
        --set train.max_steps=20 --set train.micro_batch_size=4 --set train.batch_size_tokens=65536 \
        --set train.out_dir="\"$out/pp2_$dev\"" --set train.eval_every=0 --set train.sample_every=0 \
        --set data.source=stdlib | tail -3
else
    echo "pipeline check skipped: it needs 2 CUDA devices (NCCL cannot put two ranks on one GPU)" >&2
fi
