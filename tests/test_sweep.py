"""Tests of sweep.py: grid parsing (CLI and YAML), validation before anything
launches, and real sweeps of tiny ``debug`` runs on a local 2-CPU Ray.

The end-to-end test runs a 2x2 grid (replay x seed), SIGKILLs one run's
dreamer.py after its first checkpoint, and re-runs the sweep: only that run
trains again, and it resumes from its checkpoint. ``--train_ratio 16`` keeps
each run to about 25 updates (debug block: action_repeat 2, 400 env steps =
200 agent steps, prefill 100, first checkpoint at agent step 100).
"""

import fcntl
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import ray

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sweep  # noqa: E402

BASE = ["--configs", "debug", "--task", "dmc_cartpole_balance", "--train_ratio", "16", "--device", "cpu"]
GRID = ["--grid", "replay=fifo,reservoir", "seed=0,1"]
NAMES = ["replayfifo-seed0", "replayfifo-seed1", "replayreservoir-seed0", "replayreservoir-seed1"]
FINAL_AGENT_STEP, FIRST_CHECKPOINT_AGENT_STEP = 200, 100


def spec_of(argv):
    args, extra = sweep.parse_cli(argv)
    return sweep.build_spec(args, extra)


def attempts(logdir):
    """How many times the sweep started dreamer.py in ``logdir`` (one header line each)."""
    return (logdir / sweep.LOG).read_text(errors="replace").count("=== ")


def agent_step(logdir):
    return sweep.tools.load_checkpoint(logdir / "latest.pt", "cpu")["agent_step"]


# ----------------------------------------------------------------- grid parsing


def test_cli_grid_expands_in_order_with_fixed_overrides(tmp_path):
    spec = spec_of(BASE + GRID)
    assert spec["name"] == "debug"
    assert spec["configs"] == ["debug"]
    assert spec["overrides"] == {"task": "dmc_cartpole_balance", "train_ratio": "16", "device": "cpu"}
    assert spec["grid"] == [{"replay": ["fifo", "reservoir"], "seed": ["0", "1"]}]
    points = sweep.grid_points(spec, tmp_path)
    assert [p.name for p in points] == NAMES
    assert points[1].args == BASE + ["--replay", "fifo", "--seed", "1"]
    assert points[1].logdir == tmp_path / "replayfifo-seed1"


def test_grid_values_are_canonical_and_lists_keep_their_commas(tmp_path):
    assert sweep.split_values("[0,1],[2, 3],4") == ["[0,1]", "[2, 3]", "4"]
    spec = spec_of(BASE + ["--grid", "deterministic_run=true,False", "--grid", "crl_tasks=[0,1],[1, 0]"])
    assert spec["grid"] == [{"deterministic_run": ["True", "False"], "crl_tasks": ["[0, 1]", "[1, 0]"]}]
    names = [p.name for p in sweep.grid_points(spec, tmp_path)]
    assert names[0] == "deterministic_runTrue-crl_tasks_0_1_"
    assert len(set(names)) == 4


def test_configs_grid_puts_its_blocks_before_the_fixed_ones(tmp_path):
    spec = spec_of(["--configs", "debug", "--grid", "configs=dmc_proprio,small vision"])
    points = sweep.grid_points(spec, tmp_path)
    assert [p.name for p in points] == ["dmc_proprio", "small+vision"]
    assert points[1].args == ["--configs", "small", "vision", "debug"]


def test_yaml_file_merges_with_the_command_line(tmp_path):
    path = tmp_path / "crl.yaml"
    path.write_text("name: crl\nconfigs: [debug]\noverrides: {task: dmc_cartpole_balance, train_ratio: 16}\n"
                    "grid:\n  deterministic_run: [true, false]\n  seed: [0, 1, 2]\n")
    spec = spec_of(["--file", str(path), "--grid", "seed=5,6", "--device", "cpu"])
    assert spec["name"] == "crl"
    assert spec["configs"] == ["debug"]
    assert spec["overrides"] == {"task": "dmc_cartpole_balance", "train_ratio": "16", "device": "cpu"}
    assert spec["grid"] == [{"deterministic_run": ["True", "False"], "seed": ["5", "6"]}]
    assert spec_of(["--file", str(path), "--name", "other"])["name"] == "other"
    assert spec_of(["--file", str(path)])["grid"][0]["seed"] == ["0", "1", "2"]


ARMS = """name: arms
configs: [debug]
overrides: {task: dmc_cartpole_balance, crl_steps_per_task: 100}
grid:
  - {llcd: [False]}
  - {llcd: [True], llcd_gate: [detector, never]}
  - {crl_tasks: [[0], [3]]}
"""


def test_a_list_of_grids_runs_the_union_and_the_command_line_adds_to_each(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text(ARMS)
    spec = spec_of(["--file", str(path), "--grid", "seed=0,1"])
    points = sweep.grid_points(spec, tmp_path)
    assert [p.name for p in points] == [
        "llcdFalse-seed0", "llcdFalse-seed1", "llcdTrue-llcd_gatedetector-seed0", "llcdTrue-llcd_gatedetector-seed1",
        "llcdTrue-llcd_gatenever-seed0", "llcdTrue-llcd_gatenever-seed1",
        "crl_tasks_0_-seed0", "crl_tasks_0_-seed1", "crl_tasks_3_-seed0", "crl_tasks_3_-seed1"]
    assert points[4].args == ["--configs", "debug", "--task", "dmc_cartpole_balance", "--crl_steps_per_task", "100",
                              "--llcd", "True",
                              "--llcd_gate", "never", "--seed", "0"]
    sweep.validate_points(points)
    assert [sweep.is_reference(p) for p in points] == [False] * 6 + [True] * 4
    # the analysis groups by the keys that tell the continual runs apart, not by the seed or constant keys
    assert sweep.group_keys(points[:6]) == ["domain", "llcd", "replay", "llcd_gate"]
    assert sweep.group_keys(points[:2]) == ["domain", "llcd", "replay"]
    path.write_text(ARMS.replace("task: dmc_cartpole_balance,", "llcd_gate: always,"))
    with pytest.raises(sweep.SweepError, match="'llcd_gate' is both a fixed --llcd_gate and a grid key"):
        spec_of(["--file", str(path)])


def test_the_analysis_gets_single_task_runs_as_references(tmp_path, monkeypatch):
    path = tmp_path / "arms.yaml"
    path.write_text(ARMS)
    points = sweep.grid_points(spec_of(["--file", str(path)]), tmp_path)
    for point in points[1:]:
        point.logdir.mkdir()
        (point.logdir / sweep.DONE).write_text("{}")
    commands = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda command, cwd: commands.append(command) or
                        subprocess.CompletedProcess(command, 0))
    assert sweep.analyze(tmp_path, points) == 0
    command = commands[0]
    runs = command[2:command.index("--out")]
    assert runs == [str(tmp_path / "llcdTrue-llcd_gatedetector"), str(tmp_path / "llcdTrue-llcd_gatenever")]
    assert command[command.index("--group-by") + 1:command.index("--reference")] == [
        "domain", "llcd", "replay", "llcd_gate"]
    assert command[command.index("--reference") + 1:] == [str(tmp_path / "crl_tasks_0_"), str(tmp_path / "crl_tasks_3_")]


# ----------------------------------------------------------------- bad input stops everything


@pytest.mark.parametrize("extra, message", [
    (["--grid", "seedd=0,1"], "error: run seedd0: unknown key '--seedd' (did you mean 'seed'?)"),
    (["--grid", "replay=fifo,lifo"], "error: run replaylifo: 'replay' must be one of ['fifo', 'reservoir']"),
    (["--grid", "batch_size=4,abc"], "error: run batch_sizeabc: 'batch_size' must be int, got 'abc'"),
    (["--grid", "seed"], "error: bad --grid item 'seed': use KEY=V1,V2,..."),
    (["--grid", "seed=0,"], "error: bad --grid item 'seed=0,'"),
    (["--logdir", "x"], "error: the sweep sets every run's --logdir itself"),
    (["--grid", "device=cpu,cuda"], "error: 'device' is both a fixed --device and a grid key"),
    (["stray"], "error: unexpected argument 'stray'"),
])
def test_bad_input_is_one_line_error_before_launch(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sweep, "launch", lambda *a: pytest.fail("launched despite bad input"))
    root = tmp_path / "sweep"
    assert sweep.main(extra + BASE + ["--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not root.exists()


def test_bad_sweep_file_is_reported(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("grid: {seed: 3}\n")
    assert sweep.main(["--file", str(path), "--root", str(tmp_path / "r")]) == 2
    assert "'grid' in" in capsys.readouterr().err
    path.write_text("grids: {seed: [3]}\n")
    assert sweep.main(["--file", str(path), "--root", str(tmp_path / "r")]) == 2
    assert "must be a mapping with keys among name, configs, overrides, grid" in capsys.readouterr().err


def test_root_with_other_arguments_for_a_run_is_refused(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda points, total, args: launched.append(points) or {})
    argv = ["--grid", "seed=0", "--root", str(tmp_path), "--no-analysis"]
    assert sweep.main(BASE + argv) == 0
    assert [p.name for p in launched[0]] == ["seed0"]
    manifest = sweep.tools.read_yaml(tmp_path / sweep.MANIFEST)
    assert manifest["runs"] == {"seed0": BASE + ["--seed", "0"]}
    assert sweep.main(BASE + ["--batch_size", "8"] + argv) == 2
    assert "already holds run seed0 with other arguments" in capsys.readouterr().err
    assert sweep.main(BASE + ["--grid", "seed=0,1", "--root", str(tmp_path), "--no-analysis"]) == 0
    assert set(sweep.tools.read_yaml(tmp_path / sweep.MANIFEST)["runs"]) == {"seed0", "seed1"}


def test_a_logdir_being_trained_is_not_trained_twice(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    with open(logdir / sweep.LOCK, "w") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = sweep.train_point(BASE, str(logdir), 1)
    assert result["rc"] is None
    assert result["error"] == f"pid 4242 is already training {logdir}"
    assert not (logdir / sweep.LOG).exists()


def fake_finished_run(logdir, args):
    """A logdir as a finished sweep run leaves it: config, metrics, LLCD scores, the sweep's files."""
    logdir.mkdir(parents=True)
    (logdir / "config.yaml").write_text("task: dmc_cartpole_balance\nseed: 0\n")
    (logdir / "metrics.jsonl").write_text("".join(json.dumps({"step": 2 * i, "eval_return": i / 3}) + "\n"
                                                  for i in range(50)))
    scores = {"step": np.arange(1000, dtype=np.int64), "latent_kl": np.random.default_rng(0).gamma(2.0, size=1000)
              .astype(np.float32)}
    np.savez(logdir / "llcd_scores.npz", **scores)
    (logdir / sweep.LOG).write_text(f"=== 2026-01-01T00:00:00 {sys.executable} {ROOT / 'dreamer.py'} {' '.join(args)}\n")
    (logdir / sweep.DONE).write_text(json.dumps({"args": args, "seconds": 123.4, "finished": "2026-01-01T01:00:00"}))
    return scores


def test_kept_results_are_compact_complete_and_name_the_code_that_ran(tmp_path):
    import gzip
    point = sweep.Point("seed0", BASE + ["--seed", "0"], tmp_path / "runs" / "seed0")
    scores = fake_finished_run(point.logdir, point.args)
    results = tmp_path / "results"
    assert sweep.keep_finished([point], results) == 1
    kept = results / "seed0"
    assert sorted(path.name for path in results.iterdir()) == ["seed0"]  # no temp folder left
    assert (kept / "config.yaml").read_bytes() == (point.logdir / "config.yaml").read_bytes()
    assert gzip.decompress((kept / "metrics.jsonl.gz").read_bytes()) == (point.logdir / "metrics.jsonl").read_bytes()
    with np.load(kept / "llcd_scores.npz") as data:
        assert data["latent_kl"].dtype == np.float16 and data["step"].dtype == np.int64
        np.testing.assert_array_equal(data["step"], scores["step"])
        np.testing.assert_allclose(data["latent_kl"], scores["latent_kl"], rtol=1e-3)
    assert (kept / "llcd_scores.npz").stat().st_size < 0.5 * (point.logdir / "llcd_scores.npz").stat().st_size
    info = json.loads((kept / "run.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["commit"].split("+")[0] == head and info["args"] == point.args and info["seconds"] == 123.4
    assert "cores" in info["cpu"]
    assert sweep.keep_finished([point], results) == 0  # kept once


def test_runs_whose_results_are_kept_are_skipped_even_without_their_logdir(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(sweep, "launch", lambda points, total, args: launched.append(points) or {})
    root, results = tmp_path / "root", tmp_path / "results"
    argv = BASE + ["--grid", "seed=0,1", "--root", str(root), "--results", str(results), "--no-analysis"]
    fake_finished_run(root / "seed0", BASE + ["--seed", "0"])
    assert sweep.main(argv + ["--keep-only"]) == 0
    assert not launched and (results / "seed0" / "run.json").exists() and not (results / "seed1").exists()
    shutil.rmtree(root)  # another machine: only the kept results are there
    assert sweep.main(argv) == 0
    assert [point.name for point in launched[0]] == ["seed1"]
    assert "1 already finished, 1 to run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.main(BASE + ["--grid", "seed=0", "--keep-only"])
    assert "--keep-only keeps results in --results" in capsys.readouterr().err


def test_without_address_the_sweep_starts_its_own_ray_even_beside_a_running_cluster(monkeypatch):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise KeyboardInterrupt  # stop before any run starts

    monkeypatch.setattr(sweep.ray, "init", fake_init)
    args, _ = sweep.parse_cli(["--num-cpus", "2"])
    with pytest.raises(KeyboardInterrupt):
        sweep.launch([], 0, args)
    args, _ = sweep.parse_cli(["--address", "auto"])
    with pytest.raises(KeyboardInterrupt):
        sweep.launch([], 0, args)
    assert [(c["address"], c["num_cpus"]) for c in calls] == [("local", 2), ("auto", None)]


# ----------------------------------------------------------------- real sweeps on local Ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, logging_level=logging.WARNING)  # never a cluster already running here
    yield
    ray.shutdown()


def kill_after_first_checkpoint(logdir, killed, timeout=240):
    """SIGKILL the dreamer.py training ``logdir`` as soon as its first latest.pt exists."""
    deadline = time.time() + timeout
    while not (logdir / "latest.pt").exists():
        if time.time() > deadline:
            return
        time.sleep(0.02)
    os.kill(int((logdir / sweep.LOCK).read_text()), signal.SIGKILL)
    killed.append(agent_step(logdir))


def assert_complete(logdir, args):
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 * FINAL_AGENT_STEP and "eval_return" in rows[-1]
    assert agent_step(logdir) == FINAL_AGENT_STEP
    assert (logdir / "config.yaml").exists() and list((logdir / "train_eps").glob("*.npz"))
    assert json.loads((logdir / sweep.DONE).read_text())["args"] == args


def test_sweep_completes_the_grid_and_resumes_a_killed_run(local_ray, tmp_path, capfd):
    root = tmp_path / "sweep"
    argv = BASE + GRID + ["--root", str(root), "--retries", "0", "--summary-every", "5"]
    victim = root / "replayfifo-seed1"
    args = {point.logdir: point.args for point in sweep.grid_points(spec_of(BASE + GRID), root)}
    killed = []
    killer = threading.Thread(target=kill_after_first_checkpoint, args=(victim, killed))
    killer.start()
    assert sweep.main(argv + ["--no-analysis"]) == 1
    killer.join()
    out, err = capfd.readouterr()
    assert f"sweep: FAILED replayfifo-seed1: killed by SIGKILL (log: {victim / sweep.LOG})" in err
    assert "sweep: 3/4 done, 0 running, 1 failed, 0 pending" in out
    assert killed == [FIRST_CHECKPOINT_AGENT_STEP] and agent_step(victim) == FIRST_CHECKPOINT_AGENT_STEP
    assert not (victim / sweep.DONE).exists()
    first_attempt = json.loads((victim / sweep.CLOCK).read_text())["attempts"]
    assert len(first_attempt) == 1 and first_attempt[0] > 0
    others = [root / name for name in NAMES if name != victim.name]
    for logdir in others:
        assert_complete(logdir, args[logdir])
    stamps = {logdir: ((logdir / sweep.DONE).stat().st_mtime_ns, (logdir / "latest.pt").stat().st_mtime_ns)
              for logdir in others}

    assert sweep.main(argv) == 0
    out, err = capfd.readouterr()
    assert "4 runs in" in out and "3 already finished, 1 to run" in out
    assert "sweep: 4/4 done, 0 running, 0 failed, 0 pending, ETA 0:00:00" in out
    for logdir in others:
        assert attempts(logdir) == 1
        assert ((logdir / sweep.DONE).stat().st_mtime_ns, (logdir / "latest.pt").stat().st_mtime_ns) == stamps[logdir]
    assert attempts(victim) == 2
    clock = json.loads((victim / sweep.CLOCK).read_text())["attempts"]
    assert len(clock) == 2 and clock[0] == first_attempt[0] and clock[1] > 0
    assert json.loads((victim / sweep.DONE).read_text())["seconds"] == pytest.approx(sum(clock), abs=0.2)
    assert f"Resumed from {victim / 'latest.pt'} at env step {2 * FIRST_CHECKPOINT_AGENT_STEP}" in (
        (victim / sweep.LOG).read_text(errors="replace"))
    for logdir in args:
        assert_complete(logdir, args[logdir])
    assert set(sweep.tools.read_yaml(root / sweep.MANIFEST)["runs"]) == set(NAMES)
    assert (root / "analysis" / "results.csv").exists()

    assert sweep.main(argv) == 0
    assert "4 already finished, 0 to run" in capfd.readouterr().out


def test_failing_run_is_retried_then_reported(local_ray, tmp_path, capfd):
    # a config that composes (so the sweep starts) but that dreamer.py rejects when it runs
    root = tmp_path / "sweep"
    argv = ["--configs", "debug", "--task", "dmc_cartpole_balance", "--eval_only", "True", "--device", "cpu",
            "--grid", "seed=3", "--root", str(root), "--retries", "1", "--no-analysis"]
    assert sweep.main(argv) == 1
    out, err = capfd.readouterr()
    assert "sweep: seed3 failed (exit code 1: error: --eval_only needs --checkpoint" in out
    assert "retry 1/1, resuming" in out
    assert "sweep: FAILED seed3: exit code 1: error: --eval_only needs --checkpoint" in err
    assert attempts(root / "seed3") == 2
    assert not (root / "seed3" / sweep.DONE).exists()
