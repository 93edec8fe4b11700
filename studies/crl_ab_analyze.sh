#!/usr/bin/env bash
# The tables and figures of the continual-learning study (studies/crl_ab.yaml), from its committed
# results alone (no run needed):
#   bash studies/crl_ab_analyze.sh [RESULTS] [OUT] [ANALYZE_OPTION...]
#       (default studies/results/crl_ab -> analysis/crl_ab; further options go to analyze_results.py)
# With OUT left at its default, the README's table and figures (results.md, results_iqm.csv, compare.csv,
# curves_by_domain.png, compare.png) are also copied to docs/results/crl_ab, where they are committed.
# Groups: domain x LLCD arm. References: the single-task B runs (crl_tasks [3]) and, for A, the LLCD-off
# runs' first window. P(improvement) of each LLCD arm over LLCD off, and of the detector gate over
# always and over never, per domain.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-studies/results/crl_ab}
out=${2:-analysis/crl_ab}
published=(results.md results_iqm.csv compare.csv curves_by_domain.png compare.png)
python=${PYTHON:-.venv/bin/python}
on="llcd=True llcd_gate"
kept() {  # kept continual runs of one arm: kept DOMAIN_TASK SUFFIX
  compgen -G "$results/*task$1-crl_tasks_0_3_0_-$2" > /dev/null
}
pairs=()
for domain in cup_catch cartpole_swingup; do
  label=${domain%_*}
  kept "dmc_$domain" llcdFalse || { echo "crl_ab_analyze: no kept LLCD-off run of $domain: nothing to compare" >&2; continue; }
  for gate in detector always never; do
    if kept "dmc_$domain" "llcdTrue-llcd_gate$gate"; then
      pairs+=(--compare "$label $on=$gate" "$label llcd=False")
    else
      echo "crl_ab_analyze: no kept run of $label gate $gate yet: its comparisons are left out" >&2
    fi
  done
  for gate in always never; do
    if kept "dmc_$domain" llcdTrue-llcd_gatedetector && kept "dmc_$domain" "llcdTrue-llcd_gate$gate"; then
      pairs+=(--compare "$label $on=detector" "$label $on=$gate")
    fi
  done
done
"$python" analyze_results.py "$results/*crl_tasks_0_3_0_-*" --group-by domain llcd llcd_gate \
  --reference "$results/*crl_tasks_3_-*" "$results/*crl_tasks_0_3_0_-llcdFalse" --out "$out" "${pairs[@]}" "${@:3}"
if [ -z "${2:-}" ]; then
  mkdir -p docs/results/crl_ab
  cp "${published[@]/#/$out/}" docs/results/crl_ab/
  echo "crl_ab_analyze: the README's table and figures copied to docs/results/crl_ab/"
fi
