"""Helpers shared by the tests that run the agent: run dreamer.main quietly, read what
a run wrote, crash a run at a chosen agent step, and tell whether pixels can be rendered."""

import contextlib
import io
import json
import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dreamer  # noqa: E402
import tools  # noqa: E402


class Stop(Exception):
    """Raised inside a run to simulate a crash."""


def run_main(args):
    """dreamer.main in this process; returns what it printed to stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dreamer.main(list(args))
    return out.getvalue()


def read_rows(logdir):
    lines = (pathlib.Path(logdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def chunk_files(logdir):
    """The run's replay chunk files, oldest first (names start with a timestamp)."""
    return sorted((pathlib.Path(logdir) / "train_eps").glob("*.npz"))


def replay_steps(logdir):
    """Every step a one-env run's replay holds, in arrival order: the chunk files, then the
    chunk being filled at the last checkpoint. Returns {key: (L, ...) array}."""
    parts = []
    for path in chunk_files(logdir):
        with np.load(path) as data:
            parts.append({key: data[key] for key in data.files})
    payload = tools.load_checkpoint(pathlib.Path(logdir) / "latest.pt", "cpu")
    parts += list(payload["replay"]["open"].values())
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def crash_training_at(monkeypatch, args, agent_step):
    """Run ``args`` until the first update due at or after ``agent_step``, then crash it."""
    original = dreamer.Run.train_due_updates

    def crash(run):
        if run.agent_step >= agent_step:
            raise Stop
        original(run)

    monkeypatch.setattr(dreamer.Run, "train_due_updates", crash)
    with pytest.raises(Stop):
        run_main(args)
    monkeypatch.setattr(dreamer.Run, "train_due_updates", original)


def egl_available():
    """(True, "") where MuJoCo renders 64x64 pixels here, else (False, why)."""
    try:
        from envs import dmc

        env = dmc.DeepMindControl("cartpole_balance", 1, (64, 64), None, 0, pixels=True)
        return env.reset()["image"].shape == (64, 64, 3), ""
    except Exception as error:  # noqa: BLE001 - any rendering failure means: no EGL here
        return False, f"{type(error).__name__}: {error}"
