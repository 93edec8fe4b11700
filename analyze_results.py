"""Tables and plots for continual-RL DreamerV3 runs (forgetting, transfer, LLCD).

Usage::

    python analyze_results.py RUN_DIR... [--out DIR] [--reference DIR...]
                              [--group-by KEY ...]
    python analyze_results.py RUN_DIR... --detectors [--out DIR]

``--detectors`` replays the LLCD score streams the runs recorded
(``llcd_scores.npz``) through every candidate score x detector pair, with
each run's own detector settings, and prints the strict detection table
(per run and pooled) instead of the usual analysis; ``detectors.csv`` holds it.

Glob patterns are expanded here as well, so quoted patterns such as
``'logdir/*cartpole*'`` work. A directory without ``config.yaml`` whose
immediate sub-directories are runs is replaced by those runs.

Input: one directory per run, written by ``dreamer.py``
--------------------------------------------------------
``config.yaml``
    The resolved config (a YAML mapping). Keys used here: ``task``
    (``dmc_cartpole_balance``), ``configs``, ``seed``, ``llcd``, ``replay``,
    ``crl_tasks`` (task ids, repeats allowed; empty = not a continual run),
    ``crl_steps_per_task`` (agent steps per schedule entry), ``prefill``
    (agent steps before the schedule starts), ``action_repeat`` (env steps
    per agent step), ``eval_every`` and, for single-task runs, ``task_id``.
``metrics.jsonl``
    One JSON object per line with ``step`` (env steps) and scalars logged at
    that step: ``task_{k}_eval_return`` (``eval_return`` for a run without
    ``crl_tasks``), ``model_loss``, ``crl_task``, ``llcd_detection`` (1.0 at
    each step a change was declared), ``llcd_score``, ``llcd_probe_accuracy``.
    Non-numeric values are ignored; malformed lines (e.g. the truncated last
    line of a crashed run) are skipped with a warning.

Schedule: entry j of ``crl_tasks`` covers agent steps
``[prefill + j*spt, prefill + (j+1)*spt)``, i.e. env steps times
``action_repeat``. Every boundary comes from each run's own config.

Definitions (p_i(t) = eval return on task i at eval point t)
-------------------------------------------------------------
* An eval at env step t measures the policy trained up to t, so the eval
  points *of* window [s, e) are those with s < t <= e.
* best return: max p_i(t) over the eval points of a window; reported for
  task i's first window and for every window.
* final return: p_i(T), the last eval of task i. Average performance
  P(t) = mean_i p_i(t) over the distinct scheduled tasks at the eval points
  where every task was evaluated; P(T) is its last value.
* e_i = the last eval point with t <= end of task i's first window.
  Forgetting F_i = p_i(e_i) - p_i(T); F_i^max = max_{t<=e_i} p_i(t) - p_i(T).
  The means average over *all* distinct tasks, including the last-trained
  task whose value is zero by construction.
* forward transfer FT_i = (AUC_i - AUC_i^ref) / (1 - AUC_i^ref), on returns
  divided by 1000. AUC = trapezoidal mean of the normalised return over the
  eval points with s <= t <= s + L (both ends included: the zero-shot eval
  at the window start counts), with L the length of task i's first window
  in the continual run; the time axis is (t - s) / L and the mean is taken
  over the span actually covered by eval points. Reference runs (crl_tasks
  == [i] or no crl_tasks and ``task_id: i``, same domain) are aligned by
  env steps since their own window start (prefill); AUC^ref is the mean
  over all matching reference runs.
* convergence: env steps from the start of task i's first window to the
  first eval point of that window reaching 90 % of the window's best return
  (best - 0.1*|best| when the best is negative).
* final model loss: mean of the last 10 ``model_loss`` values.
* LLCD, strict and in agent steps. A *switch* is a window start j >= 1 whose
  task differs from the previous window's. It is detected only by a
  detection within ``llcd_max_delay`` agent steps after it (0 in the config:
  one episode), its delay that of the first such detection; past that
  deadline without one it is a miss. Every other detection is a false alarm;
  the rate is per 100K agent steps of the run (last logged env step /
  action_repeat). Hit rate = hits / (hits + misses), next to its chance
  level (``detector.chance_hit_rate``: the same detections against shifted,
  fake switch times). Probe accuracy = last value.
* Across seeds: mean and sample standard deviation (ddof=1), NaNs (metric
  undefined for a seed) dropped; with fewer than two values the std is
  "n/a" in tables and no band is drawn in plots.

Groups: runs are grouped by (domain of ``task``, ``llcd``, ``replay``), or
by the ``--group-by`` keys instead (dotted keys reach into nested configs;
``domain`` is understood). Seeds are the repeats. A run whose schedule
(crl_tasks, crl_steps_per_task, prefill, action_repeat) differs from the
group's most common one is split off into its own group with a warning.

Outputs (in ``--out``, default ``analysis/``): the table on the console,
``results.csv`` (group, metric, mean, std, n), ``results_per_run.csv``,
``results.md``, ``final_results_grid_shaded.png`` and one PNG per curve
(``curve_*.png``) and per per-task metric family (``bars_*.png``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import detector
from detector import detection_report, resolve_max_delay

PROG = "analyze_results"
RETURN_SCALE = 1000.0  # DMC returns lie in [0, 1000]
CONVERGENCE_FRACTION = 0.9
LOSS_TAIL = 10
FALSE_ALARM_UNIT = 100_000  # agent steps
DEFAULT_GROUP_KEYS = ("domain", "llcd", "replay")
LLCD_DETECTION_KEY = "llcd_detection"
LLCD_SCORE_KEY = "llcd_score"
LLCD_PROBE_KEY = "llcd_probe_accuracy"
MODEL_LOSS_KEY = "model_loss"


class RunLoadError(Exception):
    """A run directory that cannot be analysed (message is user-facing)."""


def warn(message: str) -> None:
    """Print a one-line warning to stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def info(message: str) -> None:
    """Print a one-line progress message to stderr."""
    print(f"{PROG}: {message}", file=sys.stderr)


def fail(message: str) -> None:
    """Stop with a one-line error message (no traceback)."""
    raise SystemExit(f"{PROG}: error: {message}")


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One schedule entry in env steps: the task trained on [start, end)."""

    index: int
    task: int
    start: float
    end: float


@dataclass(frozen=True)
class Schedule:
    """The task schedule of one run, read from its config."""

    tasks: tuple
    steps_per_task: int
    prefill: int
    action_repeat: int
    single_task: int | None = None  # task id of a non-continual run

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        """Build the schedule from a resolved config mapping."""
        tasks = tuple(int(t) for t in (config.get("crl_tasks") or []))
        single = None if tasks else int(config.get("task_id", 0) or 0)
        return cls(
            tasks=tasks,
            steps_per_task=int(config.get("crl_steps_per_task", 0) or 0),
            prefill=int(config.get("prefill", 0) or 0),
            action_repeat=int(config.get("action_repeat", 1) or 1),
            single_task=single,
        )

    @property
    def is_continual(self) -> bool:
        """True when the run follows a crl_tasks schedule."""
        return len(self.tasks) > 0

    @property
    def start(self) -> float:
        """Env step at which the schedule (after prefill) begins."""
        return float(self.prefill * self.action_repeat)

    @property
    def end(self) -> float:
        """Env step at which the schedule ends (inf for single-task runs)."""
        if not self.is_continual:
            return math.inf
        steps = self.prefill + len(self.tasks) * self.steps_per_task
        return float(steps * self.action_repeat)

    def windows(self) -> list:
        """All schedule windows in env steps (one open window if single-task)."""
        if not self.is_continual:
            return [Window(0, self.single_task, self.start, math.inf)]
        ar, spt = self.action_repeat, self.steps_per_task
        return [
            Window(j, task, float((self.prefill + j * spt) * ar),
                   float((self.prefill + (j + 1) * spt) * ar))
            for j, task in enumerate(self.tasks)
        ]

    def distinct_tasks(self) -> list:
        """Task ids in order of first appearance."""
        return list(OrderedDict.fromkeys(w.task for w in self.windows()))

    def first_window(self, task: int) -> Window | None:
        """The first window in which ``task`` is trained."""
        return next((w for w in self.windows() if w.task == task), None)

    def switches(self) -> list:
        """Windows j >= 1 whose task differs from window j-1's."""
        wins = self.windows()
        return [w for prev, w in zip(wins, wins[1:]) if w.task != prev.task]

    def signature(self) -> tuple:
        """What must agree for runs to be averaged together."""
        return (self.tasks, self.steps_per_task, self.prefill,
                self.action_repeat, self.single_task)

    def describe(self) -> str:
        """Short human-readable schedule description."""
        if not self.is_continual:
            return (f"single task {self.single_task}, prefill={self.prefill}, "
                    f"action_repeat={self.action_repeat}")
        return (f"crl_tasks={list(self.tasks)}, crl_steps_per_task="
                f"{self.steps_per_task}, prefill={self.prefill}, "
                f"action_repeat={self.action_repeat}")


@dataclass
class Run:
    """One loaded run: its config and per-key (steps, values) arrays."""

    path: str
    config: dict
    scalars: dict = field(default_factory=dict)

    @property
    def schedule(self) -> Schedule:
        """The run's task schedule."""
        return Schedule.from_config(self.config)

    @property
    def seed(self):
        """The run's seed (None if not in the config)."""
        return self.config.get("seed")

    @property
    def domain(self) -> str:
        """The DMC domain of the run's task (see :func:`domain_of`)."""
        return domain_of(self.config.get("task", ""))

    @property
    def last_step(self) -> float:
        """Largest env step logged by the run (0 if nothing was logged)."""
        ends = [s[-1] for s, _ in self.scalars.values() if len(s)]
        return float(max(ends)) if ends else 0.0

    def series(self, key: str) -> tuple:
        """(steps, values) arrays for ``key``; empty arrays if never logged."""
        if key not in self.scalars:
            return np.zeros(0), np.zeros(0)
        return self.scalars[key]

    def eval_curve(self, task: int) -> tuple:
        """Eval-return curve (steps, values) of ``task``, duplicates averaged."""
        steps, values = self.series(f"task_{task}_eval_return")
        sched = self.schedule
        own = (sched.single_task == task) or (sched.tasks == (task,))
        if not len(steps) and own:
            steps, values = self.series("eval_return")
        return dedupe_steps(steps, values)

    def has_eval_rows(self) -> bool:
        """True if any eval return was logged."""
        return any(k == "eval_return" or
                   (k.startswith("task_") and k.endswith("_eval_return"))
                   for k, (s, _) in self.scalars.items() if len(s))

    def reference_task(self) -> int | None:
        """Task id this run is a single-task reference for, else None."""
        sched = self.schedule
        if len(sched.tasks) == 1:
            return sched.tasks[0]
        if not sched.is_continual and "task_id" in self.config:
            return int(self.config["task_id"])
        return None


def domain_of(task: str) -> str:
    """Domain of a task name: 'dmc_ball_in_cup_catch' -> 'ball_in_cup'."""
    name = str(task)
    for prefix in ("dmc_", "crl_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.rsplit("_", 1)[0] if "_" in name else name


def dedupe_steps(steps: np.ndarray, values: np.ndarray) -> tuple:
    """Sort by step, average values logged at the same step, drop NaNs."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    keep = np.isfinite(values) & np.isfinite(steps)
    steps, values = steps[keep], values[keep]
    if not len(steps):
        return steps, values
    uniq, inverse = np.unique(steps, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse)
    return uniq, sums / counts


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def read_config(path: str) -> dict:
    """Load ``config.yaml`` as a plain mapping."""
    from ruamel.yaml import YAML

    with open(path, encoding="utf-8") as f:
        data = YAML(typ="safe", pure=True).load(f)
    if not isinstance(data, dict):
        raise RunLoadError(f"{path} is not a YAML mapping")
    return data


def parse_metrics_lines(lines: list, source: str = "metrics.jsonl") -> dict:
    """Parse JSONL lines into {key: (steps, values)}; bad lines are warned."""
    rows: dict = {}
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = float(record["step"])
        except (ValueError, KeyError, TypeError):
            what = "truncated last line" if i == last else f"malformed line {i + 1}"
            warn(f"{source}: skipping {what}")
            continue
        for key, value in record.items():
            if key != "step" and _is_number(value):
                rows.setdefault(key, []).append((step, float(value)))
    return {key: _sorted_arrays(pairs) for key, pairs in rows.items()}


def _is_number(value) -> bool:
    """True for int/float JSON values (not booleans)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sorted_arrays(pairs: list) -> tuple:
    """(step, value) pairs -> step-sorted (steps, values) arrays."""
    arr = np.asarray(pairs, dtype=float).reshape(-1, 2)
    order = np.argsort(arr[:, 0], kind="stable")
    return arr[order, 0], arr[order, 1]


def load_run(path: str) -> Run:
    """Load one run directory; raise RunLoadError with a clear message."""
    if not os.path.isdir(path):
        raise RunLoadError(f"{path}: not a directory")
    for name in ("config.yaml", "metrics.jsonl"):
        if not os.path.isfile(os.path.join(path, name)):
            raise RunLoadError(f"{path}: no {name}, not a run directory")
    try:
        config = read_config(os.path.join(path, "config.yaml"))
    except RunLoadError:
        raise
    except Exception as exc:  # any YAML error becomes a one-line message
        raise RunLoadError(f"{path}/config.yaml: cannot parse ({exc.__class__.__name__})")
    metrics_path = os.path.join(path, "metrics.jsonl")
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        scalars = parse_metrics_lines(f.readlines(), metrics_path)
    return Run(path=path, config=config, scalars=scalars)


def expand_paths(patterns: list) -> list:
    """Expand globs and run-parent directories; keep order, drop duplicates."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for path in matches:
            paths.extend(_runs_below(path) or [path])
    return list(OrderedDict.fromkeys(os.path.normpath(p) for p in paths))


def _runs_below(path: str) -> list:
    """Sub-directories that are runs, if ``path`` itself is not one."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.yaml")):
        return []
    subs = sorted(os.path.join(path, d) for d in os.listdir(path))
    return [d for d in subs if os.path.isfile(os.path.join(d, "config.yaml"))]


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


# --------------------------------------------------------------------------
# Pure metric computations
# --------------------------------------------------------------------------


def window_points(steps: np.ndarray, start: float, end: float,
                  include_start: bool = False) -> np.ndarray:
    """Mask of eval points in (start, end] (or [start, end])."""
    lower = steps >= start if include_start else steps > start
    return lower & (steps <= end)


def compute_best_in_window(steps, values, start: float, end: float) -> float:
    """Best eval return among the eval points of window [start, end)."""
    mask = window_points(np.asarray(steps), start, end)
    return float(np.max(values[mask])) if mask.any() else math.nan


def compute_final_return(steps, values) -> float:
    """p_i(T): the last eval return (NaN if none)."""
    return float(values[-1]) if len(values) else math.nan


def compute_forgetting(steps, values, first_end: float) -> tuple:
    """(F_i, F_i^max) given the end of task i's first window."""
    steps, values = np.asarray(steps), np.asarray(values)
    before = steps <= first_end
    if not before.any():
        return math.nan, math.nan
    final = values[-1]
    at_end = values[before][-1]
    return float(at_end - final), float(values[before].max() - final)


def compute_convergence(steps, values, start: float, end: float,
                        fraction: float = CONVERGENCE_FRACTION) -> float:
    """Env steps from ``start`` to first reaching fraction*best in the window."""
    steps, values = np.asarray(steps), np.asarray(values)
    mask = window_points(steps, start, end)
    if not mask.any():
        return math.nan
    best = values[mask].max()
    threshold = best - (1.0 - fraction) * abs(best)
    hit = np.flatnonzero(values[mask] >= threshold)[0]
    return float(steps[mask][hit] - start)


def compute_auc(steps, values, start: float, length: float,
                scale: float = RETURN_SCALE) -> float:
    """Trapezoidal mean of values/scale over [start, start+length]."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    mask = window_points(steps, start, start + length, include_start=True)
    if not mask.any() or not length > 0:
        return math.nan
    tau = (steps[mask] - start) / length
    y = values[mask] / scale
    if len(tau) == 1:
        return float(y[0])
    area = np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(tau))
    return float(area / (tau[-1] - tau[0]))


def compute_forward_transfer(auc: float, auc_ref: float) -> float:
    """FT = (AUC - AUC_ref) / (1 - AUC_ref); NaN when undefined."""
    if not (math.isfinite(auc) and math.isfinite(auc_ref)) or auc_ref == 1.0:
        return math.nan
    return (auc - auc_ref) / (1.0 - auc_ref)


def compute_avg_performance(curves: list) -> tuple:
    """P(t) over the steps where every curve (steps, values) has a value."""
    if not curves or any(not len(s) for s, _ in curves):
        return np.zeros(0), np.zeros(0)
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    stacked = [v[np.searchsorted(s, common)] for s, v in curves]
    return common, np.mean(stacked, axis=0) if len(common) else np.zeros(0)


def compute_final_model_loss(values, tail: int = LOSS_TAIL) -> float:
    """Mean of the last ``tail`` model-loss values (NaN if none)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values[-tail:].mean()) if len(values) else math.nan


def compute_llcd(detections, switches: list, agent_steps: float, max_delay: float) -> dict:
    """Strict detection scores (SPEC §6.6), everything in agent steps.

    ``detections``: agent steps of detections; ``switches``: (window index, start, end) of
    the windows whose start is a scheduled switch. Returns detector.detection_report's dict
    with "delays" keyed by window index.
    """
    report = detection_report(detections, [(start, end) for _, start, end in switches], agent_steps, max_delay,
                              FALSE_ALARM_UNIT)
    report["delays"] = OrderedDict((index, d) for (index, _, _), d in zip(switches, report["delays"]))
    return report


def run_uses_llcd(run: Run) -> bool:
    """LLCD metrics apply when detections were logged or llcd is on."""
    return bool(run.config.get("llcd")) or len(run.series(LLCD_DETECTION_KEY)[0]) > 0


def reference_auc(refs: list, task: int, domain: str, length: float) -> float:
    """Mean AUC of the matching single-task reference runs over ``length``."""
    aucs = []
    for ref in refs:
        if ref.reference_task() != task or ref.domain != domain:
            continue
        steps, values = ref.eval_curve(task)
        start = ref.schedule.start
        if len(steps) and steps[-1] - start < length:
            warn(f"reference {ref.path} covers {steps[-1] - start:.0f} of the "
                 f"{length:.0f} env steps of task {task}'s window")
        aucs.append(compute_auc(steps, values, start, length))
    aucs = [a for a in aucs if math.isfinite(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def compute_run_metrics(run: Run, refs: list | None = None) -> "OrderedDict[str, float]":
    """Every scalar metric of one run as an ordered {name: value} mapping."""
    sched, tasks = run.schedule, run.schedule.distinct_tasks()
    curves = {t: run.eval_curve(t) for t in tasks}
    firsts = {t: sched.first_window(t) for t in tasks}
    out: OrderedDict = OrderedDict()
    for t in tasks:
        out[f"best_return/task{t}"] = compute_best_in_window(
            *curves[t], firsts[t].start, firsts[t].end)
    if sched.is_continual:
        for w in sched.windows():
            out[f"best_return/window{w.index}_task{w.task}"] = compute_best_in_window(
                *curves[w.task], w.start, w.end)
    for t in tasks:
        out[f"final_return/task{t}"] = compute_final_return(*curves[t])
    _, perf = compute_avg_performance([curves[t] for t in tasks])
    out["avg_performance/final"] = float(perf[-1]) if len(perf) else math.nan
    forgetting = {t: compute_forgetting(*curves[t], firsts[t].end) for t in tasks}
    for idx, name in ((0, "forgetting"), (1, "forgetting_max")):
        for t in tasks:
            out[f"{name}/task{t}"] = forgetting[t][idx]
        out[f"{name}/mean"] = _nanmean([forgetting[t][idx] for t in tasks])
    if refs:
        out.update(_forward_transfer_metrics(run, refs, tasks, curves, firsts))
    for t in tasks:
        out[f"convergence_steps/task{t}"] = compute_convergence(
            *curves[t], firsts[t].start, firsts[t].end)
    out["model_loss/final"] = compute_final_model_loss(run.series(MODEL_LOSS_KEY)[1])
    if run_uses_llcd(run):
        out.update(_llcd_metrics(run))
    return out


def _forward_transfer_metrics(run, refs, tasks, curves, firsts) -> OrderedDict:
    """FT_i per task and their mean for one run."""
    out = OrderedDict()
    for t in tasks:
        win = firsts[t]
        length = win.end - win.start
        if not math.isfinite(length):
            out[f"forward_transfer/task{t}"] = math.nan
            continue
        auc = compute_auc(*curves[t], win.start, length)
        out[f"forward_transfer/task{t}"] = compute_forward_transfer(
            auc, reference_auc(refs, t, run.domain, length))
    out["forward_transfer/mean"] = _nanmean([out[f"forward_transfer/task{t}"] for t in tasks])
    return out


def _llcd_metrics(run: Run) -> OrderedDict:
    """Strict LLCD scores in agent steps: delay per switch and median, hit rate and its chance
    level, misses, false alarms per 100K agent steps, probe accuracy."""
    sched = run.schedule
    repeat = sched.action_repeat
    det_steps, det_values = run.series(LLCD_DETECTION_KEY)
    detections = det_steps[det_values > 0] / repeat
    switches = [(w.index, w.start / repeat, w.end / repeat) for w in sched.switches()]
    max_delay = resolve_max_delay(run.config.get("llcd_max_delay", 0), run.config.get("time_limit", 1000), repeat)
    stats = compute_llcd(detections, switches, run.last_step / repeat, max_delay)
    out = OrderedDict()
    task_of = {w.index: w.task for w in sched.windows()}
    for j, delay in stats["delays"].items():
        out[f"llcd_delay_agent_steps/switch{j}_task{task_of[j]}"] = delay
    out["llcd_delay_agent_steps/median"] = stats["median_delay"]
    out["llcd_hit_rate"] = stats["hit_rate"]
    out["llcd_chance_hit_rate"] = stats["chance_hit_rate"]
    out["llcd_misses"] = float(stats["misses"])
    out["llcd_false_alarms_per_100k"] = stats["false_alarms_per_unit"]
    probe = run.series(LLCD_PROBE_KEY)[1]
    out["llcd_probe_accuracy/final"] = float(probe[-1]) if len(probe) else math.nan
    return out


def _nanmean(values: list) -> float:
    """Mean of the finite values (NaN if there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# --------------------------------------------------------------------------
# Grouping and aggregation
# --------------------------------------------------------------------------


@dataclass
class Group:
    """Runs averaged together (the seeds of one configuration)."""

    label: str
    runs: list
    metrics: list = field(default_factory=list)  # one OrderedDict per run

    @property
    def schedule(self) -> Schedule:
        """The common schedule of the group's runs."""
        return self.runs[0].schedule


def config_value(config: dict, key: str):
    """Look up a (dotted) key in a config; 'domain' is derived from task."""
    if key == "domain":
        return domain_of(config.get("task", ""))
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def group_label(config: dict, keys: tuple) -> str:
    """Readable label of a group key, e.g. 'cartpole llcd=True replay=fifo'."""
    parts = []
    for key in keys:
        value = config_value(config, key)
        parts.append(str(value) if key == "domain" else f"{key}={_short(value)}")
    return " ".join(parts)


def _short(value) -> str:
    """Compact string for config values (lists without spaces)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def group_runs(runs: list, group_by: list | None = None) -> list:
    """Group runs by config keys; split off runs with a different schedule."""
    keys = tuple(group_by) if group_by else DEFAULT_GROUP_KEYS
    for key in keys:
        missing = [r.path for r in runs if config_value(r.config, key) == "<missing>"]
        if missing:
            warn(f"group key '{key}' is not in the config of {len(missing)} run(s) "
                 f"(e.g. {missing[0]}); they are grouped as {key}=<missing>")
    by_label: OrderedDict = OrderedDict()
    for run in runs:
        by_label.setdefault(group_label(run.config, keys), []).append(run)
    groups = []
    for label, members in by_label.items():
        groups.extend(_split_by_schedule(label, members))
    return groups


def _split_by_schedule(label: str, runs: list) -> list:
    """One group per distinct schedule; the most common keeps the label."""
    signatures = Counter(r.schedule.signature() for r in runs)
    if len(signatures) == 1:
        return [Group(label, runs)]
    main_sig = signatures.most_common(1)[0][0]
    groups = [Group(label, [r for r in runs if r.schedule.signature() == main_sig])]
    for sig in signatures:
        if sig == main_sig:
            continue
        members = [r for r in runs if r.schedule.signature() == sig]
        sched = members[0].schedule
        new_label = f"{label} [{sched.describe()}]"
        warn(f"group '{label}': {len(members)} run(s) ({', '.join(r.path for r in members)}) "
             f"have a different schedule ({sched.describe()}); reported as group '{new_label}'")
        groups.append(Group(new_label, members))
    return groups


def summarize(values: list) -> tuple:
    """(mean, std with ddof=1, n) of the finite values; std NaN if n < 2."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    std = float(finite.std(ddof=1)) if n > 1 else math.nan
    return float(finite.mean()), std, n


def metric_names(groups: list) -> list:
    """All metric names over all groups, in order of first appearance."""
    names: OrderedDict = OrderedDict()
    for group in groups:
        for metrics in group.metrics:
            names.update((k, None) for k in metrics)
    return list(names)


def aggregate(groups: list) -> list:
    """Rows (group label, n runs, metric, mean, std, n) for every metric."""
    rows = []
    for group in groups:
        for name in metric_names([group]):
            mean, std, n = summarize([m.get(name, math.nan) for m in group.metrics])
            rows.append({"group": group.label, "n_runs": len(group.runs),
                         "metric": name, "mean": mean, "std": std, "n": n})
    return rows


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def decimals_for(value: float) -> int:
    """Decimals shown for a value of this magnitude (0, 1 or 3)."""
    if not math.isfinite(value) or abs(value) >= 10_000:
        return 0
    return 1 if abs(value) >= 10 else 3


def format_number(value: float, decimals: int | None = None) -> str:
    """Compact number formatting for tables ('n/a' for NaN)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{decimals_for(value) if decimals is None else decimals}f}"


def format_cell(mean: float, std: float, n: int) -> str:
    """'mean ± std' with the mean's precision ('± n/a' for one value)."""
    if n == 0:
        return "n/a"
    digits = decimals_for(mean if mean != 0 else std)
    return f"{format_number(mean, digits)} ± {format_number(std, digits)}"


def table_matrix(groups: list, rows: list) -> tuple:
    """Header and body (metric x group cells) of the summary table."""
    header = ["metric"] + [f"{g.label} (n={len(g.runs)})" for g in groups]
    cells = {(r["group"], r["metric"]): format_cell(r["mean"], r["std"], r["n"])
             for r in rows}
    body = [[name] + [cells.get((g.label, name), "-") for g in groups]
            for name in metric_names(groups)]
    return header, body


def render_console_table(groups: list, rows: list) -> str:
    """Fixed-width text table: one row per metric, one column per group."""
    header, body = table_matrix(groups, rows)
    widths = [max(len(str(line[c])) for line in [header] + body)
              for c in range(len(header))]
    fmt = lambda line: "  ".join(str(x).ljust(w) for x, w in zip(line, widths))
    rule = "  ".join("-" * w for w in widths)
    title = "Mean ± Std across seeds (std: ddof=1, n/a for a single seed)"
    return "\n".join([title, fmt(header), rule] + [fmt(line) for line in body])


def render_markdown(groups: list, rows: list) -> str:
    """Markdown version of the summary table with a short legend."""
    header, body = table_matrix(groups, rows)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["# Results", "",
             "Mean ± Std across seeds (sample std, ddof=1; n/a with one seed). "
             "Steps are env steps; forward transfer on returns/1000.", "",
             "| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in body]
    lines += ["", "## Groups", ""]
    for g in groups:
        seeds = ", ".join(str(r.seed) for r in g.runs)
        lines.append(f"- **{esc(g.label)}**: {len(g.runs)} run(s), seeds {seeds}; "
                     f"{g.schedule.describe()}")
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: list) -> None:
    """Write the long-format summary rows to CSV."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["group", "n_runs", "metric", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(rows)


def write_per_run_csv(path: str, groups: list) -> None:
    """Write every run's metrics (one row per run) to CSV."""
    names = metric_names(groups)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "run", "seed"] + names)
        for g in groups:
            for run, metrics in zip(g.runs, g.metrics):
                writer.writerow([g.label, run.path, run.seed] +
                                [metrics.get(n, "") for n in names])


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


@dataclass
class Panel:
    """One plotted curve metric: a title, y label and per-run extractor."""

    name: str
    title: str
    ylabel: str
    extract: object  # Run -> (steps, values)
    task: int | None = None  # highlight the windows of this task


def align_series(series: list, max_points: int = 400) -> tuple | None:
    """Put runs on a common step grid; (grid, matrix runs x grid) with NaN gaps.

    The grid is the union of logged steps, or bin centres (bin means) when
    that union is longer than ``max_points``. Outside a run's logged range
    its row is NaN, so a shorter seed does not drag the mean down.
    """
    series = [dedupe_steps(s, v) for s, v in series]
    series = [(s, v) for s, v in series if len(s)]
    if not series:
        return None
    union = np.unique(np.concatenate([s for s, _ in series]))
    if len(union) <= max_points:
        rows = [_interp_inside(s, v, union) for s, v in series]
        return union, np.vstack(rows)
    edges = np.linspace(union[0], union[-1], max_points + 1)
    grid = 0.5 * (edges[:-1] + edges[1:])
    rows = [_interp_inside(*_bin_means(s, v, edges), grid) for s, v in series]
    return grid, np.vstack(rows)


def _interp_inside(steps, values, grid) -> np.ndarray:
    """Linear interpolation on ``grid``, NaN outside [steps[0], steps[-1]]."""
    out = np.interp(grid, steps, values)
    out[(grid < steps[0]) | (grid > steps[-1])] = np.nan
    return out


def _bin_means(steps, values, edges) -> tuple:
    """Bin centres and mean values of the non-empty bins."""
    idx = np.clip(np.digitize(steps, edges) - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    sums = np.bincount(idx, weights=values, minlength=len(edges) - 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    full = counts > 0
    return centres[full], sums[full] / counts[full]


def mean_std_curve(matrix: np.ndarray) -> tuple:
    """Column mean and sample std (0 where fewer than two runs have data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(matrix, axis=0)
        counts = np.sum(np.isfinite(matrix), axis=0)
        std = np.where(counts > 1, np.nanstd(matrix, axis=0, ddof=1) if len(matrix) > 1 else 0.0, 0.0)
    return mean, np.nan_to_num(std)


def cumulative_detections(run: Run) -> tuple:
    """Cumulative LLCD detection count on a regular grid (empty if no LLCD)."""
    if not run_uses_llcd(run):
        return np.zeros(0), np.zeros(0)
    steps, values = run.series(LLCD_DETECTION_KEY)
    det = np.sort(steps[values > 0])
    grid = np.linspace(0.0, max(run.last_step, 1.0), 300)
    return grid, np.searchsorted(det, grid, side="right").astype(float)


def build_panels(groups: list) -> list:
    """The curve panels: per-task return, P(t), model loss, LLCD if present."""
    runs = [r for g in groups for r in g.runs]
    tasks = list(OrderedDict.fromkeys(t for g in groups for t in g.schedule.distinct_tasks()))
    panels = [Panel(f"eval_return_task{t}", f"Eval return, task {t}", "return",
                    (lambda r, t=t: r.eval_curve(t)), task=t) for t in tasks]
    panels.append(Panel("avg_performance", "Average performance P(t)", "mean return",
                        lambda r: compute_avg_performance(
                            [r.eval_curve(t) for t in r.schedule.distinct_tasks()])))
    optional = [
        (MODEL_LOSS_KEY, Panel("model_loss", "World-model loss", "loss",
                               lambda r: r.series(MODEL_LOSS_KEY))),
        (LLCD_SCORE_KEY, Panel("llcd_score", "LLCD surprise score", "score",
                               lambda r: r.series(LLCD_SCORE_KEY))),
        (LLCD_DETECTION_KEY, Panel("llcd_detections", "LLCD detections (cumulative)",
                                   "detections", cumulative_detections)),
        (LLCD_PROBE_KEY, Panel("llcd_probe_accuracy", "LLCD probe accuracy", "accuracy",
                               lambda r: r.series(LLCD_PROBE_KEY))),
    ]
    for key, panel in optional:
        if any(len(r.series(key)[0]) for r in runs):
            panels.append(panel)
    return panels


def _matplotlib():
    """Import pyplot with the non-interactive Agg backend and paper fonts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
                         "legend.fontsize": 10, "xtick.labelsize": 9.5,
                         "ytick.labelsize": 9.5, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _step_formatter():
    """Tick formatter for env steps: 1500 -> 1.5K, 2e6 -> 2M."""
    from matplotlib.ticker import FuncFormatter

    def fmt(x, _pos):
        for scale, suffix in ((1e6, "M"), (1e3, "K")):
            if abs(x) >= scale:
                return f"{x / scale:g}{suffix}"
        return f"{x:g}"

    return FuncFormatter(fmt)


def group_colors(groups: list) -> list:
    """One distinct colour per group."""
    plt = _matplotlib()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(len(groups))]


def draw_task_switches(ax, groups: list, task: int | None = None) -> None:
    """Dashed lines at window starts, task ids on top; shade ``task``'s windows."""
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    seen = {}
    for g in groups:
        for w in g.schedule.windows():
            seen.setdefault(w.start, w)
    for start, w in sorted(seen.items()):
        ax.axvline(start, color="0.35", linestyle="--", linewidth=0.9, zorder=1)
        ax.text(start, 1.005, f"T{w.task}", transform=trans, ha="center",
                va="bottom", fontsize=8.5, color="0.25", clip_on=False)
        if task is not None and w.task == task and math.isfinite(w.end):
            ax.axvspan(w.start, w.end, color="0.92", zorder=0, linewidth=0)


def plot_panel(ax, panel: Panel, groups: list, colors: list) -> None:
    """Draw one panel: mean line and ±std band per group, task switches."""
    for group, color in zip(groups, colors):
        aligned = align_series([panel.extract(r) for r in group.runs])
        if aligned is None:
            continue
        grid, matrix = aligned
        mean, std = mean_std_curve(matrix)
        ax.plot(grid, mean, color=color, linewidth=1.8, label=group.label, zorder=3)
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.22,
                        linewidth=0, zorder=2)
        if panel.name == "llcd_score":
            _draw_detection_ticks(ax, group, color)
    if panel.name == "llcd_score":  # free a strip below the data for the ticks
        low, high = ax.get_ylim()
        ax.set_ylim(low - 0.15 * (high - low), high)
    draw_task_switches(ax, groups, panel.task)
    ax.set_title(panel.title, pad=16)
    ax.set_xlabel("env steps")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_formatter(_step_formatter())
    ax.grid(True, axis="y", alpha=0.3)
    ax.margins(x=0.01)


def _draw_detection_ticks(ax, group: Group, color) -> None:
    """Small markers at the bottom of the axes at every detection of a group."""
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, run in enumerate(group.runs):
        steps, values = run.series(LLCD_DETECTION_KEY)
        det = steps[values > 0]
        ax.plot(det, np.full(len(det), 0.025 + 0.035 * i), "|", color=color,
                markersize=8, markeredgewidth=1.6, transform=trans, zorder=4)


def _legend_handles(groups: list, colors: list, detections: bool = False) -> tuple:
    """Legend handles: one line per group, task switch, LLCD detection ticks."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2.2) for c in colors]
    labels = [f"{g.label} (n={len(g.runs)})" for g in groups]
    handles.append(Line2D([], [], color="0.35", linestyle="--", linewidth=0.9))
    labels.append("task switch (Tk = task k)")
    if detections:
        handles.append(Line2D([], [], color="0.35", linestyle="none", marker="|",
                              markersize=8, markeredgewidth=1.6))
        labels.append("LLCD detection (one row per seed)")
    return handles, labels


def legend_columns(labels: list, width_in: float) -> int:
    """Most legend columns whose entries fit in the figure width."""
    entry = max(len(label) for label in labels) * 0.085 + 0.8  # inches at 10 pt
    return max(1, min(len(labels), int(0.95 * width_in // entry)))


def grid_shape(n_panels: int) -> tuple:
    """(rows, cols): at most 4 columns, as few empty cells as possible."""
    if n_panels <= 4:
        return 1, n_panels
    cols = min((4, 3), key=lambda c: (-n_panels % c, -c))
    return math.ceil(n_panels / cols), cols


def share_x_range(axes: list) -> None:
    """Give every axes the union of their x ranges."""
    lows, highs = zip(*(ax.get_xlim() for ax in axes))
    for ax in axes:
        ax.set_xlim(min(lows), max(highs))


def plot_grid(groups: list, panels: list, path: str) -> None:
    """All panels in one figure with a shared legend below the grid."""
    plt = _matplotlib()
    colors = group_colors(groups)
    nrows, ncols = grid_shape(len(panels))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.5 * nrows + 0.8),
                             squeeze=False)
    used = list(axes.flat)[:len(panels)]
    for ax, panel in zip(used, panels):
        plot_panel(ax, panel, groups, colors)
    share_x_range(used)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    has_ticks = any(p.name == "llcd_score" for p in panels)
    handles, labels = _legend_handles(groups, colors, has_ticks)
    ncol = legend_columns(labels, fig.get_figwidth())
    legend_rows = math.ceil(len(labels) / ncol)
    bottom = (0.25 + 0.28 * legend_rows) / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=ncol,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, bottom, 1, 1), h_pad=1.6, w_pad=1.2)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_single_panel(groups: list, panel: Panel, path: str) -> None:
    """One panel in its own figure (legend below the axes)."""
    plt = _matplotlib()
    shown = [(g, c) for g, c in zip(groups, group_colors(groups))
             if any(len(panel.extract(r)[0]) for r in g.runs)]
    handles, labels = _legend_handles([g for g, _ in shown], [c for _, c in shown],
                                      panel.name == "llcd_score")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    plot_panel(ax, panel, [g for g, _ in shown] or groups, [c for _, c in shown])
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def metric_families(groups: list) -> OrderedDict:
    """Per-task metric families {'forgetting': ['forgetting/task0', ...]}."""
    families: OrderedDict = OrderedDict()
    for name in metric_names(groups):
        family, _, item = name.partition("/")
        if item.startswith("task"):
            families.setdefault(family, []).append(name)
    return families


FAMILY_LABELS = {
    "best_return": ("Best return in the task's first window", "return"),
    "final_return": ("Final return", "return"),
    "forgetting": ("Forgetting $F_i = p_i(e_i) - p_i(T)$", "return"),
    "forgetting_max": ("Forgetting $F_i^{max} = \\max_{t \\leq e_i} p_i(t) - p_i(T)$", "return"),
    "forward_transfer": ("Forward transfer $FT_i$", "FT (normalised AUC)"),
    "convergence_steps": ("Steps to 90% of the window's best return", "env steps"),
}


def plot_metric_bars(groups: list, family: str, names: list, path: str) -> None:
    """Grouped bars (mean ± std, seeds as dots) of one per-task metric family."""
    plt = _matplotlib()
    colors = group_colors(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2.0), 4.2 + 0.3 * len(groups)))
    width = 0.8 / len(groups)
    x = np.arange(len(names))
    for i, (group, color) in enumerate(zip(groups, colors)):
        offs = x - 0.4 + width * (i + 0.5)
        values = [[m.get(n, math.nan) for m in group.metrics] for n in names]
        stats = [summarize(v) for v in values]
        means = [s[0] for s in stats]
        stds = [0.0 if not math.isfinite(s[1]) else s[1] for s in stats]
        ax.bar(offs, means, width * 0.9, yerr=stds, color=color, alpha=0.8,
               capsize=3, label=f"{group.label} (n={len(group.runs)})")
        for xo, vals in zip(offs, values):
            ax.plot(np.full(len(vals), xo), vals, "o", color="0.15", markersize=3, zorder=4)
    ax.set_xticks(x, [n.partition("/")[2].replace("task", "task ") for n in names])
    title, ylabel = FAMILY_LABELS.get(family, (family.replace("_", " "), ""))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def write_plots(groups: list, out: str) -> list:
    """Write the grid figure, one curve PNG per panel and one bar PNG per family."""
    panels = build_panels(groups)
    written = [os.path.join(out, "final_results_grid_shaded.png")]
    plot_grid(groups, panels, written[0])
    for panel in panels:
        written.append(os.path.join(out, f"curve_{panel.name}.png"))
        plot_single_panel(groups, panel, written[-1])
    for family, names in metric_families(groups).items():
        written.append(os.path.join(out, f"bars_{family}.png"))
        plot_metric_bars(groups, family, names, written[-1])
    return written


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


# ----------------------------------------------------------------- offline detector replay

SCORES_FILE = "llcd_scores.npz"
SWITCH_COLUMNS = ("run", "score", "detector", "change", "agent_step", "outcome", "delay")
DETECTOR_COLUMNS = ("run", "score", "detector", "switches", "hits", "misses", "hit_rate", "chance_hit_rate",
                    "median_delay", "false_alarms", "false_alarms_per_100k", "agent_steps")


def config_defaults() -> dict:
    """``defaults`` of configs.yaml: settings an older run's config.yaml lacks."""
    return read_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.yaml"))["defaults"]


def replay_stream(values: np.ndarray, steps: np.ndarray, settings: dict, name: str) -> list:
    """Agent steps at which detector ``name`` declares a change on a recorded score stream,
    smoothed as the live run smoothed it (mean of the last ``llcd_smoothing`` finite values)."""
    instance, smoothing = detector.from_config(settings, name), detector.score_filter(settings)
    return [step for step, value in zip(steps.tolist(), values.tolist()) if instance.update(smoothing.update(value))]


def detector_rows(run: Run, defaults: dict) -> list:
    """One strict-scoring row per candidate score x detector of one run's recorded stream."""
    settings = {**defaults, **run.config}
    with np.load(os.path.join(run.path, SCORES_FILE)) as data:
        stream = {key: data[key] for key in data.files}
    repeat = run.schedule.action_repeat
    switches = [(w.start / repeat, w.end / repeat) for w in run.schedule.switches()]
    max_delay = resolve_max_delay(settings["llcd_max_delay"], settings["time_limit"], repeat)
    steps = int(stream["step"][-1]) + 1 if len(stream["step"]) else 0
    changes = switch_changes(run, settings)
    rows, per_switch = [], []
    for score in (key for key in stream if key != "step"):
        for name in detector.DETECTORS:
            found = replay_stream(stream[score], stream["step"], settings, name)
            report = detection_report(found, switches, steps, max_delay, FALSE_ALARM_UNIT)
            per_switch += [{"run": run.path, "score": score, "detector": name, "change": change,
                            "agent_step": start, "outcome": outcome(delay, start + max_delay, steps),
                            "delay": delay} for change, (start, _), delay in zip(changes, switches, report["delays"])]
            rows.append({"run": run.path, "score": score, "detector": name, "switches": len(switches),
                         "hits": report["hits"], "misses": report["misses"], "hit_rate": report["hit_rate"],
                         "chance_hit_rate": report["chance_hit_rate"], "median_delay": report["median_delay"],
                         "false_alarms": report["false_alarms"],
                         "false_alarms_per_100k": report["false_alarms_per_unit"], "agent_steps": steps})
    return rows, per_switch


def outcome(delay: float, deadline: float, steps: int) -> str:
    """'hit', 'miss', or 'pending' (the run stopped before the switch's deadline)."""
    return "hit" if math.isfinite(delay) else ("miss" if deadline <= steps else "pending")


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


def pooled_detector_rows(rows: list) -> list:
    """Per score x detector over all runs: summed counts, pooled rates, median of the run medians."""
    pooled = []
    for key in OrderedDict.fromkeys((r["score"], r["detector"]) for r in rows):
        group = [r for r in rows if (r["score"], r["detector"]) == key]
        hits, misses = sum(r["hits"] for r in group), sum(r["misses"] for r in group)
        steps, alarms = sum(r["agent_steps"] for r in group), sum(r["false_alarms"] for r in group)
        pooled.append({"run": f"all ({len(group)} runs)", "score": key[0], "detector": key[1],
                       "switches": sum(r["switches"] for r in group), "hits": hits, "misses": misses,
                       "hit_rate": hits / (hits + misses) if hits + misses else math.nan,
                       "chance_hit_rate": _nanmean([r["chance_hit_rate"] for r in group]),
                       "median_delay": float(np.nanmedian([r["median_delay"] for r in group]))
                       if any(math.isfinite(r["median_delay"]) for r in group) else math.nan,
                       "false_alarms": alarms, "false_alarms_per_100k": alarms / steps * FALSE_ALARM_UNIT
                       if steps else math.nan, "agent_steps": steps})
    return pooled


def evaluate_detectors(runs: list, out: str) -> int:
    """The ``--detectors`` mode: replay, print the strict table, write detectors.csv."""
    defaults = config_defaults()
    usable = [run for run in runs if os.path.isfile(os.path.join(run.path, SCORES_FILE))]
    for run in runs:
        if run not in usable:
            warn(f"{run.path}: no {SCORES_FILE} (an LLCD run of this version writes it); skipped")
    if not usable:
        fail(f"no run has {SCORES_FILE}; run dreamer.py with --llcd True first")
    rows, per_switch = [], []
    for index, run in enumerate(usable, 1):
        info(f"replaying {run.path} ({index}/{len(usable)})")
        run_rows, run_switches = detector_rows(run, defaults)
        rows, per_switch = rows + run_rows, per_switch + run_switches
    table = rows + pooled_detector_rows(rows)
    print(render_detector_table(table))
    switches = pd.DataFrame(per_switch, columns=SWITCH_COLUMNS)
    pair = (defaults["llcd_score"], defaults["llcd_detector"])
    print(f"\nper change, default pair llcd_score={pair[0]}, llcd_detector={pair[1]} (pooled over runs):")
    print(per_change_table(switches, *pair).to_string())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "detectors.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=DETECTOR_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    switches.to_csv(os.path.join(out, "switches.csv"), index=False)
    info(f"wrote {os.path.join(out, 'detectors.csv')} and switches.csv (every switch of every score x detector)")
    return 0


def per_change_table(switches: "pd.DataFrame", score: str, name: str) -> "pd.DataFrame":
    """Hits / decided switches and median hit delay per change of one score x detector pair."""
    rows = switches[(switches["score"] == score) & (switches["detector"] == name) & (switches["outcome"] != "pending")]
    grouped = rows.groupby("change", sort=False)
    return pd.DataFrame({"hits": grouped["outcome"].apply(lambda o: int((o == "hit").sum())),
                         "switches": grouped.size(), "median_delay": grouped["delay"].median(),
                         "delays": grouped["delay"].apply(lambda d: " ".join(f"{x:.0f}" for x in d.dropna()))})


def render_detector_table(rows: list) -> str:
    """Plain-text table of detector rows (hit rate next to its chance level)."""
    header = ["run", "score", "detector", "hits/switches", "hit rate (chance)", "median delay", "FA/100K"]
    lines = [[r["run"], r["score"], r["detector"], f"{r['hits']}/{r['hits'] + r['misses']}",
              f"{r['hit_rate']:.2f} ({r['chance_hit_rate']:.2f})", f"{r['median_delay']:.0f}",
              f"{r['false_alarms_per_100k']:.1f}"] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    render = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines]]
    return "\n".join([render[0], "-+-".join("-" * w for w in widths), *render[1:]])


def parse_args(argv: list | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="analyze_results.py",
        description="Forgetting / transfer tables and plots from DreamerV3 CRL runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories or glob patterns")
    parser.add_argument("--out", default="analysis", help="output directory (default: analysis/)")
    parser.add_argument("--reference", nargs="+", default=[], metavar="DIR",
                        help="single-task reference runs for forward transfer")
    parser.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                        help="config keys replacing the default (domain llcd replay)")
    parser.add_argument("--detectors", action="store_true",
                        help="replay the recorded LLCD score streams through every score x detector pair")
    return parser.parse_args(argv)


def check_runs(groups: list) -> list:
    """Drop runs without eval rows, warn on incomplete runs, drop empty groups."""
    kept = []
    for group in groups:
        for run in group.runs:
            if not run.has_eval_rows():
                warn(f"{run.path}: no eval rows (task_k_eval_return / eval_return); skipped")
            elif math.isfinite(run.schedule.end) and run.last_step < run.schedule.end:
                warn(f"{run.path}: stops at env step {run.last_step:.0f} before the schedule "
                     f"ends at {run.schedule.end:.0f}")
        group.runs = [r for r in group.runs if r.has_eval_rows()]
        repeated = [s for s, c in Counter(r.seed for r in group.runs).items() if c > 1]
        if repeated:
            warn(f"group '{group.label}': seed(s) {repeated} appear more than once")
        if group.runs:
            kept.append(group)
        else:
            warn(f"group '{group.label}' is empty (no run with eval rows); skipped")
    return kept


def analyze(runs: list, refs: list, group_by: list | None) -> list:
    """Group the runs and compute every run's metrics."""
    groups = check_runs(group_runs(runs, group_by))
    if not groups:
        fail("no run has eval rows; nothing to analyse")
    for group in groups:
        group.metrics = [compute_run_metrics(r, refs) for r in group.runs]
    return groups


def write_outputs(groups: list, out: str) -> list:
    """Print the table and write CSV, Markdown and PNGs; return written paths."""
    os.makedirs(out, exist_ok=True)
    rows = aggregate(groups)
    print(render_console_table(groups, rows))
    written = [os.path.join(out, n) for n in ("results.csv", "results_per_run.csv", "results.md")]
    write_csv(written[0], rows)
    write_per_run_csv(written[1], groups)
    with open(written[2], "w", encoding="utf-8") as f:
        f.write(render_markdown(groups, rows))
    return written + write_plots(groups, out)


def main(argv: list | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    paths = expand_paths(args.runs)
    runs = load_runs(paths)
    if not runs:
        fail("no run directory with config.yaml and metrics.jsonl among: " + " ".join(args.runs))
    if args.detectors:
        return evaluate_detectors(runs, args.out)
    refs = load_runs(expand_paths(args.reference), what="reference") if args.reference else []
    for ref in refs:
        if ref.reference_task() is None:
            warn(f"reference {ref.path} is not a single-task run (crl_tasks == [i] or task_id); ignored")
    info(f"analysing {len(runs)} run(s)" + (f" with {len(refs)} reference(s)" if refs else ""))
    groups = analyze(runs, refs, args.group_by)
    written = write_outputs(groups, args.out)
    info(f"wrote {len(written)} files to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
