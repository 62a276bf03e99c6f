#!/usr/bin/env bash
# The reasoning issue's rows with windows that hold whole texts (640 tokens: prompt plus a whole trace or gold
# solution), on 2 CPU cores in two parallel lanes of one torch thread each (about 4 h from scratch; finished
# rows are skipped, so a rerun measures only what is missing):
#   lane 1: KD on the dense model's own traces to 40 % (`cpu-uniform-kd-self-L640`, ~100 min) and its pair, CE on
#           gold text in the same window (`cpu-uniform-L640`, ~70 min); one-shot RKU 20 % and FLAP 30 % on gold;
#   lane 2: one-shot accuracy (first 32 GSM8K + 32 SVAMP, ~25 min each) of FLAP 20 %, RKU / FLAP 30 %, kinetic
#           20 % and RKU 40 % calibrated on self traces, and of FLAP 20 %, RKU 30 %, kinetic 20 % and RKU 40 % on
#           gold text.
# The two recover runs do not share a lane: together they would need about 30 GiB.
# RESULTS.md pairs them in "Calibration source: accuracy" and in the prune-and-recover accuracy table.
set -euo pipefail
cd "$(dirname "$0")/.."
oneshot() { python -m benchmarks.oneshot --row "$1" --calib-source "$2" --calib-max-length 640 --no-kl --threads 1; }
recover() { python -m benchmarks.recover --method rku --preset "$1" --threads 1; }
(
  recover cpu-uniform-kd-self-L640
  recover cpu-uniform-L640
  oneshot qwen0.5b-rku-uniform-20 gold
  oneshot qwen0.5b-flap-uniform-30 gold
) &
(
  oneshot qwen0.5b-flap-uniform-20 self
  oneshot qwen0.5b-rku-uniform-30 self
  oneshot qwen0.5b-flap-uniform-20 gold
  oneshot qwen0.5b-flap-uniform-30 self
  oneshot qwen0.5b-rku-uniform-30 gold
  oneshot qwen0.5b-kinetic-uniform-20 self
  oneshot qwen0.5b-kinetic-uniform-20 gold
  oneshot qwen0.5b-rku-uniform-40 self
  oneshot qwen0.5b-rku-uniform-40 gold
) &
wait
python -m benchmarks.run render
