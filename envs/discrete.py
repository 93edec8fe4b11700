"""What the discrete-action pixel suites (envs/atari.py, envs/crafter.py, envs/memorymaze.py)
share with each other and with envs/dmc.py's pixel envs.

Observations are dicts: ``image`` (H, W, 3) uint8 and the flags ``is_first``, ``is_last`` and
``is_terminal`` (a real end of the episode, whose value is zero; a time limit sets ``is_last``
only). ``step(action)`` returns ``(obs, reward, done, info)`` with ``info['discount']`` 0 on a
real terminal, else 1. ``action_space`` is ``gymnasium.spaces.Discrete(n)``; ``step`` takes the
agent's one-hot vector (n,) or an integer index.
"""

import importlib

import gymnasium as gym
import numpy as np

FLAGS = ("is_first", "is_last", "is_terminal")


def require(module, package, suite):
    """Import the optional dependency ``module``; when it is missing, a one-line ImportError
    naming the pip ``package`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{suite} tasks need the '{package}' package, which does not import here ({error}); "
                          "install it with: pip install -r requirements.txt") from None


def observation_space(size, extra=None):
    """Dict space of ``image`` (size + (3,)) uint8, the three flags and ``extra`` spaces."""
    flags = {key: gym.spaces.Box(0, 1, (), dtype=bool) for key in FLAGS}
    image = gym.spaces.Box(0, 255, tuple(size) + (3,), dtype=np.uint8)
    return gym.spaces.Dict({"image": image, **flags, **(extra or {})})


def action_index(action, count):
    """The index of a one-hot action (count,) or of an integer action in [0, count)."""
    action = np.asarray(action)
    if action.shape == (count,):
        return int(action.argmax())
    if action.shape == () and action == np.round(action) and 0 <= action < count:
        return int(action)
    raise ValueError(f"expected a one-hot action of shape ({count},) or an index in [0, {count}), "
                     f"got {action.tolist()!r}")


def observation(image, is_first=False, is_last=False, is_terminal=False):
    return {"image": image, "is_first": is_first, "is_last": is_last, "is_terminal": is_terminal}


def step_info(is_terminal):
    """The ``info`` of a step: discount 0 after a real terminal."""
    return {"discount": np.float32(0.0 if is_terminal else 1.0)}
