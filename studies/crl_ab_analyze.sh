#!/usr/bin/env bash
# The tables and figures of the continual-learning study (studies/crl_ab.yaml), from its committed
# results alone (no run needed):
#   bash studies/crl_ab_analyze.sh [RESULTS] [OUT] [ANALYZE_OPTION...]
#       (default studies/results/crl_ab -> docs/results/crl_ab; further options go to analyze_results.py)
# Groups: domain x LLCD arm. References: the single-task B runs (crl_tasks [3]) and, for A, the LLCD-off
# runs' first window. P(improvement) of each LLCD arm over LLCD off, and of the detector gate over
# always and over never, per domain.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-studies/results/crl_ab}
out=${2:-docs/results/crl_ab}
python=${PYTHON:-.venv/bin/python}
on="llcd=True llcd_gate"
pairs=()
for domain in cup cartpole; do
  for gate in detector always never; do
    pairs+=(--compare "$domain $on=$gate" "$domain llcd=False")
  done
  pairs+=(--compare "$domain $on=detector" "$domain $on=always")
  pairs+=(--compare "$domain $on=detector" "$domain $on=never")
done
"$python" analyze_results.py "$results/*crl_tasks_0_3_0_-*" --group-by domain llcd llcd_gate \
  --reference "$results/*crl_tasks_3_-*" "$results/*crl_tasks_0_3_0_-llcdFalse" --out "$out" "${pairs[@]}" "${@:3}"
