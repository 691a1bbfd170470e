#!/usr/bin/env bash
# docs/results.md section 3 re-run at 128 px on the 2-core CPU, collapse guard on
set -euo pipefail
export OMP_NUM_THREADS=1
cd /work/runs
start=$(date +%s)
feedbackcam simulate --data isic128 --model efficientnet_lite0 --weights imagenet \
  --base-fraction 0.5 --base-epochs 6 --base-lr 3e-4 --modes cls,exp,combined --lambda 0.7 \
  --epochs 3 --batch-size 32 --optimizer adam --lr 3e-4 --out sim128 > sim128.log 2>&1
echo "simulate $(( $(date +%s) - start )) s" >> times.txt
