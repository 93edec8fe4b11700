"""The continual-learning loop: schedule, per-task evaluation, forgetting
metrics, reservoir replay and resuming mid-schedule.

Tiny runs use ``--configs dmc_crl_cartpole debug`` with 100 agent steps per
task: prefill 100 agent steps, episodes of 100 agent steps (101 stored
transitions), action_repeat 2, so task j of [0, 1, 2, 3] covers agent steps
(100 + 100 j, 200 + 100 j] and the switches are logged at env steps 400, 600, 800.
"""

import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from crl_schedule import Schedule  # noqa: E402
from envs import dmc  # noqa: E402
import tools  # noqa: E402
from runs import crash_training_at, read_rows, replay_steps, run_main  # noqa: E402

CRL = ["--configs", "dmc_crl_cartpole", "debug", "--crl_steps_per_task", "100", "--train_ratio", "16",
       "--eval_every", "100", "--device", "cpu", "--threads", "1"]
PREFILL, SPT, REPEAT, TASKS = 100, 100, 2, [0, 1, 2, 3]
EPISODE = 101  # stored transitions of an episode: the reset and 100 agent steps


def task_sequence(logdir):
    """Task ids of every stored non-first transition, in collection order."""
    steps = replay_steps(logdir)
    return steps["task_id"][~steps["is_first"]].tolist()


# ----------------------------------------------------------------- schedule and config


def test_schedule_windows():
    schedule = Schedule.from_config(tools.load_config(CRL))
    assert schedule.total_agent_steps == PREFILL + 4 * SPT
    assert [schedule.window_at(s).task for s in (0, 100, 199, 200, 299, 300, 499, 500)] == [0, 0, 0, 1, 1, 2, 3, 3]
    assert schedule.next_boundary_agent_step(100) == 200 and schedule.next_boundary_agent_step(500) == math.inf
    assert schedule.first_windows()[2].end_agent_step == 400 and schedule.first_windows()[2].end_env_step == 800


def test_ramp_blends_in_100_increments_after_each_switch():
    config = tools.load_config(CRL + ["--crl_ramp", "50"])
    schedule, ramp = Schedule.from_config(config), config.crl_ramp
    # the switch into window 1 (task 1) is at agent step 200
    assert schedule.blend_at(199, ramp) is None and schedule.blend_at(250, ramp) is None
    assert schedule.blend_at(200, ramp) == (0, 1, 0.0) and schedule.blend_at(201, ramp) == (0, 1, 0.02)
    assert schedule.blend_at(249, ramp) == (0, 1, 0.98) and schedule.blend_at(300, ramp) == (1, 2, 0.0)
    assert schedule.blend_at(200, tools.load_config(CRL).crl_ramp) is None


def test_a_ramped_run_moves_the_physics_gradually_then_runs_the_task(tmp_path, monkeypatch):
    """crl_tasks [0, 3] (gravity -9.81 -> -25) with a 50-step ramp: the train env's gravity
    falls step by step through the ramp and is the task's own from its end on."""
    seen = []
    original = dmc.ContinualDMC.set_task

    def record(blend):
        def step(env, *args):
            blend(env, *args)
            seen.append(env.physics_values()["gravity"])
        return step

    monkeypatch.setattr(dmc.ContinualDMC, "blend_tasks", record(dmc.ContinualDMC.blend_tasks))
    monkeypatch.setattr(dmc.ContinualDMC, "set_task", record(original))
    run_main(CRL + ["--logdir", str(tmp_path), "--crl_tasks", "[0, 3]", "--crl_ramp", "50", "--eval_episode_num", "0"])
    ramp = [g for g in seen if -25.0 < g < -9.81]
    assert len(ramp) == 49 and all(np.diff(ramp) < 0)  # fractions 0.02 .. 0.98 between the two ends
    assert seen[-1] == pytest.approx(-25.0)


@pytest.mark.parametrize("args, message", [
    (["--crl_tasks", "[0, 9]"], "not defined"),
    (["--crl_steps_per_task", "0"], "crl_steps_per_task"),
    (["--envs", "3"], "multiples of envs"),
    (["--replay", "random"], "replay"),
    (["--crl_switch", "later"], "crl_switch"),
    (["--crl_ramp", "101"], "crl_ramp"),
    (["--crl_ramp", "50", "--crl_switch", "episode"], "crl_ramp"),
])
def test_bad_schedule_is_a_config_error(args, message):
    with pytest.raises(tools.ConfigError, match=message):
        tools.load_config(CRL + args)


@pytest.mark.parametrize("block", ["dmc_crl_cartpole", "dmc_crl_cup", "dmc_crl_pendulum", "dmc_crl_walker"])
def test_crl_blocks_are_complete(block):
    config = tools.load_config(["--configs", block])
    assert len(config.crl_tasks) >= 4 and config.crl_steps_per_task > 0
    assert config.replay == "reservoir"
    total = config.prefill + len(config.crl_tasks) * config.crl_steps_per_task
    assert config.dataset_size < total  # the buffer fills, so the replay policy matters


# ----------------------------------------------------------------- end-to-end


@pytest.fixture(scope="module")
def crl_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("crl")
    run_main(CRL + ["--logdir", str(logdir)])
    return logdir


def test_tasks_switch_exactly_at_the_boundaries(crl_run):
    ids = task_sequence(crl_run)
    expected = [0] * (PREFILL + SPT) + [1] * SPT + [2] * SPT + [3] * SPT
    assert ids == expected
    switches = [(r["step"], r["crl_task"]) for r in read_rows(crl_run) if "crl_task" in r]
    assert switches == [((PREFILL + j * SPT) * REPEAT, j) for j in TASKS]


def test_every_task_is_evaluated_with_forgetting_metrics(crl_run):
    evals = [r for r in read_rows(crl_run) if "crl_avg_reward_all_tasks" in r]
    steps = [r["step"] for r in evals]
    assert steps == sorted(set(steps)) and steps[-1] == (PREFILL + 4 * SPT) * REPEAT
    for row in evals:
        values = [row[f"task_{k}_eval_return"] for k in TASKS]
        assert row["crl_avg_reward_all_tasks"] == pytest.approx(np.mean(values))
    last = evals[-1]
    history = {k: [(r["step"], r[f"task_{k}_eval_return"]) for r in evals] for k in TASKS}
    for k in TASKS:
        end = (PREFILL + (k + 1) * SPT) * REPEAT
        at_end = [v for s, v in history[k] if s <= end]
        now = last[f"task_{k}_eval_return"]
        assert last[f"crl_forgetting_task_{k}"] == pytest.approx(at_end[-1] - now)
        assert last[f"crl_forgetting_max_task_{k}"] == pytest.approx(max(at_end) - now)
    assert last["crl_avg_forgetting"] == pytest.approx(np.mean([last[f"crl_forgetting_task_{k}"] for k in TASKS]))
    assert any("replay_task_1_fraction" in r for r in read_rows(crl_run))


def test_episode_switch_waits_for_the_next_episode(tmp_path):
    run_main(CRL + ["--logdir", str(tmp_path), "--crl_switch", "episode", "--crl_steps_per_task", "150",
                    "--crl_tasks", "[0, 1]"])
    steps = replay_steps(tmp_path)
    episodes = np.split(steps["task_id"], np.flatnonzero(steps["is_first"])[1:])
    per_episode = [set(ids.tolist()) for ids in episodes]
    assert all(len(ids) == 1 for ids in per_episode)  # no episode mixes physics
    # prefill (episode 1) and window 0 (steps 101-250) run task 0; the switch at step 250 falls
    # mid-episode 3 (steps 201-300), so task 1 starts with episode 4.
    assert [ids.pop() for ids in per_episode] == [0, 0, 0, 1]
    assert [len(ids) for ids in episodes] == [EPISODE] * 4


def test_resume_mid_schedule_continues_on_the_right_task(tmp_path, monkeypatch):
    args = CRL + ["--logdir", str(tmp_path), "--checkpoint_every", "200"]
    crash_training_at(monkeypatch, args, 330)
    output = run_main(args)
    assert "Resumed" in output
    switches = [(r["step"], r["crl_task"]) for r in read_rows(tmp_path) if "crl_task" in r]
    assert switches == [((PREFILL + j * SPT) * REPEAT, j) for j in TASKS]
    payload = tools.load_checkpoint(tmp_path / "latest.pt", "cpu")
    assert payload["agent_step"] == PREFILL + 4 * SPT
    # episodes collected after the resume (from agent step 300, task 2's window) run the scheduled tasks
    ids = task_sequence(tmp_path)
    assert ids[-SPT:] == [3] * SPT and ids[-2 * SPT:-SPT] == [2] * SPT
