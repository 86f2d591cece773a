#!/usr/bin/env bash
# GPU check for a lent H100: install the carried FA3 wheel, run the GPU tests, print the speed tables.
# Usage (device run, from the repo root, with carry [".whl"], or [".fa3"]: the wheel's files re-packed as
# .fa3/fa3.tar.xz, which leaves room in the 64 MiB a call may carry):
#   bash scripts/gpu_check.sh            # tests + one-layer speed table (issue acceptance)
#   bash scripts/gpu_check.sh --tests    # only the GPU tests; --bench: only the one-layer speed table
#                                        # (the two halves of the default, for calls under 10 minutes)
#   bash scripts/gpu_check.sh --full     # + quantize modes, accuracy report (S=4096, H=32), mode costs
#   bash scripts/gpu_check.sh --model    # end-to-end Llama-3-8B-shaped prefill benchmark only
#   bash scripts/gpu_check.sh --table    # only the triton backend's table (D 64/128/256, S 1k..64k)
#   bash scripts/gpu_check.sh --triton   # triton/varlen/block-scale GPU tests, block-scale accuracy and cost
#   bash scripts/gpu_check.sh --cache    # FP8 KV cache, speed table and centring GPU tests, decode step on the
#                                        # acceptance shapes, end-to-end generate (B 1/8, 4k/32k), mode costs
#   bash scripts/gpu_check.sh --numerics # accuracy-mode GPU tests, mode costs at 16k, int8 vs e4m3 speed,
#                                        # long-context accuracy (fa3, triton)
#   bash scripts/gpu_check.sh --centring # centring GPU tests, mode costs at 16k, long-context accuracy of qk and
#                                        # qk+smooth_v (fa3, triton)
#   bash scripts/gpu_check.sh --decode   # FP8 cache + CUDA-graph GPU tests, decode step graph-timed with the
#                                        # DECODE_PRESETS next to the default (1x4k, 1x128k, 8x32k)
#   bash scripts/gpu_check.sh --generate # end-to-end generate B=8 x 32k: bf16 FA3, the FP8 cache's default and
#                                        # its "tma" preset, 2 interleaved rounds (the host drifts; eager: host
#                                        # cost included)
#   bash scripts/gpu_check.sh --static   # FP8StaticCache GPU tests; --static-bench: compiled generate (static
#                                        # caches, bf16 sdpa vs fp8; STATIC_BATCHES / STATIC_PROMPTS / STATIC_ROWS
#                                        # (also|only) / STATIC_BF16 (sdpa|flash_attention_3) pick the runs)
#   bash scripts/gpu_check.sh --static-decode  # FP8StaticCache GPU tests, then the decode step graph-timed with
#                                        # the static layer's rows (default, tma, its step) (1x4k, 1x128k,
#                                        # 8x32k)
#   bash scripts/gpu_check.sh --quantize # the quantize kernel's GPU tests; --quantize-bench: its speed (RoPE
#                                        # 4k-64k, accuracy modes at 16k/64k)
#   bash scripts/gpu_check.sh --vblock   # v_scales="block": its GPU tests with the quantize / block / int8 ones,
#                                        # quantize % of copy (RoPE, 16k/64k) and the single-pass kernel's warps;
#                                        # --vblock-bench: triton speed and accuracy with every scale per block
#   bash scripts/gpu_check.sh --rope-tiles  # the q/k RoPE kernel (RoPE + every scale per block): its GPU tests,
#                                        # the tile sweep (bench_quantize --rope-configs) and the modes table
#   bash scripts/gpu_check.sh --ws       # the experimental Gluon kernel: probes (one process each, timeouts),
#                                        # 16k/64k speed, the triton backend's GPU tests through it (GLUON_ROUTE);
#                                        # ROPE_SWEEP=1 adds the q/k RoPE tile sweep at 64k; TRITON_WS=1 adds
#                                        # triton_ws's GPU tests and warp-specialized builds
#   bash scripts/gpu_check.sh --gluon-default  # the Triton backend's default prefill kernel (Gluon at D=128 on
#                                        # Hopper): CUDA-graph replays (GLUON_TESTS=all: its GPU tests too), the
#                                        # persistent build's probes, fp8_triton speed at 16k (GLUON_SDPA=0:
#                                        # without it)
#   bash scripts/gpu_check.sh --gluon-check  # the Gluon kernel: 4k probes vs float32, 16k speed (GLUON_BENCH),
#                                        # the backend's GPU tests, the Triton kernel's, CUDA graphs (GLUON_TESTS=0:
#                                        # not), GLUON_SDPA=1: bench_sdpa 4k-64k, GLUON_MODEL=1: whole model 128k
#   bash scripts/gpu_check.sh --backlog  # q/k RoPE tiles (ROPE_TILES_SWEEP at ROPE_SEQLENS, default 64k; ROPE_TIMING
#                                        # "eager graph") + the second-stream V test, then BACKLOG (default "d64
#                                        # host model"; also "tests": the quantizer's and triton backend's GPU
#                                        # tests, "sdpa": one layer 16k/64k, "gluon64": the Gluon kernel at D=64,
#                                        # probes and one layer per route): one layer at D=64, host time at 4k,
#                                        # the whole model at 128k
#   bash scripts/gpu_check.sh --split    # per-head scales: the split path vs the persistent kernel (bench_quantize
#                                        # --split, eager and graph-timed), their GPU tests; SPLIT_SDPA=1: one
#                                        # layer (GQA 32/8, fp8_fa3, modes none and qk, 4k-64k)
#   bash scripts/gpu_check.sh --pack     # FA3's pack_gqa: probe_fa3 (PACK_SEQLENS), one layer GQA 32/8 (fp8_fa3,
#                                        # modes none and qk, 4k-64k), the fa3 GPU tests and CUDA-graph replays
#   bash scripts/gpu_check.sh --host     # host time of one call (bench_sdpa --host, GQA 32/8, HOST_SEQLENS default
#                                        # 4k 16k, causal, mode qk) with a cProfile of each call's host loop
#                                        # ($OUT/host_profile.txt)
#   bash scripts/gpu_check.sh --fwht     # the Hadamard rotation by the fast transform vs tl.dot (HF_FP8_ATTENTION_HADAMARD
#                                        # fwht / dot, separate processes in turns): quantize modes graph-timed (4k-64k,
#                                        # GQA 32/8), one layer fp8_fa3 (modes none and qk), the rotation's GPU tests;
#                                        # FWHT_PART=check: kernel times per mode (bench_quantize --kernel-times) and
#                                        # the GPU tests of the quantizer, the FP8 cache and centring
#   bash scripts/gpu_check.sh --retune   # the speed table re-measured (tune_dispatch, $OUT/sm90.{json,md}; commit the
#                                        # json as hf_fp8_attention/tables/sm90.json), one layer GQA 32/8 (fp8_fa3, modes
#                                        # none and qk, 8k-64k), host time at 4k with its profile, the randomized GPU tests
#   bash scripts/gpu_check.sh --rowsum   # the Gluon kernel's row sums by MMA (its default since session 25): its GPU
#                                        # tests, the Triton backend's and the CUDA-graph replays, bench_sdpa's
#                                        # kernels alone (GQA 32/8, 16k/64k, 2 rounds), ROWSUM_PROBES: probe_ws A/B
#   bash scripts/gpu_check.sh --vorder   # V in wgmma key order from the quantizer (the Gluon kernel's default route since
#                                        # session 26): its GPU tests, bench_sdpa's kernels alone against the same build on
#                                        # V in key order, the quantizer per layout, fp8_triton (GQA 32/8, 16k/64k)
#   bash scripts/gpu_check.sh --first-call  # session 27: the first call of a new prefill shape with the Gluon kernel's
#                                        # compile-ahead off and on (first_call.py --compile-ahead both --breakdown,
#                                        # FIRST_SEQLENS default 4k 16k, causal, FIRST_ROUNDS default 2 in
#                                        # alternating order) after its GPU test
#   bash scripts/gpu_check.sh --s28      # session 28: the compile-ahead and TMA-store GPU tests, --first-call's
#                                        # first_call, bench_sdpa's TMA/plain-store A/B (TMA_SEQLENS default 4k 16k 64k,
#                                        # causal both) in one call, then the Gluon/wgmma GPU tests (time-boxed)
#   bash scripts/gpu_check.sh --s28-default  # session 28, TMA stores the default: the Gluon/wgmma GPU tests, the
#                                        # first call (compile-ahead on), kernels alone and fp8_triton vs FA3 bf16
#   bash scripts/gpu_check.sh --s28-host # session 28, the Gluon kernel's direct launch: its GPU tests, host us per call
#   bash scripts/gpu_check.sh --s29      # session 29, Q quantized in the Gluon kernel: its GPU tests and the Gluon/
#                                        # sdpa-triton ones (time-boxed), then bench_sdpa's Q-in-kernel A/B (modes none
#                                        # and qk, S29_SEQLENS default 4k 16k 64k, causal both, 2 rounds)
#   bash scripts/gpu_check.sh --s29-model  # session 29: the Q-in-kernel GPU tests, then the whole model at 128k
#                                        # (FA3 bf16, fp8 auto, fp8_triton; --profile's time per kernel kind)
#   bash scripts/gpu_check.sh --ncu      # session 30: Nsight Compute counters of one layer's kernels (ncu_attention.py:
#                                        # FA3 bf16, FA3 fp8, the Gluon kernel with e4m3 Q and with Q quantized inside, the
#                                        # quantizer; NCU_SEQLENS default 16k, NCU_CAUSAL default both, NCU_IMPLS "a|b"
#                                        # picks candidates): $out/ncu_summary.md, the report
#                                        # $out/attn.ncu-rep, per-instruction SASS counters $out/ncu_source.csv (summed
#                                        # by ncu_attention.py --source into $out/ncu_source.md)
#   bash scripts/gpu_check.sh --s30      # session 30, exponentials by a polynomial (routes gluon-pp-persistent-exp2-k):
#                                        # their GPU test, then bench_sdpa's kernels alone (S30_SEQLENS default 4k 16k 64k,
#                                        # causal both, S30_ROUNDS default 3) with the A/B table
#   bash scripts/gpu_check.sh --multi    # 2+ GPUs: multi_gpu_check (tp and device_map, with and without
#                                        # prepare_model); the GPU tests are the default mode's
# Logs go to $OUT (or ./gpu_check_out when OUT is unset). Never reinstalls torch.
set -uo pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
mode=${1:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
elif ls .fa3/*.tar.xz >/dev/null 2>&1; then  # the FA3 wheel's files as an xz tarball: 29 MB instead of 63
  mkdir -p /tmp/site && python3 -c "import sys, tarfile; [tarfile.open(f).extractall('/tmp/site') for f in sys.argv[1:]]" \
    .fa3/*.tar.xz || { echo "FA3 tarball extract failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
# NVLink multicast must stay off on the lent multi-GPU machines
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import torch, triton, transformers, importlib.util
print("device:", torch.cuda.get_device_name(), "SM", torch.cuda.get_device_capability())
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("flash_attn_interface:", importlib.util.find_spec("flash_attn_interface") is not None)
PY
status=0
step() {  # step NAME CMD...: run, log to $out/NAME.log, remember failures
  local name=$1 t0=$SECONDS; shift
  "$@" 2>&1 | tee "$out/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: $name FAILED"; status=1; }
  echo "gpu_check: $name took $((SECONDS - t0)) s"
}
probe() {  # probe LOG LABEL ARGS...: scripts/probe_ws.py in its own process, PROBE_S seconds (default 30)
  local log=$1 label=$2; shift 2
  timeout "${PROBE_S:-30}" python3 scripts/probe_ws.py "$@" > "$out/probe_one.txt" 2>&1
  local rc=$?
  grep -v Warn "$out/probe_one.txt" | tee -a "$log"
  [ $rc -eq 0 ] || echo "$label: rc $rc ($([ $rc -eq 124 ] && echo hang || echo error))" | tee -a "$log"
  return $rc
}
first_call() {  # first_call STEP TIMEOUT_S COMPILE_AHEAD CHILD_TIMEOUT_S: scripts/first_call.py's first call of a new
  # causal GQA 32/8 prefill (FIRST_SEQLENS default 4k 16k, FIRST_ROUNDS default 2, --breakdown), json $out/STEP.json
  step "$1" timeout "${FIRST_S:-$2}" python3 scripts/first_call.py --seqlens ${FIRST_SEQLENS:-4096 16384} \
    --causal yes --heads 32/8 --backend triton --compile-ahead "$3" --rounds "${FIRST_ROUNDS:-2}" --breakdown \
    --timeout "$4" --json "$out/$1.json"
}
kernels_sdpa() {  # kernels_sdpa STEP TIMEOUT_S IMPL...: bench_sdpa on GQA 32/8, TMA_SEQLENS (default 4k 16k 64k), causal
  # both, TMA_ROUNDS rounds (default 2), mode none, json $out/STEP.json
  local name=$1 limit=$2; shift 2
  step "$name" timeout "${SDPA_S:-$limit}" python3 scripts/bench_sdpa.py --kv-heads 8 \
    --seqlens ${TMA_SEQLENS:-4096 16384 65536} --causal both --rounds "${TMA_ROUNDS:-2}" --modes none --sqnr-ref off \
    --rep-ms 100 --impls "$@" --json "$out/$name.json"
}
sqnr_ok() {  # sqnr_ok LOG PATTERN: a finished probe line in LOG matching PATTERN, SQNR >= 30 dB vs the Triton kernel, finite
  grep -F "$2" "$1" | grep "finite: True" \
    | awk -F'SQNR vs triton kernel ' '{split($2, a, " "); if (a[1] == "inf" || a[1] + 0 >= 30) ok = 1} END {exit !ok}'
}
if [ "$mode" = "--multi" ]; then
  nvidia-smi topo -m 2>&1 | tee "$out/topo.txt"
  seqs="4096 16384 32768"
  step tp python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/multi_gpu_check.py --mode tp --seqlens $seqs
  step tp_prepare python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/multi_gpu_check.py --mode tp --prepare --seqlens $seqs
  step device_map python3 scripts/multi_gpu_check.py --mode device_map --seqlens $seqs
  step device_map_prepare python3 scripts/multi_gpu_check.py --mode device_map --prepare --seqlens $seqs
  grep -h -A9 "^# " "$out"/tp.log "$out"/tp_prepare.log "$out"/device_map.log "$out"/device_map_prepare.log
elif [ "$mode" = "--cache" ]; then
  step cache_tests timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_kv_cache_gpu.py \
    tests/gpu/test_speed_table_gpu.py tests/gpu/test_centring_gpu.py tests/gpu/test_models_gpu.py
  step decode_step timeout 80 python3 scripts/bench_decode.py --part attention --shapes 1x4k 1x128k 8x32k \
    --gqa 32/8 --head-dims 128 --sdpa-backends fa3 --out-json "$out/decode_step.json"
  step sdpa_modes timeout 75 python3 scripts/bench_sdpa.py --seqlens 16384 --causal yes --impls fp8_fa3 fp8_triton \
    --modes none smooth_k smooth_k+smooth_v qk --json "$out/sdpa_modes.json"
  step generate timeout 230 python3 scripts/bench_decode.py --part generate --fp8-backend fa3 \
    --out-json "$out/generate.json" --out-png "$out/generate.png"
elif [ "$mode" = "--numerics" ]; then  # accuracy modes: kernels vs reference, costs, int8 speed, long context
  step numerics_tests timeout 260 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_centring_gpu.py \
    tests/gpu/test_quantize_gpu.py tests/gpu/test_int8_qk_gpu.py tests/gpu/test_long_context_gpu.py
  step mode_costs timeout 120 python3 scripts/bench_sdpa.py --seqlens 16384 --causal yes --rounds 3 --sqnr-ref off \
    --impls fp8_fa3 fp8_triton "quantize only" "add-back" \
    --modes none qk smooth_v qk+smooth_v smooth_k+smooth_v qk+smooth_k+smooth_v qkv --json "$out/mode_costs.json"
  step int8_speed timeout 100 python3 scripts/bench_sdpa.py --seqlens 16384 32768 --causal both --rounds 3 \
    --sqnr-ref off --impls fp8_triton --modes none int8 int8+smooth_k --json "$out/int8_speed.json"
  for b in fa3 triton; do
    step "long_context_$b" timeout 100 python3 scripts/accuracy_report.py --seqlens 8192 32768 131072 --heads 8 \
      --backend "$b" --modes none smooth_v qk+smooth_v qk+smooth_k+smooth_v --json "$out/long_context_$b.json"
  done
elif [ "$mode" = "--centring" ]; then  # centring in the quantize pass: its GPU tests, mode costs, long context
  step centring_tests timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_centring_gpu.py \
    tests/gpu/test_quantize_gpu.py tests/gpu/test_long_context_gpu.py
  step mode_costs timeout 100 python3 scripts/bench_sdpa.py --seqlens 16384 --causal yes --rounds 3 --sqnr-ref off \
    --impls fp8_fa3 fp8_triton "quantize only" "add-back" --modes none qk smooth_v qk+smooth_v \
    --json "$out/mode_costs.json"
  for b in fa3 triton; do
    step "long_context_$b" timeout 90 python3 scripts/accuracy_report.py --seqlens 8192 32768 131072 --heads 8 \
      --backend "$b" --modes qk qk+smooth_v --json "$out/long_context_$b.json"
  done
elif [ "$mode" = "--decode" ]; then  # the decode step: cache / CUDA-graph GPU tests, graph-timed presets
  step decode_tests timeout 320 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_kv_cache_gpu.py \
    tests/gpu/test_cuda_graphs_gpu.py
  step decode_graph timeout 200 python3 scripts/bench_decode.py --part attention --timing graph --rounds 3 \
    --shapes 1x4k 1x128k 8x32k --gqa 32/8 --head-dims 128 --sdpa-backends fa3 \
    --cache-configs ${DECODE_CONFIGS:-"s8 default" tma "tma unfused" pdl} \
    --out-json "$out/decode_graph.json"
elif [ "$mode" = "--generate" ]; then  # end to end, B=8 x 32k: bf16 FA3 vs the FP8 cache (default, tma), 2 rounds
  step generate timeout 420 python3 scripts/bench_decode.py --part generate --fp8-backend fa3 --batches 8 \
    --prompts 32768 --modes bf16 fp8_cache --generate-cache-presets tma --generate-rounds 2 \
    --out-json "$out/generate.json"
elif [ "$mode" = "--static" ]; then  # FP8StaticCache: its GPU tests (static layer, CUDA graph, compiled generate)
  step static_tests timeout 400 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_static_cache_gpu.py
elif [ "$mode" = "--static-decode" ]; then  # FP8StaticCache GPU tests + the decode step graph-timed with its rows
  step static_tests timeout 300 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_static_cache_gpu.py
  step decode_graph_static timeout 240 python3 scripts/bench_decode.py --part attention --timing graph --rounds 3 \
    --shapes 1x4k 1x128k 8x32k --gqa 32/8 --head-dims 128 --sdpa-backends --static \
    --cache-configs ${DECODE_CONFIGS:-tma} --out-json "$out/decode_graph_static.json"
elif [ "$mode" = "--static-bench" ]; then  # compiled generate: transformers' StaticCache (sdpa) vs FP8StaticCache
  step generate_static timeout 560 python3 scripts/bench_decode.py --part generate --fp8-backend fa3 \
    --modes bf16 fp8_cache --static ${STATIC_ROWS:-also} --batches ${STATIC_BATCHES:-1 8} \
    --prompts ${STATIC_PROMPTS:-4096} --static-bf16-attn ${STATIC_BF16:-sdpa} \
    --out-json "$out/generate_static.json"
elif [ "$mode" = "--quantize" ]; then  # the quantize kernel's GPU tests (about 6-7 minutes on the H200)
  step quantize_tests timeout 540 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_quantize_gpu.py tests/gpu/test_varlen_gpu.py tests/gpu/test_block_scales_gpu.py \
    tests/gpu/test_int8_qk_gpu.py tests/gpu/test_centring_gpu.py
elif [ "$mode" = "--quantize-bench" ]; then  # its speed: RoPE 4k-64k (3 rounds: 4k is noisy); modes table
  step quantize_rope timeout 150 python3 scripts/bench_quantize.py --rope --rounds 3 --seqlens 4096 16384 65536 \
    --heads 32/8 32/32
  step quantize_modes timeout 120 python3 scripts/bench_quantize.py --modes --skip-configs --seqlens 16384 65536 \
    --heads 32/8
elif [ "$mode" = "--vblock" ]; then  # v_scales="block" (every scale per block: the single-pass quantize kernel)
  step vblock_tests timeout 300 python3 -m pytest -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_v_block_scales_gpu.py tests/gpu/test_block_scales_gpu.py tests/gpu/test_int8_qk_gpu.py \
    tests/gpu/test_quantize_gpu.py
  # the int8 + V-block check of session 15 (quantizer vs reference per shape, the refusal's switch on)
  step vblock_probe2 timeout 150 python3 docs/results/vblock_probe2_s15.py.txt
  step quantize_vblock timeout 120 python3 scripts/bench_quantize.py --modes --skip-configs --seqlens 16384 65536 \
    --heads 32/32 32/8 --only-modes rope rope+qk rope+block+block_v rope+int8 none block+block_v
  step quantize_block_warps timeout 100 python3 scripts/bench_quantize.py --block-configs --seqlens 16384 65536 \
    --heads 32/32 32/8
elif [ "$mode" = "--rope-tiles" ]; then
  step rope_tiles_tests timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_v_block_scales_gpu.py \
    tests/gpu/test_int8_qk_gpu.py tests/gpu/test_cuda_graphs_gpu.py
  step rope_tiles timeout 200 python3 scripts/bench_quantize.py --rope-configs --seqlens 16384 65536 --heads 32/32 32/8
  for d in 64 256; do  # their tiles were scaled from D=128's by elements per thread, not timed (session 16)
    step rope_tiles_d$d timeout 120 python3 scripts/bench_quantize.py --rope-configs --seqlens 65536 --heads 32/8 \
      --head-dim $d
  done
  step quantize_rope_modes timeout 100 python3 scripts/bench_quantize.py --modes --skip-configs --seqlens 16384 65536 \
    --heads 32/32 32/8 --only-modes rope rope+qk rope+block+block_v block+block_v
  # the same from CUDA-graph replays: GPU time alone (GQA 32/8 at 16k, ~0.1 ms, swung 40-73% eagerly)
  step quantize_rope_modes_graph timeout 100 python3 scripts/bench_quantize.py --timing graph --modes --skip-configs \
    --seqlens 16384 65536 --heads 32/32 32/8 --only-modes rope rope+qk rope+block+block_v block+block_v
elif [ "$mode" = "--ws" ]; then  # the experimental kernels: the Gluon kernel (and with TRITON_WS=1 triton_ws's GPU
  # tests and warp-specialized builds), one process each under a timeout (a hang is rc 124)
  : > "$out/gluon_probe.log"; : > "$out/ws_probe.log"  # fresh logs: their lines gate the later steps
  if [ "${TRITON_WS:-0}" = 1 ]; then  # triton_ws (ruled out on triton 3.6, session 17): only when asked
    step ws_tests timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_triton_ws_gpu.py \
      -k "${WS_TESTS_K:-not nothing}"
  fi
  # the Gluon kernel (backends/gluon_attention.py), 4k: (consumers pingpong causal config D batch kv-heads)
  for v in "1 0 0 128,128,8,2 128 1 8" "1 0 1 128,128,8,2 128 1 8" "2 0 0 128,128,4,2 128 1 8" \
           "2 1 0 128,128,4,2 128 1 8" "2 1 1 128,128,4,2 128 1 8" "2 1 1 128,128,4,3 64 1 8"; do
    set -- $v
    probe "$out/gluon_probe.log" "gluon $v" --gluon 1 --consumers $1 --pingpong $2 --causal $3 --config $4 \
      --head-dim $5 --batch $6 --kv-heads $7
  done
  # GQA 8/2, two sequences of 4144 keys (not a multiple of 128: the 2-D descriptors read the next sequence's rows)
  for v in "1 0 0" "1 0 1" "2 1 0" "2 1 1"; do
    set -- $v
    probe "$out/gluon_probe.log" "gluon gqa $v" --gluon 1 --consumers $1 --pingpong $2 \
      --config 128,128,$((8 / $1)),2 --causal $3 --seq 4144 --batch 2 --kv-heads 2
  done
  # speed (16k; 64k for the ping-pong build) of those that agreed at 4k, next to the Triton kernel and FA3 fp8
  for v in "1 0 128,128,8,2 16384" "2 0 128,128,4,2 16384" "2 1 128,128,4,2 16384" "2 1 128,128,4,3 16384" \
           "2 1 128,128,4,2 65536"; do
    set -- $v
    if sqnr_ok "$out/gluon_probe.log" "gluon consumers=$1 pingpong=$2 persistent=0 config=(128, 128, $((8 / $1)), 2) S=4096 H=8 D=128 causal=0 "; then
      for c in 0 1; do
        PROBE_S=120 probe "$out/gluon_probe.log" "gluon bench $v causal=$c" --gluon 1 --consumers $1 --pingpong $2 \
          --config $3 --causal $c --seq $4 --heads 32 --bench 1
      done
    else
      echo "gpu_check: gluon bench $v skipped (no 4k probe line of that build agreed)"
    fi
  done
  # the backend's GPU tests through the Gluon kernel (HF_FP8_ATTENTION_TRITON_KERNEL, GLUON_ROUTE: gluon-pp by
  # default) once it agreed at 4k, then a check that routed calls reached it
  if sqnr_ok "$out/gluon_probe.log" "gluon consumers=2 pingpong=1 persistent=0 config=(128, 128, 4, 2) S=4096 H=8 D=128 causal=1 "; then
    step gluon_backend_tests env HF_FP8_ATTENTION_TRITON_KERNEL=${GLUON_ROUTE:-gluon-pp} timeout 240 python3 -m pytest \
      -q -x -p no:cacheprovider tests/gpu/test_triton_attention_gpu.py tests/gpu/test_long_context_gpu.py
    step gluon_routed env HF_FP8_ATTENTION_TRITON_KERNEL=${GLUON_ROUTE:-gluon-pp} timeout 60 python3 -c "
import torch
from hf_fp8_attention import fp8_sdpa
from hf_fp8_attention.backends import gluon_attention
q, k, v = (torch.randn(1, h, 4096, 128, device='cuda', dtype=torch.bfloat16) for h in (8, 2, 2))
fp8_sdpa(q, k, v, is_causal=True, backend='triton')
print('gluon kernel calls:', gluon_attention.CALLS)
assert gluon_attention.CALLS > 0"
  else
    echo "gpu_check: gluon_backend_tests skipped (the 4k ping-pong probe did not agree)"; status=1
  fi
  if [ -n "${ROPE_SWEEP:-}" ]; then  # the q/k RoPE tile sweep at 64k (V programs first: tile entry 2)
    step rope_tiles timeout 120 python3 scripts/bench_quantize.py --rope-configs --seqlens 65536 --heads 32/32 32/8
  fi
  if [ "${TRITON_WS:-0}" = 1 ]; then
    for v in "1 1 128,128,4,2" "1 1 64,128,4,3" "0 2 128,128,4,2" "0 3 64,128,4,3"; do
      set -- $v
      probe "$out/ws_probe.log" "ws split=$1 variant=$2 config=$3" --ws 1 --split $1 --variant $2 --config $3
    done
  fi
elif [ "$mode" = "--gluon-check" ]; then  # the Gluon kernel: 4k probes against float32 and the Triton kernel (MHA
  # one-tile; GQA 8/2 with two sequences of 4144 keys, persistent), then GLUON_BENCH (default "0 16384|1 16384":
  # "persistent S" pairs, ping-pong, H=32, causal and not) next to the Triton kernel and FA3 fp8; GLUON_TESTS=1
  # (default): the backend's GPU tests through GLUON_ROUTE (default: the backend's own route), the Triton
  # kernel's (HF_FP8_ATTENTION_TRITON_KERNEL=triton) and the CUDA-graph replays (=backend: the first only); GLUON_SDPA=1: fp8_triton next to
  # FA3 bf16 / fp8 at 4k-64k (bench_sdpa); GLUON_MODEL=1: the whole model at 128k (benchmark_model)
  # GLUON_VORDER=1: every probe with V's keys in wgmma order (--v-order 1; the bench lines then also time the
  # build on V in key order, A/B); GLUON_SDPA_ROUTES="R1 R2 ...": bench_sdpa's fp8_triton and kernel alone once per
  # HF_FP8_ATTENTION_TRITON_KERNEL value (one process each) for each of GLUON_SDPA_CFGS ("ARGS|ARGS...", default
  # "--seqlens 4096"), GLUON_SDPA_ROUNDS round-robin rounds (default 1); GLUON_PROBES="ARGS|ARGS...": more
  # bench probes (probe_ws.py arguments after the ping-pong build's)
  vo="--v-order ${GLUON_VORDER:-0}"
  : > "$out/gluon_check.log"
  PROBE_S=60 probe "$out/gluon_check.log" "gluon 4k" --gluon 1 --consumers 2 --pingpong 1 --config 128,128,4,2 \
    --causal 0 $vo || status=1
  PROBE_S=60 probe "$out/gluon_check.log" "gluon 4k causal" --gluon 1 --consumers 2 --pingpong 1 \
    --config 128,128,4,2 --causal 1 $vo || status=1
  PROBE_S=60 probe "$out/gluon_check.log" "gluon gqa" --gluon 1 --consumers 2 --pingpong 1 --persistent 1 \
    --config 128,128,4,2 --causal 1 --seq 4144 --batch 2 --kv-heads 2 $vo || status=1
  for p in "persistent=0 config=(128, 128, 4, 2)" "persistent=1 config=(128, 128, 4, 2)"; do
    sqnr_ok "$out/gluon_check.log" "$p" || { echo "gpu_check: gluon probe '$p' below 30 dB vs the Triton kernel"; status=1; }
  done
  IFS='|' read -ra bench_list <<< "${GLUON_BENCH-0 16384|1 16384}"
  for v in "${bench_list[@]}"; do
    set -- $v
    if [ $# -ne 2 ]; then echo "gpu_check: GLUON_BENCH entry '$v' is not 'persistent S'"; status=1; continue; fi
    for c in 0 1; do
      PROBE_S=150 probe "$out/gluon_check.log" "gluon bench $v causal=$c" --gluon 1 --consumers 2 --pingpong 1 \
        --persistent $1 --config 128,128,4,2 --causal $c --seq $2 --heads 32 --bench 1 $vo || status=1
    done
  done
  if [ "${GLUON_TESTS:-1}" != 0 ]; then
    step gluon_backend_tests env ${GLUON_ROUTE:+HF_FP8_ATTENTION_TRITON_KERNEL=$GLUON_ROUTE} timeout 240 python3 -m \
      pytest -q -x -p no:cacheprovider tests/gpu/test_triton_attention_gpu.py tests/gpu/test_long_context_gpu.py
  fi
  if [ "${GLUON_TESTS:-1}" = 1 ]; then
    step triton_kernel_tests env HF_FP8_ATTENTION_TRITON_KERNEL=triton timeout 200 python3 -m pytest -q -x \
      -p no:cacheprovider tests/gpu/test_triton_attention_gpu.py
    step graph_tests timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_cuda_graphs_gpu.py -k replays
  fi
  [ "${GLUON_SDPA:-0}" = 1 ] && step sdpa timeout 240 python3 scripts/bench_sdpa.py --seqlens 4096 16384 65536 \
    --causal both --modes none --sqnr-ref off --impls "FA3" fp8_fa3 fp8_triton "triton fp8" --json "$out/sdpa.json"
  IFS='|' read -ra extra_probes <<< "${GLUON_PROBES:-}"  # "ARGS|ARGS...": more bench probes of the ping-pong build
  for v in "${extra_probes[@]}"; do
    PROBE_S=150 probe "$out/gluon_check.log" "gluon probe $v" --gluon 1 --consumers 2 --pingpong 1 \
      --config 128,128,4,2 --bench 1 $v || status=1
  done
  IFS='|' read -ra sdpa_cfgs <<< "${GLUON_SDPA_CFGS:---seqlens 4096}"
  for i in "${!sdpa_cfgs[@]}"; do
    for r in ${GLUON_SDPA_ROUTES:-}; do
      step "sdpa_${r}_$i" env HF_FP8_ATTENTION_TRITON_KERNEL=$r timeout 240 python3 scripts/bench_sdpa.py \
        ${sdpa_cfgs[$i]} --causal both --modes none --sqnr-ref off --impls "FA3" fp8_triton "triton fp8" \
        --rep-ms 100 --rounds ${GLUON_SDPA_ROUNDS:-1} --json "$out/sdpa_${r}_$i.json"
    done
  done
  [ "${GLUON_MODEL:-0}" = 1 ] && step model timeout 300 python3 scripts/benchmark_model.py --seqlens 131072 \
    --warmup 1 --repeats 2 --impls fa3_bf16 fp8_fa3 fp8_triton --json "$out/model.json"
elif [ "$mode" = "--pack" ]; then  # session 23: FA3's pack_gqa (fa3.pack_gqa_choice): its choices timed
  # (probe_fa3.py at PACK_SEQLENS), one layer GQA 32/8 with fp8_fa3 (modes none and qk, 4k-64k), its GPU tests
  step fa3_knobs timeout 200 python3 scripts/probe_fa3.py --seqlens ${PACK_SEQLENS:-4096 8192 32768} --causal both
  step pack_sdpa timeout 240 python3 scripts/bench_sdpa.py --kv-heads 8 --seqlens 4096 16384 65536 --causal both \
    --modes none qk --sqnr-ref off --rep-ms 100 --impls "FA3" fp8_fa3 "quantize only" --json "$out/pack_sdpa.json"
  step pack_tests timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_sdpa_gpu.py \
    tests/gpu/test_varlen_gpu.py tests/gpu/test_cuda_graphs_gpu.py -k "${PACK_TESTS_K:-fa3 or replays}"
elif [ "$mode" = "--fwht" ] && [ "${FWHT_PART:-}" = check ]; then  # the rotation's GPU tests, kernel times
  step fwht_kernels timeout 120 python3 scripts/bench_quantize.py --kernel-times --only-modes none qk rope rope+qk \
    --seqlens 4096 16384 65536 --heads 32/8
  step fwht_tests timeout ${FWHT_TESTS_S:-400} python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_quantize_gpu.py \
    tests/gpu/test_kv_cache_gpu.py tests/gpu/test_centring_gpu.py -k "${FWHT_TESTS_K:-not nothing}"
elif [ "$mode" = "--fwht" ]; then  # session 24: tile_math._hadamard by FWHT vs tl.dot, in turns
  for r in 1 2; do
    for h in dot fwht; do
      step "fwht_quant_${h}_$r" env HF_FP8_ATTENTION_HADAMARD=$h timeout 150 python3 scripts/bench_quantize.py --modes \
        --skip-configs --only-modes none qk rope rope+qk --seqlens 4096 16384 65536 --heads 32/8 --timing graph
    done
  done
  for h in dot fwht; do
    step "fwht_sdpa_$h" env HF_FP8_ATTENTION_HADAMARD=$h timeout 200 python3 scripts/bench_sdpa.py --kv-heads 8 \
      --seqlens 4096 16384 65536 --causal both --modes none qk --sqnr-ref fp32 --rep-ms 100 \
      --impls "FA3" fp8_fa3 "quantize only" --json "$out/fwht_sdpa_$h.json"
  done
  step fwht_tests timeout ${FWHT_TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_quantize_gpu.py \
    tests/gpu/test_centring_gpu.py tests/gpu/test_kv_cache_gpu.py tests/gpu/test_randomized_gpu.py
elif [ "$mode" = "--retune" ]; then  # session 24: after the rotation's change
  step tune timeout 240 python3 scripts/tune_dispatch.py --out "$out/sm90.json" --markdown "$out/sm90.md"
  step retune_sdpa timeout 200 python3 scripts/bench_sdpa.py --kv-heads 8 --seqlens ${RETUNE_SEQLENS:-8192 16384 65536} --causal both \
    --modes none qk --sqnr-ref off --rep-ms 100 --impls "FA3" fp8_fa3 "quantize only" --json "$out/retune_sdpa.json"
  step retune_host timeout 120 python3 scripts/bench_sdpa.py --kv-heads 8 --seqlens 4096 --causal yes --modes qk \
    --sqnr-ref off --rep-ms 100 --impls "FA3" fp8_fa3 "quantize only" --host --host-profile "$out/host_profile.txt" \
    --json "$out/retune_host.json"
  step retune_tests timeout ${RETUNE_TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_randomized_gpu.py
elif [ "$mode" = "--host" ]; then  # session 24: where one call's host time goes
  step host timeout 300 python3 scripts/bench_sdpa.py --kv-heads 8 --seqlens ${HOST_SEQLENS:-4096 16384} \
    --causal ${HOST_CAUSAL:-yes} --modes qk --sqnr-ref off --rep-ms 100 --impls "FA3" fp8_fa3 fp8_triton "quantize only" \
    ${HOST_IMPLS:-} --host \
    --host-profile "$out/host_profile.txt" --json "$out/host.json"
elif [ "$mode" = "--gluon-default" ]; then  # the Triton backend's default prefill (the Gluon kernel at D=128 on
  # Hopper): CUDA-graph replays (GLUON_TESTS=all: its GPU tests too), the persistent build's probes (4k GQA with
  # two sequences, 16k speed), then fp8_triton next to FA3 bf16 / fp8 at 16k
  tests_k="replays"; [ "${GLUON_TESTS:-}" = all ] && tests_k="triton_attention or replays"
  step gluon_default_tests timeout ${GLUON_TESTS_S:-150} python3 -m pytest -q -x -p no:cacheprovider -rs \
    tests/gpu/test_triton_attention_gpu.py tests/gpu/test_cuda_graphs_gpu.py -k "$tests_k"
  for c in 0 1; do
    timeout 40 python3 scripts/probe_ws.py --gluon 1 --consumers 2 --pingpong 1 --persistent 1 --config 128,128,4,2 \
      --causal $c --seq 4144 --batch 2 --kv-heads 2 2>&1 | grep -v Warn | tee -a "$out/gluon_persistent.log"
  done
  for c in 0 1; do
    timeout 60 python3 scripts/probe_ws.py --gluon 1 --consumers 2 --pingpong 1 --persistent 1 --config 128,128,4,2 \
      --causal $c --seq 16384 --heads 32 --bench 1 2>&1 | grep -v Warn | tee -a "$out/gluon_persistent.log"
  done
  [ "${GLUON_SDPA:-1}" = 0 ] || step gluon_default_sdpa timeout 90 python3 scripts/bench_sdpa.py --seqlens 16384 --causal both --modes none \
    --sqnr-ref off --impls "FA3" fp8_fa3 fp8_triton "triton fp8" --json "$out/gluon_default_sdpa.json"
elif [ "$mode" = "--vblock-bench" ]; then  # the triton backend with every scale per block: speed, accuracy
  step sdpa_vblock timeout 300 python3 scripts/bench_sdpa.py --seqlens 4096 16384 65536 --causal both --rounds 2 \
    --sqnr-ref off --impls fp8_triton "quantize only" --modes none block block+block_v int8 \
    --json "$out/sdpa_vblock.json"
  step accuracy_vblock timeout 120 python3 scripts/accuracy_report.py --seq 4096 --heads 32 --head-dim 128 \
    --backend triton --modes none block block+block_v int8 int8+smooth_k \
    --json "$out/accuracy_vblock.json"
elif [ "$mode" = "--backlog" ]; then  # session 21: the q/k RoPE tiles at 64k (ROPE_TILES_SWEEP, tiles R,H,W,P,F,V;
  # V 3 = v's launch on a second stream) with their GPU test, then what session 20 left unmeasured (BACKLOG, default
  # "d64 host model"): one layer at D=64, the launch path's host time at 4k, the whole model at 128k
  step v_side_test timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_v_block_scales_gpu.py \
    -k "second_stream or (single_pass and 128 and not int8)"
  for t in ${ROPE_TIMING:-eager}; do
    step "rope_tiles_$t" timeout 240 python3 scripts/bench_quantize.py --rope-configs --seqlens ${ROPE_SEQLENS:-65536} \
      --heads 32/8 32/32 --timing "$t" --rounds "${ROPE_ROUNDS:-3}" \
      --rope-tiles ${ROPE_TILES_SWEEP:-16,8,4,1,1,0 16,8,4,1,1,3}
  done
  for b in ${BACKLOG-d64 host model}; do
    case "$b" in
      tests) step quantize_tests timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider -rs \
             tests/gpu/test_v_block_scales_gpu.py tests/gpu/test_cuda_graphs_gpu.py tests/gpu/test_quantize_gpu.py \
             tests/gpu/test_triton_attention_gpu.py ;;
      sdpa) step sdpa timeout 200 python3 scripts/bench_sdpa.py --seqlens 16384 65536 --causal both --modes none \
             --sqnr-ref off --impls "FA3" fp8_fa3 fp8_triton "triton fp8" --json "$out/sdpa.json" ;;
      d64) step sdpa_d64 timeout 200 python3 scripts/bench_sdpa.py --head-dim 64 --seqlens 4096 16384 65536 \
             --causal both --modes none --sqnr-ref off --impls "FA3" fp8_fa3 fp8_triton "triton fp8" \
             --json "$out/sdpa_d64.json" ;;
      host) step sdpa_host timeout 150 python3 scripts/bench_sdpa.py --seqlens 4096 --causal yes --modes none \
             --impls "FA3 bf16" fp8_fa3 fp8_triton --host --json "$out/sdpa_host.json" ;;
      gluon64) : > "$out/gluon64.log"  # the Gluon kernel at D=64 (auto keeps the Triton kernel there): agreement
             # with the Triton kernel at 4k (MHA; GQA 8/2 with two sequences), then one layer with each route
             PROBE_S=90 probe "$out/gluon64.log" "gluon d64" --gluon 1 --consumers 2 --pingpong 1 --persistent 1 \
               --config 128,128,4,2 --causal 1 --head-dim 64 || status=1
             PROBE_S=90 probe "$out/gluon64.log" "gluon d64 gqa" --gluon 1 --consumers 2 --pingpong 1 --persistent 1 \
               --config 128,128,4,2 --causal 1 --head-dim 64 --seq 4144 --batch 2 --kv-heads 2 || status=1
             for p in "D=64 causal=1 B=1" "D=64 causal=1 B=2 H_kv=2"; do
               sqnr_ok "$out/gluon64.log" "$p" || { echo "gpu_check: gluon probe '$p' below 30 dB vs the Triton kernel"; status=1; }
             done
             for r in gluon-pp-persistent triton; do
               step "sdpa_d64_$r" env HF_FP8_ATTENTION_TRITON_KERNEL=$r timeout 200 python3 scripts/bench_sdpa.py \
                 --head-dim 64 --seqlens 4096 16384 65536 --causal both --modes none --sqnr-ref off \
                 --impls "FA3" fp8_triton "triton fp8" --json "$out/sdpa_d64_$r.json"
             done ;;
      model) step model timeout 330 python3 scripts/benchmark_model.py --seqlens 131072 --warmup 1 --repeats 2 \
             --impls fa3_bf16 fp8_fa3 fp8_triton --json "$out/model.json" ;;
      *) echo "gpu_check: unknown BACKLOG entry '$b'"; status=1 ;;
    esac
  done
elif [ "$mode" = "--split" ]; then  # session 22: per-(batch, KV head) scales through the split path (two
  # launches of the single-pass kernels) vs the persistent two-pass kernel: timed in turns, eagerly (SPLIT_SEQLENS,
  # SPLIT_HEADS, SPLIT_MODES, SPLIT_ROUNDS; SPLIT_TILES "R,W[:r,h,w] ...": the split path's tiles to compare;
  # SPLIT_DIMS "64 256": other head dims) and graph-timed (SPLIT_GRAPH=0: not; SPLIT_GRAPH_SEQLENS, _HEADS, _MODES),
  # their GPU tests (both paths,
  # and the CUDA-graph replays; SPLIT_TESTS=0: not), then SPLIT_SDPA=1: one layer, GQA 32/8, fp8_fa3 with modes none and qk (the default
  # rotation) at 4k-64k
  step split_eager timeout 330 python3 scripts/bench_quantize.py --split --rounds "${SPLIT_ROUNDS:-2}" \
    --seqlens ${SPLIT_SEQLENS:-4096 16384 65536} --heads ${SPLIT_HEADS:-32/8 32/32} \
    ${SPLIT_TILES:+--split-tiles $SPLIT_TILES} ${SPLIT_MODES:+--only-modes $SPLIT_MODES}
  for d in ${SPLIT_DIMS:-}; do  # other head dims, today's tiles
    step "split_d$d" timeout 150 python3 scripts/bench_quantize.py --split --rounds 2 --head-dim "$d" \
      --seqlens 16384 65536 --heads 32/8 --only-modes rope+qk none
  done
  [ "${SPLIT_GRAPH:-1}" = 1 ] && step split_graph timeout 200 python3 scripts/bench_quantize.py --split --timing graph \
    --rounds 2 --seqlens ${SPLIT_GRAPH_SEQLENS:-4096 16384} --heads ${SPLIT_GRAPH_HEADS:-32/8} \
    --only-modes ${SPLIT_GRAPH_MODES:-rope+qk none} ${SPLIT_TILES:+--split-tiles $SPLIT_TILES}
  [ "${SPLIT_TESTS:-1}" = 1 ] && step split_tests timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_quantize_gpu.py \
    tests/gpu/test_varlen_gpu.py -k "${SPLIT_TESTS_K:-split or matches_reference or modes_match or keys_contiguous or special}"
  [ "${SPLIT_TESTS:-1}" = 1 ] && step split_graph_tests timeout 200 python3 -m pytest -q -p no:cacheprovider -rs \
    tests/gpu/test_cuda_graphs_gpu.py -k replays
  [ "${SPLIT_SDPA:-0}" = 1 ] && step split_sdpa timeout 240 python3 scripts/bench_sdpa.py --kv-heads 8 \
    --seqlens 4096 16384 65536 --causal both --modes none qk --sqnr-ref off --rep-ms 100 \
    --impls "FA3" fp8_fa3 "quantize only" --json "$out/split_sdpa.json"
elif [ "$mode" = "--rowsum" ]; then  # session 25: the Gluon kernel's row sums by MMA (the default persistent build):
  # its GPU tests against the build that sums in the softmax, the Triton backend's GPU tests and the CUDA-graph
  # replays through it (ROWSUM_TESTS=0: not), then bench_sdpa's kernels alone and end to end (GQA 32/8, D=128,
  # ROWSUM_SEQLENS default 16k 64k, causal both, 2 rounds) and probe_ws A/B at ROWSUM_PROBES ("S causal|...")
  [ "${ROWSUM_TESTS:-1}" = 1 ] && step rowsum_tests timeout "${TESTS_S:-420}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/gpu/test_gluon_gpu.py tests/gpu/test_triton_attention_gpu.py tests/gpu/test_long_context_gpu.py \
    tests/gpu/test_cuda_graphs_gpu.py -k "${ROWSUM_TESTS_K:-gluon or triton or long or replays}"
  step rowsum_sdpa timeout 300 python3 scripts/bench_sdpa.py --kv-heads 8 --seqlens ${ROWSUM_SEQLENS:-16384 65536} \
    --causal both --rounds 2 --modes none --sqnr-ref off --rep-ms 150 \
    --impls "FA3" "FA3 fp8 kernel only" "triton fp8 kernel only" fp8_triton --json "$out/rowsum_sdpa.json"
  IFS='|' read -ra probes <<< "${ROWSUM_PROBES-}"
  for p in "${probes[@]}"; do
    read -r s c <<< "$p"
    timeout 90 python3 scripts/probe_ws.py --gluon 1 --consumers 2 --pingpong 1 --persistent 1 --rowsum-mma 1 \
      --bench 1 --config 128,128,4,2 --heads 32 --kv-heads 8 --seq "$s" --causal "$c" 2>&1 | grep -v Warn \
      | tee -a "$out/rowsum_probe.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: rowsum probe '$p' FAILED"; status=1; }
  done
elif [ "$mode" = "--vorder" ]; then  # session 26: V in wgmma key order from the quantizer (the Gluon kernel's default
  # route): the GPU tests it touches (VORDER_TESTS=0: not; VORDER_TESTS_K filters), then bench_sdpa's kernels alone,
  # the same build on V in key order and the quantizer writing each layout, and fp8_triton end to end (GQA 32/8,
  # D=128, VORDER_SEQLENS default 16k 64k, causal both, VORDER_ROUNDS default 2)
  [ "${VORDER_TESTS:-1}" = 1 ] && step vorder_tests timeout "${TESTS_S:-420}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/gpu/test_gluon_gpu.py tests/gpu/test_quantize_gpu.py tests/gpu/test_triton_attention_gpu.py \
    tests/gpu/test_cuda_graphs_gpu.py -k "${VORDER_TESTS_K:-gluon or keys_contiguous or triton or replays}"
  step vorder_sdpa timeout "${SDPA_S:-150}" python3 scripts/bench_sdpa.py --kv-heads 8 \
    --seqlens ${VORDER_SEQLENS:-16384 65536} --causal both --rounds "${VORDER_ROUNDS:-2}" --modes none --sqnr-ref off \
    --rep-ms 150 --impls "FA3" "triton fp8 kernel only" "quantize only, V" fp8_triton --json "$out/vorder_sdpa.json"
elif [ "$mode" = "--first-call" ]; then  # session 27: compile-ahead (the Gluon kernel's compile beside the quantizer's)
  step first_call_tests timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    -k compile_ahead
  first_call first_call 400 both 90
elif [ "$mode" = "--s28" ]; then  # session 28: session 27's unmeasured changes in one call: the compile-ahead and
  # TMA-store GPU tests, the first call (compile-ahead off/on), the TMA-store A/B, then the Gluon/wgmma GPU tests that
  # the one-compile-for-every-length change (do_not_specialize) touches
  step tma_tests timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    -k "tma_store or compile_ahead"
  first_call first_call 170 both 60
  kernels_sdpa tma_sdpa 130 "FA3 fp8 kernel only" "triton fp8 kernel only"
  step gluon_tests timeout "${GLUON_S:-120}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    tests/gpu/test_quantize_gpu.py tests/gpu/test_cuda_graphs_gpu.py tests/gpu/test_sdpa_gpu.py \
    -k "(gluon or wgmma or keys_contiguous or replays or (sdpa and triton)) and not tma_store and not compile_ahead"
elif [ "$mode" = "--s28-default" ]; then  # session 28: TMA stores as the persistent build's default: the Gluon/wgmma
  # GPU tests (compile-ahead's and the TMA/plain-store equality included), the first call with compile-ahead on,
  # then bench_sdpa's kernels alone (TMA stores against plain stores) and fp8_triton end to end against FA3 bf16
  step default_tests timeout "${TESTS_S:-260}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    tests/gpu/test_quantize_gpu.py tests/gpu/test_cuda_graphs_gpu.py tests/gpu/test_sdpa_gpu.py \
    -k "gluon or wgmma or keys_contiguous or replays or (sdpa and triton) or tma_store or compile_ahead"
  first_call first_call_default 100 on 45
  kernels_sdpa default_sdpa 200 "FA3" fp8_fa3 fp8_triton "FA3 fp8 kernel only" "triton fp8 kernel only"
elif [ "$mode" = "--s28-host" ]; then  # session 28: the Gluon kernel's direct launch (a known specialization skips
  # the JIT's dispatch and TensorDescriptor's checks): its GPU tests and the ones it touches, then host us per call
  step host_tests timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    tests/gpu/test_cuda_graphs_gpu.py tests/gpu/test_sdpa_gpu.py \
    -k "${HOST_TESTS_K:-direct_launch or compile_ahead or tma_store or wgmma or replays or (sdpa and triton)}"
  step host timeout 200 python3 scripts/bench_sdpa.py --kv-heads 8 --seqlens ${HOST_SEQLENS:-4096} --causal both \
    --modes qk --sqnr-ref off --rep-ms 100 --impls "FA3" fp8_fa3 fp8_triton "quantize only" kernel --host \
    --host-profile "$out/host_profile.txt" --json "$out/host.json"
elif [ "$mode" = "--s29" ]; then  # session 29: the Gluon kernel quantizes Q's rows itself (Q_IN_KERNEL): its GPU
  # tests, then the ones its route touches, then fp8_triton with Q in the kernel against Q in the quantizer end to
  # end (modes none and qk: hadamard auto's), the kernels alone, FA3 bf16 and fp8_fa3, in one run
  step q_tests timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    -k "q_quantized_in_the_kernel or quantizes_q_in_the_kernel"
  step q_sdpa timeout "${SDPA_S:-300}" python3 scripts/bench_sdpa.py --kv-heads 8 \
    --seqlens ${S29_SEQLENS:-4096 16384 65536} --causal both --rounds "${S29_ROUNDS:-2}" --modes none qk \
    --sqnr-ref off --rep-ms 100 --impls "FA3 bf16" "FA3 fp8 kernel only" "triton fp8 kernel only" fp8_fa3 fp8_triton \
    --json "$out/q_sdpa.json"
  step gluon_tests timeout "${GLUON_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    tests/gpu/test_cuda_graphs_gpu.py tests/gpu/test_sdpa_gpu.py tests/gpu/test_triton_attention_gpu.py \
    -k "${S29_TESTS_K:-(gluon or wgmma or replays or (sdpa and triton) or compile_ahead or direct_launch) and not q_quantized and not quantizes_q}"
elif [ "$mode" = "--s29-model" ]; then  # session 29: the Q-in-kernel GPU tests (opt-in), then the whole Llama-3-8B
  # shape at 128k (MODEL_SEQLENS): FA3 bf16, fp8 (auto) and fp8_triton, with the attention/quantize time split
  step q_tests timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    -k "q_quantized_in_the_kernel or quantizes_q_in_the_kernel"
  step model timeout "${MODEL_S:-330}" python3 scripts/benchmark_model.py --seqlens ${MODEL_SEQLENS:-131072} \
    --impls fa3_bf16 fp8 fp8_triton --warmup 1 --repeats 2 --profile --json "$out/model.json"
elif [ "$mode" = "--ncu" ]; then  # session 30: hardware counters (Nsight Compute, clocks left alone) of the kernels
  # of one layer, each candidate's once after two unprofiled calls (scripts/ncu_attention.py --drive)
  # NCU_IMPLS: candidate names separated by "|" (default: ncu_attention.py's DEFAULT_IMPLS)
  IFS='|' read -r -a NCU_IMPLS_LIST <<< "${NCU_IMPLS:-}"
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu_bin" ] || { echo "gpu_check: no ncu"; exit 1; }
  "$ncu_bin" --version | tee "$out/ncu_version.txt"
  "$ncu_bin" --query-metrics --chip gh100 > "$out/ncu_metrics.txt" 2>&1
  # the pipes' activity where this ncu knows the names (an unknown name would stop ncu)
  extra=$(grep -o -E '\b(sm__pipe_tensor_op_gmma_cycles_active|sm__inst_executed_pipe_xu|sm__inst_executed_pipe_fma|sm__inst_executed_pipe_alu|sm__inst_executed_pipe_fmaheavy|smsp__issue_active)\b' \
    "$out/ncu_metrics.txt" | sort -u | sed 's/$/.avg.pct_of_peak_sustained_active/' | paste -sd, -)
  echo "extra metrics: ${extra:-none}"
  step ncu_drive timeout "${NCU_S:-420}" "$ncu_bin" --profile-from-start off --clock-control none \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
    --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section InstructionStats \
    --section SourceCounters ${extra:+--metrics "$extra"} -f -o "$out/attn" \
    python3 scripts/ncu_attention.py --drive --seqlens ${NCU_SEQLENS:-16384} --causal "${NCU_CAUSAL:-both}" \
    ${NCU_IMPLS:+--impls "${NCU_IMPLS_LIST[@]}"}
  "$ncu_bin" --import "$out/attn.ncu-rep" --csv --page raw --print-units base > "$out/ncu_raw.csv" 2> "$out/ncu_import.err"
  python3 scripts/ncu_attention.py --summary "$out/ncu_raw.csv" --log "$out/ncu_drive.log" | tee "$out/ncu_summary.md"
  # per-instruction counters (SASS) of the profiled kernels, where this ncu prints them
  "$ncu_bin" --import "$out/attn.ncu-rep" --csv --page source --print-source sass > "$out/ncu_source.csv" \
    2>> "$out/ncu_import.err" && python3 scripts/ncu_attention.py --source "$out/ncu_source.csv" > "$out/ncu_source.md" \
    || echo "gpu_check: no source page"
  ls -la "$out" | tail -n +2 | awk '{print $5, $9}' | head -40
elif [ "$mode" = "--s30" ]; then  # session 30: part of the softmax's exponentials by a polynomial on the FMA pipe
  step exp2_tests timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gluon_gpu.py \
    -k "exp2 or default_build_matches"
  step exp2_sdpa timeout "${SDPA_S:-330}" python3 scripts/bench_sdpa.py --kv-heads 8 \
    --seqlens ${S30_SEQLENS:-4096 16384 65536} --causal both --rounds "${S30_ROUNDS:-3}" --modes none \
    --sqnr-ref off --rep-ms 100 --impls "FA3 bf16" "FA3 fp8 kernel only" "triton fp8 kernel only" "exp2" \
    --json "$out/exp2_sdpa.json"
elif [ "$mode" = "--model" ]; then
  step model python3 scripts/benchmark_model.py --seqlens 4096 16384 32768 65536 131072 --warmup 1 --repeats 2 \
    --json "$out/model.json"
else
  case "$mode" in --table|--triton|--bench) ;; *) step gpu_tests python3 -m pytest -q tests/gpu -p no:cacheprovider -rs ;; esac
  if [ "$mode" = "--full" ]; then
    step quantize python3 scripts/bench_quantize.py --modes --seqlens 16384
    step accuracy python3 scripts/accuracy_report.py --seq 4096 --heads 32 --head-dim 128 --json "$out/accuracy.json"
    step sdpa_modes python3 scripts/bench_sdpa.py --seqlens 16384 --causal yes --json "$out/sdpa_modes.json"
  fi
  if [ "$mode" = "--table" ]; then
    step triton_table python3 scripts/bench_sdpa.py --head-dims 64 128 256 \
      --seqlens 1024 2048 4096 8192 16384 32768 65536 --modes none --sqnr-ref bf16 --rep-ms 100 \
      --impls "FA3" fp8_fa3 fp8_triton "triton fp8" --json "$out/triton_table.json"
  fi
  if [ "$mode" = "--triton" ]; then  # the triton/varlen/block-scale tests, block-scale accuracy and cost
    step triton_tests python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_triton_attention_gpu.py \
      tests/gpu/test_varlen_gpu.py tests/gpu/test_block_scales_gpu.py
    step accuracy_block python3 scripts/accuracy_report.py --seq 4096 --heads 32 --head-dim 128 \
      --modes none block qkv block+qkv qkv+smooth_k block+qkv+smooth_k --json "$out/accuracy_block.json"
    step sdpa_block python3 scripts/bench_sdpa.py --seqlens 16384 --causal yes --modes none block \
      --impls fp8_triton --json "$out/sdpa_block.json"
  elif [ "$mode" != "--table" ] && [ "$mode" != "--tests" ]; then
    step sdpa python3 scripts/bench_sdpa.py --seqlens 4096 16384 32768 --modes none --json "$out/bench_sdpa.json"
  fi
fi
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
