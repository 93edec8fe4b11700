"""Atari 2600 games through ale-py (which ships the ROMs), as DreamerV3 runs Atari 100k.

Task ``atari_<game>`` names an ale-py ROM id: ``atari_pong``, ``atari_ms_pacman``,
``atari_jamesbond``. One agent step repeats the action for ``action_repeat`` frames and sums
their rewards; the image is the pixel-wise max over the step's last two frames (Atari sprites
flicker between frames), resized bilinearly to ``size``, in colour. The settings of the
``atari100k`` block follow the ``atari100k`` entry of DreamerV3's released configs.yaml (and
the same block of the PyTorch port NM512/dreamerv3-torch): action repeat 4, 64x64 colour,
sticky actions off, ``actions: needed`` = ALE's minimal action set of the game
(``full_action_space=False``: 4 actions in Breakout, 6 in Pong), ``noops: 30`` = a random
number of no-op actions, 0 to 30, after each reset (drawn from a generator seeded with
``seed``; the observation after them is the episode's ``is_first``), and ``lives: unused``:
losing a life is neither an episode end nor a terminal; the game over is a real terminal.
The 108K-frame time limit (30 minutes of play) is the agent's TimeLimit wrapper. The
Machado et al. protocol of Atari 200M: ``--atari.sticky 0.25`` (ALE's
repeat_action_probability) and ``--atari.full_action_space True`` (all 18 actions).

``human_normalized(game, score)`` = (score - random) / (human - random) with the reference
scores of ``REFERENCE_SCORES``.
"""

import difflib

import gymnasium as gym
import numpy as np

from envs import discrete

# (random, human) scores of the 26 Atari 100k games, by ale-py ROM id. Source: Wang et al. 2016,
# "Dueling Network Architectures for Deep RL" (random and human rows of its score table), the
# reference scores of the Atari 100k benchmark (Kaiser et al. 2020) and of DreamerV3.
REFERENCE_SCORES = {
    "alien": (227.8, 7127.7),
    "amidar": (5.8, 1719.5),
    "assault": (222.4, 742.0),
    "asterix": (210.0, 8503.3),
    "bank_heist": (14.2, 753.1),
    "battle_zone": (2360.0, 37187.5),
    "boxing": (0.1, 12.1),
    "breakout": (1.7, 30.5),
    "chopper_command": (811.0, 7387.8),
    "crazy_climber": (10780.5, 35829.4),
    "demon_attack": (152.1, 1971.0),
    "freeway": (0.0, 29.6),
    "frostbite": (65.2, 4334.7),
    "gopher": (257.6, 2412.5),
    "hero": (1027.0, 30826.4),
    "jamesbond": (29.0, 302.8),
    "kangaroo": (52.0, 3035.0),
    "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3),
    "ms_pacman": (307.3, 6951.6),
    "pong": (-20.7, 14.6),
    "private_eye": (24.9, 69571.3),
    "qbert": (163.9, 13455.0),
    "road_runner": (11.5, 7845.0),
    "seaquest": (68.4, 42054.7),
    "up_n_down": (533.4, 11693.2),
}


def human_normalized(game, score):
    """(score - random) / (human - random), or None for a game without reference scores."""
    if game not in REFERENCE_SCORES:
        return None
    random, human = REFERENCE_SCORES[game]
    return (score - random) / (human - random)


def check_task(game, action_repeat, size):
    """One-line ValueError (ImportError without ale-py) unless ``game`` is an ale-py ROM id."""
    roms = discrete.require("ale_py.roms", "ale-py", "Atari")
    games = roms.get_all_rom_ids()
    if game not in games:
        close = difflib.get_close_matches(game, games, n=1)
        hint = f" (did you mean 'atari_{close[0]}'?)" if close else ""
        raise ValueError(f"unknown Atari game '{game}'{hint}; tasks are atari_<game> with an ale-py ROM id, "
                         f"e.g. atari_pong, atari_ms_pacman ({len(games)} games)")


def action_count(game, full_action_space=False):
    """The actions of ``game`` as ``Atari`` offers them: ALE's minimal set, or its 18 legal ones."""
    check_task(game, 4, (64, 64))
    ale_py = discrete.require("ale_py", "ale-py", "Atari")
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # before the constructor: no banner
    ale = ale_py.ALEInterface()
    ale.loadROM(str(ale_py.roms.get_rom_path(game)))
    return len(ale.getLegalActionSet() if full_action_space else ale.getMinimalActionSet())


class Atari:
    """One Atari game; ``info['lives']`` reports the lives left after each step, ``start_frame``
    the frames played (no-ops) before the first observation of the current episode."""

    def __init__(self, game, action_repeat=4, size=(64, 64), seed=0, sticky=0.0, full_action_space=False, noops=30):
        check_task(game, action_repeat, size)
        ale_py = discrete.require("ale_py", "ale-py", "Atari")
        self._ale = ale_py.ALEInterface()
        self._ale.setLoggerMode(ale_py.LoggerMode.Error)
        self._ale.setInt("random_seed", seed)  # the emulator's randomness, sticky actions included
        self._ale.setFloat("repeat_action_probability", sticky)
        self._ale.loadROM(str(ale_py.roms.get_rom_path(game)))
        self._actions = self._ale.getLegalActionSet() if full_action_space else self._ale.getMinimalActionSet()
        self._noop = ale_py.Action.NOOP
        self._repeat, self._size, self._noops = action_repeat, tuple(size), noops
        self._rng = np.random.default_rng(seed)  # the number of no-ops at each start
        self.start_frame = 0
        height, width = self._ale.getScreenDims()
        self._frames = np.zeros((2, height, width, 3), np.uint8)  # the last two frames, newest last

    @property
    def observation_space(self):
        return discrete.observation_space(self._size)

    @property
    def action_space(self):
        return gym.spaces.Discrete(len(self._actions))

    def reset(self):
        self._ale.reset_game()
        for _ in range(self._rng.integers(self._noops + 1)):
            self._ale.act(self._noop)
            if self._ale.game_over():
                self._ale.reset_game()
        self.start_frame = self._ale.getEpisodeFrameNumber()
        self._grab_frame()
        self._grab_frame()  # both frames of the pool are the first screen
        return discrete.observation(self._image(), is_first=True)

    def step(self, action):
        action = self._actions[discrete.action_index(action, len(self._actions))]
        reward = 0.0
        for repeat in range(self._repeat):
            reward += self._ale.act(action)
            over = self._ale.game_over()
            if over or repeat >= self._repeat - 2:
                self._grab_frame()
            if over:
                break
        obs = discrete.observation(self._image(), is_last=over, is_terminal=over)
        return obs, reward, over, {**discrete.step_info(over), "lives": self._ale.lives()}

    def _grab_frame(self):
        self._frames[0] = self._frames[1]
        self._ale.getScreenRGB(self._frames[1])

    def _image(self):
        """Max over the last two frames (H, W, 3), resized to ``size``."""
        from PIL import Image

        pooled = Image.fromarray(self._frames.max(0))
        return np.asarray(pooled.resize((self._size[1], self._size[0]), Image.BILINEAR))
