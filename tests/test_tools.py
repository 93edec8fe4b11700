"""Tests for tools.py: config loading and errors, replay, driver, checkpoints."""

import os
import pathlib
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dreamer  # noqa: E402
import tools  # noqa: E402
from envs import wrappers  # noqa: E402


# ----------------------------------------------------------------- config


def test_defaults_load_with_expected_types():
    config = tools.load_config([])
    raw = tools.read_yaml(pathlib.Path(ROOT) / "configs.yaml")["defaults"]
    for key, value in raw.items():
        assert key in config, key
    assert config.batch_size == raw["batch_size"] and isinstance(config.batch_size, int)
    assert isinstance(config.model_lr, float)
    assert config.encoder.mlp_units == raw["encoder"]["mlp_units"]
    assert config.configs == []
    # DreamerV3-torch key names exist
    for key in ("train_ratio", "action_repeat", "prefill", "envs", "dyn_deter", "dyn_stoch", "dyn_discrete",
                "units", "batch_size", "batch_length", "eval_every", "eval_episode_num", "dataset_size",
                "precision", "video_pred_log"):
        assert key in config, key


def test_required_blocks_load():
    for block in ("dmc_proprio", "dmc_vision", "vision", "small", "debug"):
        config = tools.load_config(["--configs", block])
        assert config.configs == [block]
    assert tools.load_config(["--configs", "vision"]).pixels is True


def test_blocks_merge_left_to_right_later_wins():
    blocks = tools.read_yaml(pathlib.Path(ROOT) / "configs.yaml")
    small_debug = tools.load_config(["--configs", "small", "debug"])
    debug_small = tools.load_config(["--configs", "debug", "small"])
    assert small_debug.dyn_deter == blocks["debug"]["dyn_deter"]
    assert debug_small.dyn_deter == blocks["small"]["dyn_deter"]
    assert small_debug.precision == blocks["debug"]["precision"]
    assert debug_small.precision == blocks["small"]["precision"]
    # keys set by only one block survive, whatever the order
    assert debug_small.imag_horizon == blocks["debug"]["imag_horizon"]
    assert small_debug.imag_horizon == blocks["debug"]["imag_horizon"]
    # nested blocks merge per leaf: untouched leaves keep their defaults
    assert debug_small.encoder.mlp_units == blocks["small"]["encoder"]["mlp_units"]
    assert small_debug.encoder.mlp_units == blocks["debug"]["encoder"]["mlp_units"]
    assert debug_small.encoder.symlog_inputs == blocks["defaults"]["encoder"]["symlog_inputs"]
    assert small_debug.encoder.kernel_size == blocks["defaults"]["encoder"]["kernel_size"]
    assert small_debug.configs == ["small", "debug"]


def test_cli_overrides_with_types():
    config = tools.load_config(["--configs", "debug", "--batch_size", "7", "--encoder.mlp_units", "64",
                                "--model_lr", "3e-4", "--pixels", "True", "--size", "[32,32]",
                                "--discount", "1", "--task", "dmc_cartpole_balance"])
    assert config.batch_size == 7 and type(config.batch_size) is int
    assert config.encoder.mlp_units == 64 and type(config.encoder.mlp_units) is int
    assert config.model_lr == pytest.approx(3e-4) and type(config.model_lr) is float
    assert config.pixels is True
    assert config.size == [32, 32]
    assert config.discount == 1.0 and type(config.discount) is float
    assert config.task == "dmc_cartpole_balance"
    # CLI overrides apply after every block
    assert tools.load_config(["--configs", "debug", "--dyn_deter", "48"]).dyn_deter == 48
    assert tools.load_config(["--dyn_deter", "48", "--configs", "debug"]).dyn_deter == 48
    # bf16 and integer precisions
    assert tools.load_config(["--precision", "bf16"]).precision == "bf16"
    assert tools.load_config(["--precision", "16"]).precision == 16


def test_integer_keyed_tables_take_overrides():
    """Task ids are YAML ints: --crl_task_defs.cup.3 reaches task 3 of the cup table."""
    config = tools.load_config(["--crl_task_defs.cup.3", "{gravity: -30.0}"])
    assert config["crl_task_defs"]["cup"][3] == {"gravity": -30.0}
    assert config["crl_task_defs"]["cup"][2] == {"gravity": -1.62}


def test_unknown_key_suggests_closest():
    with pytest.raises(tools.ConfigError) as info:
        tools.load_config(["--bach_size", "4"])
    assert "bach_size" in str(info.value) and "batch_size" in str(info.value)
    with pytest.raises(tools.ConfigError) as info:
        tools.load_config(["--encoder.mlp_unit", "4"])
    assert "mlp_units" in str(info.value)
    with pytest.raises(tools.ConfigError) as info:
        tools.load_config(["--encodr.mlp_units", "4"])
    assert "encoder" in str(info.value)


def test_unknown_block_suggests_closest():
    with pytest.raises(tools.ConfigError) as info:
        tools.load_config(["--configs", "dmc_propio"])
    message = str(info.value)
    assert "dmc_propio" in message and "dmc_proprio" in message
    with pytest.raises(tools.ConfigError):
        tools.load_config(["--configs", "defaults"])


@pytest.mark.parametrize("argv, key", [
    (["--batch_size", "abc"], "batch_size"),
    (["--batch_size", "2.5"], "batch_size"),
    (["--precision", "8"], "precision"),
    (["--pixels", "maybe"], "pixels"),
    (["--model_lr", "fast"], "model_lr"),
    (["--encoder.mlp_units", "[1, 2]"], "mlp_units"),
])
def test_ill_typed_values_are_errors(argv, key):
    with pytest.raises(tools.ConfigError) as info:
        tools.load_config(argv)
    assert key in str(info.value)


@pytest.mark.parametrize("argv, key", [
    (["--steps", "-1"], "steps"),
    (["--batch_size", "0"], "batch_size"),
    (["--batch_length", "100"], "replay_chunk"),  # a window spans at most two 64-step chunks
    (["--llcd", "True", "--llcd_context_len", "64"], "llcd_context_len"),  # its context comes from one chunk
    (["--envs", "0"], "envs"),
    (["--llcd_cusum_window", "100"], "llcd_cusum_window"),  # below twice llcd_burn_in
    (["--task", "dmc_cartpole_balance", "--crl_tasks", "[0, 6]", "--crl_steps_per_task", "100",
      "--crl_task_defs.cartpole.6", "{actuator_scale: -1.0}"], "actuator_scale"),  # scales are > 0
])
def test_impossible_values_are_errors(argv, key):
    with pytest.raises(tools.ConfigError) as info:
        tools.load_config(argv)
    assert key in str(info.value)


def test_windows_longer_than_an_episode_are_accepted():
    """Windows cross episode boundaries: 600 steps > the 500-step episodes of time_limit 1000."""
    config = tools.load_config(["--batch_length", "600", "--replay_chunk", "600"])
    assert config.batch_length == 600 and config.replay_chunk == 600


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(tools, "cpu_has_native_bf16", lambda: native)
    assert tools.load_config(["--precision", "auto", "--device", "cpu"]).precision == ("bf16" if native else 32)
    assert tools.load_config(["--precision", "32", "--device", "cpu"]).precision == 32
    assert tools.load_config(["--configs", "small", "--device", "cpu"]).precision == 32  # bf16 does not pay there


def test_resuming_on_a_machine_where_auto_resolves_otherwise_is_an_error(monkeypatch):
    monkeypatch.setattr(tools, "cpu_has_native_bf16", lambda: False)
    saved = tools.load_config(["--device", "cpu"]).to_dict()  # auto -> 32 where it was started
    monkeypatch.setattr(tools, "cpu_has_native_bf16", lambda: True)
    given = tools.load_config(["--device", "cpu"])  # auto -> bf16 here
    with pytest.raises(tools.ConfigError, match=r"precision 32 \(saved\) vs 'bf16' \(given\)"):
        tools.check_checkpoint_config("latest.pt", saved, given, "resume with --precision 32")
    tools.check_checkpoint_config("latest.pt", saved, tools.load_config(["--device", "cpu", "--precision", "32"]), "")


def test_default_logdir_names_task_blocks_llcd_and_seed():
    config = tools.load_config(["--configs", "debug", "--task", "dmc_cartpole_balance", "--seed", "3"])
    logdir = pathlib.Path(tools.default_logdir(config))
    assert logdir.parent.name == "logdir"
    assert logdir.name == "dmc_cartpole_balance-debug-llcdFalse-seed3"
    baseline = tools.load_config(["--configs", "debug", "--task", "dmc_cartpole_balance", "--seed", "3",
                                  "--eval_only", "True", "--eval_policy", "random"])
    assert tools.default_logdir(baseline).name == "dmc_cartpole_balance-debug-llcdFalse-seed3-random"
    names = {gate: tools.default_logdir(tools.load_config(["--configs", "debug", "--llcd", "True", "--llcd_gate", gate]))
             .name for gate in ("detector", "always", "never")}
    assert len(set(names.values())) == 3 and "gatealways" in names["always"]  # an ablation never resumes another arm
    saved = tools.load_config(["--configs", "debug", "--llcd", "True"]).to_dict()
    with pytest.raises(tools.ConfigError, match=r"llcd_gate 'detector' \(saved\) vs 'always' \(given\)"):
        tools.check_checkpoint_config("latest.pt", saved, tools.load_config(["--configs", "debug", "--llcd", "True",
                                                                             "--llcd_gate", "always"]), "")


def test_cli_error_is_one_line_without_traceback():
    result = subprocess.run([sys.executable, "dreamer.py", "--bach_size", "4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "batch_size" in lines[0]


# ----------------------------------------------------------------- driver


class CountingEnv:
    """Episodes of fixed ``length``; reward t at step t; terminal at the end if ``terminal``."""

    def __init__(self, name, length, terminal=False):
        self.name, self.length, self.terminal = name, length, terminal
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.id, self.episodes, self.actions = None, 0, []

    def obs(self, first, last):
        return {"state": np.array([self.t], np.float32), "is_first": first, "is_last": last,
                "is_terminal": last and self.terminal}

    def reset(self):
        self.t, self.episodes = 0, self.episodes + 1
        self.id = f"{self.name}-{self.episodes:03d}"
        return self.obs(True, False)

    def step(self, action):
        self.actions.append(np.array(action))
        self.t += 1
        done = self.t >= self.length
        discount = np.float32(0.0 if done and self.terminal else 1.0)
        return self.obs(False, done), float(self.t), done, {"discount": discount}


def stream_of(replay, env_index):
    """Every stored step of env ``env_index``'s stream, in order: {key: (L, ...)}."""
    chunks = [chunk for name, chunk in replay.chunks.items()
              if tools.chunk_position(name)[0] == replay.streams[env_index][0]]
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def test_driver_two_envs_episodes_transitions_and_returns(tmp_path):
    envs = [wrappers.InProcess(CountingEnv("a", 3, terminal=True)), wrappers.InProcess(CountingEnv("b", 5))]
    replay = tools.Replay(tmp_path / "eps", capacity=1000, chunk=4)
    driver = tools.Driver(envs, replay, keep_episodes=True)
    calls, finished = [], []

    def policy(obs, state):
        assert obs["state"].shape == (2, 1) and obs["is_first"].shape == (2,)
        assert np.array_equal(obs["reward"], obs["state"][:, 0])  # CountingEnv: reward t with state t
        calls.append(obs["is_first"].copy())
        count = 0 if state is None else state
        return np.full((2, 2), 0.5, np.float32) * np.array([[1.0], [-1.0]], np.float32), count + 1

    driver.run(policy, episodes=4, on_episode=lambda ret, length, ep: finished.append((ret, length, ep)))
    # env a ends at steps 3, 6, 9; env b at 5: the 4th episode ends at step 9
    assert len(calls) == 9
    assert driver.state == 9
    assert len(finished) == 4
    assert sorted(f[:2] for f in finished) == sorted([(6.0, 3), (6.0, 3), (6.0, 3), (15.0, 5)])
    episode = next(ep for _, length, ep in finished if length == 5)
    assert episode["is_first"].tolist() == [True] + [False] * 5
    np.testing.assert_array_equal(episode["action"][0], np.zeros(2, np.float32))
    np.testing.assert_allclose(episode["action"][1:], np.full((5, 2), -0.5))
    np.testing.assert_allclose(episode["reward"], [0, 1, 2, 3, 4, 5])
    np.testing.assert_allclose(episode["state"][:, 0], np.arange(6))
    assert episode["is_last"].tolist() == [False] * 5 + [True]
    a_episode = next(ep for _, length, ep in finished if length == 3)
    assert a_episode["discount"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert a_episode["is_terminal"].tolist() == [False, False, False, True]
    for ret, length, stored in finished:
        assert stored["reward"].sum() == pytest.approx(ret)
        assert len(stored["reward"]) == length + 1
    # the replay got the same steps as they arrived: a's 12 steps (3 episodes) fill 3 chunks,
    # b's first 8 (its first episode and 2 steps of the second) fill 2, across the boundary
    a_steps, b_steps = stream_of(replay, 0), stream_of(replay, 1)
    assert a_steps["reward"].tolist() == [0, 1, 2, 3] * 3
    assert a_steps["is_first"].tolist() == [True, False, False, False] * 3
    assert b_steps["reward"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert b_steps["is_first"].tolist() == [True] + [False] * 5 + [True, False]
    assert len(replay.open[1]["reward"]) == 3  # the rest of b's 2nd episode waits in its open chunk
    assert files_on_disk(tmp_path / "eps") == sorted(replay.chunks)
    # the policy saw is_first exactly on the first step of each episode
    assert calls[0].tolist() == [True, True]
    assert calls[3].tolist() == [True, False] and calls[5].tolist() == [False, True]
    # the driver keeps unfinished episodes across calls: b's 2nd episode (4 steps so far)
    # ends in the next call with all its transitions, a's 4th episode starts
    finished.clear()
    driver.run(policy, steps=2, on_episode=lambda ret, length, ep: finished.append((ret, length, ep)))
    (_, _, episode), = finished
    np.testing.assert_allclose(episode["reward"], [0, 1, 2, 3, 4, 5])
    assert episode["is_first"].tolist() == [True] + [False] * 5
    assert envs[0].env.episodes == 4


def files_on_disk(directory):
    return sorted(path.stem for path in pathlib.Path(directory).glob("*.npz"))


def test_driver_steps_count_all_envs():
    envs = [wrappers.InProcess(CountingEnv(name, 100)) for name in ("a", "b")]
    driver = tools.Driver(envs)
    counted = []
    driver.run(lambda obs, state: (np.zeros((2, 2), np.float32), None), steps=10, on_step=counted.append)
    assert sum(counted) == 10
    assert all(len(env.env.actions) == 5 for env in envs)


def test_driver_runs_each_env_for_exactly_one_episode_in_one_batch():
    """Evaluation: envs of episode lengths 2, 5 and 3 each run one episode; a finished env is
    not stepped again (no second, short episode), and the batch keeps all three rows."""
    envs = [wrappers.InProcess(CountingEnv(name, length)) for name, length in (("a", 2), ("b", 5), ("c", 3))]
    driver = tools.Driver(envs)
    calls, finished = [], []

    def policy(obs, state):
        calls.append(sorted(driver.running))
        assert obs["state"].shape == (3, 1)
        return np.zeros((3, 2), np.float32), None

    driver.run_each_once(policy, on_episode=lambda ret, length, ep: finished.append((ret, length)))
    assert sorted(finished) == [(3.0, 2), (6.0, 3), (15.0, 5)]
    assert [len(env.env.actions) for env in envs] == [2, 5, 3]
    assert [env.env.episodes for env in envs] == [1, 1, 1]
    assert len(calls) == 5 and calls[0] == [0, 1, 2] and calls[2] == [1, 2] and calls[3] == [1]


def test_evaluate_runs_the_episodes_in_rounds_of_the_eval_envs():
    envs = [wrappers.InProcess(CountingEnv(name, length)) for name, length in (("a", 2), ("b", 4))]

    class Agent:
        def policy(self, obs, state, mode):
            assert mode == "eval"
            return np.zeros((len(obs["is_first"]), 2), np.float32), {}

        def eval(self):
            pass

        def train(self):
            pass

    returns, _, _ = dreamer.evaluate(Agent(), envs, 5, record_video=False)
    # rounds: (a, b), (a, b), (a): five episodes, none of them a second one of the same env in a round
    assert sorted(returns) == [3.0, 3.0, 3.0, 10.0, 10.0]
    assert [env.env.episodes for env in envs] == [3, 2]


# ----------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "latest.pt"
    model = torch.nn.Linear(3, 2)
    payload = {"agent": model.state_dict(), "agent_step": 123, "nested": {"a": [1, 2.5, "x"]},
               "array": np.arange(6).reshape(2, 3), "rng": tools.rng_states(),
               "numpy": (np.float32(0.1), np.zeros(4, np.uint32), np.array([True, False]), np.float16(2.5)),
               "generator": np.random.default_rng(3).bit_generator.state}
    tools.save_checkpoint(path, payload)
    torch.load(path, weights_only=True)  # plain data only
    loaded = tools.load_checkpoint(path, "cpu")
    assert loaded["agent_step"] == 123 and loaded["nested"] == {"a": [1, 2.5, "x"]}
    np.testing.assert_array_equal(loaded["array"], payload["array"])
    for before, after in zip(payload["numpy"], loaded["numpy"]):  # dtype, kind (scalar or array) and value exact
        assert type(after) is type(before) and after.dtype == before.dtype and np.array_equal(after, before)
    assert loaded["generator"] == payload["generator"]
    torch.nn.Linear(3, 2).load_state_dict(loaded["agent"])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["agent"][key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temp file left
    # restoring the rng states replays the same random numbers
    tools.set_rng_states(loaded["rng"])
    first = (np.random.rand(), torch.rand(3))
    tools.set_rng_states(loaded["rng"])
    second = (np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def test_checkpoint_overwrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    tools.save_checkpoint(path, {"version": 1})
    tools.save_checkpoint(path, {"version": 2})
    assert tools.load_checkpoint(path, "cpu")["version"] == 2

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        tools.save_checkpoint(path, {"version": 3})
    monkeypatch.undo()
    # a crash while writing leaves the previous checkpoint intact and loadable
    assert tools.load_checkpoint(path, "cpu")["version"] == 2


def test_atomic_write_bytes_replaces_content(tmp_path):
    path = tmp_path / "file.bin"
    tools.atomic_write_bytes(path, b"old")
    tools.atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    tools.atomic_write_bytes(str(path), b"as str")
    assert path.read_bytes() == b"as str"


def test_llcd_without_an_episode_length_needs_an_explicit_detection_deadline():
    """Memory Maze has no time_limit of its own: 'one episode' is undefined there."""
    with pytest.raises(tools.ConfigError) as info:
        tools.load_config(["--configs", "memorymaze", "--llcd", "True"])
    assert "llcd_max_delay" in str(info.value)
    assert tools.load_config(["--configs", "memorymaze", "--llcd", "True", "--llcd_max_delay", "500"]).llcd_max_delay == 500
    assert not tools.load_config(["--configs", "memorymaze"]).llcd  # without LLCD nothing to check
