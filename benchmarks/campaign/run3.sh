#!/usr/bin/env bash
# Device campaign 3 for issue 17: multi-node over loopback (item 3), VRAM points (issue 14), and the
# largest base FSDP trains on 2 GPUs under a 24 GiB cap each (item 2), each phase under its own limit.
#   today    = the train stage before this branch (baseline/: stages/ at ce87c8f, same benchmark harness)
#   new      = this branch (token-balanced sampler, no per-step loss sync)
# Phases:
#   F1 FSDP, Llama-2-70B shapes (random NF4 base written layer by layer), 24 GiB cap per GPU;
#      if it fails, F2 the same at Llama-2-13B shapes
#   M1 2 one-GPU "nodes" (torchrun rendezvous on 127.0.0.1), 24gb, batch 40 each, per-rank timing
#   M2 1 GPU at batch 80, the same global batches (GPU 0) | V1/V2 VRAM points (GPU 1, not timed)
# Usage there: bash benchmarks/campaign/run3.sh   (OUT=<dir> for the results; wheels installed first)
set -u
RUN=run3
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
R=$OUT/results
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG=$OUT/log.txt
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
pack() { tar -czf "$OUT/$RUN.tar.gz" -C "$OUT" results log.txt logs 2>/dev/null; }
mkdir -p "$OUT/logs"
SHAPE=${SHAPE:-mistral-7b}  # SHAPE=tiny EXTRA='...' dry-runs this script on a CPU
read -r -a EXTRA <<<"${EXTRA:-}"
COMMON=(--workdir /tmp/kb --steps 30 --warmup 3 --out "$R" --shape "$SHAPE" "${EXTRA[@]}")
bench() {  # bench TREE LOGNAME SECONDS ARGS...: the benchmark of TREE (. or baseline), log in logs/
  local tree=$1 name=$2 limit=$3; shift 3
  (cd "$tree" && timeout -k 10 "$limit" python3 benchmarks/train_throughput.py "${COMMON[@]}" \
    --timeout $((limit - 15)) "$@") >"$OUT/logs/$name.log" 2>&1
  say "$name rc=$?: $(grep -E 'tok/s' "$OUT/logs/$name.log" | tail -n 2)"
}
{ nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv; nvidia-smi topo -m; nproc; free -g; } >>"$LOG" 2>&1
python3 -c "import torch, transformers, trl, peft, bitsandbytes; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, bitsandbytes.__version__)" >>"$LOG" 2>&1

say "prepare: random Mistral-7B (bf16) and tokenizer"
timeout 240 python3 benchmarks/train_throughput.py --workdir /tmp/kb --shape "$SHAPE" --prepare-only >"$OUT/logs/prepare.log" 2>&1
say "prepare rc=$?"; pack
FSDP=(--gpus 2 --memory-cap-gib 24 --profiles 24gb-fsdp --label fsdp --steps 4 --warmup 2)
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation under the cap
bench . F1-70b 230 "${FSDP[@]}" --shape llama2-70b; pack
if ! grep "tok/s" "$OUT/logs/F1-70b.log" | grep -qv error; then  # the next size down, if time allows
  bench . F2-13b 90 "${FSDP[@]}" --shape llama2-13b; pack
fi
unset PYTORCH_CUDA_ALLOC_CONF
STEPS=(--steps 15 --warmup 2)
bench . M1-nodes 110 --profiles 24gb --nodes 2 --timing --label nodes "${STEPS[@]}"; pack
bench . M2-b80 140 --profiles 24gb --set training.batch_size=80 --label b80 "${STEPS[@]}" &
( bench . V1-vram 70 --profiles vram-b16-ckpt --first-gpu 1 --steps 2 --warmup 1 --label vram
  bench . V2-vram 70 --profiles vram-b8-nockpt --first-gpu 1 --steps 2 --warmup 1 --label vram ) &
wait; pack
say "done"
python3 benchmarks/campaign/summary.py "$R" | tee -a "$LOG"
pack
