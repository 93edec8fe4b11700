"""Sweeps: every point of a config grid is one dreamer.py run, distributed with Ray (docs/design.md#scale).

    python sweep.py --configs dmc_crl_cartpole small --grid llcd=True,False seed=0,1,2
    python sweep.py --file sweep.yaml --address auto --cpus-per-run 4 --gpus-per-run 1

``--grid KEY=V1,V2 ...`` spans the grid (every combination of the values);
every other ``--key value`` (``--configs`` and ``--task`` included) is passed
unchanged to every run. ``--file`` reads the same from YAML: ``name``,
``configs``, ``overrides`` (key: value, fixed) and ``grid`` (key: [values]),
or a list of such grids, whose runs are the union of their products (arms
that differ in which keys they set, e.g. LLCD off plus LLCD on x gate); the
command line adds to every grid. A ``configs`` grid value (block names
separated by spaces) goes before the fixed ``--configs`` blocks. Every run's
arguments are checked with ``tools.load_config`` before Ray starts.

Layout: ``--root`` (default ``logdir/sweep-<name>``) holds ``sweep.yaml`` (the
manifest: the spec and every run's dreamer arguments), one logdir per grid
point named from its values (``replayfifo-seed0``) and ``analysis/``.

Each run is a Ray task that starts ``python dreamer.py ... --logdir DIR`` as a
subprocess instead of calling ``dreamer.main`` inside the Ray worker: all its
output, C-level included, goes to ``DIR/sweep.log``; a crash, kill or OOM
ends that run only and leaves no torch/MuJoCo state in the worker; and a
killed run leaves exactly what dreamer.py resumes from (``latest.pt`` and
``train_eps/``). Worker-side code uses the standard library only (this module
is shipped to workers by value), so a worker never imports torch itself.

Kept results (``--results DIR``): as each run finishes, its compact results go to
``DIR/<run>/`` (``keep_results``): config.yaml, metrics.jsonl.gz, llcd_scores.npz as
float16 where the run has one, and run.json (the commit of the code that ran it, the CPU,
the wall time summed over its attempts). A run whose results are kept is skipped, even where its logdir is gone,
so a study committed to the repo run by run continues on another machine. With
``--keep-only`` the sweep keeps the finished runs' results and launches nothing: results
of a sweep running from a pinned worktree are kept by a newer checkout's sweep.py.

A run is finished when ``DIR/sweep_done.json`` exists. Its task writes it
atomically only after dreamer.py exited 0, which dreamer.py does only once
training is complete and the last checkpoint saved: a killed or crashed run
never has one. Re-running a sweep skips finished runs and resumes the others
from their checkpoints. While a run trains, its dreamer.py process holds an
exclusive lock on ``DIR/sweep.lock`` (which names its pid), so two sweeps
never train one logdir at once. A failed run is retried ``--retries`` times
(each retry resumes), then reported with its error line; the exit code is 1.
"""

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import gzip
import itertools
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import ray
from ray import cloudpickle
from ruamel.yaml import YAMLError

import tools

ROOT = pathlib.Path(__file__).resolve().parent
DONE, LOCK, LOG, MANIFEST = "sweep_done.json", "sweep.lock", "sweep.log", "sweep.yaml"
CLOCK, HEARTBEAT = "sweep_clock.json", 60.0  # each attempt's wall seconds, rewritten every HEARTBEAT s
FILE_KEYS = ("name", "configs", "overrides", "grid")
GROUP_KEYS = ("domain", "llcd", "replay")  # analyze_results.py's default grouping

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SweepError(Exception):
    """Bad sweep input; the message says what is wrong and how to fix it."""


@dataclasses.dataclass
class Point:
    """One grid point: its run name, its dreamer.py arguments (no --logdir) and its logdir."""

    name: str
    args: list
    logdir: pathlib.Path
    values: dict = dataclasses.field(default_factory=dict)  # its grid's keys and values

    @property
    def finished(self):
        return (self.logdir / DONE).exists()


# ----------------------------------------------------------------- the grid


def canonical(value):
    """One spelling per value, for run names and argv: 'true' and True -> 'True', [0,1] -> '[0, 1]'."""
    if isinstance(value, str):
        value = tools.parse_value(value)
    if value is None or isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def split_values(text):
    """'0,1' -> ['0', '1']; commas inside brackets stay: '[0,1],[2]' -> ['[0,1]', '[2]']."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def parse_grid_item(item):
    """'seed=0,1,2' -> ('seed', ['0', '1', '2'])."""
    key, sep, text = item.partition("=")
    values = [value.strip() for value in split_values(text)]
    if not sep or not key.strip() or not all(values):
        raise SweepError(f"bad --grid item '{item}': use KEY=V1,V2,... e.g. seed=0,1,2")
    return key.strip().replace("-", "_"), [canonical(value) for value in values]


def read_spec_file(path):
    """The spec in a YAML sweep file (name, configs, overrides, grid)."""
    try:
        data = tools.read_yaml(path) or {}
    except (OSError, YAMLError) as error:
        raise SweepError(f"cannot read sweep file '{path}': {str(error).strip().splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) - set(FILE_KEYS):
        raise SweepError(f"sweep file '{path}' must be a mapping with keys among {', '.join(FILE_KEYS)}")
    grids, overrides = data.get("grid") or {}, data.get("overrides") or {}
    grids = grids if isinstance(grids, list) else [grids]
    if not all(isinstance(grid, dict) and all(isinstance(v, list) and v for v in grid.values()) for grid in grids):
        raise SweepError(f"'grid' in '{path}' must map each key to a non-empty list of values (or be a list of such "
                         "grids)")
    if not isinstance(overrides, dict):
        raise SweepError(f"'overrides' in '{path}' must map keys to values")
    configs = data.get("configs") or []
    return {"name": data.get("name"), "configs": configs.split() if isinstance(configs, str) else list(configs),
            "overrides": {key: canonical(value) for key, value in overrides.items()},
            "grid": [{key: [canonical(value) for value in values] for key, values in grid.items()} for grid in grids]}


def build_spec(args, extra):
    """Merge the sweep file (if any) with the command line: name, configs, fixed overrides, grid."""
    spec = read_spec_file(args.file) if args.file else {"name": None, "configs": [], "overrides": {}, "grid": [{}]}
    blocks, overrides = tools.parse_args(extra)
    spec["configs"] = blocks or spec["configs"]
    spec["overrides"].update((key, canonical(raw)) for key, raw in overrides)
    for grid in spec["grid"]:
        grid.update(parse_grid_item(item) for item in args.grid)
    file_stem = pathlib.Path(args.file).stem if args.file else None
    spec["name"] = args.name or spec["name"] or file_stem or "-".join(spec["configs"]) or "defaults"
    check_keys(spec)
    return spec


def check_keys(spec):
    """The sweep owns --logdir, and a key is either fixed or in the grid, never both."""
    grid_keys = {key for grid in spec["grid"] for key in grid}
    if "logdir" in spec["overrides"] or "logdir" in grid_keys:
        raise SweepError("the sweep sets every run's --logdir itself; choose where with --root")
    both = sorted(set(spec["overrides"]) & grid_keys)
    if both:
        raise SweepError(f"'{both[0]}' is both a fixed --{both[0]} and a grid key; keep one")


def point_name(chosen):
    """{'replay': 'fifo', 'seed': '0'} -> 'replayfifo-seed0', safe as a directory name."""
    parts = [value.replace(" ", "+") if key == "configs" else f"{key}{value}" for key, value in chosen.items()]
    return re.sub(r"[^\w.+=-]+", "_", "-".join(parts)) or "run"


def point_args(spec, chosen):
    """dreamer.py arguments of one grid point: blocks, fixed overrides, then the point's values."""
    blocks = chosen.get("configs", "").split() + spec["configs"]
    args = ["--configs", *blocks] if blocks else []
    values = {**spec["overrides"], **{key: value for key, value in chosen.items() if key != "configs"}}
    for key, value in values.items():
        args += [f"--{key}", value]
    return args


def grid_points(spec, root):
    """One Point per combination of each grid's values, grid after grid, in the order they were given."""
    points = []
    for grid in spec["grid"]:
        for values in itertools.product(*grid.values()):
            chosen = dict(zip(grid, values))
            name = point_name(chosen)
            points.append(Point(name, point_args(spec, chosen), root / name, chosen))
    names = [point.name for point in points]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise SweepError(f"two grid points map to the run name '{duplicate}'; make the grid values distinct")
    return points


def validate_points(points):
    """Compose every run's config now, so that a bad key or value stops the sweep before any run starts."""
    for point in points:
        try:
            tools.load_config(point.args)
        except tools.ConfigError as error:
            raise SweepError(f"run {point.name}: {error}") from None


# ----------------------------------------------------------------- manifest


def check_manifest(root, points):
    """A run name already in this root must have the same arguments (else it is another sweep)."""
    path = root / MANIFEST
    known = tools.read_yaml(path).get("runs", {}) if path.exists() else {}
    for point in points:
        if point.name in known and known[point.name] != point.args:
            raise SweepError(f"{root} already holds run {point.name} with other arguments "
                             f"({shlex.join(known[point.name])}); use another --name or --root")
    return known


def write_manifest(root, spec, points, known):
    """sweep.yaml: this sweep's spec and every run ever launched in this root with its arguments."""
    root.mkdir(parents=True, exist_ok=True)
    runs = {**known, **{point.name: point.args for point in points}}
    tools.write_yaml({**spec, "root": str(root), "runs": runs}, root / MANIFEST)


# ----------------------------------------------------------------- one run (Ray worker side, stdlib only)


def train_point(args, logdir, threads):
    """Ray task: run (or resume) dreamer.py in ``logdir``; mark the run finished if it exits 0.

    Returns {'rc': exit code (negative: killed by that signal; None: not started), 'seconds', 'error'}.
    The wall time of every attempt goes to ``sweep_clock.json`` (an attempt whose worker is killed
    counts up to its last heartbeat); the done marker's ``seconds`` is their sum, the run's wall time.
    """
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            return {"rc": None, "seconds": 0.0, "error": f"pid {owner} is already training {logdir}"}
        clock = AttemptClock(logdir / CLOCK)
        rc = run_dreamer(args, logdir, threads, lock, clock)
        if rc == 0:
            done = {"args": args, "seconds": round(clock.total(), 1), "finished": now()}
            write_atomic(logdir / DONE, json.dumps(done))
    return {"rc": rc, "seconds": clock.attempts[-1], "error": None if rc == 0 else error_line(logdir, rc)}


class AttemptClock:
    """The wall seconds of each attempt at a run, kept in ``path`` ({"attempts": [...]}); ``tick``
    rewrites the current attempt's entry."""

    def __init__(self, path):
        self.path, self.start = path, time.time()
        self.attempts = json.loads(path.read_text())["attempts"] + [0.0] if path.exists() else [0.0]

    def tick(self):
        self.attempts[-1] = round(time.time() - self.start, 1)
        write_atomic(self.path, json.dumps({"attempts": self.attempts}))

    def total(self):
        return sum(self.attempts)


def run_dreamer(args, logdir, threads, lock, clock):
    """python dreamer.py ARGS --logdir DIR with output appended to DIR/sweep.log; returns its exit code.
    ``clock`` ticks every HEARTBEAT seconds while it runs and once at its end.

    The child inherits the locked file, so the lock lasts as long as the training process, and it gets
    SIGTERM if this worker dies, so no orphan keeps training unseen.
    """
    command = [sys.executable, str(ROOT / "dreamer.py"), *args, "--logdir", str(logdir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(logdir / LOG, "a") as log:
        log.write(f"=== {now()} {shlex.join(command)}\n")
        log.flush()
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),), preexec_fn=die_with_parent)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{child.pid}\n")
        lock.flush()
        while True:
            try:
                rc = child.wait(timeout=HEARTBEAT)
            except subprocess.TimeoutExpired:
                clock.tick()
                continue
            clock.tick()
            return rc


def die_with_parent():
    """In the child before exec: ask Linux for SIGTERM when the parent (the Ray worker) dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def error_line(logdir, rc):
    """Why a run failed: the signal that killed it, or the last line it printed."""
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    with open(logdir / LOG, "rb") as log:
        log.seek(max(0, log.seek(0, os.SEEK_END) - 8192))
        lines = re.split(r"[\r\n]+", log.read().decode(errors="replace"))
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return f"exit code {rc}: {last[:300]}"


def write_atomic(path, text):
    """Write ``text`` so that a crash leaves either no file or the whole file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


# ----------------------------------------------------------------- scheduling (driver side)


class Scheduler:
    """Keeps at most ``slots`` runs in flight on Ray, retries failed runs and prints the live summary."""

    def __init__(self, points, total, args, slots):
        self.pending = collections.deque(points)
        self.total, self.slots, self.args = total, slots, args
        self.task = ray.remote(train_point).options(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run,
                                                    max_retries=0)
        self.in_flight = {}  # ObjectRef -> (Point, submit time)
        self.attempts = collections.Counter()
        self.durations, self.failed, self.done = [], {}, total - len(points)

    def run(self):
        """Until every run has finished or failed for good; returns {run name: error line}."""
        next_summary = 0.0
        self.fill()
        while self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=max(0.1, next_summary - time.time()))
            for ref in ready:
                self.collect(ref)
            self.fill()
            if ready or time.time() >= next_summary:
                print(self.summary(), flush=True)
                next_summary = time.time() + self.args.summary_every
        return self.failed

    def fill(self):
        threads = max(1, int(self.args.cpus_per_run))
        while self.pending and len(self.in_flight) < self.slots:
            point = self.pending.popleft()
            ref = self.task.remote(point.args, str(point.logdir), threads)
            self.in_flight[ref] = (point, time.time())

    def collect(self, ref):
        point, _ = self.in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as error:
            result = {"rc": None, "error": f"Ray: {str(error).strip().splitlines()[0]}"}
        self.attempts[point.name] += 1
        if result["rc"] == 0:
            self.done += 1
            self.durations.append(result["seconds"])
            if self.args.results:
                keep_finished([point], self.args.results)
        elif self.attempts[point.name] <= self.args.retries:
            print(f"sweep: {point.name} failed ({result['error']}); retry {self.attempts[point.name]}"
                  f"/{self.args.retries}, resuming", flush=True)
            self.pending.append(point)
        else:
            self.failed[point.name] = result["error"]

    def summary(self):
        return (f"sweep: {self.done}/{self.total} done, {len(self.in_flight)} running, {len(self.failed)} failed, "
                f"{len(self.pending)} pending, ETA {self.eta()}")

    def eta(self):
        """Remaining work at the mean duration of the runs finished so far, spread over the slots."""
        if not self.durations:
            return "?"
        mean = sum(self.durations) / len(self.durations)
        running = sum(max(mean - (time.time() - start), 0.0) for _, start in self.in_flight.values())
        seconds = (len(self.pending) * mean + running) / self.slots
        return str(datetime.timedelta(seconds=round(seconds)))


def concurrent_slots(args, runs):
    """How many runs fit at once: --max-concurrent, else the Ray cluster's CPUs and GPUs per run."""
    if args.max_concurrent:
        return args.max_concurrent
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    slots = min(cpus // args.cpus_per_run, gpus // args.gpus_per_run if args.gpus_per_run else runs)
    if slots < 1:
        raise SweepError(f"the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs) cannot fit one run of "
                         f"--cpus-per-run {args.cpus_per_run:g} --gpus-per-run {args.gpus_per_run:g}")
    return int(slots)


def launch(points, total, args):
    """Run ``points`` as Ray tasks (starting local Ray unless one is up); returns {run name: error line}."""
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=args.address or "local", num_cpus=args.num_cpus, logging_level=logging.WARNING)
    try:
        slots = concurrent_slots(args, len(points))
        print(f"sweep: {slots} run(s) at a time, {args.cpus_per_run:g} CPU(s) and {args.gpus_per_run:g} GPU(s) each",
              flush=True)
        return Scheduler(points, total, args, slots).run()
    finally:
        if started_here:
            ray.shutdown()


# ----------------------------------------------------------------- kept results


def keep_results(point, results):
    """Write the finished run ``point``'s compact results to ``results/<name>/`` (see the module
    docstring); a temp folder renamed at the end, so kept results are complete or absent."""
    target = results / point.name
    temp = results / f".{point.name}.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    shutil.copyfile(point.logdir / "config.yaml", temp / "config.yaml")
    with open(point.logdir / "metrics.jsonl", "rb") as src, gzip.open(temp / "metrics.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    scores = point.logdir / "llcd_scores.npz"
    if scores.exists():
        with np.load(scores, allow_pickle=False) as data:
            np.savez_compressed(temp / scores.name, **{key: data[key].astype(np.float16) if data[key].dtype.kind == "f"
                                                        else data[key] for key in data.files})
    done = json.loads((point.logdir / DONE).read_text())
    code = code_dir(point.logdir)
    info = {"run": point.name, "args": point.args, "commit": git_commit(code), "cpu": cpu_model(),
            "seconds": done["seconds"], "finished": done["finished"]}
    (temp / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temp, target)


def code_dir(logdir):
    """The folder of the dreamer.py that trained ``logdir``, from its sweep.log header line."""
    header = (logdir / LOG).read_text(errors="replace").split("\n", 1)[0]
    script = next((part for part in header.split() if part.endswith("dreamer.py")), str(ROOT / "dreamer.py"))
    return pathlib.Path(script).parent


def git_commit(folder):
    """'<commit>' of the checkout in ``folder``, '+dirty' appended where tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_model():
    """The CPU's model name, whether it has native bf16 (it changes speed figures several-fold), its cores."""
    text = ""
    with contextlib.suppress(OSError):
        text = pathlib.Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", text)
    bf16 = ", native bf16" if text and tools.cpu_has_native_bf16() else ""
    return f"{name.group(1) if name else 'unknown CPU'}{bf16}, {os.cpu_count()} cores"


def keep_finished(points, results):
    """Keep the results of every finished run not kept yet; returns how many were kept."""
    fresh = [point for point in points if point.finished and not (results / point.name).exists()]
    for point in fresh:
        keep_results(point, results)
        print(f"sweep: kept {point.name}'s results in {results / point.name}", flush=True)
    return len(fresh)


# ----------------------------------------------------------------- end of a sweep


def report(failed, points):
    """Print each run that failed for good, with its error line and log."""
    logdirs = {point.name: point.logdir for point in points}
    for name, error in failed.items():
        print(f"sweep: FAILED {name}: {error} (log: {logdirs[name] / LOG})", file=sys.stderr)


def is_reference(point):
    """A single-task reference run: a one-entry ``crl_tasks`` schedule (forward transfer's baseline)."""
    return len(tools.load_config(point.args).crl_tasks) == 1


def group_keys(runs):
    """analyze_results.py groups: its defaults plus every grid key but the seed whose value differs among runs."""
    keys = dict.fromkeys(key for run in runs for key in run.values if key != "seed")
    varying = [key for key in keys if len({run.values.get(key) for run in runs}) > 1]
    return list(dict.fromkeys([*GROUP_KEYS, *varying]))


def analyze(root, points):
    """analyze_results.py over the finished runs into ROOT/analysis, single-task runs as its references;
    returns its exit code."""
    finished = [point for point in points if point.finished]
    refs = [point for point in finished if is_reference(point)]
    runs = [point for point in finished if point not in refs]
    if not runs:
        return 0
    out = root / "analysis"
    print(f"sweep: analysing {len(runs)} finished runs ({len(refs)} references) -> {out}", flush=True)
    command = [sys.executable, str(ROOT / "analyze_results.py"), *(str(run.logdir) for run in runs),
               "--out", str(out), "--group-by", *group_keys(runs)]
    if refs:
        command += ["--reference", *(str(ref.logdir) for ref in refs)]
    return subprocess.run(command, cwd=ROOT).returncode


# ----------------------------------------------------------------- CLI


def parse_cli(argv):
    """The sweep's own options; every other argument is for dreamer.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Any other --key value (--configs, --task, ...) goes to every run.")
    parser.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="grid keys and their values, e.g. seed=0,1,2 replay=fifo,reservoir")
    parser.add_argument("--file", help="YAML sweep file with name, configs, overrides, grid")
    parser.add_argument("--name", help="sweep name (default: the file's stem or the configs)")
    parser.add_argument("--root", help="sweep directory (default: logdir/sweep-<name>)")
    parser.add_argument("--address", help="address of an existing Ray cluster (e.g. auto); default: local Ray")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray CPUs (and torch threads) per run")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray GPUs per run")
    parser.add_argument("--max-concurrent", type=int, help="runs at once (default: what the cluster fits)")
    parser.add_argument("--retries", type=int, default=1, help="retries of a failed run, each resuming (default 1)")
    parser.add_argument("--summary-every", type=float, default=30.0, help="seconds between summary lines")
    parser.add_argument("--results", help="keep each finished run's compact results in RESULTS/<run>/ and "
                        "skip the runs kept there")
    parser.add_argument("--keep-only", action="store_true",
                        help="keep the finished runs' results in --results and launch nothing")
    parser.add_argument("--no-analysis", dest="analysis", action="store_false",
                        help="skip analyze_results.py at the end")
    args, extra = parser.parse_known_args(argv)
    if args.address and args.num_cpus:
        parser.error("--num-cpus sizes a local Ray only; a cluster given by --address has its own size")
    if args.keep_only and not args.results:
        parser.error("--keep-only keeps results in --results DIR; give one")
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0:
        parser.error("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    return args, extra


def prepare(args, extra):
    """Spec, root and grid points, all validated; the manifest written. Raises SweepError/ConfigError."""
    spec = build_spec(args, extra)
    root = pathlib.Path(args.root or ROOT / "logdir" / f"sweep-{spec['name']}").resolve()
    points = grid_points(spec, root)
    validate_points(points)
    write_manifest(root, spec, points, check_manifest(root, points))
    return spec, root, points


def main(argv=None):
    """Run the sweep; returns 0 if every run finished, 1 if any failed, 2 on bad input."""
    args, extra = parse_cli(argv)
    try:
        spec, root, points = prepare(args, extra)
        results = args.results = pathlib.Path(args.results).resolve() if args.results else None
        if results:
            keep_finished(points, results)
        if args.keep_only:
            return 0
        todo = [point for point in points if not point.finished and not (results and (results / point.name).exists())]
        print(f"sweep {spec['name']}: {len(points)} runs in {root}: {len(points) - len(todo)} already finished, "
              f"{len(todo)} to run", flush=True)
        failed = launch(todo, len(points), args) if todo else {}
    except (SweepError, tools.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    report(failed, points)
    analysis_rc = analyze(root, points) if args.analysis else 0
    return 1 if failed or analysis_rc else 0


if __name__ == "__main__":
    sys.exit(main())
