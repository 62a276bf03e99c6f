#!/usr/bin/env bash
# The part of the reasoning issue's one-shot measurement that 2 CPU cores can afford (about two hours):
# rku and flap at 20/30/40 % uniform on Qwen2.5-Coder-0.5B, calibrated on gold solutions vs the dense
# model's own traces (16 GSM8K-train problems each), scored teacher-forced on the first 32 GSM8K test
# questions: CoT NLL of the gold solutions and KL(dense || pruned) on the dense model's answers and on
# the gold solutions. No generation (accuracy needs the GPU script, benchmarks/gpu_reasoning.sh).
# `kinetic` is left out: under uniform allocation it prunes exactly what rku prunes (README, Results).
# Every row saves as it finishes and a rerun skips finished rows.
set -euo pipefail
cd "$(dirname "$0")/.."
GRID="--models qwen0.5b --allocations uniform --sparsities 0.2 0.3 0.4 --methods rku flap --no-generate"
# One row alone first: it builds the gold calibration statistics and the cached dense answers the KL
# of every later row reads, which two parallel rows would otherwise both generate.
python -m benchmarks.oneshot --row qwen0.5b-rku-uniform-20 --no-generate --threads 2
python -m benchmarks.run oneshot $GRID --calib-source gold --jobs 2 --threads 1
python -m benchmarks.run oneshot $GRID --calib-source self --jobs 2 --threads 1
# The calibration window: the 40 % pair again with a window that holds the prompt and a whole trace, and
# accuracy of `self` calibration in that window at 20 % (README, "Calibration source").
for source in gold self; do
  python -m benchmarks.oneshot --row qwen0.5b-rku-uniform-40 --no-generate --calib-max-length 640 --calib-source $source --threads 1
done
python -m benchmarks.oneshot --row qwen0.5b-rku-uniform-20 --calib-source self --calib-max-length 640 --no-kl --threads 2
python -m benchmarks.run render
