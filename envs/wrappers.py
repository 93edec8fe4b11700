"""Environment wrappers: time limit, action normalisation, and
``Parallel``, which runs an environment in its own process.

Every wrapper forwards unknown attributes to the wrapped env, so methods such
as ``set_task`` reach the innermost env through any stack of wrappers. For a
``Parallel`` env, ``call(name, *args)`` runs any such method in the child.
``step``/``reset`` of ``Parallel`` return a promise (call it to get the
result) so several envs can step concurrently; ``InProcess`` offers the same
interface without a subprocess.
"""

import multiprocessing
import traceback

import cloudpickle
import gymnasium as gym
import numpy as np


class Wrapper:
    """Base wrapper: forwards every attribute it does not define."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.env, name)


class TimeLimit(Wrapper):
    """Ends an episode after ``duration`` agent steps."""

    def __init__(self, env, duration):
        super().__init__(env)
        self._duration = duration
        self._step = None

    def step(self, action):
        assert self._step is not None, "call reset() before step()"
        obs, reward, done, info = self.env.step(action)
        self._step += 1
        if self._duration and self._step >= self._duration:
            done = True
            obs["is_last"] = True
            info.setdefault("discount", np.float32(1.0))
        if done:
            self._step = None
        return obs, reward, done, info

    def reset(self):
        self._step = 0
        return self.env.reset()


class NormalizeActions(Wrapper):
    """Exposes finite action bounds as [-1, 1]."""

    def __init__(self, env):
        super().__init__(env)
        space = env.action_space
        self._mask = np.isfinite(space.low) & np.isfinite(space.high)
        self._low = np.where(self._mask, space.low, -1)
        self._high = np.where(self._mask, space.high, 1)

    @property
    def action_space(self):
        low = np.where(self._mask, -np.ones_like(self._low), self._low)
        high = np.where(self._mask, np.ones_like(self._high), self._high)
        return gym.spaces.Box(low, high, dtype=np.float32)

    def step(self, action):
        original = (action + 1) / 2 * (self._high - self._low) + self._low
        return self.env.step(np.where(self._mask, original, action))


class InProcess(Wrapper):
    """Same interface as ``Parallel`` for an env living in this process."""

    def step(self, action):
        result = self.env.step(action)
        return lambda: result

    def reset(self):
        result = self.env.reset()
        return lambda: result

    def attribute(self, name):
        return getattr(self.env, name)

    def call(self, name, *args, **kwargs):
        return getattr(self.env, name)(*args, **kwargs)


class Parallel:
    """Runs ``ctor()`` in a child process; talk to it through a pipe."""

    def __init__(self, ctor):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_worker, args=(child, cloudpickle.dumps(ctor)), daemon=True)
        self._process.start()
        child.close()
        self.observation_space = self.attribute("observation_space")
        self.action_space = self.attribute("action_space")

    @property
    def id(self):
        return self.attribute("id")

    def attribute(self, name):
        """Value of an attribute of the env in the child process."""
        return self._request("attr", name, (), {})()

    def step(self, action):
        return self._request("call", "step", (action,), {})

    def reset(self):
        return self._request("call", "reset", (), {})

    def call(self, name, *args, **kwargs):
        return self._request("call", name, args, kwargs)()

    def close(self):
        try:
            self._conn.send(None)
            self._process.join(5)
        except (BrokenPipeError, OSError):
            pass
        if self._process.is_alive():
            self._process.terminate()

    def _request(self, kind, name, args, kwargs):
        self._conn.send((kind, name, args, kwargs))
        return self._receive

    def _receive(self):
        try:
            ok, payload = self._conn.recv()
        except (EOFError, ConnectionError) as error:
            raise RuntimeError(f"environment process died (exit code {self._process.exitcode})") from error
        if not ok:
            raise RuntimeError(f"environment process failed:\n{payload}")
        return payload


def _worker(conn, ctor_bytes):
    """Child loop: build the env, then answer ('attr'|'call', name, args, kwargs) requests."""
    env = cloudpickle.loads(ctor_bytes)()
    while True:
        message = conn.recv()
        if message is None:
            break
        kind, name, args, kwargs = message
        try:
            value = getattr(env, name)
            conn.send((True, value(*args, **kwargs) if kind == "call" else value))
        except Exception:  # noqa: BLE001 - the parent re-raises with the child's traceback
            conn.send((False, traceback.format_exc()))
    conn.close()
