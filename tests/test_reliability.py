"""Fault injection: kill -9 and resume, corrupt replay chunk files, read-only logdir,
disk full, non-finite updates, incompatible checkpoints, bad input, determinism.

Runs use ``--configs debug --task dmc_cartpole_balance --train_ratio 16`` on
CPU with one thread, like tests/test_dreamer.py: action_repeat 2, prefill 100
agent steps, episodes of 100 agent steps (101 stored transitions), eval and
checkpoint every 200 env steps, batch 4 x 16, so one update per 4 agent steps
after prefill. Every checkpoint falls on an episode boundary, which makes the
step bookkeeping below exact. Replay chunks hold 64 steps.
"""

import contextlib
import copy
import errno
import io
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dreamer  # noqa: E402
import tools  # noqa: E402
from runs import Stop, read_rows, replay_steps, run_main  # noqa: E402

BASE = ["--configs", "debug", "--task", "dmc_cartpole_balance", "--train_ratio", "16", "--device", "cpu",
        "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
ACTION_REPEAT, PREFILL, EPISODE_STEPS, BATCH_STEPS, TRAIN_RATIO, CHUNK = 2, 100, 100, 4 * 16, 16, 64


def expected_updates(agent_step):
    return (agent_step - PREFILL) * TRAIN_RATIO // BATCH_STEPS


def command(*args):
    return [sys.executable, "dreamer.py", *BASE, *args]


def run_command(argv, env=ENV, timeout=300):
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *fragments):
    """Exit code non-zero, no traceback, exactly one stderr line 'error: ...' holding ``fragments``."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def exit_message(args):
    """The SystemExit message of dreamer.main(args) run in this process."""
    with pytest.raises(SystemExit) as info:
        run_main(args)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def chunk_names(logdir):
    return sorted(path.stem for path in (pathlib.Path(logdir) / "train_eps").glob("*.npz"))


def assert_replay_matches_checkpoint(logdir, payload):
    """Files on disk == the checkpoint's chunk list == a resumed replay's memory (same order)."""
    state, config = payload["replay"], payload["config"]
    assert chunk_names(logdir) == sorted(state["chunks"])
    assert not list((pathlib.Path(logdir) / "train_eps" / ".evicted").glob("*"))
    replay = tools.Replay(pathlib.Path(logdir) / "train_eps", config["dataset_size"], config["seed"],
                          config["replay"], config["replay_chunk"])
    replay.load_state_dict(state)
    assert list(replay.chunks) == state["chunks"]
    positions = [tools.chunk_position(name) for name in state["chunks"]]
    assert len(positions) == len(set(positions))


def assert_metrics_logged_once(logdir):
    rows = read_rows(logdir)
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps)
    pairs = [(row["step"], key) for row in rows for key in row if key != "step"]
    assert len(pairs) == len(set(pairs))
    return rows


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 400-env-step run (checkpoint at agent step 200, two episodes)."""
    logdir = tmp_path_factory.mktemp("finished") / "run"
    run_main([*BASE, "--steps", "400", "--logdir", str(logdir)])
    return logdir


def copy_run(source, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


# ----------------------------------------------------------------- kill -9


def logged_step(logdir):
    """Largest env step in metrics.jsonl so far (0 before the first row)."""
    path = pathlib.Path(logdir) / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def run_with_kills(argv, logdir, targets, rng):
    """For each target env step: start ``argv`` and kill -9 it at a random moment (0-0.5 s) after
    metrics.jsonl first logs a step >= target and beyond anything logged before this start.
    Then run ``argv`` to completion. Returns (kills that hit a live process, every output)."""
    hits, outputs = 0, []
    for attempt, target in enumerate(targets):
        target = max(target, logged_step(logdir) + 100)
        log_path = logdir.parent / f"attempt{attempt}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 300
            while process.poll() is None and logged_step(logdir) < target and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            if process.poll() is None:
                process.kill()  # SIGKILL
                hits += 1
            process.wait()
        outputs.append(log_path.read_text())
    final = run_command(argv)
    assert final.returncode == 0, final.stderr[-3000:]
    return hits, outputs + [final.stdout + final.stderr]


@pytest.mark.parametrize("replay, dataset_size", [("fifo", 100_000), ("fifo", 101), ("reservoir", 101)])
def test_kill_9_at_random_moments_then_resume_loses_and_duplicates_nothing(replay, dataset_size, tmp_path):
    """Checkpoints at env steps 200 (after prefill), 1000 and 1200, so most kills land with
    chunks stored and files evicted after the last checkpoint.
    fifo with room for everything: every step is stored exactly once, in order.
    fifo holding one chunk: every full chunk evicts the checkpointed file, which must come back.
    reservoir holding one chunk: its counter and buffer continue from the checkpoint."""
    steps = 1200  # 600 agent steps: prefill episode + 5 episodes, 125 updates
    logdir = tmp_path / "run"
    argv = command("--steps", str(steps), "--logdir", str(logdir), "--replay", replay,
                   "--dataset_size", str(dataset_size), "--eval_every", "800", "--checkpoint_every", "800")
    rng = random.Random(f"kill-{replay}-{dataset_size}")
    targets = sorted(rng.randrange(300, 1100) for _ in range(3))
    hits, outputs = run_with_kills(argv, logdir, targets, rng)
    assert hits >= 2, f"only {hits} kills hit a running process"
    assert all("Resumed" in output for output in outputs[1:])  # every kill came after the prefill checkpoint
    assert not any("unreadable replay chunk" in output for output in outputs)  # no checkpointed chunk lost

    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    agent_step = steps // ACTION_REPEAT
    assert payload["agent_step"] == agent_step
    assert payload["updates"] == expected_updates(agent_step)
    episodes = agent_step // EPISODE_STEPS
    transitions = agent_step + episodes  # each episode stores its reset too
    assert payload["replay"]["seen"] == transitions // CHUNK  # every full chunk offered once
    assert_replay_matches_checkpoint(logdir, payload)
    if dataset_size > steps:
        stored = replay_steps(logdir)
        assert len(stored["reward"]) == transitions
        length = EPISODE_STEPS + 1
        assert np.flatnonzero(stored["is_first"]).tolist() == [i * length for i in range(episodes)]
        assert np.flatnonzero(stored["is_last"]).tolist() == [(i + 1) * length - 1 for i in range(episodes)]
    else:
        assert len(payload["replay"]["chunks"]) == 1
    rows = assert_metrics_logged_once(logdir)
    assert [row["step"] for row in rows if "eval_return" in row] == [200, 1000, 1200]
    assert not list(logdir.glob(".*.tmp")) and not list((logdir / "train_eps").glob(".*.tmp"))


def make_episode(replay, index, length=5):
    for t in range(length):
        replay.add_step(0, {"reward": np.float32(t), "ep": np.int64(index)})


def contents(replay):
    """What the buffer holds, in its order: stored chunks then the open ones (names hold
    timestamps and differ between two buffers fed the same steps)."""
    chunks = [(chunk["ep"].tolist(), chunk["reward"].tolist()) for chunk in replay.chunks.values()]
    return chunks, {index: [int(ep) for ep in steps["ep"]] for index, steps in replay.open.items()}


def test_replay_resume_restores_the_checkpointed_buffer_exactly(tmp_path):
    """Kill after a checkpoint: new files are deleted, evicted ones come back, the memory order,
    the chunk being filled and the RNG are the checkpoint's, so the reservoir continues as if
    never interrupted: nothing lost, nothing stored twice."""
    directory = tmp_path / "eps"
    live = tools.Replay(directory, 16, 0, "reservoir", chunk=4)  # holds 4 chunks; 5-step episodes
    reference = tools.Replay(tmp_path / "reference", 16, 0, "reservoir", chunk=4)
    for index in range(10):
        make_episode(live, index)
        make_episode(reference, index)
    state = copy.deepcopy(live.state_dict())  # the checkpoint
    live.purge_evicted()
    for index in range(10, 16):  # collected after the checkpoint, then kill -9
        make_episode(live, index)
    (directory / ".chunk-cut-short.npz.tmp").write_bytes(b"cut short")
    evicted = {path.stem for path in (directory / ".evicted").glob("*.npz")}
    assert evicted & set(state["chunks"])  # the test needs a checkpointed file that was evicted since
    assert state["open"]  # and a chunk being filled at the checkpoint

    resumed = tools.Replay(directory, 16, 0, "reservoir", chunk=4)
    resumed.load_state_dict(state)
    assert list(resumed.chunks) == state["chunks"]
    assert sorted(path.stem for path in directory.glob("*.npz")) == sorted(state["chunks"])
    assert not list(directory.glob(".*.tmp")) and not (directory / ".evicted").exists()
    for index in range(10, 30):
        make_episode(resumed, index)
        make_episode(reference, index)
    assert contents(resumed) == contents(reference)
    assert resumed.seen == reference.seen == 30 * 5 // 4


def test_restart_without_checkpoint_starts_clean_and_prefill_is_checkpointed(tmp_path, monkeypatch):
    """A kill during prefill leaves chunk files but no checkpoint: the restart deletes them
    with a note; a checkpoint is written right after prefill."""
    logdir = tmp_path / "run"
    stale = logdir / "train_eps" / "20000101T000000000000-stale-101.npz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed prefill")

    def stop(run):
        raise Stop

    monkeypatch.setattr(dreamer.Run, "train", stop)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(Stop):
        dreamer.main([*BASE, "--logdir", str(logdir)])
    assert "No checkpoint: deleted 1 replay chunk files" in out.getvalue()
    assert not stale.exists()
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert payload["agent_step"] == PREFILL and payload["updates"] == 0
    assert len(payload["replay"]["chunks"]) == 1  # 101 transitions: one full chunk, 37 steps open
    assert len(payload["replay"]["open"][0]["reward"]) == PREFILL + 1 - CHUNK
    assert_replay_matches_checkpoint(logdir, payload)


# ----------------------------------------------------------------- damaged files


def test_corrupt_chunk_file_is_skipped_with_a_warning(finished_run, tmp_path):
    logdir = copy_run(finished_run, tmp_path)
    victim = chunk_names(logdir)[0]
    (logdir / "train_eps" / f"{victim}.npz").write_bytes(b"\x00garbage, not a zip file")
    with pytest.warns(UserWarning, match=victim):
        run_main([*BASE, "--steps", "600", "--logdir", str(logdir)])
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert payload["agent_step"] == 600 // ACTION_REPEAT
    assert victim not in payload["replay"]["chunks"]
    assert (logdir / "train_eps" / f"{victim}.npz.corrupt").exists()
    assert_replay_matches_checkpoint(logdir, payload)


def read_only_argv(directory, argv):
    """``argv`` run with ``directory`` read-only. chmod does not stop root, so as root the
    directory becomes a read-only bind mount inside a private mount namespace (unshare)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return argv
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode:
        pytest.skip("running as root (chmod does not block root's writes) and unshare -rm is unavailable "
                    "for a read-only bind mount")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", str(directory), *argv]


def test_read_only_logdir_is_a_one_line_error(tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    try:
        result = run_command(read_only_argv(parent, command("--logdir", str(parent / "run"))))
    finally:
        parent.chmod(0o755)
    assert_one_line_error(result, "cannot write to logdir", str(parent / "run"), "--logdir")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(finished_run, tmp_path, monkeypatch):
    logdir = copy_run(finished_run, tmp_path)
    replace = os.replace

    def disk_full_for_checkpoints(src, dst):
        if pathlib.Path(dst).name == "latest.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full_for_checkpoints)
    message = exit_message([*BASE, "--steps", "600", "--logdir", str(logdir)])
    monkeypatch.undo()
    assert "latest.pt" in message and os.strerror(errno.ENOSPC) in message
    assert "previous checkpoint (env step 400) is intact" in message and "free disk space" in message
    assert not list(logdir.glob(".*.tmp"))  # the half-written temp file is gone
    assert tools.load_checkpoint(logdir / "latest.pt", "cpu")["agent_step"] == 400 // ACTION_REPEAT
    run_main([*BASE, "--steps", "600", "--logdir", str(logdir)])  # space freed: the same command resumes
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert payload["agent_step"] == 600 // ACTION_REPEAT
    assert_replay_matches_checkpoint(logdir, payload)
    assert_metrics_logged_once(logdir)


def test_failed_atomic_write_removes_its_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    tools.atomic_write_bytes(path, b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        tools.atomic_write_bytes(path, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"] and path.read_bytes() == b"old"


# ----------------------------------------------------------------- non-finite updates


def test_optimizer_skips_nonfinite_loss_and_gradients():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = tools.Optimizer("m", model.parameters(), 1e-2, 1e-8, 100.0, 0.0, 32)
    x = torch.randn(4, 3)
    assert opt.step(model(x).pow(2).mean())["m_nonfinite"] == 0.0
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    nan_loss = model(x).sum() * float("nan")
    nan_grad = (model.weight - model.weight.detach()).abs().sqrt().sum()  # loss 0, gradient NaN
    for loss in (nan_loss, nan_grad):
        assert opt.step(loss)["m_nonfinite"] == 1.0
        for before, after in zip(params, model.parameters()):
            assert torch.equal(before, after)
        for before, after in zip(state["opt"]["state"].values(), opt.state_dict()["opt"]["state"].values()):
            assert all(torch.equal(before[key], after[key]) for key in before)
    assert opt.step(model(x).pow(2).mean())["m_nonfinite"] == 0.0
    assert not torch.equal(params[0], model.weight)


def nan_batches(monkeypatch, bad):
    """Replay.sample returns NaN observations for the updates whose index ``bad(index)`` holds."""
    original, calls = tools.Replay.sample, []

    def sample(self, batch, length, prefix=0):
        data = original(self, batch, length, prefix)
        if bad(len(calls)):
            data["state"] = np.full_like(data["state"], np.nan)
        calls.append(1)
        return data

    monkeypatch.setattr(tools.Replay, "sample", sample)


def assert_agent_finite(payload):
    for name, value in payload["agent"].items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.isfinite(value).all(), name


def test_nonfinite_updates_are_skipped_counted_and_logged(tmp_path, monkeypatch):
    nan_batches(monkeypatch, lambda index: 5 <= index < 8)  # updates 6-8, before the log at env step 302
    logdir = tmp_path / "run"
    run_main([*BASE, "--steps", "400", "--logdir", str(logdir)])
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert payload["updates"] == expected_updates(200) and payload["nonfinite_updates"] == 3
    assert_agent_finite(payload)  # parameters, Adam moments' owners and the return-scale EMA
    rows = [row for row in read_rows(logdir) if "nonfinite_updates" in row]
    assert rows[-1]["nonfinite_updates"] == 3
    assert any(row.get("model_nonfinite", 0) > 0 for row in rows)


def test_repeated_nonfinite_updates_stop_the_run_with_a_valid_checkpoint(tmp_path, monkeypatch):
    nan_batches(monkeypatch, lambda index: index >= 2)
    logdir = tmp_path / "run"
    message = exit_message([*BASE, "--steps", "400", "--nonfinite_limit", "5", "--logdir", str(logdir)])
    assert "5 updates in a row" in message and "model" in message and "latest.pt" in message
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    assert payload["updates"] == 7 and payload["nonfinite_updates"] == 5
    assert_agent_finite(payload)
    assert read_rows(logdir)[-1]["nonfinite_updates"] == 5


# ----------------------------------------------------------------- incompatible checkpoints


def test_incompatible_checkpoint_is_a_one_line_error(finished_run, tmp_path):
    logdir = copy_run(finished_run, tmp_path)
    before = chunk_names(logdir)
    result = run_command(command("--steps", "600", "--logdir", str(logdir), "--units", "64", "--dyn_deter", "48"))
    line = assert_one_line_error(result, "saved with another config", "units 32 (saved) vs 64 (given)",
                                 "dyn_deter 32 (saved) vs 48 (given)", "--logdir")
    assert "latest.pt" in line
    assert tools.read_yaml(logdir / "config.yaml")["units"] == 32  # nothing in the logdir changed
    assert chunk_names(logdir) == before


def test_checkpoint_that_does_not_fit_the_agent_is_a_clear_error(finished_run, tmp_path):
    logdir = copy_run(finished_run, tmp_path)
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    name = next(key for key, value in payload["agent"].items() if value.ndim == 2)
    payload["agent"][name] = torch.zeros(3, 3)  # as if saved by another code version
    tools.save_checkpoint(logdir / "latest.pt", payload)
    message = exit_message([*BASE, "--steps", "600", "--logdir", str(logdir)])
    assert "does not fit this agent" in message and "size mismatch" in message and "--logdir" in message


def test_checkpoint_with_an_episode_replay_is_a_clear_error(finished_run, tmp_path):
    """A run written before replay chunks (its checkpoint lists episodes) cannot resume."""
    logdir = copy_run(finished_run, tmp_path)
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    replay = payload["replay"]
    payload["replay"] = {"seen": 2, "rng": replay["rng"], "episodes": ["20260101T000000000000-abc-101"]}
    tools.save_checkpoint(logdir / "latest.pt", payload)
    message = exit_message([*BASE, "--steps", "600", "--logdir", str(logdir)])
    assert "episode replay" in message and "--logdir" in message


class CreatesFile:
    """Unpickling it calls open(path, 'w'): a stand-in for code a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_whose_pickle_runs_code_is_refused_by_resume_and_eval_only(finished_run, tmp_path):
    logdir = copy_run(finished_run, tmp_path)
    marker = tmp_path / "created_by_the_checkpoint"
    payload = tools.load_checkpoint(logdir / "latest.pt", "cpu")
    payload["note"] = CreatesFile(marker)
    torch.save(payload, logdir / "latest.pt")  # written as a crafted file would be, not by save_checkpoint
    before = chunk_names(logdir)
    resumed = run_command(command("--steps", "600", "--logdir", str(logdir)))
    assert_one_line_error(resumed, "latest.pt holds objects that a checkpoint of this project never holds",
                          "nothing in it ran")
    evaluated = run_command([sys.executable, "dreamer.py", "--eval_only", "True", "--checkpoint",
                             str(logdir / "latest.pt"), "--device", "cpu"])
    assert_one_line_error(evaluated, "holds objects that a checkpoint of this project never holds")
    assert not marker.exists() and chunk_names(logdir) == before
    torch.load(logdir / "latest.pt", weights_only=False)  # the power of the test: a full unpickle runs it
    assert marker.exists()


def test_a_replay_chunk_holding_an_object_array_is_skipped_without_unpickling(finished_run, tmp_path):
    logdir = copy_run(finished_run, tmp_path)
    marker = tmp_path / "created_by_the_chunk"
    victim = sorted((logdir / "train_eps").glob("*.npz"))[0]
    with np.load(victim) as data:
        chunk = {key: data[key] for key in data.files}
    chunk["reward"] = np.array([CreatesFile(marker)] * len(chunk["reward"]), dtype=object)
    np.savez(victim, **chunk)
    with pytest.warns(UserWarning, match=f"skipping unreadable replay chunk {victim.name}.*allow_pickle"):
        replay = tools.Replay(logdir / "train_eps", 10 ** 6, chunk=len(chunk["reward"])).load()
    assert not marker.exists() and victim.stem not in replay.chunks and replay.num_chunks > 0
    assert victim.with_name(victim.name + ".corrupt").exists()


def test_eval_only_with_flags_contradicting_the_checkpoint_is_an_error(finished_run):
    message = exit_message(["--eval_only", "True", "--checkpoint", str(finished_run / "latest.pt"),
                            "--task", "dmc_cup_catch", "--device", "cpu"])
    assert "task 'dmc_cartpole_balance' (saved) vs 'dmc_cup_catch' (given)" in message


# ----------------------------------------------------------------- bad input


BAD_INPUT = [
    (["--bach_size", "4"], "did you mean 'batch_size'"),
    (["--configs", "debgu"], "did you mean 'debug'"),
    (["--batch_size", "2.5"], "'batch_size' must be int"),
    (["--steps", "-5"], "'steps' must be > 0"),
    (["--train_ratio", "0"], "'train_ratio' must be > 0"),
    (["--batch_length", "200"], "'replay_chunk' (64) must be >= 'batch_length' (200)"),
    (["--task", "dmc_cartpol_balance"], "did you mean 'dmc_cartpole_balance'"),
    (["--crl_tasks", "[0, 9]", "--crl_steps_per_task", "100"], "crl_tasks [9] are not defined"),
    (["--crl_tasks", "[0]", "--crl_steps_per_task", "100", "--task", "dmc_cheetah_run"], "no continual-physics env"),
    (["--eval_only", "True", "--checkpoint", "missing.pt"], "--eval_only needs --checkpoint"),
    (["--eval_policy", "random"], "'eval_policy: random' only evaluates (it trains nothing): add --eval_only True"),
    (["--eval_only", "True", "--eval_policy", "random", "--checkpoint", "x.pt"], "drop --checkpoint"),
    (["--eval_tasks", "[3]"], "'eval_tasks' evaluates a saved agent (or random actions) on changed physics"),
    (["--eval_only", "True", "--eval_policy", "random", "--eval_tasks", "[0, 9]"], "eval_tasks [9] are not defined"),
    (["--eval_only", "True", "--eval_policy", "random", "--eval_tasks", "[1]", "--task", "dmc_cheetah_run"],
     "has no continual-physics env (eval_tasks is set)"),
    (["--llcd", "True", "--llcd_score", "paired_kl", "--llcd_log_score", "True"], "'llcd_score: paired_kl' needs a dmc_ task"),
    (["--llcd", "True", "--llcd_score", "paired_kl", "--task", "atari_pong"], "'llcd_score: paired_kl' needs a dmc_ task"),
]


@pytest.mark.parametrize("args, fragment", BAD_INPUT)
def test_bad_input_is_a_one_line_error_before_anything_runs(args, fragment, tmp_path):
    logdir = tmp_path / "run"
    message = exit_message([*BASE, "--logdir", str(logdir), *args])
    assert fragment in message
    assert not logdir.exists()


@pytest.mark.parametrize("backend, args, fragment", [
    ("disable", ["--pixels", "True"], "cannot render pixels with MUJOCO_GL='disable'"),
    ("bogus", [], "cannot import dm_control with MUJOCO_GL='bogus'"),
])
def test_broken_gl_backend_is_a_one_line_error(backend, args, fragment, tmp_path):
    result = run_command(command("--logdir", str(tmp_path / "run"), *args), env={**ENV, "MUJOCO_GL": backend})
    assert_one_line_error(result, fragment, "MUJOCO_GL=egl", "libegl1", "MUJOCO_GL=osmesa")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- determinism


def test_deterministic_runs_write_identical_metrics(tmp_path):
    texts = []
    for name in ("a", "b"):
        logdir = tmp_path / name
        result = run_command(command("--steps", "600", "--seed", "3", "--deterministic_run", "True",
                                     "--logdir", str(logdir)))
        assert result.returncode == 0, result.stderr[-3000:]
        texts.append((logdir / "metrics.jsonl").read_bytes())
    assert texts[0] == texts[1]
    rows = [json.loads(line) for line in texts[0].decode().splitlines()]
    assert any("model_loss" in row for row in rows) and any("eval_return" in row for row in rows)
    assert not any("fps" in row or "update_rate" in row for row in rows)  # wall-clock: TensorBoard only


def test_a_continual_runs_first_window_trains_as_the_single_task_run(tmp_path):
    """Evaluation puts the random streams back, so the continual run (which also evaluates task 3
    at every eval point) trains exactly as the single-task run of task 0 until its switch: its
    first window can serve as task 0's single-task reference."""
    switch_env_step = (100 + 300) * 2  # (prefill + crl_steps_per_task) * action_repeat

    def training_rows(name, schedule):
        logdir = tmp_path / name
        result = run_command(command("--crl_tasks", schedule, "--crl_steps_per_task", "300", "--eval_every", "200",
                                     "--seed", "4", "--deterministic_run", "True", "--logdir", str(logdir)))
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
        return [{key: value for key, value in row.items() if "eval" not in key and not key.startswith("crl_")}
                for row in rows if row["step"] < switch_env_step]

    continual, single = training_rows("continual", "[0, 3]"), training_rows("single", "[0]")
    assert sum("model_loss" in row for row in single) >= 3  # evals at env steps 200, 400, 600 in between
    assert continual == single
