"""Tables and plots for continual-RL DreamerV3 runs (forgetting, transfer, LLCD).

Usage::

    python analyze_results.py RUN_DIR... [--out DIR] [--reference DIR...] [--group-by KEY ...]
                              [--include-incomplete] [--compare A B [--compare C D ...]]
    python analyze_results.py RUN_DIR... --detectors [--out DIR]
    python analyze_results.py RUN_DIR... --anchor SCORES.csv [--out DIR]

Globs are expanded here too; a directory without ``config.yaml`` stands for its sub-directories that are
runs. A run holds ``config.yaml`` (the resolved config) and ``metrics.jsonl`` (``step`` in env steps and
scalars: ``task_{k}_eval_return`` (``eval_return`` without ``crl_tasks``), ``model_loss``,
``llcd_detection``, ``llcd_score``, ``llcd_probe_accuracy``; malformed lines are skipped with a warning).
Entry j of ``crl_tasks`` covers agent steps [prefill + j*spt, prefill + (j+1)*spt), times
``action_repeat`` in env steps; a run without ``crl_tasks`` trains task 0 in one open window.

Definitions (p_i(t): eval return on task i at env step t; the eval points of window [s, e) are s < t <= e;
T: the last eval; e_i: the last eval point <= the end of task i's first window): best return (max p_i(t)
in task i's first window, and in every window); final return p_i(T); average performance P(T), with
P(t) = mean_i p_i(t) where every task was evaluated; forgetting F_i = p_i(e_i) - p_i(T) and
F_i^max = max_{t<=e_i} p_i(t) - p_i(T), missing while that window is unfinished (no eval at or after its
end), their means over the tasks whose first window is not the schedule's last; forward transfer
FT_i = (AUC_i - AUC_i^ref)/(1 - AUC_i^ref), AUC = trapezoidal mean of return/1000 over [s, s + L] of
task i's first window, AUC^ref = mean over the reference runs of task i (same domain, schedule starting
with i: ``crl_tasks: [i]`` or a continual run's first window) over L env steps from their prefill; recovery
R_j = mean p_k(t) over the eval points in the first half of window j (a switch, task k) / the references'
mean return on k at the end of their first window; switch cost C_j = 1 - p_k(s_j) / p_k'(s_j) (k' the
task of window j-1), both at the eval at the switch s_j; convergence: env steps from s to the first eval reaching 90% of the
window's best; final model loss: mean of the last 10 values; LLCD, strict and in agent steps (env steps /
action_repeat): a switch (window j >= 1 with another task than j-1) is hit by the first detection within
``llcd_max_delay`` (0: one episode), else missed; other detections are false alarms (per 100K agent
steps); hit rate beside its chance level (``detector.detection_report``); probe accuracy: last value.

Runs are grouped by (domain, llcd, replay) or the ``--group-by`` keys (dotted keys reach into nested
configs); seeds are the repeats; a run with another schedule than its group's most common one forms its
own group. A run that stops before its schedule ends is named in a warning and left out unless
``--include-incomplete``. Across seeds: mean and sample std (ddof=1); IQM with 95% stratified-bootstrap
CIs (rliable, seeded) of final return, average performance, forgetting, forward transfer (runs x tasks)
and recovery (runs x switches); ``--compare A B`` (repeatable): the probability that group A improves on group B on each (less
forgetting is better). Outputs in ``--out``: the tables on the console, results.csv, results_per_run.csv,
results_iqm.csv, results.md, compare.csv, final_results_grid_shaded.png (mean, 95% bootstrap CI band,
task switches), curve_*.png per curve, bars_*.png per per-task metric, iqm_intervals.png (rliable's IQM and
CI figure), compare.png (each --compare pair's P(improvement) and CI), and with groups of several domains
curves_by_domain.png (a row per domain, a colour per arm).
``--detectors`` replays the
recorded score streams (``llcd_scores.npz``) through every score x detector pair with each run's
settings (scores phase-normalised too where the phase was recorded, and max-of-CUSUMs fusions): the strict table per run and pooled (detectors.csv) and every switch (switches.csv).
``--anchor`` sets single-task runs beside published scores (e.g. DreamerV3's): per task and each env
step of the anchor file, the anchor's mean and range over its seeds and ours (last eval at or before that
step), with wall time per run and the CPU (learning_table.md/.csv, learning.png).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import gzip
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402
from rliable import library as rly, metrics as rly_metrics, plot_utils as rly_plots  # noqa: E402

import detector  # noqa: E402
from crl_schedule import Schedule, Window, forgetting  # noqa: E402
from detector import detection_report, resolve_max_delay  # noqa: E402

PROG = "analyze_results"
RETURN_SCALE = 1000.0  # DMC returns lie in [0, 1000]
CONVERGENCE_FRACTION = 0.9
LOSS_TAIL = 10
FALSE_ALARM_UNIT = 100_000  # agent steps
FALSE_ALARM_GOAL = 1.0  # per FALSE_ALARM_UNIT: the detection goal's false-alarm bound
# The settings each detector is replayed at, (config key, short name, values): the false-alarm budget a CUSUM is
# built for and the sigma rule's multiple, each traded for delay and hits.
DETECTOR_GRID = {"cusum": ("llcd_false_alarms_per_100k", "fa", (1.0, 0.1)), "threshold": ("llcd_sigma", "sigma", (3.0, 5.0))}
DEFAULT_GROUP_KEYS = ("domain", "llcd", "replay")
BOOTSTRAP_REPS, BOOTSTRAP_SEED = 2000, 0
CURVE_POINTS, PLOT_BOOT = 200, 300  # plotted grid points per curve, bootstrap resamples per plotted CI
AGGREGATES = {"final_return": 1, "avg_performance": 1, "forgetting": -1, "forward_transfer": 1,
              "recovery": 1}  # 1: higher is better
DETECTION_KEY, SCORE_KEY, PROBE_KEY, LOSS_KEY = "llcd_detection", "llcd_score", "llcd_probe_accuracy", "model_loss"
FAMILY_TITLES = {"best_return": "Best return in the task's first window", "final_return": "Final return",
                 "forgetting": "Forgetting $F_i = p_i(e_i) - p_i(T)$",
                 "forgetting_max": "Forgetting $F_i^{max} = \\max_{t \\leq e_i} p_i(t) - p_i(T)$",
                 "forward_transfer": "Forward transfer $FT_i$ (normalised AUC)",
                 "recovery": "Recovery $R_j$ (first half of window $j$ / reference)",
                 "switch_cost": "Return lost at switch $j$, $C_j$",
                 "convergence_steps": "Env steps to 90% of the window's best return"}


class RunLoadError(Exception):
    """A run directory that cannot be analysed (message is user-facing)."""


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def info(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def fail(message: str) -> None:
    """Stop with a one-line error message (no traceback)."""
    raise SystemExit(f"{PROG}: error: {message}")


# ----------------------------------------------------------------- schedule and runs

@dataclass
class Run:
    """One loaded run: its config and {key: (steps, values)} arrays sorted by step."""

    path: str
    config: dict
    scalars: dict

    def __post_init__(self):
        self.schedule = Schedule.from_config(self.config)
        self.seed, self.domain = self.config.get("seed"), domain_of(self.config.get("task", ""))
        self.last_step = float(max((s[-1] for s, _ in self.scalars.values() if len(s)), default=0.0))
        self.complete = not self.schedule.tasks or self.last_step >= self.schedule.windows()[-1].end_env_step
        self.uses_llcd = bool(self.config.get("llcd")) or DETECTION_KEY in self.scalars
        self.has_eval_rows = any(k == "eval_return" or k.startswith("task_") and k.endswith("_eval_return")
                                 for k in self.scalars)
        self.reference_task = self.schedule.tasks[0] if self.schedule.tasks else None  # learnt from scratch

    def series(self, key: str) -> pd.Series:
        """Values of ``key`` indexed by env step (empty if never logged)."""
        steps, values = self.scalars.get(key, ((), ()))
        return pd.Series(values, index=np.asarray(steps, float), dtype=float)

    def detection_steps(self) -> np.ndarray:
        """Env steps of the logged LLCD detections."""
        logged = self.series(DETECTION_KEY)
        return logged.index.to_numpy()[logged.to_numpy() > 0]

    def eval_curve(self, task: int) -> pd.Series:
        """Eval returns of ``task`` by env step, values logged at the same step averaged."""
        key = f"task_{task}_eval_return"
        return self.series(key if key in self.scalars or self.schedule.tasks else "eval_return").groupby(level=0).mean()


def domain_of(task: str) -> str:
    """Domain of a task name: 'dmc_ball_in_cup_catch' -> 'ball_in_cup'."""
    return str(task).removeprefix("dmc_").removeprefix("crl_").rsplit("_", 1)[0]


def read_config(path: str) -> dict:
    """Load a YAML mapping."""
    from ruamel.yaml import YAML

    with open(path, encoding="utf-8") as f:
        data = YAML(typ="safe", pure=True).load(f)
    if not isinstance(data, dict):
        raise RunLoadError(f"{path} is not a YAML mapping")
    return data


def parse_metrics_lines(lines: list, source: str = "metrics.jsonl") -> dict:
    """JSONL lines -> {key: (steps, values)} of the finite numbers; bad lines are warned."""
    records, last = [], max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = float(record["step"])
        except (ValueError, KeyError, TypeError):
            warn(f"{source}: skipping {'truncated last line' if i == last else f'malformed line {i + 1}'}")
            continue
        records += [(step, key, float(value)) for key, value in record.items() if key != "step" and
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    frame = pd.DataFrame(records, columns=["step", "key", "value"]).sort_values("step", kind="stable")
    return {key: (rows["step"].to_numpy(), rows["value"].to_numpy()) for key, rows in frame.groupby("key", sort=False)}


def load_run(path: str) -> Run:
    """Load one run directory (or a run's kept results: metrics.jsonl.gz, see sweep.py --results);
    raise RunLoadError with a clear message."""
    if not os.path.isdir(path):
        raise RunLoadError(f"{path}: not a directory")
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise RunLoadError(f"{path}: no config.yaml, not a run directory")
    metrics_path = next((os.path.join(path, name) for name in ("metrics.jsonl", "metrics.jsonl.gz")
                         if os.path.isfile(os.path.join(path, name))), None)
    if metrics_path is None:
        raise RunLoadError(f"{path}: no metrics.jsonl, not a run directory")
    try:
        config = read_config(os.path.join(path, "config.yaml"))
    except RunLoadError:
        raise
    except Exception as exc:  # any YAML error becomes a one-line message
        raise RunLoadError(f"{path}/config.yaml: cannot parse ({exc.__class__.__name__})")
    opener = gzip.open if metrics_path.endswith(".gz") else open
    with opener(metrics_path, "rt", encoding="utf-8", errors="replace") as f:
        return Run(path, config, parse_metrics_lines(f.readlines(), metrics_path))


def expand_paths(patterns: list) -> list:
    """Expand globs and directories of runs; keep order, drop duplicates."""
    paths = []
    for path in (p for pattern in patterns for p in sorted(glob.glob(pattern)) or [pattern]):
        below = [] if os.path.exists(os.path.join(path, "config.yaml")) or not os.path.isdir(path) else [
            d for d in sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isfile(f"{d}/config.yaml")]
        paths.extend(below or [path])
    return list(dict.fromkeys(os.path.normpath(p) for p in paths))


def load_runs(paths: list, what: str = "run") -> list:
    """Load many runs with progress output; unusable paths are warned."""
    runs, every = [], max(1, math.ceil(len(paths) / 10))
    for i, path in enumerate(paths, 1):
        try:
            runs.append(load_run(path))
        except RunLoadError as exc:
            warn(f"skipping {what}: {exc}")
        if len(paths) >= 10 and (i % every == 0 or i == len(paths)):
            info(f"loading {what}s: {i}/{len(paths)}")
    return runs


# ----------------------------------------------------------------- metrics of one run


def in_window(curve: pd.Series, start: float, end: float, include_start: bool = False) -> pd.Series:
    """Points of ``curve`` in (start, end] (or [start, end])."""
    steps = curve.index
    return curve[((steps >= start) if include_start else (steps > start)) & (steps <= end)]


def last_value(series: pd.Series) -> float:
    return float(series.iloc[-1]) if len(series) else math.nan


def nanmean(values: list) -> float:
    return float(pd.Series(values, dtype=float).mean())


def best_in_window(curve: pd.Series, window: Window) -> float:
    return float(in_window(curve, window.start_env_step, window.end_env_step).max())


def convergence_steps(curve: pd.Series, window: Window) -> float:
    """Env steps from the window start to the first eval reaching 90% of the window's best."""
    points = in_window(curve, window.start_env_step, window.end_env_step)
    if not len(points):
        return math.nan
    best = points.max()
    return float(points[points >= best - (1 - CONVERGENCE_FRACTION) * abs(best)].index[0] - window.start_env_step)


def normalised_auc(curve: pd.Series, start: float, length: float) -> float:
    """Trapezoidal mean of return/1000 over the span of the eval points in [start, start + length]."""
    points = in_window(curve, start, start + length, include_start=True) / RETURN_SCALE
    if not len(points) or not 0 < length < math.inf:
        return math.nan
    tau = (points.index.to_numpy() - start) / length
    return float(points.iloc[0]) if len(tau) == 1 else float(np.trapezoid(points.to_numpy(), tau) / (tau[-1] - tau[0]))


def average_performance(curves: list) -> pd.Series:
    """P(t) at the eval points where every curve has a value."""
    return pd.concat(curves, axis=1, join="inner").sort_index().mean(axis=1) if curves else pd.Series(dtype=float)


def reference_windows(refs: list, task: int, domain: str) -> list:
    """(run, first window) of the reference runs of ``task``: the runs of ``domain`` whose schedule starts
    with it, so their first window learns it from scratch (a single-task run, or a continual run's first
    window, which trains exactly as the single-task run: evaluation leaves the random streams alone)."""
    return [(r, r.schedule.windows()[0]) for r in refs if r.reference_task == task and r.domain == domain]


def reference_auc(refs: list, task: int, domain: str, length: float) -> float:
    """Mean AUC of the reference runs of ``task`` over ``length`` env steps from their prefill."""
    aucs = []
    for ref, window in reference_windows(refs, task, domain):
        curve = in_window(ref.eval_curve(task), window.start_env_step, window.end_env_step, include_start=True)
        if len(curve) and curve.index[-1] - window.start_env_step < length:
            warn(f"reference {ref.path} covers {curve.index[-1] - window.start_env_step:.0f} of the "
                 f"{length:.0f} env steps of task {task}'s window")
        aucs.append(normalised_auc(curve, window.start_env_step, length))
    return nanmean(aucs)


def reference_return(refs: list, task: int, domain: str) -> float:
    """Mean over the reference runs of ``task`` of their return at the end of their first window."""
    return nanmean([last_value(in_window(ref.eval_curve(task), window.start_env_step, window.end_env_step))
                    for ref, window in reference_windows(refs, task, domain)])


def forward_transfer_metrics(run: Run, refs: list, curves: dict) -> dict:
    """FT_i = (AUC_i - AUC_i^ref) / (1 - AUC_i^ref) per task (NaN when undefined) and their mean."""
    out = {}
    for task, window in run.schedule.first_windows().items():
        length = window.end_env_step - window.start_env_step
        auc = normalised_auc(curves[task], window.start_env_step, length)
        ref = reference_auc(refs, task, run.domain, length) if math.isfinite(auc) else math.nan
        out[f"forward_transfer/task{task}"] = (auc - ref) / (1 - ref) if math.isfinite(ref) and ref != 1 else math.nan
    out["forward_transfer/mean"] = nanmean(list(out.values()))
    return out


def recovery_metrics(run: Run, refs: list, curves: dict) -> dict:
    """R_j: the mean return on window j's task over the eval points in the first half of window j, over
    the reference's return at the end of its first window, per switch j; and their mean."""
    out = {}
    for w in run.schedule.switches():
        early = in_window(curves[w.task], w.start_env_step, (w.start_env_step + w.end_env_step) / 2)
        ref = reference_return(refs, w.task, run.domain)
        out[f"recovery/switch{w.index}_task{w.task}"] = early.mean() / ref if len(early) and ref > 0 else math.nan
    out["recovery/mean"] = nanmean(list(out.values()))
    return out


def switch_costs(run: Run, curves: dict) -> dict:
    """C_j = 1 - p_new(s_j) / p_old(s_j): the share of its return that the policy trained up to switch j
    loses on the new physics, both evaluated at the switch s_j (NaN without that eval or if p_old <= 0)."""
    out, windows = {}, run.schedule.windows()
    for w in run.schedule.switches():
        old, new = (curves[t].get(w.start_env_step, math.nan) for t in (windows[w.index - 1].task, w.task))
        out[f"switch_cost/switch{w.index}_task{w.task}"] = 1 - new / old if old > 0 else math.nan
    return out


def llcd_metrics(run: Run) -> dict:
    """Strict LLCD scores in agent steps: delay per switch and median, hit rate and its chance level,
    misses, false alarms per 100K agent steps, probe accuracy."""
    repeat, switches = run.schedule.action_repeat, run.schedule.switches()
    max_delay = resolve_max_delay(run.config.get("llcd_max_delay", 0), run.config.get("time_limit", 1000), repeat)
    spans = [(w.start_agent_step, w.end_agent_step) for w in switches]
    report = detection_report(run.detection_steps() / repeat, spans, run.last_step / repeat, max_delay,
                              FALSE_ALARM_UNIT)
    out = {f"llcd_delay_agent_steps/switch{w.index}_task{w.task}": d for w, d in zip(switches, report["delays"])}
    return {**out, "llcd_delay_agent_steps/median": report["median_delay"], "llcd_hit_rate": report["hit_rate"],
            "llcd_chance_hit_rate": report["chance_hit_rate"], "llcd_misses": float(report["misses"]),
            "llcd_false_alarms_per_100k": report["false_alarms_per_unit"],
            "llcd_probe_accuracy/final": last_value(run.series(PROBE_KEY))}


def compute_run_metrics(run: Run, refs: list | None = None) -> dict:
    """Every scalar metric of one run as an ordered {name: value} mapping."""
    sched, firsts = run.schedule, run.schedule.first_windows()
    curves = {t: run.eval_curve(t) for t in firsts}
    out = {f"best_return/task{t}": best_in_window(curves[t], w) for t, w in firsts.items()}
    if sched.tasks:
        out.update({f"best_return/window{w.index}_task{w.task}": best_in_window(curves[w.task], w)
                    for w in sched.windows()})
    out.update({f"final_return/task{t}": last_value(c) for t, c in curves.items()})
    out["avg_performance/final"] = last_value(average_performance(list(curves.values())))
    drops = {t: forgetting(curves[t].items(), w.end_env_step) for t, w in firsts.items()}
    for i, name in enumerate(("forgetting", "forgetting_max")):
        out.update({f"{name}/task{t}": drop[i] for t, drop in drops.items()})
        out[f"{name}/mean"] = nanmean([drops[t][i] for t in sched.forgettable_tasks()])
    out.update(switch_costs(run, curves))
    if refs:
        out.update(forward_transfer_metrics(run, refs, curves))
        out.update(recovery_metrics(run, refs, curves))
    out.update({f"convergence_steps/task{t}": convergence_steps(curves[t], w) for t, w in firsts.items()})
    out["model_loss/final"] = float(run.series(LOSS_KEY).iloc[-LOSS_TAIL:].mean())
    return {**out, **llcd_metrics(run)} if run.uses_llcd else out


# ----------------------------------------------------------------- groups and statistics


@dataclass
class Group:
    """Runs averaged together (the seeds of one configuration)."""

    label: str
    runs: list

    @property
    def schedule(self) -> Schedule:
        return self.runs[0].schedule

    @property
    def heading(self) -> str:
        return f"{self.label} (n={len(self.runs)})"


def config_value(config: dict, key: str):
    """A (dotted) key of a config; 'domain' is derived from task."""
    if key == "domain":
        return domain_of(config.get("task", ""))
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def short(value) -> str:
    """Compact string for config values (lists without spaces)."""
    return "[" + ",".join(map(short, value)) + "]" if isinstance(value, (list, tuple)) else str(value)


def group_label(config: dict, keys: tuple) -> str:
    """Readable label of a group key, e.g. 'cartpole llcd=True replay=fifo'; ``llcd_*`` keys are left out
    of a run without LLCD (they do nothing there)."""
    shown = [k for k in keys if config.get("llcd") or not k.startswith("llcd_")]
    return " ".join(str(config_value(config, k)) if k == "domain" else f"{k}={short(config_value(config, k))}"
                    for k in shown)


def group_runs(runs: list, group_by: list | None = None) -> list:
    """Group runs by config keys; a run with another schedule than its group's most common one is split off."""
    keys = tuple(group_by or DEFAULT_GROUP_KEYS)
    for key in keys:
        missing = [r.path for r in runs if config_value(r.config, key) == "<missing>"]
        if missing:
            warn(f"group key '{key}' is not in the config of {len(missing)} run(s) "
                 f"(e.g. {missing[0]}); they are grouped as {key}=<missing>")
    by_label, groups = {}, []
    for run in runs:
        by_label.setdefault(group_label(run.config, keys), []).append(run)
    for label, members in by_label.items():
        main = Counter(r.schedule for r in members).most_common(1)[0][0]
        for schedule in sorted(dict.fromkeys(r.schedule for r in members), key=lambda s: s != main):
            same = [r for r in members if r.schedule == schedule]
            name = label if schedule == main else f"{label} [{schedule.describe()}]"
            if schedule != main:
                warn(f"group '{label}': {len(same)} run(s) ({', '.join(r.path for r in same)}) "
                     f"have a different schedule ({schedule.describe()}); reported as group '{name}'")
            groups.append(Group(name, same))
    return groups


def select_runs(groups: list, include_incomplete: bool) -> list:
    """Drop runs without eval rows and, unless ``include_incomplete``, incomplete runs (each named in a
    warning); drop empty groups."""
    kept = []
    for group in groups:
        for run in group.runs:
            if not run.has_eval_rows:
                warn(f"{run.path}: no eval rows (task_k_eval_return / eval_return); skipped")
            elif not run.complete:
                end = run.schedule.windows()[-1].end_env_step
                warn(f"{run.path}: incomplete, stops at env step {run.last_step:.0f} before the schedule ends at "
                     f"{end:.0f}; " + ("kept (--include-incomplete)" if include_incomplete
                                       else "left out (--include-incomplete keeps it)"))
        group.runs = [r for r in group.runs if r.has_eval_rows and (r.complete or include_incomplete)]
        repeated = [s for s, c in Counter(r.seed for r in group.runs).items() if c > 1]
        if repeated:
            warn(f"group '{group.label}': seed(s) {repeated} appear more than once")
        if group.runs:
            kept.append(group)
        else:
            warn(f"group '{group.label}' is empty (no complete run with eval rows); skipped")
    return kept


def run_tables(groups: list, refs: list) -> tuple:
    """(every run's metrics, one row per run; mean, std (ddof=1) and count of each group x metric)."""
    metrics = [(g, r, compute_run_metrics(r, refs)) for g in groups for r in g.runs]
    wide = pd.DataFrame([{"group": g.label, "run": r.path, "seed": r.seed, **m} for g, r, m in metrics])
    long = pd.DataFrame([(g.label, k, v) for g, _, m in metrics for k, v in m.items()],
                        columns=["group", "metric", "value"])
    stats = long.groupby(["group", "metric"], sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    stats.insert(1, "n_runs", stats["group"].map({g.label: len(g.runs) for g in groups}))
    return wide, stats.rename(columns={"count": "n"})


def score_frame(wide: pd.DataFrame, group: Group, family: str) -> pd.DataFrame:
    """Runs x tasks scores of one aggregate metric (forgetting: the forgettable tasks; recovery: the switches);
    tasks without any value, then runs with a missing one, are dropped."""
    tasks = group.schedule.forgettable_tasks() if family == "forgetting" else list(group.schedule.first_windows())
    columns = (["avg_performance/final"] if family == "avg_performance" else
               [f"recovery/switch{w.index}_task{w.task}" for w in group.schedule.switches()] if family == "recovery"
               else [f"{family}/task{t}" for t in tasks])
    return wide[wide["group"] == group.label].reindex(columns=columns).dropna(axis=1, how="all").dropna()


def interval_estimate(scores, func, reps: int = BOOTSTRAP_REPS) -> tuple:
    """(point, low, high) of ``func`` on ``scores`` with a 95% stratified-bootstrap CI (rliable). rliable
    resamples with NumPy's global RNG: it is seeded here for reproducible CIs, then restored."""
    state = np.random.get_state()
    np.random.seed(BOOTSTRAP_SEED)
    try:
        points, intervals = rly.get_interval_estimates({"x": scores}, func, reps=reps)
    finally:
        np.random.set_state(state)
    return (float(np.ravel(points["x"])[0]), *np.ravel(intervals["x"]).tolist())


def iqm_table(wide: pd.DataFrame, groups: list, reps: int = BOOTSTRAP_REPS) -> pd.DataFrame:
    """IQM over runs and tasks and its 95% CI of every aggregate metric per group."""
    rows = [(g.label, family, *interval_estimate(scores, lambda s: np.array([rly_metrics.aggregate_iqm(s)]), reps),
             *scores.shape) for g in groups for family in AGGREGATES
            if (scores := score_frame(wide, g, family).to_numpy()).size]
    return pd.DataFrame(rows, columns=["group", "metric", "iqm", "ci_low", "ci_high", "runs", "tasks"])


def compare_table(wide: pd.DataFrame, a: Group, b: Group, reps: int = BOOTSTRAP_REPS) -> pd.DataFrame:
    """Probability (95% CI) that group a improves on group b per aggregate metric, on their common tasks."""
    rows = []
    for family, sign in AGGREGATES.items():
        x, y = score_frame(wide, a, family), score_frame(wide, b, family)
        common = x.columns.intersection(y.columns)
        if len(common) and len(x) and len(y):
            pair = [sign * x[common].to_numpy(), sign * y[common].to_numpy()]
            point, low, high = interval_estimate(pair, rly_metrics.probability_of_improvement, reps)
            rows.append((family, point, low, high, len(common), comparison_verdict(low, high)))
    return pd.DataFrame(rows, columns=["metric", "probability", "ci_low", "ci_high", "tasks", "verdict"])


def comparison_verdict(low: float, high: float) -> str:
    """How a P(improvement) interval stands to chance: excludes 0.5, includes it, or is the point 0.5 (all
    scores tied)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    if low == high == 0.5:
        return "all scores tied"
    return "CI includes 0.5" if low <= 0.5 <= high else "CI excludes 0.5"


# ----------------------------------------------------------------- tables


def digits(value: float) -> int:
    """Decimals shown for a value of this magnitude (0, 1 or 3)."""
    return 0 if not math.isfinite(value) or abs(value) >= 10_000 else 1 if abs(value) >= 10 else 3


def number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}" if math.isfinite(value) else "n/a"


def mean_std_cell(mean: float, std: float, n: int) -> str:
    """'mean ± std' with the mean's precision ('± n/a' for one value, 'n/a' for none)."""
    places = digits(mean if mean != 0 else std)
    return f"{number(mean, places)} ± {number(std, places)}" if n else "n/a"


def interval_cell(point: float, low: float, high: float) -> str:
    places = digits(point)
    return f"{number(point, places)} [{number(low, places)}, {number(high, places)}]"


def cell_table(frame: pd.DataFrame, cells: list, groups: list) -> pd.DataFrame:
    """Metric x group table of formatted ``cells`` (one per row of ``frame``); '-' where a group lacks a metric."""
    table = frame.assign(cell=cells).pivot(index="metric", columns="group", values="cell")
    table = table.reindex(index=pd.unique(frame["metric"]), columns=[g.label for g in groups]).fillna("-")
    return table.set_axis([g.heading for g in groups], axis=1).rename_axis("metric")


def markdown_table(table: pd.DataFrame) -> str:
    """A table (index as the first column) in Markdown; '|' is escaped."""
    lines = [[table.index.name, *table.columns], ["---"] * (len(table.columns) + 1),
             *([index, *row] for index, row in zip(table.index, table.to_numpy().tolist()))]
    return "\n".join("| " + " | ".join(str(x).replace("|", "\\|") for x in line) + " |" for line in lines)


# ----------------------------------------------------------------- plots


def cumulative_detections(run: Run) -> pd.Series:
    """Cumulative LLCD detection count on a regular grid (empty without LLCD)."""
    if not run.uses_llcd:
        return pd.Series(dtype=float)
    grid = np.linspace(0.0, max(run.last_step, 1.0), CURVE_POINTS)
    return pd.Series(np.searchsorted(np.sort(run.detection_steps()), grid, side="right"), index=grid, dtype=float)


def build_panels(groups: list) -> list:
    """(name, title, y label, Run -> curve, highlighted task) of every curve: eval return per task, P(t),
    and the model loss and LLCD curves where logged."""
    runs = [r for g in groups for r in g.runs]
    tasks = list(dict.fromkeys(t for g in groups for t in g.schedule.first_windows()))
    panels = [(f"eval_return_task{t}", f"Eval return, task {t}", "return", lambda r, t=t: r.eval_curve(t), t)
              for t in tasks]
    panels.append(("avg_performance", "Average performance P(t)", "mean return", lambda r: average_performance(
        [r.eval_curve(t) for t in r.schedule.first_windows()]), None))
    logged = [(LOSS_KEY, "World-model loss", "loss"), (SCORE_KEY, "LLCD surprise score", "score"),
              (PROBE_KEY, "LLCD probe accuracy", "accuracy")]
    panels += [(key, title, ylabel, lambda r, key=key: r.series(key), None) for key, title, ylabel in logged
               if any(key in r.scalars for r in runs)]
    if any(DETECTION_KEY in r.scalars for r in runs):
        panels.append(("llcd_detections", "LLCD detections (cumulative)", "detections", cumulative_detections, None))
    return panels


def curve_frame(groups: list, extract) -> pd.DataFrame:
    """Long frame (group, run, step, value): each run's curve interpolated on its group's step grid (the
    union of steps, or CURVE_POINTS even steps if longer), missing outside the run's range."""
    frames = []
    for group in groups:
        curves = [c for c in map(extract, group.runs) if len(c)]
        union = np.unique(np.concatenate([c.index for c in curves])) if curves else []
        grid = union if len(union) <= CURVE_POINTS else np.linspace(union[0], union[-1], CURVE_POINTS)
        frames += [pd.DataFrame({"group": group.heading, "run": i, "step": grid, "value": np.interp(
            grid, c.index, c.to_numpy(), left=np.nan, right=np.nan)}) for i, c in enumerate(curves)]
    return pd.concat(frames).dropna() if frames else pd.DataFrame(columns=["group", "run", "step", "value"])


def draw_task_switches(ax, groups: list, task: int | None) -> None:
    """Dashed lines at window starts labelled Tk; ``task``'s windows shaded."""
    starts = {}
    for window in (w for g in groups for w in g.schedule.windows()):
        starts.setdefault(window.start_env_step, window)
    for start, window in sorted(starts.items()):
        ax.axvline(start, color="0.35", linestyle="--", linewidth=0.9, zorder=1)
        ax.text(start, 1.005, f"T{window.task}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8.5, color="0.25", clip_on=False)
        if window.task == task and math.isfinite(window.end_env_step):
            ax.axvspan(window.start_env_step, window.end_env_step, color="0.92", zorder=0, linewidth=0)


def draw_detections(ax, groups: list, palette: dict) -> None:
    """One row of ticks per run, in a strip below the data, at its LLCD detections."""
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.15 * (high - low), high)
    for row, (run, color) in enumerate((r, palette[g.heading]) for g in groups for r in g.runs):
        steps = run.detection_steps()
        ax.plot(steps, np.full(len(steps), 0.025 + 0.035 * row), "|", color=color, markersize=8,
                markeredgewidth=1.6, transform=ax.get_xaxis_transform(), zorder=4)


def plot_panel(ax, panel: tuple, groups: list, palette: dict) -> None:
    """Mean and 95% bootstrap CI band per group (seaborn), task switches, LLCD detections."""
    name, title, ylabel, extract, task = panel
    data = curve_frame(groups, extract)
    if len(data):
        sns.lineplot(data, x="step", y="value", hue="group", palette=palette, errorbar=("ci", 95),
                     n_boot=PLOT_BOOT, seed=BOOTSTRAP_SEED, linewidth=1.8, legend=False, ax=ax)
    if name == SCORE_KEY:
        draw_detections(ax, groups, palette)
    draw_task_switches(ax, groups, task)
    ax.set_title(title, pad=16)
    ax.set(xlabel="env steps", ylabel=ylabel)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, axis="y", alpha=0.3)


def plot_curves(groups: list, panels: list, palette: dict, path: str) -> None:
    """Panels in a grid of up to 4 columns, shared x range, legend below."""
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.4, 4.6 * cols), 3.5 * rows + 0.5), squeeze=False)
    used = list(axes.flat)[:len(panels)]
    for ax, panel in zip(used, panels):
        plot_panel(ax, panel, groups, palette)
    lows, highs = zip(*(ax.get_xlim() for ax in used))
    for ax in axes.flat:
        ax.set(xlim=(min(lows), max(highs)), visible=ax in used)
    handles = [Line2D([], [], color=palette[g.heading], linewidth=2.2) for g in groups]
    handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=0.9))
    labels = [g.heading for g in groups] + ["task switch (Tk = task k)"]
    if any(panel[0] == SCORE_KEY for panel in panels):
        handles.append(Line2D([], [], color="0.35", linestyle="none", marker="|", markersize=8, markeredgewidth=1.6))
        labels.append("LLCD detection (one row per seed)")
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=max(1, cols // 2), frameon=False)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def domain_rows(groups: list) -> list:
    """[(domain, its groups)] in first-seen order: one figure row per domain."""
    rows = {}
    for group in groups:
        rows.setdefault(group.runs[0].domain, []).append(group)
    return list(rows.items())


def arm_of(group: Group) -> str:
    """A group's label without its domain: the arm it shares with the same arm's groups of other domains."""
    domain = group.runs[0].domain
    return " ".join(word for word in group.label.split(" ") if word != domain) or group.label


def arm_palette(groups: list) -> dict:
    """Group heading -> colour, one colour per arm (the same in every domain)."""
    arms = list(dict.fromkeys(map(arm_of, groups)))
    colours = dict(zip(arms, sns.color_palette("tab10", len(arms))))
    return {g.heading: colours[arm_of(g)] for g in groups}


def plot_by_domain(groups: list, path: str) -> None:
    """One row per domain, one column per task's eval return: each arm's mean and 95% CI band, with the
    task switches; the arms keep their colour across rows and each row's legend gives its seeds."""
    rows, palette = domain_rows(groups), arm_palette(groups)
    panels = [p for p in build_panels(groups) if p[0].startswith("eval_return")]
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.6 * len(panels) + 2.8, 3.4 * len(rows)),
                             squeeze=False)
    for (domain, members), row in zip(rows, axes):
        for ax, panel in zip(row, panels):
            plot_panel(ax, panel, members, palette)
            ax.set_ylabel(f"{domain}\nreturn")
        handles = [Line2D([], [], color=palette[g.heading], linewidth=2.2) for g in members]
        row[-1].legend(handles, [g.heading for g in members], loc="center left", bbox_to_anchor=(1.02, 0.5),
                       frameon=False, fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_metric_bars(wide: pd.DataFrame, groups: list, family: str, palette: dict, path: str) -> None:
    """Bars (mean and 95% bootstrap CI, seeds as dots) per task of one per-task metric family."""
    names = [c for c in wide.columns if c.startswith(f"{family}/task")]
    data = wide.melt(id_vars="group", value_vars=names, var_name="metric").dropna()
    data = data.assign(task=data["metric"].str.removeprefix(f"{family}/"), group=data["group"].map(
        {g.label: g.heading for g in groups}))
    order, hues = [n.removeprefix(f"{family}/") for n in names], [g.heading for g in groups]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2.0), 4.2 + 0.3 * len(groups)))
    sns.barplot(data, x="task", y="value", hue="group", order=order, hue_order=hues, palette=palette, alpha=0.8,
                errorbar=("ci", 95), n_boot=PLOT_BOOT, seed=BOOTSTRAP_SEED, capsize=0.1, ax=ax)
    sns.stripplot(data, x="task", y="value", hue="group", order=order, hue_order=hues, dodge=True, legend=False,
                  palette={h: "0.15" for h in hues}, size=3, jitter=False, ax=ax)
    ax.set(title=FAMILY_TITLES.get(family, family.replace("_", " ")), xlabel="", ylabel="")
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_intervals(iqms: pd.DataFrame, groups: list, palette: dict, path: str) -> None:
    """rliable's interval figure: per aggregate metric, each group's IQM and 95% CI (NaN: no such metric)."""
    families = [f for f in AGGREGATES if f in set(iqms["metric"])]
    table = iqms.set_index(["group", "metric"])
    labels = [g.label for g in groups]
    points = {label: np.array([table["iqm"].get((label, f), np.nan) for f in families]) for label in labels}
    intervals = {label: np.array([[table[c].get((label, f), np.nan) for f in families] for c in ("ci_low", "ci_high")])
                 for label in labels}
    row_height = 0.45  # inches per group; the x label sits 0.6 inch below the axes
    fig, _ = rly_plots.plot_interval_estimates(points, intervals, metric_names=[f.replace("_", " ") for f in families],
                                               algorithms=labels[::-1], xlabel="IQM [95% CI]", row_height=row_height,
                                               xlabel_y_coordinate=-0.6 / (row_height * len(labels)),
                                               colors={g.label: palette[g.heading] for g in groups})
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_plots(groups: list, wide: pd.DataFrame, iqms: pd.DataFrame, out: str) -> list:
    """The grid of every curve, one curve PNG per panel, one bar PNG per per-task metric family, the IQM
    intervals of the aggregate metrics and, with several domains, the eval curves by domain and arm."""
    sns.set_theme(style="ticks", rc={"axes.spines.top": False, "axes.spines.right": False})
    palette = dict(zip((g.heading for g in groups), sns.color_palette("tab10", len(groups))))
    panels = build_panels(groups)
    figures = [("final_results_grid_shaded", panels)] + [(f"curve_{p[0]}", [p]) for p in panels]
    for name, shown in figures:
        plot_curves(groups, shown, palette, os.path.join(out, f"{name}.png"))
    families = list(dict.fromkeys(c.partition("/")[0] for c in wide.columns if "/task" in c and wide[c].notna().any()))
    for family in families:
        plot_metric_bars(wide, groups, family, palette, os.path.join(out, f"bars_{family}.png"))
    names = [n for n, _ in figures] + [f"bars_{f}" for f in families]
    if len(domain_rows(groups)) > 1:
        plot_by_domain(groups, os.path.join(out, "curves_by_domain.png"))
        names.append("curves_by_domain")
    if len(iqms):
        plot_intervals(iqms, groups, palette, os.path.join(out, "iqm_intervals.png"))
        names.append("iqm_intervals")
    return [os.path.join(out, f"{name}.png") for name in names]


# ----------------------------------------------------------------- outputs


def write_outputs(groups: list, refs: list, out: str, reps: int = BOOTSTRAP_REPS) -> tuple:
    """Print the tables; write CSVs, Markdown and PNGs. Returns (written paths, per-run table)."""
    os.makedirs(out, exist_ok=True)
    wide, stats = run_tables(groups, refs)
    iqms = iqm_table(wide, groups, reps)
    table = cell_table(stats, [mean_std_cell(*row) for row in stats[["mean", "std", "n"]].to_numpy()], groups)
    intervals = cell_table(iqms, [interval_cell(*row) for row in iqms[["iqm", "ci_low", "ci_high"]].to_numpy()], groups)
    print("Mean ± Std across seeds (std: ddof=1, n/a for a single seed)\n" + table.to_string())
    print("\nIQM [95% stratified-bootstrap CI] over seeds and tasks\n" + intervals.to_string())
    written = [os.path.join(out, n) for n in ("results.csv", "results_per_run.csv", "results_iqm.csv", "results.md")]
    for frame, path in zip((stats, wide, iqms), written):
        frame.to_csv(path, index=False, na_rep="nan")
    notes = [f"- **{g.label}**: {len(g.runs)} run(s), seeds {', '.join(str(r.seed) for r in g.runs)}; "
             f"{g.schedule.describe()}" for g in groups]
    with open(written[3], "w", encoding="utf-8") as f:
        f.write("\n".join(["# Results", "", "Mean ± Std across seeds (sample std, ddof=1; n/a with one seed). "
                           "Convergence in env steps, LLCD delays in agent steps; forward transfer on returns/1000; "
                           "mean forgetting over the tasks trained before the last window.", "", markdown_table(table),
                           "", "## IQM [95% stratified-bootstrap CI] over seeds and tasks", "",
                           markdown_table(intervals.T.rename_axis("group")), "",
                           "## Groups", "", *notes]) + "\n")
    return written + write_plots(groups, wide, iqms, out), wide


def check_compare_labels(groups: list, pairs: list) -> None:
    """One-line error listing the groups when a --compare label is not one of them."""
    known = [g.label for g in groups]
    unknown = [label for pair in pairs for label in pair if label not in known]
    if unknown:
        fail(f"--compare: no group '{unknown[0]}'; groups: " + ", ".join(f"'{k}'" for k in known))


COMPARE_COLORS = {"CI excludes 0.5": "tab:red", "CI includes 0.5": "tab:blue", "all scores tied": "0.6", "n/a": "0.9"}


def plot_comparisons(compare: pd.DataFrame, path: str) -> None:
    """P(A improves on B) and its 95% CI: a row per pair, a panel per aggregate metric, chance (0.5) marked."""
    pairs = list(dict.fromkeys(zip(compare["group_a"], compare["group_b"])))
    families = [f for f in AGGREGATES if f in set(compare["metric"])]
    fig, axes = plt.subplots(1, len(families), figsize=(2.8 * len(families) + 3.5, 0.38 * len(pairs) + 1.2),
                             sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        rows = compare[compare["metric"] == family].set_index(["group_a", "group_b"]).reindex(pairs)
        for y, (p, low, high, verdict) in enumerate(rows[["probability", "ci_low", "ci_high", "verdict"]].to_numpy()):
            color = COMPARE_COLORS[verdict]
            ax.errorbar(p, y, xerr=[[p - low], [high - p]], fmt="o", color="0.15", mfc=color, ecolor=color,
                        elinewidth=3, capsize=0)
        ax.axvline(0.5, color="0.5", linestyle="--", linewidth=0.9)
        title = family.replace("_", " ") + ("\n(less is better)" if AGGREGATES[family] < 0 else "")
        ax.set(xlim=(-0.02, 1.02), title=title, xlabel="P(improvement)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0][0].set(yticks=np.arange(len(pairs)), yticklabels=[f"{a}  over  {b}" for a, b in pairs])
    axes[0][0].invert_yaxis()
    shown = [v for v in COMPARE_COLORS if v in set(compare["verdict"])]
    handles = [plt.Line2D([], [], color=COMPARE_COLORS[v], marker="o", linewidth=3) for v in shown]
    fig.legend(handles, shown, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=len(shown), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def print_comparisons(groups: list, wide: pd.DataFrame, pairs: list, out: str, reps: int = BOOTSTRAP_REPS) -> list:
    """Print P(A improves on B) per aggregate metric for every pair (A, B); write compare.csv and its figure
    compare.png; returns their paths."""
    by_label, tables = {g.label: g for g in groups}, []
    for a, b in pairs:
        table = compare_table(wide, by_label[a], by_label[b], reps)
        cells = [interval_cell(*row) for row in table[["probability", "ci_low", "ci_high"]].to_numpy()]
        print(f"\nP({a} improves on {b}) [95% CI], less forgetting is better:")
        print(table[["metric", "tasks"]].assign(probability=cells, verdict=table["verdict"]).to_string(index=False))
        tables.append(table.assign(group_a=a, group_b=b))
    compare, paths = pd.concat(tables, ignore_index=True), [os.path.join(out, f"compare.{e}") for e in ("csv", "png")]
    compare.to_csv(paths[0], index=False, na_rep="nan")
    plot_comparisons(compare, paths[1])
    return paths


# ----------------------------------------------------------------- offline detector replay

SCORES_FILE = "llcd_scores.npz"
SWITCH_COLUMNS = ("run", "score", "detector", "change", "agent_step", "outcome", "delay", "first_detection")
DETECTOR_COLUMNS = ("run", "domain", "score", "detector", "switches", "hits", "misses", "hit_rate", "chance_hit_rate",
                    "median_delay", "false_alarms", "false_alarms_per_100k", "agent_steps")


def config_defaults() -> dict:
    """``defaults`` of configs.yaml: settings an older run's config.yaml lacks."""
    return read_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.yaml"))["defaults"]


def detector_inputs(stream: dict, settings: dict) -> dict:
    """What a detector sees per call, by candidate name (``detector.CandidateScore``, as live): each
    recorded score, and where the phase was recorded, that phase-normalised too (``<score>@phase``)."""
    scores = [key for key in stream if key not in ("step", "phase")]
    names = scores + ([score + detector.PHASE for score in scores] if "phase" in stream else [])
    phases = stream["phase"].tolist() if "phase" in stream else [math.nan] * len(stream["step"])
    inputs = {}
    for name in names:
        candidate, values = detector.CandidateScore(settings, name), stream[name.removesuffix(detector.PHASE)]
        inputs[name] = np.array([candidate.update({candidate.score: value}, phase)
                                 for value, phase in zip(values.tolist(), phases)])
    return inputs


def fusions(inputs: dict) -> dict:
    """The fused candidates, 'max(a+b+...)' -> their inputs: every raw score, and every phase-normalised one."""
    groups = [[name for name in inputs if "@" not in name], [name for name in inputs if name.endswith("@phase")]]
    return {f"max({'+'.join(names)})": names for names in groups if len(names) > 1}


def replay_detections(inputs: dict, names: list, steps: np.ndarray, settings: dict, name: str) -> list:
    """Agent steps at which detector ``name`` declares a change on the candidate ``names`` (one: that
    detector on it; several: the max of CUSUMs over them)."""
    if len(names) == 1:
        instance = detector.from_config(settings, name)
        return [step for step, value in zip(steps.tolist(), inputs[names[0]].tolist()) if instance.update(value)]
    fused = detector.fused_cusum(settings, len(names))
    matrix = np.stack([inputs[n] for n in names], 1)  # (calls, candidates)
    return [step for step, row in zip(steps.tolist(), matrix) if fused.update(row)]


def detector_label(name: str, settings: dict) -> str:
    """'cusum(fa=1)': a detector and its DETECTOR_GRID setting in ``settings``."""
    key, short, _ = DETECTOR_GRID[name]
    return f"{name}({short}={settings[key]:g})"


def detector_settings() -> list:
    """(label, detector name, config overrides) of every detector setting the replay tries."""
    return [(detector_label(name, {key: value}), name, {key: value})
            for name, (key, _, values) in DETECTOR_GRID.items() for value in values]


def live_options(score: str, label: str) -> str:
    """The dreamer.py options that run candidate ``score`` under detector setting ``label`` live."""
    name, setting = label.rstrip(")").split("(")
    return f"--llcd_score {score} --llcd_detector {name} --{DETECTOR_GRID[name][0]} {setting.split('=')[1]}"


def detector_rows(run: Run, defaults: dict) -> tuple:
    """(one strict-scoring row per candidate x detector setting, one row per switch of each) of one run's
    recorded stream; the candidates: every score, phase-normalised too where the phase was recorded, and
    their max-of-CUSUMs fusions."""
    settings = {**defaults, **run.config}
    with np.load(os.path.join(run.path, SCORES_FILE), allow_pickle=False) as data:  # kept results: float16
        stream = {key: data[key] if key == "step" else data[key].astype(np.float32) for key in data.files}
    repeat = run.schedule.action_repeat
    switches = [(float(w.start_agent_step), float(w.end_agent_step))  # floats, as switches.csv writes them
                for w in run.schedule.switches()]
    max_delay = resolve_max_delay(settings["llcd_max_delay"], settings["time_limit"], repeat)
    steps = int(stream["step"][-1]) + 1 if len(stream["step"]) else 0
    changes = switch_changes(run, settings)
    inputs = detector_inputs(stream, settings)
    grid = detector_settings()
    pairs = [(score, [score], setting) for score in inputs for setting in grid]
    pairs += [(fused, names, setting) for fused, names in fusions(inputs).items()
              for setting in grid if setting[1] == "cusum"]
    rows, per_switch = [], []
    for score, names, (label, name, overrides) in pairs:
        found = replay_detections(inputs, names, stream["step"], {**settings, **overrides}, name)
        report = detection_report(found, switches, steps, max_delay, FALSE_ALARM_UNIT)
        per_switch += [(run.path, score, label, change, start, result, delay, first_in_window(found, start, end))
                       for change, (start, end), result, delay
                       in zip(changes, switches, report["outcomes"], report["delays"])]
        rows.append({"run": run.path, "domain": run.domain, "score": score, "detector": label,
                     "switches": len(switches), **report,
                     "false_alarms_per_100k": report["false_alarms_per_unit"], "agent_steps": steps})
    return rows, per_switch


def first_in_window(found: list, start: float, end: float) -> float:
    """Agent steps from a switch to the first detection in its window, at any delay (NaN: none)."""
    return next((step - start for step in found if start <= step < end), math.nan)


def switch_changes(run: Run, settings: dict) -> list:
    """'<domain>: task k (<factors>)' of the task each switch of ``run`` goes to."""
    domain = domain_of(settings.get("task", ""))
    defs = (settings.get("crl_task_defs") or {}).get(domain, {})
    labels = []
    for window in run.schedule.switches():
        factors = defs.get(window.task, defs.get(str(window.task), {})) or {}
        text = ", ".join(f"{k} {v}" for k, v in factors.items()) or "standard"
        labels.append(f"{domain}: task {window.task} ({text})")
    return labels


def pooled_detector_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Per score x detector over all runs: summed counts, pooled rates, median of the run medians."""
    grouped = rows.groupby(["score", "detector"], sort=False)
    sums = grouped[["switches", "hits", "misses", "false_alarms", "agent_steps"]].sum()
    pooled = sums.assign(run=[f"all ({n} runs)" for n in grouped.size()],
                         domain=" ".join(sorted(set(rows["domain"]))),
                         hit_rate=sums.hits / (sums.hits + sums.misses), median_delay=grouped["median_delay"].median(),
                         chance_hit_rate=grouped["chance_hit_rate"].mean(),
                         false_alarms_per_100k=sums.false_alarms / sums.agent_steps * FALSE_ALARM_UNIT)
    return pooled.reset_index()[list(DETECTOR_COLUMNS)]


def per_change_table(switches: pd.DataFrame, score: str, name: str) -> pd.DataFrame:
    """Hits / decided switches and median hit delay per change of one score x detector pair, and the
    first detection in each switch's window at any delay ('-': none), which tells late from never."""
    rows = switches[(switches["score"] == score) & (switches["detector"] == name) & (switches["outcome"] != "pending")]
    grouped = rows.groupby("change", sort=False)
    return pd.DataFrame({"hits": grouped["outcome"].apply(lambda o: int((o == "hit").sum())),
                         "switches": grouped.size(), "median_delay": grouped["delay"].median(),
                         "first_detection": grouped["first_detection"].apply(
                             lambda d: " ".join("-" if math.isnan(x) else f"{x:.0f}" for x in d))})


def per_change_type_table(switches: pd.DataFrame) -> pd.DataFrame:
    """Hits / decided switches and median hit delay per change type, across domains: the corpus schedules give
    task k one type in every domain (crl_task_defs), named here by the factors it sets there."""
    decided = switches[switches["outcome"] != "pending"]
    parts = decided["change"].str.extract(r"task (?P<task>\d+) \((?P<factors>[^)]*)\)")
    types = parts["task"].map({task: f"task {task}: " + "; ".join(sorted(set(parts["factors"][parts["task"] == task])))
                               for task in parts["task"].unique()})
    grouped = decided.assign(type=types).groupby("type")
    return pd.DataFrame({"hits": grouped["outcome"].apply(lambda o: int((o == "hit").sum())),
                         "switches": grouped.size(), "median_delay": grouped["delay"].median()})


def render_detector_table(table: pd.DataFrame) -> str:
    """Plain-text table of detector rows (hit rate next to its chance level)."""
    header = ["run", "score", "detector", "hits/switches", "hit rate (chance)", "median delay", "FA/100K"]
    lines = [[r["run"], r["score"], r["detector"], f"{r['hits']}/{r['hits'] + r['misses']}",
              f"{r['hit_rate']:.2f} ({r['chance_hit_rate']:.2f})", f"{r['median_delay']:.0f}",
              f"{r['false_alarms_per_100k']:.1f}"] for r in table.to_dict("records")]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    render = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines]]
    return "\n".join([render[0], "-+-".join("-" * w for w in widths), *render[1:]])


def choose_candidate(pooled: pd.DataFrame) -> pd.Series:
    """The default chosen on pooled figures, among the candidates a live run can use (not the fusions): the
    highest hit rate (ties: fewer false alarms, then a shorter median delay) within the false-alarm goal, or,
    where no candidate there beats its chance hit rate, within the smallest budget, doubling from the goal,
    where one does (a default that finds nothing is no default)."""
    live = pooled[~pooled["score"].str.startswith("max(")]
    useful = live[live["hit_rate"] > live["chance_hit_rate"]]
    if not len(useful):
        return live.sort_values(["false_alarms_per_100k", "hit_rate"], ascending=[True, False]).iloc[0]
    budget = FALSE_ALARM_GOAL * 2.0 ** math.ceil(math.log2(max(useful["false_alarms_per_100k"].min()
                                                               / FALSE_ALARM_GOAL, 1.0)))
    within = live[live["false_alarms_per_100k"] <= budget * (1 + 1e-9)]
    return within.sort_values(["hit_rate", "false_alarms_per_100k", "median_delay"],
                              ascending=[False, True, True]).iloc[0]


def held_out_table(runs_table: pd.DataFrame, select_on: list) -> pd.DataFrame:
    """No tuning to the test: the candidate chosen on the ``select_on`` domains, then on the others (the swap),
    each with its pooled figures where it was chosen and on the held-out domains; last, the candidate the
    same rule chooses on every domain (the default to ship; the two splits estimate how it generalises)."""
    chosen = runs_table["domain"].isin(select_on)
    if not chosen.any() or chosen.all():
        fail(f"--select-on {' '.join(select_on)}: needs runs of those domains and of others; domains here: "
             + " ".join(sorted(set(runs_table["domain"]))))
    rows = []
    for select, test in ((chosen, ~chosen), (~chosen, chosen)):
        pick = choose_candidate(pooled_detector_rows(runs_table[select]))
        for role, part in (("selected on", select), ("held out", test)):
            pooled = pooled_detector_rows(runs_table[part])
            row = pooled[(pooled["score"] == pick["score"]) & (pooled["detector"] == pick["detector"])].iloc[0]
            rows.append({"split": "chosen on " + "+".join(sorted(set(runs_table.loc[select, "domain"]))),
                         "role": role, **row})
    every = pooled_detector_rows(runs_table)
    rows.append({"split": "chosen on all", "role": "selected on", **choose_candidate(every)})
    return pd.DataFrame(rows)


def evaluate_detectors(runs: list, out: str, select_on: list | None = None) -> int:
    """The ``--detectors`` mode: replay, print the strict table, write detectors.csv and switches.csv; with
    ``select_on``, the held-out table too (heldout.csv)."""
    defaults = config_defaults()
    usable = [run for run in runs if os.path.isfile(os.path.join(run.path, SCORES_FILE))]
    for run in (run for run in runs if run not in usable):
        warn(f"{run.path}: no {SCORES_FILE} (an LLCD run of this version writes it); skipped")
    if not usable:
        fail(f"no run has {SCORES_FILE}; run dreamer.py with --llcd True first")
    info(f"replaying {len(usable)} run(s), {os.cpu_count()} at a time")
    with concurrent.futures.ProcessPoolExecutor(min(len(usable), os.cpu_count() or 1)) as pool:
        replayed = list(pool.map(detector_rows, usable, [defaults] * len(usable)))
    rows, per_switch = [row for run_rows, _ in replayed for row in run_rows], [s for _, ss in replayed for s in ss]
    runs_table = pd.DataFrame(rows, columns=DETECTOR_COLUMNS)
    table = pd.concat([runs_table, pooled_detector_rows(runs_table)], ignore_index=True)
    print(render_detector_table(table))
    switches = pd.DataFrame(per_switch, columns=SWITCH_COLUMNS)
    pair = (defaults["llcd_score"], detector_label(defaults["llcd_detector"], defaults))
    print(f"\nper change, the default {pair[0]} + {pair[1]} (pooled over runs):")
    print(per_change_table(switches, *pair).to_string())
    os.makedirs(out, exist_ok=True)
    table.to_csv(os.path.join(out, "detectors.csv"), index=False, na_rep="nan")
    switches.to_csv(os.path.join(out, "switches.csv"), index=False)
    info(f"wrote {os.path.join(out, 'detectors.csv')} and switches.csv (every switch of every score x detector)")
    if select_on:
        held_out = held_out_table(runs_table, select_on)
        print(f"\nheld out (chosen: the highest hit rate within {FALSE_ALARM_GOAL:g} false alarm per 100K agent steps, "
              "or within the smallest doubled budget where a candidate beats chance):")
        print(render_detector_table(held_out.assign(run=held_out["split"] + ", " + held_out["role"])))
        held_out.to_csv(os.path.join(out, "heldout.csv"), index=False, na_rep="nan")
        domains = dict(zip(runs_table["run"], runs_table["domain"]))
        tested_all = []
        for row in held_out[held_out["role"] == "held out"].to_dict("records"):
            tested = switches[switches["run"].map(domains).isin(row["domain"].split())]
            print(f"\nper change, {row['split']} ({live_options(row['score'], row['detector'])}), "
                  f"on held-out {row['domain']}:")
            print(per_change_table(tested, row["score"], row["detector"]).to_string())
            tested_all.append(tested[(tested["score"] == row["score"]) & (tested["detector"] == row["detector"])])
        default = held_out.iloc[-1]
        print(f"\nthe rule on every domain (the default to ship): {live_options(default['score'], default['detector'])}")
        by_type = per_change_type_table(pd.concat(tested_all))
        print("\nper change type, every switch scored by the choice made without its domain:")
        print(by_type.to_string())
        by_type.to_csv(os.path.join(out, "heldout_types.csv"), na_rep="nan")
    return 0


# ----------------------------------------------------------------- learning table against published scores

ANCHOR_TASKS = {"dmc_cup_catch": "dmc_ball_in_cup_catch"}  # this project's task name -> the anchor's


def read_anchor(path: str) -> pd.DataFrame:
    """A published score file: CSV with columns task, seed, env_steps, return."""
    try:
        anchor = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        fail(f"--anchor {path}: cannot read it as CSV ({exc.__class__.__name__}); give the published scores file")
    missing = {"task", "seed", "env_steps", "return"} - set(anchor.columns)
    if missing:
        fail(f"--anchor {path}: no column {', '.join(sorted(missing))}; it needs task, seed, env_steps, return")
    return anchor


def return_at(run: Run, step: float) -> float:
    """The run's eval return at env step ``step``: its last eval at or before it, if that eval is
    less than one ``eval_every`` earlier; NaN otherwise (the run stopped before ``step``)."""
    curve = run.eval_curve(0)
    before = curve[curve.index <= step]
    if before.empty or step - before.index[-1] >= float(run.config.get("eval_every", math.inf)):
        return math.nan
    return float(before.iloc[-1])


def train_return_near(run: Run, step: float, span: float = 5000.0) -> float:
    """Mean training-episode return logged in env steps (step - span, step] (the anchor's kind of
    return: episodes of the stochastic policy); NaN where none was logged."""
    logged = run.series("train_return")
    near = logged[(logged.index > step - span) & (logged.index <= step)]
    return float(near.mean()) if len(near) else math.nan


def run_facts(run: Run) -> dict:
    """Wall seconds and CPU of a run: run.json of kept results, else the sweep's sweep_done.json."""
    for name in ("run.json", "sweep_done.json"):
        path = os.path.join(run.path, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return {}


def learning_rows(runs: list, anchor: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, env step of the anchor): the anchor's seeds and ours."""
    rows = []
    for task, group in pd.DataFrame({"run": runs, "task": [r.config.get("task") for r in runs]}).groupby("task"):
        published = anchor[anchor["task"] == ANCHOR_TASKS.get(task, task)]
        if published.empty:
            warn(f"{task}: not in the anchor file; left out")
            continue
        ordered = sorted(group["run"], key=lambda r: r.seed)
        facts = [run_facts(r) for r in ordered]
        for step, theirs in published.groupby("env_steps"):
            ours = [return_at(r, step) for r in ordered]
            if all(math.isnan(x) for x in ours):
                continue
            trained = [train_return_near(r, step) for r in ordered]
            rows.append({"task": task, "env_steps": int(step), "anchor_mean": theirs["return"].mean(),
                         "anchor_min": theirs["return"].min(), "anchor_max": theirs["return"].max(),
                         "anchor_seeds": len(theirs), "mean": nanmean(ours),
                         "std": float(pd.Series(ours, dtype=float).std()),  # NaN with fewer than 2 seeds
                         "seeds": " / ".join(f"{x:.0f}" for x in ours), "seed_ids": [r.seed for r in ordered],
                         "train_mean": nanmean(trained), "train_seeds": " / ".join(f"{x:.0f}" for x in trained),
                         "minutes": np.mean([f["seconds"] / 60 for f in facts if "seconds" in f] or [math.nan]),
                         "cpu": "; ".join(sorted({f["cpu"] for f in facts if "cpu" in f}))})
    return pd.DataFrame(rows)


def render_learning_table(table: pd.DataFrame) -> str:
    """Markdown: ours beside the anchor at each of its env steps."""
    lines = ["| task | env steps | DreamerV3 mean [min, max] (seeds) | ours: eval mean ± std | eval per seed | "
             "train episodes per seed | mean ≥ anchor's (eval / train) | wall min per run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        reached = " / ".join("yes" if r[key] >= r["anchor_mean"] else "no" for key in ("mean", "train_mean"))
        spread = f" ± {r['std']:.0f}" if math.isfinite(r["std"]) else ""  # one seed: no spread
        lines.append(f"| {r['task'].removeprefix('dmc_')} | {r['env_steps'] // 1000}K | {r['anchor_mean']:.0f} "
                     f"[{r['anchor_min']:.0f}, {r['anchor_max']:.0f}] ({r['anchor_seeds']}) | {r['mean']:.0f}{spread} | "
                     f"{r['seeds']} | {r['train_seeds']} | {reached} | {r['minutes']:.0f} |")
    return "\n".join(lines)


def plot_learning(runs: list, table: pd.DataFrame, path: str) -> None:
    """Our eval curves per task (one line per seed) with the anchor's mean and range at its steps."""
    tasks = list(dict.fromkeys(table["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        for run in (r for r in runs if r.config.get("task") == task):
            curve = run.eval_curve(0)
            ax.plot(curve.index, curve.to_numpy(), color="C0", alpha=0.6, lw=1)
        rows = table[table["task"] == task]
        ax.errorbar(rows["env_steps"], rows["anchor_mean"], fmt="o", color="C3", capsize=3,
                    yerr=[rows["anchor_mean"] - rows["anchor_min"], rows["anchor_max"] - rows["anchor_mean"]])
        ax.set_title(task.removeprefix("dmc_"), fontsize=9)
        ax.set_xlabel("env steps")
        ax.xaxis.set_major_formatter(EngFormatter())
    axes[0][0].set_ylabel("eval return")
    axes[0][0].legend([Line2D([], [], color="C0"), Line2D([], [], color="C3", marker="o", ls="")],
                      ["ours (small, 1 CPU core), per seed", "DreamerV3 (size S), mean and range"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def learning_table(runs: list, anchor_path: str, out: str) -> int:
    """The ``--anchor`` mode: print the learning table, write learning_table.md/.csv and learning.png."""
    table = learning_rows(runs, read_anchor(anchor_path))
    if table.empty:
        fail("no run has an eval at an env step of the anchor file, or no task matches it")
    rendered = render_learning_table(table)
    print(rendered)
    cpus = sorted({cpu for cell in table["cpu"] for cpu in cell.split("; ") if cpu})
    print(f"\nCPU: {'; '.join(cpus) or 'not recorded'}")
    os.makedirs(out, exist_ok=True)
    table.to_csv(os.path.join(out, "learning_table.csv"), index=False)
    with open(os.path.join(out, "learning_table.md"), "w", encoding="utf-8") as f:
        f.write(rendered + "\n")
    plot_learning(runs, table, os.path.join(out, "learning.png"))
    info(f"wrote learning_table.md, learning_table.csv and learning.png to {out}/")
    return 0


# ----------------------------------------------------------------- CLI


def parse_args(argv: list | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="analyze_results.py",
                                     description="Forgetting / transfer tables and plots from DreamerV3 CRL runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or glob patterns")
    parser.add_argument("--out", default="analysis", help="output directory (default: analysis/)")
    parser.add_argument("--reference", nargs="+", default=[], metavar="DIR",
                        help="reference runs of each schedule's first task (crl_tasks: [k], or a continual "
                             "run's first window) for forward transfer and recovery")
    parser.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                        help="config keys replacing the default (domain llcd replay)")
    parser.add_argument("--include-incomplete", action="store_true",
                        help="keep runs that stop before their schedule ends in the group statistics")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="probability that group A improves on group B (group labels as printed); repeatable")
    parser.add_argument("--bootstrap-reps", type=int, default=BOOTSTRAP_REPS, metavar="N",
                        help=f"bootstrap resamples of each IQM and P(improvement) CI (default {BOOTSTRAP_REPS})")
    parser.add_argument("--anchor", metavar="CSV",
                        help="published scores (task, seed, env_steps, return): the learning table of "
                        "single-task runs against them")
    parser.add_argument("--detectors", action="store_true",
                        help="replay the recorded LLCD score streams through every score x detector pair")
    parser.add_argument("--select-on", nargs="+", default=None, metavar="DOMAIN",
                        help="with --detectors: choose the default on these domains, report it on the others, "
                             "then swap (heldout.csv)")
    return parser.parse_args(argv)


def main(argv: list | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    runs = load_runs(expand_paths(args.runs))
    if not runs:
        fail("no run directory with config.yaml and metrics.jsonl among: " + " ".join(args.runs))
    if args.bootstrap_reps < 1:
        fail(f"--bootstrap-reps must be at least 1, got {args.bootstrap_reps}")
    if args.select_on and not args.detectors:
        fail("--select-on chooses a detector: add --detectors")
    if args.detectors:
        return evaluate_detectors(runs, args.out, args.select_on)
    if args.anchor:
        return learning_table(runs, args.anchor, args.out)
    refs = load_runs(expand_paths(args.reference), what="reference") if args.reference else []
    for ref in (ref for ref in refs if ref.reference_task is None):
        warn(f"reference {ref.path} has no crl_tasks (a reference learns its schedule's first task); ignored")
    info(f"analysing {len(runs)} run(s)" + (f" with {len(refs)} reference(s)" if refs else ""))
    groups = select_runs(group_runs(runs, args.group_by), args.include_incomplete)
    if not groups:
        fail("every run with eval rows is incomplete; pass --include-incomplete to analyse them"
             if any(r.has_eval_rows for r in runs) else "no run has eval rows; nothing to analyse")
    if args.compare:
        check_compare_labels(groups, args.compare)
    written, wide = write_outputs(groups, refs, args.out, args.bootstrap_reps)
    if args.compare:
        written += print_comparisons(groups, wide, args.compare, args.out, args.bootstrap_reps)
    info(f"wrote {len(written)} files to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
