#!/usr/bin/env bash
# Everything the GPU table of docs/speed.md needs, in one command on a GPU machine without network: install the
# wheels of scripts/gpu_wheels.sh (carried in .whl/, timm's scripts in .timm/) on top of its torch, run the
# CUDA tests, then every craft_runner.bench.gpu_measure subcommand; JSON lines go to $DEST/measure.jsonl, logs
# beside it.
#   scripts/gpu_session.sh [DEST]           # DEST: $OUT when set (the device tool), else outputs/gpu
#   PART=tests scripts/gpu_session.sh       # only the CUDA tests; PART=measure: only the measurements
#   TINY=1 scripts/gpu_session.sh /tmp/x    # --device cpu --tiny, no install: a check of this script on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:-outputs/gpu}}
PART=${PART:-all}
PY=${PY:-python3}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

if [[ -z ${TINY:-} && -d .whl ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
ARGS=()
[[ -n ${TINY:-} ]] && ARGS=(--device cpu --tiny)
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"

status=0
if [[ $PART == all || $PART == tests ]]; then
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$DEST/cuda-tests.log" || status=1
fi
if [[ $PART == all || $PART == measure ]]; then
  run() {
    echo "== gpu_measure $*" | tee -a "$DEST/measure.log"
    $PY -m craft_runner.bench.gpu_measure "$@" "${ARGS[@]}" 2>>"$DEST/measure.log" | tee -a "$DEST/measure.jsonl" || status=1
  }
  run throughput
  run throughput --timm-flags
  run timm-train --run
  run timm-train --script benchmark --run
  run lambda-max
  run ptq4vit
  run baseptq
fi
exit $status
