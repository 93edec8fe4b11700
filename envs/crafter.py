"""Crafter (Hafner 2021), the open-world survival benchmark, as DreamerV3 runs it.

Task ``crafter_reward``: 64x64 colour observations, 17 discrete actions, the reward of the
benchmark (+1 for each achievement unlocked the first time in an episode, +-0.1 per health
point gained or lost), one agent step per game step (action repeat 1), 1M steps. The player's
death is a real terminal; the 10,000-step episode limit is the agent's TimeLimit wrapper.

Each observation also carries ``log_achievement_<name>`` (1.0 once the achievement has been
unlocked in this episode), so a finished episode logs which of the 22 achievements it unlocked.
``success_rates`` (percent of episodes) and ``score`` (the Crafter paper's score,
exp(mean(log(1 + s_i))) - 1 over the 22 success rates s_i in percent) summarise them.
"""

import functools

import gymnasium as gym
import numpy as np

from envs import discrete

TASKS = ("reward",)
LOG_PREFIX = "log_achievement_"


def check_task(task, action_repeat, size):
    """One-line ValueError (ImportError without the crafter package) for a task Crafter cannot run."""
    discrete.require("crafter", "crafter", "Crafter")
    if task not in TASKS:
        raise ValueError(f"unknown Crafter task 'crafter_{task}'; tasks: {', '.join(f'crafter_{t}' for t in TASKS)}")
    if action_repeat != 1:
        raise ValueError(f"Crafter runs with action_repeat 1 (one agent step per game step), got {action_repeat}; "
                         "pass --action_repeat 1 or add --configs crafter")


def achievements():
    """The 22 achievement names, in Crafter's order."""
    return list(discrete.require("crafter", "crafter", "Crafter").constants.achievements)


@functools.cache
def reproducible_env_class():
    """crafter.Env with reproducible creature balancing. Crafter keeps each chunk's objects in
    a set, so which creature despawns depends on their memory addresses and a seeded run differs
    from process to process; here the balancing sees them sorted by position (one per cell)."""
    crafter = discrete.require("crafter", "crafter", "Crafter")

    class ReproducibleEnv(crafter.Env):
        def _balance_object(self, chunk, objs, *args):
            return super()._balance_object(chunk, sorted(objs, key=lambda obj: tuple(obj.pos)), *args)

    return ReproducibleEnv


class Crafter:
    """One Crafter world per episode, generated from ``seed`` and the episode count."""

    def __init__(self, task="reward", size=(64, 64), seed=0):
        check_task(task, 1, size)
        self._env = reproducible_env_class()(size=tuple(size), seed=seed, length=None, reward=True)
        self._size = tuple(size)
        self._names = achievements()

    @property
    def observation_space(self):
        logs = {LOG_PREFIX + name: gym.spaces.Box(0, 1, (), dtype=np.float32) for name in self._names}
        return discrete.observation_space(self._size, logs)

    @property
    def action_space(self):
        return gym.spaces.Discrete(self._env.action_space.n)

    def reset(self):
        obs = discrete.observation(self._env.reset(), is_first=True)
        return {**obs, **{LOG_PREFIX + name: np.float32(0.0) for name in self._names}}

    def step(self, action):
        image, reward, done, info = self._env.step(discrete.action_index(action, self._env.action_space.n))
        dead = bool(done)  # without a length, only the player's death ends a Crafter episode
        unlocked = {LOG_PREFIX + name: np.float32(info["achievements"][name] > 0) for name in self._names}
        obs = {**discrete.observation(image, is_last=dead, is_terminal=dead), **unlocked}
        return obs, float(reward), dead, discrete.step_info(dead)


def success_rates(episodes, prefix="episode_achievement_"):
    """Percent of ``episodes`` that unlocked each achievement; an episode is a dict with a 0/1
    entry ``<prefix><name>`` per achievement, e.g. a per-episode row of a run's metrics.jsonl."""
    rates = {}
    for name in achievements():
        values = [episode[prefix + name] for episode in episodes if prefix + name in episode]
        rates[name] = 100.0 * float(np.mean(values)) if values else 0.0
    return rates


def score(rates):
    """Crafter score: exp(mean_i log(1 + s_i)) - 1 over the success rates s_i in percent."""
    return float(np.exp(np.mean(np.log1p(list(rates.values())))) - 1.0)
