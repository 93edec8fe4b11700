#!/usr/bin/env bash
# The results table of the continual-learning pilot (studies/crl.yaml; docs/results/2026-12-06-crl-pilot.md), from its runs:
#   python sweep.py --file studies/crl.yaml --cpus-per-run 1
#   bash studies/crl_analyze.sh [SWEEP_ROOT]        (default logdir/sweep-crl; writes SWEEP_ROOT/study)
# Groups: domain x LLCD arm x replay; references: the single-task runs; P(improvement) of each
# LLCD arm over LLCD off per domain, of the detector gate over never, and of reservoir over FIFO.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-logdir/sweep-crl}
python=${PYTHON:-.venv/bin/python}
on="llcd=True llcd_gate"
pairs=()
for domain in cartpole walker; do
  off="$domain llcd=False replay=reservoir"
  for gate in detector always never; do
    pairs+=(--compare "$domain $on=$gate replay=reservoir" "$off")
  done
  pairs+=(--compare "$domain $on=detector replay=reservoir" "$domain $on=never replay=reservoir")
done
pairs+=(--compare "cartpole llcd=False replay=reservoir" "cartpole llcd=False replay=fifo")
pairs+=(--compare "cartpole $on=detector replay=reservoir" "cartpole $on=detector replay=fifo")
"$python" analyze_results.py "$root/*crl_tasks_0_3_*" --group-by domain llcd llcd_gate replay \
  --reference "$root/*crl_tasks_0_-*" "$root/*crl_tasks_3_-*" --out "$root/study" "${pairs[@]}"
