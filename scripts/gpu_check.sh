#!/usr/bin/env bash
# GPU check for a lent H100: install the carried FA3 wheel, run the GPU tests, print the speed table.
# Usage (device run, from the repo root, with carry [".whl"]):  bash scripts/gpu_check.sh [--quick]
# Logs go to $OUT (or ./gpu_check_out when OUT is unset). Never reinstalls torch.
set -uo pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import torch, triton, transformers, importlib.util
print("device:", torch.cuda.get_device_name(), "SM", torch.cuda.get_device_capability())
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("flash_attn_interface:", importlib.util.find_spec("flash_attn_interface") is not None)
PY
status=0
python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ "${1:-}" != "--quick" ]; then
  python3 scripts/bench_sdpa.py --seqlens 4096 16384 32768 --json "$out/bench_sdpa.json" 2>&1 | tee "$out/bench_sdpa.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
