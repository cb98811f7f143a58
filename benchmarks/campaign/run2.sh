#!/usr/bin/env bash
# Device campaign 2 for issue 17 (after run2.sh): the final figures of items 1 and 4, each process
# alone on the host (run 1 showed a 1-GPU job slowed ~10% by a neighbour job on the other GPU).
#   today    = the train stage before this branch (baseline/: stages/ at ce87c8f, same benchmark harness)
#   new      = this branch (token-balanced sampler, no per-step loss sync)
# Phases, one after the other:
#   T1 today 24gb, 1 GPU     T2 today reference, 1 GPU
#   N1 new 24gb, 1 GPU       N2 new 24gb, DDP on 2 GPUs      R1 new 24gb on real text lengths, 1 GPU
# Usage there: bash benchmarks/campaign/run2.sh   (OUT=<dir> for the results; wheels installed first)
set -u
RUN=run2
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
bench baseline T1-24gb 170 --profiles 24gb --timing --label today; pack
bench baseline T2-ref 110 --profiles reference --label today; pack
bench . N1-24gb 160 --profiles 24gb --timing --label new; pack
bench . N2-ddp 160 --profiles 24gb --gpus 2 --timing --label new; pack
bench . R1-real 130 --profiles 24gb --lengths benchmarks/data/stdlib-row-lengths.json --label real; pack
say "done"
python3 benchmarks/campaign/summary.py "$R" | tee -a "$LOG"
pack
