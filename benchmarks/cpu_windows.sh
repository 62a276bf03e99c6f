#!/usr/bin/env bash
# The reasoning issue's rows with windows that hold whole texts (640 tokens: prompt plus a whole trace or gold
# solution), on 2 CPU cores in two parallel lanes of one torch thread each (about 7 h from scratch;
# finished rows are skipped, so a rerun measures only what is missing):
#   lane 1: prune-and-recover to 40 % (uniform, 2 rounds x 16 steps) for RKU and FLAP: KD on the dense model's own
#           traces (`cpu-uniform-kd-self-L640`, 80-100 min each) and CE on gold text in the same window
#           (`cpu-uniform-L640`, ~60 min each); then each run's final answers with a 512-token cap
#           (`benchmarks.recover_answers`: only the answers cut at 256 are regenerated, ~15-40 min each) and on
#           64 + 64 questions (~15 min each), with the dense model's answers to the same 64 + 64;
#   lane 2: one-shot accuracy (first 32 GSM8K + 32 SVAMP, ~20 min each) calibrated on self traces and on gold
#           text: RKU and FLAP at 20, 30 and 40 % uniform, and the best global variant at 40 % by CoT NLL
#           (kinetic, MLP only). Uniform `kinetic` rows would repeat the `rku` ones: under uniform allocation
#           the two prune the same structures.
# The recover runs share a lane because two at once would need about 30 GiB.
# RESULTS.md pairs them in "Calibration source: accuracy" and in the prune-and-recover accuracy table.
set -euo pipefail
cd "$(dirname "$0")/.."
(
  for preset in cpu-uniform-kd-self-L640 cpu-uniform-L640; do
    for method in rku flap; do python -m benchmarks.recover --method $method --preset $preset --threads 1; done
  done
  for preset in cpu-uniform-L640 cpu-uniform-kd-self-L640; do
    for method in rku flap; do
      python -m benchmarks.recover_answers --method $method --preset $preset --cap 512 --threads 1
      python -m benchmarks.recover_answers --method $method --preset $preset --questions 64 --batch-size 16 --threads 1
    done
  done
  python -m benchmarks.oneshot --row qwen0.5b-dense --gsm8k-limit 64 --svamp-limit 64 --no-kl --threads 1
) &
(
  for row in rku-uniform-20 rku-uniform-30 rku-uniform-40 flap-uniform-20 flap-uniform-30 flap-uniform-40 kinetic_mlp-global-40; do
    for source in self gold; do
      python -m benchmarks.oneshot --row "qwen0.5b-$row" --calib-source $source --calib-max-length 640 --no-kl --threads 1
    done
  done
) &
wait
python -m benchmarks.run render
