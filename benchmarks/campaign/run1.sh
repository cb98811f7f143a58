#!/usr/bin/env bash
# Device campaign 1 for issue 17, on a 2-GPU H200 host (device kind nvidia-h200-x2), one call:
# where DDP's time goes today and with the fix, and the one-GPU candidates, all in one run.
#   today    = the train stage before this branch (baseline/: stages/ at ce87c8f, same benchmark harness)
#   new      = this branch (token-balanced sampler, no per-step loss sync)
# Phases (each under its own timeout; results are packed after every phase):
#   A  1 GPU each, side by side:  new 24gb (GPU 0) | new 24gb-fused (GPU 1)
#   E  2 GPUs, DDP:               new 24gb, per-rank timing
#   C  1 GPU each, side by side:  today 24gb (GPU 0) | today reference (GPU 1)
#   F  2 GPUs, DDP:               today 24gb, per-rank timing
# Usage there: bash benchmarks/campaign/run1.sh   (OUT=<dir> for the results; wheels installed first)
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
R=$OUT/results
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG=$OUT/log.txt
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
pack() { tar -czf "$OUT/run1.tar.gz" -C "$OUT" results log.txt logs 2>/dev/null; }
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

say "A: new 24gb (GPU0) | new 24gb-fused (GPU1)"
bench . A-24gb 200 --profiles 24gb --first-gpu 0 --timing --label new&
bench . A-fused 200 --profiles 24gb-fused --first-gpu 1 --timing --label new&
wait; pack

say "E: new 24gb, DDP on 2 GPUs"
bench . E-ddp 200 --profiles 24gb --gpus 2 --timing --label new
pack

say "C: today 24gb (GPU0) | today reference (GPU1)"
bench baseline C-24gb 200 --profiles 24gb --first-gpu 0 --timing --label today&
bench baseline C-ref 200 --profiles reference --first-gpu 1 --label today&
wait; pack

say "F: today 24gb, DDP on 2 GPUs"
bench baseline F-ddp 180 --profiles 24gb --gpus 2 --timing --label today
pack

say "done"
python3 benchmarks/campaign/summary.py "$R" | tee -a "$LOG"
pack
