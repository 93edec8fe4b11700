"""End-to-end runs of dreamer.py on CPU with the debug config.

Every run uses ``--configs debug --task dmc_cartpole_balance`` with a logdir
under pytest's tmp_path. ``--train_ratio 16`` keeps the number of gradient
updates small (0.25 per agent step instead of 2) so the whole file stays
fast on 2 CPU cores; everything else is the debug block.

Numbers used below, from configs.yaml's debug block: action_repeat 2,
prefill 100 agent steps, time_limit 200 env steps (episodes of 100 agent
steps, i.e. 101 stored transitions), eval_every 200 env steps,
batch 4 x 16.
"""

import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dreamer  # noqa: E402
import tools  # noqa: E402
from envs import wrappers  # noqa: E402
from runs import chunk_files, egl_available, read_rows, replay_steps, run_main  # noqa: E402

BASE = ["--configs", "debug", "--task", "dmc_cartpole_balance", "--train_ratio", "16", "--device", "cpu",
        "--threads", "1"]
ACTION_REPEAT, PREFILL, EPISODE_STEPS, BATCH_STEPS, TRAIN_RATIO = 2, 100, 100, 4 * 16, 16


def expected_updates(agent_step):
    return (agent_step - PREFILL) * TRAIN_RATIO // BATCH_STEPS


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("e2e") / "run"
    printed = run_main([*BASE, "--steps", "400", "--logdir", str(logdir)])
    return logdir, printed


def test_run_writes_config_metrics_events_checkpoint_and_episodes(first_run):
    logdir, printed = first_run
    assert "Resumed" not in printed
    # config.yaml: the resolved config
    saved = tools.read_yaml(logdir / "config.yaml")
    assert saved["task"] == "dmc_cartpole_balance" and saved["steps"] == 400
    assert saved["configs"] == ["debug"] and saved["train_ratio"] == 16
    assert pathlib.Path(saved["logdir"]) == logdir
    # metrics.jsonl: eval and training rows, steps never go back
    rows = read_rows(logdir)
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps)
    evals = [row for row in rows if "eval_return" in row]
    assert evals, rows
    eval_steps = [row["step"] for row in evals]
    assert eval_steps == sorted(set(eval_steps))
    assert eval_steps[-1] == 400
    for row in evals:
        assert 0 <= row["eval_return"] <= EPISODE_STEPS * ACTION_REPEAT
    train_rows = [row for row in rows if "model_loss" in row]
    assert train_rows
    for row in train_rows:
        for key in ("model_loss", "kl", "reward_loss", "cont_loss", "state_loss", "actor_loss", "critic_loss",
                    "actor_clip_fraction", "actor_std"):
            assert key in row and math.isfinite(row[key]), key
        assert 0 <= row["actor_clip_fraction"] <= 1
    # TensorBoard event file
    events = list(logdir.glob("events.out.tfevents.*"))
    assert events and all(path.stat().st_size > 0 for path in events)
    # latest.pt
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    for key in ("agent", "agent_step", "updates", "optimizers", "rng"):
        assert key in payload, key
    assert payload["agent_step"] == 400 // ACTION_REPEAT
    assert payload["updates"] == expected_updates(payload["agent_step"]) > 0
    assert len(payload["optimizers"]) >= 3  # world model, actor, critic
    assert set(payload["rng"]) >= {"python", "numpy", "torch"}
    # train_eps: 64-step chunks; with the chunk being filled they hold every step collected,
    # two 101-transition episodes (a reset then 100 agent steps each), in order
    files = chunk_files(logdir)
    assert len(files) == 2 * (EPISODE_STEPS + 1) // 64
    for path in files:
        with np.load(path) as data:
            assert {"state", "action", "reward", "is_first", "is_last", "is_terminal", "discount"} <= set(data.files)
            assert data["state"].shape == (64, 5) and data["action"].shape == (64, 1)
    steps = replay_steps(logdir)
    length = EPISODE_STEPS + 1
    assert len(steps["reward"]) == 2 * length
    assert np.flatnonzero(steps["is_first"]).tolist() == [0, length]
    assert np.flatnonzero(steps["is_last"]).tolist() == [length - 1, 2 * length - 1]
    assert np.all(steps["action"][steps["is_first"]] == 0)
    assert np.all(np.abs(steps["action"]) <= 1)


def test_resume_continues_steps_without_duplicates(first_run, tmp_path):
    source, _ = first_run
    logdir = tmp_path / "run"
    shutil.copytree(source, logdir)
    before_files = {path.name for path in chunk_files(logdir)}
    before_steps = replay_steps(logdir)
    before = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    printed = run_main([*BASE, "--steps", "800", "--logdir", str(logdir)])
    assert "Resumed" in printed
    after = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert after["agent_step"] == 800 // ACTION_REPEAT
    assert after["updates"] > before["updates"]
    assert after["updates"] == expected_updates(after["agent_step"])
    # metrics: the step counter continues, nothing logged twice
    rows = read_rows(logdir)
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps)
    assert max(steps) == 800
    lines = (logdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    seen = set()
    for row in rows:
        for key in row:
            if key != "step":
                assert (row["step"], key) not in seen, (row["step"], key)
                seen.add((row["step"], key))
    eval_steps = [row["step"] for row in rows if "eval_return" in row]
    assert eval_steps == sorted(set(eval_steps))
    assert 400 in eval_steps and eval_steps[-1] == 800
    assert any(row["step"] > 400 and "model_loss" in row for row in rows)
    # replay: the first run's files are kept and its steps continue, none stored twice:
    # 4 episodes of 101 transitions, the first two exactly those stored before
    after_files = {path.name for path in chunk_files(logdir)}
    assert before_files <= after_files
    assert len(after_files) > len(before_files)
    after_steps = replay_steps(logdir)
    assert len(after_steps["reward"]) == 4 * (EPISODE_STEPS + 1)
    for key, value in before_steps.items():
        np.testing.assert_array_equal(after_steps[key][:len(value)], value)
    assert np.flatnonzero(after_steps["is_first"]).tolist() == [i * (EPISODE_STEPS + 1) for i in range(4)]


def test_eval_only_writes_returns(first_run, tmp_path):
    source, _ = first_run
    checkpoint = tmp_path / "latest.pt"
    shutil.copy(source / "latest.pt", checkpoint)
    printed = run_main(["--eval_only", "True", "--checkpoint", str(checkpoint), "--eval_episode_num", "2",
                        "--device", "cpu"])
    summary = json.loads((tmp_path / "eval_returns.json").read_text())
    assert len(summary["returns"]) == 2
    for value in summary["returns"]:
        assert 0 <= value <= EPISODE_STEPS * ACTION_REPEAT
    assert summary["mean"] == pytest.approx(np.mean(summary["returns"]))
    assert f"{summary['mean']:.1f}" in printed
    assert not (tmp_path / "train_eps").exists()  # evaluation stores nothing


def test_eval_only_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        dreamer.main(["--eval_only", "True", "--checkpoint", str(tmp_path / "missing.pt")])
    assert "checkpoint" in str(info.value.code)


RANDOM_EVAL = {  # task -> its block and a time limit of 100 agent steps
    "atari_pong": ["--configs", "atari100k", "--time_limit", "400"],
    "dmc_cartpole_balance": ["--time_limit", "200"],
}


@pytest.mark.parametrize("task", sorted(RANDOM_EVAL))
def test_random_baseline_evaluates_uniform_actions_without_a_checkpoint(monkeypatch, tmp_path, task):
    sent = []  # every action the eval envs were given, (A,) each
    step = wrappers.InProcess.step

    def recording_step(env, action):
        sent.append(np.array(action))
        return step(env, action)

    monkeypatch.setattr(wrappers.InProcess, "step", recording_step)
    printed = run_main([*RANDOM_EVAL[task], "--task", task, "--eval_only", "True", "--eval_policy", "random",
                        "--eval_episode_num", "3", "--device", "cpu", "--logdir", str(tmp_path)])
    summary = json.loads((tmp_path / "eval_returns.json").read_text())
    assert summary["policy"] == "random" and summary["task"] == task and len(summary["returns"]) == 3
    assert summary["mean"] == pytest.approx(np.mean(summary["returns"]))
    assert f"eval over 3 episodes: {summary['mean']:.1f}" in printed
    assert summary.get("human_normalized") == dreamer.human_normalized(task, summary["mean"])
    assert [path.name for path in tmp_path.iterdir()] == ["eval_returns.json"]  # no checkpoint, no replay
    actions = np.stack(sent)  # (3 episodes x 100 steps, A)
    assert len(actions) == 3 * EPISODE_STEPS
    check_uniform(actions, discrete=task.startswith("atari_"))


def test_eval_tasks_evaluate_on_each_changed_physics_in_turn(monkeypatch, tmp_path):
    """--eval_tasks writes one summary per physics task, and each task's episodes ran on that
    task's physics (the factors the env reports while stepping)."""
    factors = []  # the physics factors of every eval step, in order
    step = wrappers.InProcess.step

    def recording_step(env, action):
        factors.append(env.call("task_factors"))
        return step(env, action)

    monkeypatch.setattr(wrappers.InProcess, "step", recording_step)
    run_main(["--time_limit", "200", "--task", "dmc_cartpole_balance", "--eval_only", "True", "--eval_policy",
              "random", "--eval_tasks", "[3, 0]", "--eval_episode_num", "2", "--device", "cpu",
              "--logdir", str(tmp_path)])
    defs = tools.load_config([]).crl_task_defs.cartpole
    assert factors == [defs[3]] * (2 * EPISODE_STEPS) + [defs[0]] * (2 * EPISODE_STEPS)
    assert defs[3] != defs[0]
    for task in (3, 0):
        summary = json.loads((tmp_path / f"eval_returns_task{task}.json").read_text())
        assert summary["physics_task"] == task and len(summary["returns"]) == 2
    assert not (tmp_path / "eval_returns.json").exists()


def check_uniform(actions, discrete):
    """(n, A) actions look uniform: one-hots of every index about equally often, or values spread
    evenly over [-1, 1]."""
    if discrete:
        assert set(np.unique(actions)) == {0.0, 1.0} and (actions.sum(1) == 1).all()
        counts = actions.sum(0)  # (A,)
        expected = len(actions) / actions.shape[1]
        bound = stats.chi2.ppf(0.999, actions.shape[1] - 1)  # Pearson's statistic's 99.9% quantile
        assert counts.min() > 0 and ((counts - expected) ** 2 / expected).sum() < bound
    else:
        assert np.abs(actions).max() <= 1
        np.testing.assert_allclose(np.quantile(actions, [0.1, 0.5, 0.9]), [-0.8, 0.0, 0.8], atol=0.1)


def test_parallel_envs_run(tmp_path):
    logdir = tmp_path / "run"
    run_main([*BASE, "--parallel", "True", "--envs", "2", "--logdir", str(logdir)])
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert payload["agent_step"] == 400 // ACTION_REPEAT
    # 200 agent steps over 2 envs: each env stores 101 transitions, one full 64-step chunk each
    files = chunk_files(logdir)
    assert len(files) == 2
    assert len({tools.chunk_position(path.stem)[0] for path in files}) == 2  # one stream per env
    assert all(len(steps["reward"]) == EPISODE_STEPS + 1 - 64 for steps in payload["replay"]["open"].values())
    assert any("eval_return" in row for row in read_rows(logdir))


def test_pixel_run_stores_images(tmp_path):
    ok, reason = egl_available()
    if not ok:
        pytest.skip(f"MuJoCo EGL rendering unavailable ({reason})")
    logdir = tmp_path / "run"
    run_main([*BASE, "--pixels", "True", "--video_pred_log", "True", "--logdir", str(logdir)])
    files = chunk_files(logdir)
    assert files
    with np.load(files[0]) as data:
        assert "image" in data.files and "state" not in data.files
        image = data["image"]
    assert image.shape == (64, 64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 0  # rendered, not blank
    rows = read_rows(logdir)
    assert any("image_loss" in row and math.isfinite(row["image_loss"]) for row in rows)
    assert tools.load_checkpoint(logdir / "latest.pt", "cpu")["agent_step"] == 400 // ACTION_REPEAT


EXPLORE_FLAGS = {}


@pytest.mark.parametrize("behavior", ["plan2explore", "random"])
def test_exploration_behaviours_run(behavior, tmp_path, monkeypatch):
    flags = EXPLORE_FLAGS.setdefault(behavior, [])
    original = dreamer.Dreamer.policy

    def recording_policy(self, obs, state, mode, explore=False):
        if mode == "train":
            flags.append(explore)
        return original(self, obs, state, mode, explore)

    monkeypatch.setattr(dreamer.Dreamer, "policy", recording_policy)
    logdir = tmp_path / "run"
    # log_every 50: training rows at 250 and 300 (the debug block's 100 would log only at 202)
    run_main([*BASE, "--expl_behavior", behavior, "--steps", "300", "--log_every", "50", "--logdir", str(logdir)])
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert payload["agent_step"] == 300 // ACTION_REPEAT
    assert payload["updates"] == expected_updates(payload["agent_step"]) > 0
    assert len(payload["optimizers"]) >= (5 if behavior == "plan2explore" else 3)
    rows = read_rows(logdir)
    if behavior == "plan2explore":
        assert any("expl_actor_loss" in row and math.isfinite(row["expl_actor_loss"]) for row in rows)
    assert flags  # the learned policy acted after prefill


@pytest.mark.parametrize("behavior", ["plan2explore", "random"])
def test_exploration_behaviour_acts_by_default(behavior):
    """DreamerV3-torch semantics: expl_until 0 (the default) means 'explore for the whole
    run', so --expl_behavior X alone makes X choose the training actions."""
    flags = EXPLORE_FLAGS.get(behavior)
    if not flags:
        pytest.skip("the exploration run did not record its policy calls")
    assert tools.load_config([]).expl_until == 0
    assert any(flags), f"--expl_behavior {behavior} never acted ({len(flags)} training policy calls)"
