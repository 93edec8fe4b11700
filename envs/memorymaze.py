"""Memory Maze (Pasukonis et al. 2022): 3D mazes that test long-term memory, on MuJoCo.

Task ``memorymaze_<size>`` with size 9x9, 11x11, 13x13 or 15x15. The agent sees a 64x64
first-person colour image (the colour of the current target drawn as its border) and picks
one of 6 actions (noop, forward, left, right, forward+left, forward+right) at the benchmark's
4 Hz control rate, so the agent's action repeat is 1. A reward of 1 for touching the target
object, after which another target is asked for. Episodes never end early: the maze's time
limit (1000, 2000, 3000, 4000 steps for the four sizes) sets ``is_last`` and never
``is_terminal``. The paper's budget is 100M steps.

The env is memory_maze's dm_env task (``memory_maze.tasks``); importing memory_maze also
imports the old ``gym`` package to register gym ids, hence gym is pinned in requirements.txt.
Most of a step's time is MuJoCo physics and rendering (its shadow map).
"""

import gymnasium as gym
import numpy as np

from envs import discrete

SIZES = ("9x9", "11x11", "13x13", "15x15")


def check_task(size, action_repeat, image_size):
    """One-line ValueError (ImportError without memory-maze) for a task Memory Maze cannot run."""
    discrete.require("memory_maze.tasks", "memory-maze", "Memory Maze")
    if size not in SIZES:
        raise ValueError(f"unknown Memory Maze task 'memorymaze_{size}'; tasks: "
                         f"{', '.join(f'memorymaze_{s}' for s in SIZES)}")
    if action_repeat != 1:
        raise ValueError(f"Memory Maze runs with action_repeat 1 (its control rate is already 4 Hz), got "
                         f"{action_repeat}; pass --action_repeat 1 or add --configs memorymaze")
    if image_size[0] != image_size[1]:
        raise ValueError(f"Memory Maze renders square images, got size {list(image_size)}; pass --size [64, 64]")


class MemoryMaze:
    """One maze of the given size; a new maze layout every episode, drawn from ``seed``."""

    def __init__(self, size="9x9", image_size=(64, 64), seed=0):
        check_task(size, 1, image_size)
        tasks = discrete.require("memory_maze.tasks", "memory-maze", "Memory Maze")
        build = getattr(tasks, f"memory_maze_{size}")
        self._env = build(seed=seed, image_only_obs=True, camera_resolution=int(image_size[0]))
        self._size = tuple(image_size)
        self._count = int(self._env.action_spec().num_values)

    @property
    def observation_space(self):
        return discrete.observation_space(self._size)

    @property
    def action_space(self):
        return gym.spaces.Discrete(self._count)

    def reset(self):
        return discrete.observation(np.asarray(self._env.reset().observation), is_first=True)

    def step(self, action):
        time_step = self._env.step(discrete.action_index(action, self._count))
        last = time_step.last()
        terminal = last and time_step.discount == 0
        obs = discrete.observation(np.asarray(time_step.observation), is_last=last, is_terminal=terminal)
        return obs, float(time_step.reward or 0.0), last, discrete.step_info(terminal)
