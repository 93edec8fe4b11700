"""crl_schedule: task windows in agent and env steps, boundaries, switches, ramps and forgetting.

The main schedule: crl_tasks [2, 0, 2, 1], 100 agent steps per task, prefill 40 agent steps,
action_repeat 4, so window j covers agent steps [40 + 100 j, 140 + 100 j), i.e. env steps
[160 + 400 j, 560 + 400 j), and prefill (agent steps 0-39) runs on window 0's task.
"""

import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from crl_schedule import Schedule, forgetting  # noqa: E402

CONFIG = {"crl_tasks": [2, 0, 2, 1], "crl_steps_per_task": 100, "prefill": 40, "action_repeat": 4}


def test_importing_it_does_not_import_torch():
    code = "import sys; import crl_schedule; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ----------------------------------------------------------------- windows


def test_windows_in_agent_and_env_steps():
    windows = Schedule.from_config(CONFIG).windows()
    assert [(w.index, w.task) for w in windows] == [(0, 2), (1, 0), (2, 2), (3, 1)]
    assert [(w.start_agent_step, w.end_agent_step) for w in windows] == [(40, 140), (140, 240), (240, 340), (340, 440)]
    assert [(w.start_env_step, w.end_env_step) for w in windows] == [(160, 560), (560, 960), (960, 1360), (1360, 1760)]
    assert Schedule.from_config(CONFIG).total_agent_steps == 440


def test_window_at_an_agent_step():
    schedule = Schedule.from_config(CONFIG)
    index = {step: schedule.window_at(step).index for step in (0, 39, 40, 139, 140, 239, 240, 439, 440, 10_000)}
    # prefill is in window 0; a step past the end stays in the last window
    assert index == {0: 0, 39: 0, 40: 0, 139: 0, 140: 1, 239: 1, 240: 2, 439: 3, 440: 3, 10_000: 3}
    assert [schedule.window_at(step).task for step in (0, 140, 240, 340)] == [2, 0, 2, 1]


def test_next_boundary_is_the_next_window_end():
    schedule = Schedule.from_config(CONFIG)
    boundaries = {step: schedule.next_boundary_agent_step(step) for step in (0, 139, 140, 339, 439)}
    assert boundaries == {0: 140, 139: 140, 140: 240, 339: 340, 439: 440}
    assert schedule.next_boundary_agent_step(440) == math.inf  # none past the last one


def test_first_windows_and_forgettable_tasks():
    schedule = Schedule.from_config(CONFIG)
    firsts = schedule.first_windows()
    assert list(firsts) == [2, 0, 1]  # order of first appearance; task 2's second window is not a first
    assert {task: w.end_env_step for task, w in firsts.items()} == {2: 560, 0: 960, 1: 1760}
    assert schedule.forgettable_tasks() == [2, 0]  # task 1 is first trained in the last window


def test_switches_skip_a_window_that_repeats_the_previous_task():
    schedule = Schedule.from_config({**CONFIG, "crl_tasks": [0, 0, 1, 1, 0]})
    assert [(w.index, w.task, w.start_agent_step) for w in schedule.switches()] == [(2, 1, 240), (4, 0, 440)]


def test_single_task_run_is_one_open_window():
    schedule = Schedule.from_config({"prefill": 40, "action_repeat": 4})
    assert not schedule.active and schedule.total_agent_steps == 40
    [window] = schedule.windows()
    assert (window.index, window.task, window.start_env_step, window.end_env_step) == (0, 0, 160, math.inf)
    assert schedule.window_at(10_000) == window and schedule.switches() == []
    assert schedule.next_boundary_agent_step(0) == math.inf and schedule.blend_at(100, 10) is None


def test_from_config_defaults_and_equality():
    assert Schedule.from_config({"crl_tasks": None}) == Schedule((), 0, 0, 1)
    assert Schedule.from_config(CONFIG) == Schedule((2, 0, 2, 1), 100, 40, 4)
    assert len({Schedule.from_config(CONFIG), Schedule.from_config(dict(CONFIG))}) == 1  # hashable
    assert Schedule.from_config({**CONFIG, "action_repeat": 2}) != Schedule.from_config(CONFIG)


def test_blend_ramps_in_after_a_switch_only():
    schedule = Schedule.from_config({"crl_tasks": [0, 1, 1, 2], "crl_steps_per_task": 100, "prefill": 0})
    # switches into windows 1 (task 1, agent step 100) and 3 (task 2, agent step 300); window 2 repeats task 1
    assert schedule.blend_at(99, 50) is None and schedule.blend_at(150, 50) is None
    assert [schedule.blend_at(step, 50) for step in (100, 125, 149)] == [(0, 1, 0.0), (0, 1, 0.5), (0, 1, 0.98)]
    assert schedule.blend_at(200, 50) is None and schedule.blend_at(300, 50) == (1, 2, 0.0)
    assert schedule.blend_at(100, 0) is None  # no ramp: abrupt switches


# ----------------------------------------------------------------- forgetting


def test_forgetting_against_the_last_eval_of_the_first_window():
    evals = [(100, 10.0), (200, 50.0), (300, 40.0), (400, 5.0)]
    # e = 300 (40), best up to e = 50, T = 400 (5): F = 40 - 5, F_max = 50 - 5
    assert forgetting(evals, 300) == (35.0, 45.0)
    # a window end between evals: e = the eval before it (200: 50)
    assert forgetting(evals, 250) == (45.0, 45.0)
    # backward transfer is negative forgetting
    assert forgetting([(100, 10.0), (200, 30.0)], 100) == (-20.0, -20.0)


def test_forgetting_is_nan_while_the_window_is_unfinished():
    evals = [(100, 10.0), (200, 50.0)]
    assert all(math.isnan(value) for value in forgetting(evals, 300))  # last eval before the end
    assert forgetting(evals, 200) == (0.0, 0.0)  # an eval at the end finishes it
    assert all(math.isnan(value) for value in forgetting([(400, 5.0)], 300))  # no eval at or before the end
    assert all(math.isnan(value) for value in forgetting([], 300))


def test_forgetting_is_the_same_in_agent_and_env_steps():
    window = Schedule.from_config(CONFIG).first_windows()[0]  # agent steps [140, 240)
    returns = [0.0, 300.0, 700.0, 650.0, 200.0]
    agent_steps = [100, 190, 230, 240, 440]
    in_agent_steps = forgetting(zip(agent_steps, returns), window.end_agent_step)
    in_env_steps = forgetting(zip([4 * s for s in agent_steps], returns), window.end_env_step)
    assert in_agent_steps == in_env_steps == pytest.approx((650 - 200, 700 - 200))
