#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine: the paper preset's train/predict speed and the
# whole CLI chain (synth → prepare → train seg+cls → calibrate → predict → evaluate) on CUDA.
# Usage: tools/gpu-check.sh OUTDIR   (python3 must hold torch with CUDA and petctl's dependencies)
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
export PETCTL_HOME=/tmp/gpu-home HF_HOME=/tmp/gpu-hf PYTHONUNBUFFERED=1
py=python3
nvidia-smi -L | tee "$out/gpu.txt"
$py bench/gpu_paper_preset.py --steps 20 2>&1 | tee "$out/bench.txt"
w=/tmp/gpu-chain; rm -rf $w $PETCTL_HOME
t0=$(date +%s)
$py -m petctl synth $w/raw --cases 8 --test-cases 2 --seed 5 --workers 8 || exit 1
$py -m petctl prepare $w/raw --store $w/store --workers 8 --folds 2 --run gpu || exit 1
t1=$(date +%s)
$py -m petctl train --store $w/store --task seg --fold 0,1 --preset autopet-paper --mixed-precision bf16 --max-steps 40 --run gpu 2>&1 | tail -15
$py -m petctl train --store $w/store --task cls --fold 0,1 --preset autopet-paper --mixed-precision bf16 --max-steps 10 --run gpu 2>&1 | tail -12
t2=$(date +%s)
$py -m petctl calibrate --run gpu 2>&1 | tail -8
t3=$(date +%s)
$py -m petctl predict --run gpu $w/raw $w/pred 2>&1 | tail -6
t4=$(date +%s)
$py -m petctl evaluate $w/raw/labelsTs $w/pred 2>&1 | tail -6
$py -m petctl status --json > "$out/status.json"
echo "chain seconds: prepare $((t1-t0)) train $((t2-t1)) calibrate $((t3-t2)) predict $((t4-t3))" | tee "$out/chain.txt"
