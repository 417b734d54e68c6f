#!/usr/bin/env bash
# Every benchmark at base size on one CUDA GPU, with bf16 autocast, SDPA attention (the models' default) and
# torch.compile for the training step; prints the tables (and MFU) and writes benchmarks/results/*_cuda.json.
#   bash benchmarks/gpu.sh            (from the repo root, in an environment with the project installed)
# Where the project's packages are not installed (a lent GPU machine), carry .device-wheels/ (made here by
# benchmarks/device_wheels.sh: the missing packages' wheels and BERT's vocab.txt): this script installs from it.
# The whole script keeps within BUDGET seconds (default 570: one device call is at most 600): each step runs with
# what is left, the most needed first. With OUT set (the device tool's folder), the results come back as one tarball.
set -uo pipefail  # no -e: one failing benchmark must not cost the others (a lent GPU is short-lived)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-570}
step() {  # step NAME COMMAND...: run it within the time left, say so if it failed or was cut, go on
  local name=$1 left=$((BUDGET - SECONDS))
  shift
  echo "== $name (${SECONDS} s in, ${left} s left) =="
  if [ "$left" -lt 30 ]; then echo "SKIPPED: no time left"; return; fi
  timeout --signal=INT --kill-after=10 "$left" "$@" || echo "FAILED ($?): $*"
}
if [ -d .device-wheels ] && ! $PY -c "import mlflow, webdataset, pydantic_settings" 2>/dev/null; then
  # A lent GPU machine: the packages its image lacks, from the wheels carried with the tree (device_wheels.sh).
  $PY -m pip install --quiet --no-index --no-deps --target .device-site .device-wheels/*.whl
  export PYTHONPATH="$PWD/.device-site${PYTHONPATH:+:$PYTHONPATH}"
  export BLIP_BENCH_TOKENIZER=${BLIP_BENCH_TOKENIZER:-$PWD/.device-wheels/vocab.txt}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# Never run before on a GPU, so first: the DAG on configs/base.yaml, small world, every training stage under torchrun,
# pretraining killed and resumed (benchmarks/results/gpu_dag/: summary.json, logs, metrics).
step "the base DAG end to end" $PY -m benchmarks.gpu_dag
step "pretraining step, eager" $PY -m benchmarks.pretrain_step --device cuda --bf16 --sizes base --batch 96 --steps 10
# Batches that divide BLIP's 57,600 queue (two compilations, a minute or two each); the profile (top operators by
# GPU time) is of the larger.
step "pretraining step, torch.compile" $PY -m benchmarks.pretrain_step --device cuda --bf16 --compile \
  --sizes base base --batch 96 256 --steps 10 --profile
step "against transformers' BLIP (bf16)" $PY -m benchmarks.vs_transformers --device cuda --bf16 --batch 32 --repeats 10
step "data loading and CapFilt" $PY -m benchmarks.data_and_capfilt --device cuda --bf16 --sizes base --workers 1 8 14
step "retrieval evaluation" $PY benchmarks/retrieval_eval.py --device cuda --sizes 1000 5000
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" benchmarks/results/gpu_dag benchmarks/results/*cuda* 2>/dev/null
  echo "results in $OUT/results.tgz"
fi
