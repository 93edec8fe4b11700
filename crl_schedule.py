"""Task schedules and forgetting of continual-RL runs, shared by the training loop (``dreamer.py``,
in agent steps) and the analysis (``analyze_results.py``, in env steps); torch-free.

Entry j of ``crl_tasks`` covers agent steps [prefill + j*spt, prefill + (j+1)*spt), and env steps
``action_repeat`` times those; prefill runs on the first task. Without ``crl_tasks`` the run trains
task 0 in one open window [prefill, inf). A metric without a value (yet) is NaN.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple


class Window(NamedTuple):
    """Schedule entry ``index``: ``task`` on agent steps [start_agent_step, end_agent_step)."""

    index: int
    task: int
    start_agent_step: int
    end_agent_step: float  # an int, or math.inf for the open window of a single-task run
    action_repeat: int

    @property
    def start_env_step(self) -> float:
        return float(self.start_agent_step * self.action_repeat)

    @property
    def end_env_step(self) -> float:
        return float(self.end_agent_step * self.action_repeat)


@dataclass(frozen=True)
class Schedule:
    """The task schedule of one run (docs/design.md#crl-loop; hashable: the analysis groups runs by it)."""

    tasks: tuple
    agent_steps_per_task: int
    prefill_agent_steps: int
    action_repeat: int

    @classmethod
    def from_config(cls, config) -> "Schedule":
        """From a config mapping: ``crl_tasks``, ``crl_steps_per_task``, ``prefill``, ``action_repeat``."""
        return cls(tuple(int(t) for t in config.get("crl_tasks") or ()), int(config.get("crl_steps_per_task") or 0),
                   int(config.get("prefill") or 0), int(config.get("action_repeat") or 1))

    @property
    def active(self) -> bool:
        """Whether the run is continual (has ``crl_tasks``)."""
        return bool(self.tasks)

    @property
    def total_agent_steps(self) -> int:
        return self.prefill_agent_steps + len(self.tasks) * self.agent_steps_per_task

    def window(self, index: int) -> Window:
        """Window ``index`` of ``crl_tasks``."""
        start = self.prefill_agent_steps + index * self.agent_steps_per_task
        return Window(index, self.tasks[index], start, start + self.agent_steps_per_task, self.action_repeat)

    def windows(self) -> list:
        """Every window (one open window on task 0 without crl_tasks)."""
        if not self.tasks:
            return [Window(0, 0, self.prefill_agent_steps, math.inf, self.action_repeat)]
        return [self.window(j) for j in range(len(self.tasks))]

    def window_at(self, agent_step: int) -> Window:
        """The window training at ``agent_step``: the first one during prefill, the last one past the end."""
        if not self.tasks:
            return self.windows()[0]
        index = max(0, agent_step - self.prefill_agent_steps) // self.agent_steps_per_task
        return self.window(min(index, len(self.tasks) - 1))

    def next_boundary_agent_step(self, agent_step: int) -> float:
        """First window end after ``agent_step`` (math.inf past the last one)."""
        return next((w.end_agent_step for w in self.windows() if w.end_agent_step > agent_step), math.inf)

    def first_windows(self) -> dict:
        """{task: its first window}, tasks in order of first appearance."""
        firsts = {}
        for window in self.windows():
            firsts.setdefault(window.task, window)
        return firsts

    def forgettable_tasks(self) -> list:
        """Tasks first trained before the last window (the last-trained task cannot be forgotten yet)."""
        last = len(self.windows()) - 1
        return [t for t, window in self.first_windows().items() if window.index != last]

    def switches(self) -> list:
        """Windows j >= 1 whose task differs from window j-1's."""
        wins = self.windows()
        return [w for prev, w in zip(wins, wins[1:]) if w.task != prev.task]

    def blend_at(self, agent_step: int, ramp_agent_steps: int):
        """(previous task, task, fraction) while the physics ramps into a window after a switch
        (over ``ramp_agent_steps``, in 100 equal increments), else None."""
        for window in self.switches() if ramp_agent_steps else []:
            if window.start_agent_step <= agent_step < window.start_agent_step + ramp_agent_steps:
                fraction = (agent_step - window.start_agent_step) * 100 // ramp_agent_steps / 100
                return self.tasks[window.index - 1], window.task, fraction
        return None

    def describe(self) -> str:
        tail = f"prefill={self.prefill_agent_steps}, action_repeat={self.action_repeat}"
        if not self.tasks:
            return f"single task, {tail}"
        return f"crl_tasks={list(self.tasks)}, crl_steps_per_task={self.agent_steps_per_task}, {tail}"


def forgetting(evals, first_window_end: float) -> tuple:
    """(F_i, F_i^max) = (p_i(e_i) - p_i(T), max_{t<=e_i} p_i(t) - p_i(T)) of task i from its evals
    [(step, return), ...] in step order (the last one is T) and the end of its first window in the
    same step unit; e_i is the last eval at or before that end. NaN while the window is unfinished
    (no eval at or after its end) or without an eval at or before its end."""
    evals = list(evals)
    before = [value for step, value in evals if step <= first_window_end]
    if not before or evals[-1][0] < first_window_end:
        return math.nan, math.nan
    now = evals[-1][1]
    return float(before[-1] - now), float(max(before) - now)
