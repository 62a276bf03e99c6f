#!/usr/bin/env bash
# The reasoning issue's measurement set on one H200-class GPU, in one command (budget ~10 minutes):
#   one-shot rku / kinetic / flap at 20-40 %, uniform and global MLP-only, calibrated on gold vs the dense model's
#   own traces, 100 GSM8K + 100 SVAMP questions with KL to dense; then prune-and-recover to 40 % with
#   {ce on gold, kd on self traces} x {uniform rku, uniform flap, global MLP-only kinetic (the CPU rows' pick)}, global
#   MLP-only rku with ce (on CPU the normalisation cost it +13 [+1, +25] of 256 against kinetic) and the
#   recovery-only control, then the uniform four to 30 %. Every row saves as it finishes and a rerun skips finished
#   rows, so an interrupted run loses only the rows in flight.
# Answers may run to 512 new tokens and calibration / training windows hold 640 tokens: a 256-token window
# keeps 35 % of the dense traces' written steps, so gold-vs-self would be decided by the window, and at 256
# new tokens 58 % of the dense model's GSM8K answers are cut (RESULTS.md, "Why the answers are wrong").
# Prepared on CPU; not yet run on a GPU (README, "Not measured yet").
set -euo pipefail
cd "$(dirname "$0")/.."
export RKU_CACHE="${RKU_CACHE:-$PWD/benchmarks/work/cache}"
ONESHOT="--models qwen0.5b --sparsities 0.2 0.3 0.4 --gsm8k-limit 100 --svamp-limit 100 --batch-size 100
         --calib-samples 64 --threads 2 --jobs 4 --device cuda --max-new-tokens 512 --calib-max-length 640"
for source in gold self; do
  python -m benchmarks.run oneshot $ONESHOT --allocations uniform --methods dense rku kinetic flap --calib-source "$source" &
  python -m benchmarks.run oneshot $ONESHOT --allocations global --methods rku_mlp kinetic_mlp flap_mlp --calib-source "$source" &
done
wait
RECOVERED="rku:gpu-ce-gold flap:gpu-ce-gold kinetic:gpu-global-mlp-ce-gold rku:gpu-global-mlp-ce-gold rku:gpu-kd-self flap:gpu-kd-self kinetic:gpu-global-mlp-kd-self"
for row in $RECOVERED; do
  python -m benchmarks.run recover --methods "${row%%:*}" --preset "${row#*:}" --threads 2 &
done
python -m benchmarks.run recover --methods rku --preset gpu-recovery-only --threads 2 &
wait
for method in rku flap; do  # the same to 30 %, once the 40 % rows are saved
  python -m benchmarks.run recover --methods "$method" --preset gpu-ce-gold-30 --threads 2 &
  python -m benchmarks.run recover --methods "$method" --preset gpu-kd-self-30 --threads 2 &
done
wait
# Last, the seven 40 % models on 500 + 500 questions: at the gaps measured on CPU (KD - CE, RKU - FLAP: 2-4 of
# 128 questions), 100 + 100 cannot resolve them (README, "What 64 questions can resolve"). About 5 min per model,
# estimated from the 40-55 s that 100 + 100 answers took per round in the `full` rows; rows save as they finish.
for row in $RECOVERED; do
  python -m benchmarks.recover_answers --method "${row%%:*}" --preset "${row#*:}" --questions 500 --batch-size 100 --threads 2 &
done
wait
python -m benchmarks.run render
