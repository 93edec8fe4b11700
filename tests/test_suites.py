"""Tests for the discrete-action pixel suites: Atari (envs/atari.py), Crafter (envs/crafter.py)
and Memory Maze (envs/memorymaze.py), for the agent running them end to end, and for bench.py's
``pixel update`` rows (at the debug size).

Envs are built as the agent builds them (dreamer.make_env from a config of the suite's block
plus ``debug``). Memory Maze is slow (a few seconds per maze, ~50 steps/s), so its env is
built once per module where a test does not need a fresh one.
"""

import functools
import math
import os
import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
import dreamer  # noqa: E402
import networks  # noqa: E402
import tools  # noqa: E402
from envs import atari, crafter, discrete, memorymaze, wrappers  # noqa: E402
from runs import read_rows, replay_steps, run_main  # noqa: E402


def ale_for(game, seed=0):
    """ale-py run directly: ``game``'s ROM, ``seed``, no sticky actions."""
    import ale_py

    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", seed)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(str(ale_py.roms.get_rom_path(game)))
    return ale


BLOCKS = {"atari_breakout": "atari100k", "crafter_reward": "crafter", "memorymaze_9x9": "memorymaze"}
# Atari: ALE's minimal action set of the game (the atari100k block's `actions: needed`), as
# ale-py gives it; atari_pong is the atari100k block's task, whose actions bench.py uses.
ACTIONS = {"atari_breakout": len(ale_for("breakout").getMinimalActionSet()),
           "atari_pong": len(ale_for("pong").getMinimalActionSet()), "crafter_reward": 17, "memorymaze_9x9": 6}


def config_for(task, *extra):
    return tools.load_config(["--configs", BLOCKS[task], "debug", "--task", task, "--parallel", "False", *extra])


def make(task, *extra, mode="train"):
    """The env of ``task`` inside the agent's wrapper stack."""
    return dreamer.make_env(config_for(task, *extra), mode, 0)


def one_hot(index, count):
    return np.eye(count, dtype=np.float32)[index]


def run_episode(env, actions, limit):
    """Step ``env`` from a reset with one-hot ``actions(t, count)`` (``count``: the env's number of
    actions) until done or ``limit`` steps;
    returns the observations, rewards and infos of the steps (the reset's observation first)."""
    observations, rewards, infos = [env.reset()], [], []
    count = env.action_space.n
    for t in range(limit):
        obs, reward, done, info = env.step(one_hot(actions(t, count), count))
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
        if done:
            break
    return observations, rewards, infos


def random_actions(seed):
    rng = np.random.default_rng(seed)
    return lambda t, count: int(rng.integers(count))


@pytest.fixture(scope="module")
def maze():
    """One 9x9 maze env (seed 4, no TimeLimit, in the agent's wrappers) and its first observation."""
    env = make("memorymaze_9x9", "--seed", "4", "--time_limit", "0")
    return env, env.reset()


def check_contract(env, first):
    """Observation dict, flags and discrete action space as envs/discrete.py describes them."""
    space = env.observation_space
    assert {"image", "is_first", "is_last", "is_terminal"} <= set(space.spaces)
    assert space["image"].shape == (64, 64, 3) and space["image"].dtype == np.uint8
    assert isinstance(env.action_space, gym.spaces.Discrete)
    assert not isinstance(env.env, wrappers.NormalizeActions)  # discrete actions are not rescaled
    assert first["is_first"] is True and first["is_last"] is False and first["is_terminal"] is False
    assert space.contains(first) and first["image"].std() > 0
    obs, reward, done, info = env.step(one_hot(1, env.action_space.n))
    assert space.contains(obs) and obs["is_first"] is False
    assert math.isfinite(reward) and not done and info["discount"] == 1.0
    env.step(np.int64(2))  # an integer index is an action too
    with pytest.raises(ValueError, match=r"one-hot action of shape \(\d+,\)"):
        env.step(np.full(env.action_space.n, 0.5, np.float32)[:2])


@pytest.mark.parametrize("task", ["atari_breakout", "crafter_reward"])
def test_observation_and_action_contract(task):
    env = make(task)
    assert env.action_space.n == ACTIONS[task]
    check_contract(env, env.reset())


def test_memory_maze_observation_and_action_contract(maze):
    env, first = maze
    assert env.action_space.n == ACTIONS["memorymaze_9x9"]
    check_contract(env, first)


def test_dmc_keeps_normalised_continuous_actions():
    env = dreamer.make_env(tools.load_config(["--configs", "debug"]), "train", 0)
    assert isinstance(env.env, wrappers.NormalizeActions)


# ----------------------------------------------------------------- episode ends


def test_atari_life_loss_goes_on_and_game_over_is_a_real_terminal():
    """Breakout under random actions: 5 lives, each lost without ending the episode (lives
    unused, as DreamerV3's Atari 100k runs); the game over is is_last and is_terminal."""
    env = make("atari_breakout", "--time_limit", "100000")
    observations, _, infos = run_episode(env, random_actions(0), 5000)
    lives = [info["lives"] for info in infos]
    assert lives[-1] == 0 and max(lives) == 5
    losses = [t for t in range(1, len(lives)) if lives[t] < lives[t - 1]]
    assert len(losses) == 5
    for t in losses[:-1]:
        assert not observations[t + 1]["is_last"] and not observations[t + 1]["is_terminal"]
        assert infos[t]["discount"] == 1.0
    final = observations[-1]
    assert final["is_last"] and final["is_terminal"] and infos[-1]["discount"] == 0.0
    assert not any(obs["is_last"] for obs in observations[:-1])


def test_atari_image_is_the_max_of_the_last_two_frames_in_colour_with_the_minimal_action_set():
    """The env's images against ALE run directly: same seed, no sticky actions, as many no-ops
    after the reset as the env played, then ALE's minimal action set (Breakout: NOOP, FIRE, RIGHT,
    LEFT), each action repeated 4 frames, the max of frames 3 and 4 resized bilinearly to 64x64."""
    from PIL import Image

    def resized(frame):
        return np.asarray(Image.fromarray(frame).resize((64, 64), Image.BILINEAR))

    env = atari.Atari("breakout", action_repeat=4, seed=7)
    ale = ale_for("breakout", seed=7)
    minimal = ale.getMinimalActionSet()
    assert env.action_space.n == len(minimal) < len(ale.getLegalActionSet())
    first = env.reset()
    assert 0 < env.start_frame <= 30  # seed 7 draws a no-op start
    ale.reset_game()
    for _ in range(env.start_frame):
        ale.act(minimal[0])  # NOOP
    np.testing.assert_array_equal(first["image"], resized(ale.getScreenRGB()))
    for index in [1, 2, 2, 3, 1, 0, 3, 2] * 3:
        obs = env.step(one_hot(index, len(minimal)))[0]
        frames = []
        for _ in range(4):
            ale.act(minimal[index])
            frames.append(ale.getScreenRGB())
        np.testing.assert_array_equal(obs["image"], resized(np.maximum(frames[2], frames[3])))


def test_atari100k_block_has_the_minimal_action_set_and_up_to_30_no_ops_at_each_reset():
    """The env of the atari100k block (dreamer.atari_env, as the agent builds it): Breakout's
    minimal action set, not all 18 actions; each reset plays a random 0-30 no-ops (ALE's episode
    frame count at the first observation), drawn anew at each reset and different per seed."""
    config = config_for("atari_breakout")
    starts = {}  # seed -> the frame of the first observation of each of 10 resets
    for seed in range(4):
        env = dreamer.atari_env(config, "breakout", seed)
        assert env.action_space.n == ACTIONS["atari_breakout"] < 18
        starts[seed] = []
        for _ in range(10):
            assert env.reset()["is_first"]
            starts[seed].append(env.start_frame)
    every = sum(starts.values(), [])
    assert min(every) >= 0 and max(every) <= 30
    assert len(set(every)) >= 10 and max(every) >= 20  # spread over 0-30
    assert len({tuple(values) for values in starts.values()}) == 4
    again = dreamer.atari_env(config, "breakout", 2)
    replayed = []
    for _ in range(10):
        again.reset()
        replayed.append(again.start_frame)
    assert replayed == starts[2]  # the seed fixes them


def test_crafter_death_is_a_real_terminal():
    """Random actions (seed 0) kill the player before Crafter's 10,000-step limit."""
    env = make("crafter_reward", "--time_limit", "10000")
    observations, _, infos = run_episode(env, random_actions(0), 10000)
    assert len(infos) < 10000
    assert observations[-1]["is_last"] and observations[-1]["is_terminal"] and infos[-1]["discount"] == 0.0
    assert not any(obs["is_last"] or obs["is_terminal"] for obs in observations[:-1])


def test_crafter_achievements_are_logged_as_unlocked_this_episode():
    env = crafter.Crafter(seed=0)
    observations, rewards, _ = run_episode(env, random_actions(1), 300)
    keys = [crafter.LOG_PREFIX + name for name in crafter.achievements()]
    assert len(keys) == 22 and all(observations[0][key] == 0 for key in keys)
    unlocked = np.array([[obs[key] for key in keys] for obs in observations])  # (T + 1, 22)
    assert set(np.unique(unlocked)) <= {0.0, 1.0} and (np.diff(unlocked, axis=0) >= 0).all()
    # a step that unlocks achievements pays +1, on top of 0.1 per health point gained (at most
    # one a step) or lost (up to 7, a zombie's hit on a sleeping player)
    news = np.diff(unlocked, axis=0).sum(1) > 0  # (T,)
    assert news.sum() >= 2
    rewards = np.array(rewards)
    assert (rewards[news] >= 0.3 - 1e-6).all() and (rewards[~news] <= 0.1 + 1e-6).all()


@pytest.mark.parametrize("task", ["atari_breakout", "crafter_reward"])
def test_time_limit_is_last_but_not_terminal(task):
    env = make(task, "--time_limit", "120")
    observations, _, infos = run_episode(env, lambda t, count: 0, 1000)
    assert len(infos) == 120 // config_for(task).action_repeat
    assert observations[-1]["is_last"] and not observations[-1]["is_terminal"] and infos[-1]["discount"] == 1.0


def test_memory_maze_time_limit_is_last_but_not_terminal(maze):
    """The 9x9 maze's own limit: 1000 steps (250 s at 4 Hz); the block adds no TimeLimit."""
    env, _ = maze
    observations, _, infos = run_episode(env, lambda t, count: 1 + t % 5, 1200)
    assert len(infos) == 1000
    assert observations[-1]["is_last"] and not observations[-1]["is_terminal"] and infos[-1]["discount"] == 1.0
    assert not any(obs["is_last"] or obs["is_terminal"] for obs in observations[:-1])


# ----------------------------------------------------------------- determinism


def images(env, steps, actions):
    observations, _, _ = run_episode(env, actions, steps)
    return np.stack([obs["image"] for obs in observations])


@pytest.mark.parametrize("build", [
    functools.partial(atari.Atari, "breakout", sticky=0.25, noops=30),
    functools.partial(crafter.Crafter, "reward"),
])
def test_same_seed_same_observations_other_seed_others(build):
    """Atari with sticky actions and no-op starts (both random); Crafter's world generation and
    creature balancing (upstream, which creature despawns depends on memory addresses)."""
    first, *again, other = (images(build(seed=seed), 250, random_actions(5)) for seed in (1, 1, 1, 1, 2))
    for same in again:
        np.testing.assert_array_equal(first, same)
    assert not np.array_equal(first[:60], other[:60])


def test_memory_maze_same_seed_same_maze_other_seed_another(maze):
    _, other_first = maze  # seed 4
    first, again = (images(memorymaze.MemoryMaze("9x9", seed=3), 10, lambda t, count: 1 + t % 5) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], other_first["image"])


# ----------------------------------------------------------------- scores and config errors


def test_human_normalized_score_of_the_reference_table():
    assert len(atari.REFERENCE_SCORES) == 26
    assert dreamer.human_normalized("atari_pong", -20.7) == pytest.approx(0.0)
    assert dreamer.human_normalized("atari_pong", 14.6) == pytest.approx(1.0)
    assert dreamer.human_normalized("atari_breakout", 30.5 + 28.8) == pytest.approx(2.0)
    assert dreamer.human_normalized("atari_tennis", 1.0) is None
    assert dreamer.human_normalized("crafter_reward", 1.0) is None
    import ale_py.roms

    assert set(atari.REFERENCE_SCORES) <= set(ale_py.roms.get_all_rom_ids())


def test_crafter_score_is_the_geometric_mean_style_score_of_the_paper():
    names = crafter.achievements()
    assert crafter.score(dict.fromkeys(names, 100.0)) == pytest.approx(100.0)
    assert crafter.score(dict.fromkeys(names, 0.0)) == pytest.approx(0.0)
    one = {**dict.fromkeys(names, 0.0), "collect_wood": 100.0}
    assert crafter.score(one) == pytest.approx(101 ** (1 / 22) - 1)
    episodes = [{f"episode_achievement_{name}": float(name == "collect_wood" or k == 0) for name in names}
                for k in range(4)]
    rates = crafter.success_rates(episodes)
    assert rates["collect_wood"] == 100.0 and rates["wake_up"] == 25.0


@pytest.mark.parametrize("task, module, package", [
    ("atari_breakout", "ale_py.roms", "ale-py"), ("crafter_reward", "crafter", "crafter"),
    ("memorymaze_9x9", "memory_maze.tasks", "memory-maze"),
])
def test_a_missing_package_is_a_one_line_error_naming_it(monkeypatch, task, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(tools.ConfigError) as error:
        config_for(task)
    message = str(error.value)
    assert f"'{package}' package" in message and "pip install -r requirements.txt" in message
    assert "\n" not in message


@pytest.mark.parametrize("args, match", [
    (["--task", "atari_pongg"], r"unknown Atari game 'pongg' \(did you mean 'atari_pong'\?\)"),
    (["--task", "crafter_score", "--action_repeat", "1"], r"tasks: crafter_reward"),
    (["--task", "crafter_reward"], r"Crafter runs with action_repeat 1"),
    (["--task", "memorymaze_8x8", "--action_repeat", "1"], r"tasks: memorymaze_9x9, memorymaze_11x11"),
    (["--task", "minecraft_diamond"], r"not supported.*: tasks are dmc_<domain>_<task>, atari_<game>"),
    (["--task", "atari_pong", "--crl_tasks", "[0, 1]", "--crl_steps_per_task", "10"], r"need a DMC task"),
])
def test_bad_tasks_are_one_line_config_errors(args, match):
    with pytest.raises(tools.ConfigError, match=match):
        tools.load_config(args)


# ----------------------------------------------------------------- end to end


E2E = {
    "atari_breakout": ["--steps", "480", "--prefill", "40", "--time_limit", "240", "--eval_every", "480"],
    "crafter_reward": ["--steps", "160", "--prefill", "60", "--time_limit", "50", "--eval_every", "160"],
    "memorymaze_9x9": ["--steps", "80", "--prefill", "40", "--time_limit", "30", "--eval_every", "80",
                       "--log_every", "20", "--replay_chunk", "16"],
}


@pytest.mark.parametrize("task", sorted(E2E))
def test_debug_run_trains_evaluates_and_writes_metrics(tmp_path, task):
    """A tiny run of dreamer.main: prefill with random one-hot actions, train (REINFORCE actor on
    one-hot actions), evaluate and write metrics, checkpoint and replay."""
    logdir = tmp_path / "run"
    run_main(["--configs", BLOCKS[task], "debug", "--task", task, "--device", "cpu", "--threads", "1",
              "--train_ratio", "32", "--parallel", "False", "--envs", "1", "--logdir", str(logdir), *E2E[task]])
    rows = read_rows(logdir)
    steps = int(E2E[task][1])
    evals = [row for row in rows if "eval_return" in row]
    assert [row["step"] for row in evals][-1] == steps
    trained = [row for row in rows if "actor_loss" in row]
    assert trained and all(math.isfinite(row[key]) for row in trained for key in ("model_loss", "actor_loss"))
    assert all(row["actor_entropy"] <= math.log(ACTIONS[task]) + 1e-4 for row in trained)  # a categorical's
    replay = replay_steps(logdir)
    actions = replay["action"]  # (L, A): one-hot, the zero action at each episode start
    assert actions.shape[1:] == (ACTIONS[task],)
    assert ((actions == 0) | (actions == 1)).all()
    np.testing.assert_array_equal(actions.sum(1), 1 - replay["is_first"])
    assert replay["image"].shape[1:] == (64, 64, 3)
    assert not [key for key in replay if key.startswith("log_")]  # per-episode statistics stay out of the replay
    check_suite_metrics(task, rows, evals)


def check_suite_metrics(task, rows, evals):
    if task.startswith("atari_"):
        expected = [dreamer.human_normalized(task, row["eval_return"]) for row in evals]
        assert [row["eval_human_normalized"] for row in evals] == pytest.approx(expected)
    episodes = [row for row in rows if "episode_return" in row]
    if task.startswith("crafter_"):
        assert len(episodes) == 3  # 160 agent steps of 50-step episodes
        assert all(len([key for key in row if key.startswith("episode_achievement_")]) == 22 for row in episodes)
        assert 0.0 <= crafter.score(crafter.success_rates(episodes)) <= 100.0
    else:
        assert episodes == []  # only envs with log_* entries get per-episode rows


def test_discrete_helpers_reject_out_of_range_indices():
    for bad in (6, -1, 2.5, np.array([1.0, 0.0])):
        with pytest.raises(ValueError, match=r"index in \[0, 6\)"):
            discrete.action_index(bad, 6)
    assert discrete.action_index(one_hot(4, 6), 6) == 4 and discrete.action_index(3, 6) == 3


class NoopAgent:
    """Stands in for the agent in dreamer.evaluate: always Atari's NOOP, action 0 of ``count``
    (Breakout never serves)."""

    def __init__(self, count):
        self.count = count

    def policy(self, obs, state, mode):
        return np.tile(one_hot(0, self.count), (len(obs["is_first"]), 1)), {}

    def eval(self):
        pass

    def train(self):
        pass


def test_eval_video_keeps_the_first_frames_of_a_long_episode():
    frames = dreamer.VIDEO_FRAMES + 100
    env = wrappers.InProcess(make("atari_breakout", "--time_limit", str(4 * frames), mode="eval"))
    returns, video, _ = dreamer.evaluate(NoopAgent(env.action_space.n), [env], 1, record_video=True)
    assert returns == [0.0] and video.shape == (dreamer.VIDEO_FRAMES, 64, 64, 3)


# ----------------------------------------------------------------- bench.py's pixel update rows


@pytest.mark.parametrize("block", sorted(bench.PIXEL_SPACES))
def test_bench_pixel_update_batch_fits_the_agent_and_trains_at_debug_size(block):
    """The batch of a ``pixel update`` row (here at the debug size, 2 x 16) has the agent's image and
    action shapes, the suite's action count, and one update on it gives finite losses."""
    spaces = bench.PIXEL_SPACES[block]
    agent, batch = bench.update_setup([block, "debug"], spaces, 32, "cpu", 2, 16)
    assert agent.wm.encoder.keys == ["image"] and batch["image"].dtype == np.uint8
    assert batch["image"].shape == (2, 16, *spaces[0]["image"].shape) == (2, 16, 64, 64, 3)
    assert batch["action"].shape == (2, 16, agent.action_dim)
    suite_tasks = {suite_block: task for task, suite_block in BLOCKS.items()}
    suite_tasks["atari100k"] = tools.load_config(["--configs", "atari100k"]).task  # atari_pong, its block's task
    expected = ACTIONS[suite_tasks[block]] if block in suite_tasks else 6  # dmc_vision: walker's 6 joints
    assert agent.action_dim == expected
    assert agent.discrete == (block in suite_tasks)
    if agent.discrete:
        np.testing.assert_array_equal(batch["action"].sum(-1), 1)  # one-hot
    metrics = agent.train_step(batch)
    assert all(math.isfinite(float(metrics[key])) for key in ("model_loss", "actor_loss", "critic_loss"))


def test_bench_padding_rows_time_both_head_widths_and_restore_the_padded_heads(monkeypatch):
    """``bench.py --padding`` alternates updates with 255- and 256-wide two-hot logits and leaves
    the padded heads installed afterwards."""
    widths = []
    init = networks.TwoHotSymlog.__init__

    def spy(self, logits, bins):
        widths.append(logits.shape[-1])
        init(self, logits, bins)

    monkeypatch.setattr(networks.TwoHotSymlog, "__init__", spy)
    padded = networks.padded_linear
    args = types.SimpleNamespace(batch=2, length=8, warmup=1, updates=2)
    rows = bench.bench_padding("debug", 32, "cpu", args)
    assert [row.split()[:3] for row in rows] == [["update", "255", "out"], ["update", "256", "out"]]
    assert set(widths) == {255, 256} and widths.count(255) == widths.count(256)
    assert networks.padded_linear is padded


def test_update_ops_record_what_flop_counter_counts_and_the_exp_type_elements():
    """``bench.UpdateOps`` sees every matmul of an update (its FLOPs equal FlopCounterMode's count,
    an independent counter; the debug proprio agent has no convolutions) and counts the input
    elements of exp-type ops."""
    agent, batch = bench.update_setup(["debug"], bench.PROPRIO, 32, "cpu", 2, 8)
    agent.train_step(batch)
    ops = bench.UpdateOps()
    with ops:
        agent.train_step(batch)
    assert sum(bench.matmul_flops(layouts) for _, layouts, _ in ops.matmuls) == bench.update_flops(agent, batch)
    x, y = torch.randn(3, 5), torch.randn(5, 4)
    with bench.UpdateOps() as small:
        torch.softmax(x, -1), torch.nn.functional.silu(x), x @ y, torch.addmm(torch.zeros(4), x, y)
    assert small.exp_elements == 2 * x.numel()
    assert [func for func, _, _ in small.matmuls] == [torch.ops.aten.mm.default, torch.ops.aten.addmm.default]
    assert [bench.matmul_flops(layouts) for _, layouts, _ in small.matmuls] == [2 * 3 * 5 * 4] * 2


def test_bench_floor_replays_the_matmuls_of_an_update_at_their_layouts():
    """``bench.py --floor``: the replay runs each recorded matmul on tensors of the recorded shape and
    stride (an expanded operand keeps its 0 stride), and the rows report the matmuls alone below the
    whole update."""
    agent, batch = bench.update_setup(["debug"], bench.PROPRIO, 32, "cpu", 2, 8)
    with bench.UpdateOps() as ops:
        agent.train_step(batch)
    with bench.UpdateOps() as again:
        bench.replay(ops.matmuls)()
    assert [(func, layouts) for func, layouts, _ in again.matmuls] == [(func, layouts) for func, layouts, _ in ops.matmuls]
    assert any(0 in stride for _, layouts, _ in ops.matmuls for _, stride, _, _ in layouts)  # expanded operands
    args = types.SimpleNamespace(batch=2, length=8, warmup=1, updates=3)
    update, matmuls, floor = bench.bench_floor("debug", 32, "cpu", args)
    assert update.split()[0] == "update" and matmuls.startswith("matmuls alone") and floor.startswith("floor")
    assert float(matmuls.split()[6]) < float(update.split()[4])
