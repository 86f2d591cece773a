#!/usr/bin/env bash
# Issue 16 on a 2-GPU machine: the decode check of scripts/multi_gpu_check.py (FP8 KV cache and int8 Q.K,
# prefill + 64 teacher-forced decode steps, split vs one GPU next to the bf16 pair) under tp_plan="auto"
# and device_map="auto", in one device call of under 10 minutes.
# Usage (device run, from the repo root; carry [".whl"] to run the FA3 prefill, else triton prefills):
#   bash scripts/multi_gpu_run.sh [S ...]       # prompt lengths, default 4096 32768
# MULTI_GPU_EXTRA_ARGS adds arguments to every multi_gpu_check call (e.g. a smaller model: "--layers 2").
# Steps, each a separate process with its own log under $OUT (or ./multi_gpu_out), each cut short by a
# shared deadline (MULTI_GPU_BUDGET_S, default 560 s):
#   tp              torchrun 2 ranks, --kv-cache fp8 --qk-format int8 (both modes, one model load)
#   device_map_int8 / device_map_fp8_cache   one process each (a CUDA fault in one keeps the other's table)
#   device_map_fp8_cache_pinned              only when device_map_fp8_cache did not pass: the same with
#                   --pin-device (each layer's GPU current while it runs), which tells a numerics problem
#                   from a kernel launched on the wrong GPU
# Never reinstalls torch; NVLink multicast stays off.
set -uo pipefail
start=$(date +%s)
budget=${MULTI_GPU_BUDGET_S:-560}
out=${OUT:-multi_gpu_out}
mkdir -p "$out"
seqs=${*:-4096 32768}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# NVLink multicast must stay off on the lent multi-GPU machines (KINDS.md); nothing is downloaded
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import torch, triton, transformers, importlib.util
print("devices:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(), "SM", torch.cuda.get_device_capability())
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("flash_attn_interface (FA3):", importlib.util.find_spec("flash_attn_interface") is not None)
PY
nvidia-smi topo -m > "$out/topo.txt" 2>&1
common=(--seqlens $seqs --decode-steps 64 --warmup-steps 8 --workdir /tmp/hfa_multi_gpu_decode_model
        ${MULTI_GPU_EXTRA_ARGS:-})
status=0
step() {  # step NAME CAP_S CMD...: run under what is left of the budget (at most CAP_S), log to $out/NAME.log
  local name=$1 cap=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  (( left < cap )) && cap=$left
  if (( cap < 30 )); then echo "multi_gpu_run: $name skipped (budget spent)" | tee "$out/$name.log"; status=1; return; fi
  echo "=== $name (limit ${cap}s): $*"
  timeout --kill-after=10 "$cap" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v -e "Loading weights" -e "Writing model shards" "$out/$name.log" | tail -n 12
  echo "=== $name: rc=$rc, $(( $(date +%s) - start ))s since start"
  [ "$rc" -eq 0 ] || status=1
  return $rc
}
step tp 300 python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/multi_gpu_check.py \
  --mode tp --kv-cache fp8 --qk-format int8 "${common[@]}"
step device_map_int8 150 python3 scripts/multi_gpu_check.py --mode device_map --qk-format int8 "${common[@]}"
if ! step device_map_fp8_cache 150 python3 scripts/multi_gpu_check.py --mode device_map --kv-cache fp8 "${common[@]}"; then
  step device_map_fp8_cache_pinned 150 python3 scripts/multi_gpu_check.py --mode device_map --kv-cache fp8 \
    --pin-device "${common[@]}"
fi
echo
echo "### summary"
for name in tp device_map_int8 device_map_fp8_cache device_map_fp8_cache_pinned; do
  f=$out/$name.log
  [ -f "$f" ] || continue
  echo "--- $(basename "$f")"
  grep -h -e "^# " -e "^devices of" -e "^fp8-cache: " -e "^int8: " -e "rank [0-9]:" -e "^| " -e "S=[0-9]*: 1-cos" \
    -e "^multi_gpu_check" -e "Error" -e "error:" "$f" | head -n 40
done
echo "multi_gpu_run: $([ $status -eq 0 ] && echo PASS || echo FAIL) ($(( $(date +%s) - start ))s)"
exit $status
