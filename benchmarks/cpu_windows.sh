#!/usr/bin/env bash
# The reasoning issue's rows with windows that hold whole texts (640 tokens: prompt plus a whole trace or gold
# solution), on 2 CPU cores in two parallel lanes of one torch thread each (about 2 h 10 min):
#   lane 1: KD on the dense model's own traces to 40 % in 640-token windows (`cpu-uniform-kd-self-L640`,
#           ~100 min), then RKU 20 % calibrated on gold text in a 640-token window;
#   lane 2: one-shot accuracy (first 32 GSM8K + 32 SVAMP) of FLAP 20 % and RKU / FLAP 30 % calibrated on self
#           traces, and of FLAP 20 % and RKU 30 % on gold text, all in 640-token windows (~25 min each).
# RESULTS.md pairs them in "Calibration source: accuracy" and in the prune-and-recover accuracy table (against
# the `cpu-uniform` gold-CE run). Every row saves as it finishes and a rerun skips finished rows.
set -euo pipefail
cd "$(dirname "$0")/.."
oneshot() { python -m benchmarks.oneshot --row "$1" --calib-source "$2" --calib-max-length 640 --no-kl --threads 1; }
(
  python -m benchmarks.recover --method rku --preset cpu-uniform-kd-self-L640 --threads 1
  oneshot qwen0.5b-rku-uniform-20 gold
) &
(
  oneshot qwen0.5b-flap-uniform-20 self
  oneshot qwen0.5b-rku-uniform-30 self
  oneshot qwen0.5b-flap-uniform-20 gold
  oneshot qwen0.5b-flap-uniform-30 self
  oneshot qwen0.5b-rku-uniform-30 gold
) &
wait
python -m benchmarks.run render
