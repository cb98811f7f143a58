#!/usr/bin/env bash
# Device campaign 4 for issue 17 (run3.sh's FSDP phase again, after its config fix): the largest base
# FSDP trains on 2 GPUs under a 24 GiB cap each, Llama-2-70B shapes; Llama-2-13B if that fails.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
R=$OUT/results
mkdir -p "$R" "$OUT/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation under the cap
LOG=$OUT/log.txt
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
pack() { tar -czf "$OUT/run4.tar.gz" -C "$OUT" results log.txt logs 2>/dev/null; }
FSDP=(--workdir /tmp/kb --out "$R" --gpus 2 --memory-cap-gib 24 --profiles 24gb-fsdp --label fsdp --steps 4 --warmup 2)
bench() {  # bench LOGNAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  timeout -k 5 "$limit" python3 benchmarks/train_throughput.py "${FSDP[@]}" --timeout $((limit - 10)) "$@" \
    >"$OUT/logs/$name.log" 2>&1
  say "$name rc=$?: $(grep -E 'tok/s' "$OUT/logs/$name.log" | tail -n 2)"
}
bench F1-70b "${LIMIT_70B:-175}" --shape llama2-70b --steps 3 --warmup 1; pack
if ! grep "tok/s" "$OUT/logs/F1-70b.log" | grep -qv error; then
  grep -E "Error|error" "$OUT/logs/F1-70b.log" | grep -v Warning | tail -n 5 | tee -a "$LOG"
  left=$(( ${BUDGET_S:-235} - ($(date +%s) - T0) ))
  [ "$left" -gt 40 ] && bench F2-13b "$left" --shape llama2-13b; pack
fi
grep -E "peak|tokens_per_s|mfu|error" "$R"/*.json | tee -a "$LOG"
pack
