"""Infrastructure shared by the agent: config loading, logging, replay,
the environment driver, optimisers, precision, checkpoints and seeding.

Config: ``configs.yaml`` holds ``defaults`` and named blocks; ``--configs a b``
merges blocks left to right, then ``--key value`` / ``--block.key value``
overrides any leaf. A block's ``base: [x, y]`` merges blocks x then y before
its own keys. Every key must exist in ``defaults`` and keep its type;
mistakes raise ``ConfigError`` naming the key and the closest valid one.

Replay: steps are stored as they arrive, in fixed-size chunks that live in
memory and as ``<stamp>-<stream>-<seq>.npz`` files in the run's ``train_eps``
folder (written atomically); the files on disk always mirror the chunks in
memory. Training windows start at uniformly drawn stored steps and may cross
episode boundaries. Eviction keeps at most ``dataset_size`` steps (oldest
chunk first, or Algorithm R over chunks); evicted files wait in
``train_eps/.evicted`` until the next checkpoint, so a resume can put the
folder back exactly as the checkpoint saw it.
"""

import contextlib
import ctypes
import datetime
import difflib
import importlib
import io
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from collections import OrderedDict

import gymnasium as gym
import numpy as np
import torch
from ruamel.yaml import YAML

import detector

ROOT = pathlib.Path(__file__).resolve().parent
SUITES = ("dmc", "atari", "crafter", "memorymaze")  # task name prefixes: <suite>_<name> (envs/<suite>.py)
LLCD_SCORES = ("obs_nll", "latent_kl", "latent_kl_zmean", "paired_kl", "reward_nll", "openloop_nll")  # Dreamer.surprise
CHOICES = {
    "precision": (32, 16, "bf16", "auto"),
    "expl_behavior": ("greedy", "random", "plan2explore"),
    "imag_gradient": ("dynamics", "reinforce"),
    "disag_target": ("stoch", "deter", "feat", "embed"),
    "replay": ("fifo", "reservoir"),
    "crl_switch": ("immediate", "episode"),
    "llcd_gate": ("detector", "always", "never"),
    "llcd_score": LLCD_SCORES + tuple(score + detector.PHASE for score in LLCD_SCORES),
    "llcd_detector": detector.DETECTORS,
    "eval_policy": ("agent", "random"),
}


# ----------------------------------------------------------------- config


class ConfigError(Exception):
    """A bad config: the message names the key and the fix."""


class Config(dict):
    """Dict with attribute access; nested dicts become Configs."""

    def __init__(self, data=()):
        super().__init__({k: Config(v) if isinstance(v, dict) else v for k, v in dict(data).items()})

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def read_yaml(path):
    with open(path) as f:
        return YAML(typ="safe").load(f)


def write_yaml(data, path):
    stream = io.StringIO()
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.dump(data, stream)
    atomic_write_bytes(path, stream.getvalue().encode())


def suggest(name, options):
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_args(argv):
    """Split argv into the block names after --configs and (key, raw value) overrides."""
    blocks, overrides, index = [], [], 0
    while index < len(argv):
        arg = argv[index]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --key value")
        key = arg[2:].replace("-", "_") if arg[2:] not in ("configs",) else "configs"
        values = []
        while index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            index += 1
            values.append(argv[index])
        if key == "configs":
            blocks += values
        elif len(values) != 1:
            raise ConfigError(f"--{key} needs exactly one value, got {len(values)}")
        else:
            overrides.append((key, values[0]))
        index += 1
    return blocks, overrides


def merge(base, update, where):
    """Recursively merge ``update`` into a copy of ``base``; unknown keys are errors."""
    out = dict(base)
    for key, value in update.items():
        if key == "crl_task_defs":
            out[key] = merge_open(base[key], value)
            continue
        if key not in base:
            raise ConfigError(f"unknown key '{where}{key}'{suggest(key, base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and base[key]:
            out[key] = merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = check_type(f"{where}{key}", base[key], value)
    return out


def merge_open(base, update):
    """Recursive merge that accepts new keys (task tables: new ids, new domains)."""
    out = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = merge_open(out[key], value) if both_dicts else value
    return out


def check_type(name, default, value):
    """Return ``value`` if it fits the type of ``default``; raise ConfigError otherwise."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in CHOICES:
        if value not in CHOICES[leaf]:
            raise ConfigError(f"'{name}' must be one of {list(CHOICES[leaf])}, got {value!r}")
        return value
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise ConfigError(f"'{name}' must be {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(default)):
        raise ConfigError(f"'{name}' must be {type(default).__name__}, got {value!r}")
    return value


def parse_value(raw):
    """CLI strings are read as YAML scalars/lists: 'True', '1e-4', '[0, 1]', 'bf16'."""
    try:
        return YAML(typ="safe").load(raw)
    except Exception:  # noqa: BLE001 - not YAML: keep the raw string
        return raw


def apply_override(config, key, raw):
    parts = key.split(".")
    node, where = config, ""
    for part in parts[:-1]:
        part = node_key(node, part)
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown key '{where}{part}'{suggest(part, node)}")
        node, where = node[part], f"{where}{part}."
    leaf = node_key(node, parts[-1])
    if leaf not in node:
        raise ConfigError(f"unknown key '--{where}{leaf}'{suggest(leaf, node)}")
    node[leaf] = check_type(f"{where}{leaf}", node[leaf], parse_value(raw))


def node_key(node, part):
    """The key of ``node`` that the command-line ``part`` names (YAML keys may be ints: task ids)."""
    return next((key for key in node if str(key) == part), part)


def load_config(argv, path=ROOT / "configs.yaml"):
    """Compose defaults, the --configs blocks (each after its bases) and the --key overrides into a Config."""
    blocks_file = read_yaml(path)
    blocks, overrides = parse_args(argv)
    config = dict(blocks_file["defaults"])
    for name in blocks:
        config = apply_block(config, blocks_file, name)
    for key, raw in overrides:
        apply_override(config, key, raw)
    config["configs"] = blocks
    validate(config)
    config["precision"] = resolve_precision(config["precision"], config["device"])
    return Config(config)


def apply_block(config, blocks_file, name, chain=()):
    """Merge block ``name`` into ``config``: the blocks of its ``base`` first (recursively,
    left to right), then its own keys. ``chain``: the blocks whose bases led here."""
    if name in chain:
        raise ConfigError(f"config block '{name}' builds on itself: {' -> '.join((*chain, name))}; "
                          "remove one of these 'base' entries")
    own = dict(find_block(blocks_file, name, chain))
    for base in base_names(own.pop("base", []), name):
        config = apply_block(config, blocks_file, base, (*chain, name))
    return merge(config, own, "")


def find_block(blocks_file, name, chain):
    """The block ``name`` of configs.yaml; ConfigError naming the closest block if there is none."""
    if name != "defaults" and name in blocks_file:
        return blocks_file[name]
    valid = [b for b in blocks_file if b != "defaults"]
    where = f" in the base of '{chain[-1]}'" if chain else ""
    raise ConfigError(f"unknown config block '{name}'{where}{suggest(name, valid)}; blocks: {', '.join(valid)}")


def base_names(base, name):
    """The block names of block ``name``'s ``base``, which must be a list of names."""
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        raise ConfigError(f"'base' of config block '{name}' must be a list of block names, e.g. base: [size_s]; "
                          f"got {base!r}")
    return base


def resolve_precision(precision, device):
    """``auto``: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere."""
    if precision != "auto":
        return precision
    device = "cuda" if device == "auto" and torch.cuda.is_available() else device
    return "bf16" if str(device).startswith("cuda") or cpu_has_native_bf16() else 32


def validate(config):
    """Reject impossible values before anything runs."""
    positive = ["steps", "batch_size", "batch_length", "train_ratio", "envs", "action_repeat",
                "eval_every", "log_every", "checkpoint_every", "dataset_size", "replay_chunk", "imag_horizon",
                "llcd_context_len", "llcd_context_dim", "llcd_units", "llcd_lr", "llcd_smoothing", "llcd_history_window",
                "llcd_sigma", "llcd_patience", "llcd_burn_in", "llcd_cusum_drift", "llcd_false_alarms_per_100k",
                "llcd_openloop_horizon", "nonfinite_limit", "eval_envs_max"]
    for key in positive:
        if config[key] <= 0:
            raise ConfigError(f"'{key}' must be > 0, got {config[key]}")
    if not 0 <= config["llcd_adapt_fraction"] <= 1:
        raise ConfigError(f"'llcd_adapt_fraction' is a fraction of a task window's updates: give a value in [0, 1], "
                          f"got {config['llcd_adapt_fraction']}")
    for key in ("prefill", "eval_episode_num", "llcd_scale", "llcd_beta",
                "llcd_std_floor", "llcd_cooldown", "llcd_max_delay"):
        if config[key] < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {config[key]}")
    if config["llcd_cusum_window"] < 2 * config["llcd_burn_in"]:
        raise ConfigError(f"'llcd_cusum_window' ({config['llcd_cusum_window']}) must be at least twice "
                          f"'llcd_burn_in' ({config['llcd_burn_in']}): the baseline holds the burn-in")
    if config["llcd_burn_in"] > config["llcd_history_window"]:
        raise ConfigError(f"'llcd_burn_in' ({config['llcd_burn_in']}) must not exceed "
                          f"'llcd_history_window' ({config['llcd_history_window']})")
    suite = config["task"].split("_", 1)[0]
    if suite not in SUITES:
        raise ConfigError(f"task '{config['task']}' is not supported{suggest(suite, SUITES)}: tasks are "
                          "dmc_<domain>_<task>, atari_<game>, crafter_reward or memorymaze_<size>")
    if suite == "dmc":
        validate_task(config["task"])
    else:
        validate_discrete_task(config, suite)
    if config["crl_tasks"]:
        validate_schedule(config)
    validate_eval_policy(config)
    validate_eval_tasks(config)
    if config["replay_chunk"] < config["batch_length"]:
        raise ConfigError(f"'replay_chunk' ({config['replay_chunk']}) must be >= 'batch_length' "
                          f"({config['batch_length']}): a window spans at most two chunks; raise replay_chunk")
    if config["llcd"] and not config["llcd_max_delay"] and config["time_limit"] // config["action_repeat"] < 1:
        raise ConfigError(f"'llcd_max_delay' 0 means one episode, but 'time_limit' is {config['time_limit']}: "
                          "set --llcd_max_delay to the agent steps a detection may lag a switch")
    if config["llcd"] and config["llcd_score"].startswith("paired_kl") and (suite != "dmc" or config["llcd_log_score"]):
        raise ConfigError(f"'llcd_score: {config['llcd_score']}' needs a dmc_ task (fixed-length episodes match its "
                          "phases) and 'llcd_log_score: False' (it is a difference, often negative): choose another "
                          "score, e.g. --llcd_score latent_kl")
    if config["llcd"] and config["replay_chunk"] <= config["llcd_context_len"]:
        raise ConfigError(f"'replay_chunk' ({config['replay_chunk']}) must exceed 'llcd_context_len' "
                          f"({config['llcd_context_len']}): the context before a window comes from one chunk")


def validate_eval_policy(config):
    """``eval_policy: random`` is an evaluation of its own: with ``eval_only`` and no checkpoint."""
    if config["eval_policy"] != "random":
        return
    if not config["eval_only"]:
        raise ConfigError("'eval_policy: random' only evaluates (it trains nothing): add --eval_only True")
    if config["checkpoint"]:
        raise ConfigError("'eval_policy: random' evaluates no agent: drop --checkpoint")


def validate_eval_tasks(config):
    """``eval_tasks`` (physics tasks of crl_task_defs to evaluate on) belong to ``eval_only``; their
    ids are checked against the evaluated run's task (``validate_physics_tasks``)."""
    if not config["eval_tasks"]:
        return
    if not config["eval_only"]:
        raise ConfigError("'eval_tasks' evaluates a saved agent (or random actions) on changed physics: "
                          "add --eval_only True")


def validate_task(task):
    """``task`` must be a dm_control suite task ('dmc_cup_catch' stands for ball_in_cup_catch)."""
    from envs import dmc

    problem = dmc.gl_problem()  # dm_control does not even import under a broken MUJOCO_GL
    if problem:
        raise ConfigError(problem)
    from dm_control import suite

    short = {full: alias for alias, full in dmc.DOMAIN_ALIASES.items()}
    valid = [f"dmc_{short.get(domain, domain)}_{name}" for domain, name in suite.ALL_TASKS]
    try:
        known = dmc.split_task_name(task[len("dmc_"):]) in suite.ALL_TASKS
    except ValueError:  # no '_' between domain and task
        known = False
    if not known:
        raise ConfigError(f"unknown task '{task}'{suggest(task, valid)}; tasks are dmc_<domain>_<task> "
                          "from dm_control's suite, e.g. dmc_walker_walk")


def validate_discrete_task(config, suite):
    """An Atari, Crafter or Memory Maze task: its package imports and the env can run it;
    the continual schedule needs a DMC task."""
    try:
        importlib.import_module(f"envs.{suite}").check_task(config["task"][len(suite) + 1:],
                                                           config["action_repeat"], config["size"])
    except (ImportError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if config["crl_tasks"]:
        raise ConfigError(f"crl_tasks is set but task '{config['task']}' has no continual physics: "
                          "continual runs need a DMC task such as dmc_cartpole_swingup")


def validate_physics_tasks(config, key):
    """The task ids in ``config[key]`` (if any) need a continual env for the task and entries in crl_task_defs."""
    from envs import dmc

    if not config[key]:
        return
    suite, rest = config["task"].split("_", 1)
    domain, task = dmc.split_task_name(rest) if suite == "dmc" else (None, None)
    if task not in getattr(dmc.CONTINUAL_ENVS.get(domain), "SUITE_TASKS", ()):
        supported = ", ".join(f"dmc_{env.DOMAIN}_{name}" for env in dmc.CONTINUAL_ENVS.values()
                              for name in env.SUITE_TASKS)
        raise ConfigError(f"task '{config['task']}' has no continual-physics env ({key} is set); "
                          f"continual tasks: {supported}")
    try:
        known = list(dmc.parse_tasks(dmc.domain_tasks(config["crl_task_defs"], domain), domain))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    unknown = [t for t in config[key] if t not in known]
    if unknown:
        raise ConfigError(f"{key} {unknown} are not defined for '{domain}'; crl_task_defs has ids {known}")


def validate_schedule(config):
    """A continual schedule needs a continual env, known task ids and windows the envs hit exactly."""
    validate_physics_tasks(config, "crl_tasks")
    if config["crl_steps_per_task"] <= 0:
        raise ConfigError("'crl_steps_per_task' must be > 0 when crl_tasks is set")
    envs = config["envs"]
    if config["crl_steps_per_task"] % envs or config["prefill"] % envs:
        raise ConfigError(f"'crl_steps_per_task' and 'prefill' must be multiples of envs ({envs}) "
                          "so that every env switches exactly at the task boundary")
    if not 0 <= config["crl_ramp"] <= config["crl_steps_per_task"]:
        raise ConfigError(f"'crl_ramp' ({config['crl_ramp']}) must lie in [0, crl_steps_per_task "
                          f"({config['crl_steps_per_task']})]: a ramp happens inside its window")
    if config["crl_ramp"] and config["crl_switch"] != "immediate":
        raise ConfigError("'crl_ramp' needs crl_switch immediate: a ramp moves every train env at once")


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return name


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); Linux flags only."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True  # unknown: do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


def keep_freed_memory():
    """Tell glibc malloc to reuse freed memory instead of returning it to the kernel.

    An update allocates and frees activations of ~100 MB (e.g. imagined features,
    (H+1, N, F)); by default glibc serves each from a fresh ``mmap`` whose pages the
    kernel must fault in and zero on first touch, which cost ~20% of a CPU update at the
    ``dmc_proprio`` sizes (see bench.py). Turning off mmap and heap trimming keeps the
    pages mapped (resident memory stays at the run's peak). No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def precision_warning(precision, device):
    """A one-line warning when ``precision`` will be slow on ``device``, else None."""
    if precision == "bf16" and str(device) == "cpu" and not cpu_has_native_bf16():
        return ("warning: this CPU has no native bf16 (avx512_bf16/amx_bf16 flags): bf16 updates run "
                "8-50x slower than fp32 here; use --precision 32")
    return None


def compile_available():
    """Whether torch.compile works here (it needs a C++ compiler on CPU); warns and returns
    False if not, so ``compile: True`` falls back to eager instead of failing mid-run."""
    try:
        torch.compile(lambda x: torch.tanh(x) * 2.0)(torch.ones(4))
        return True
    except Exception as error:  # noqa: BLE001 - any backend failure means: run eager
        reason = " ".join(str(error).split())[:200]
        print(f"warning: compile: True is unavailable here ({type(error).__name__}: {reason}); running eager",
              file=sys.stderr, flush=True)
        return False


def default_logdir(config):
    """logdir/<task>-<blocks>-llcd<bool>[-gate<mode>]-seed<n>[-random]: the LLCD gate ablations
    and a random baseline get folders of their own, so none resumes another's run."""
    blocks = "-".join(config.configs) or "defaults"
    llcd = config.get("llcd", False)
    gate = f"-gate{config.llcd_gate}" if llcd and config.get("llcd_gate", "detector") != "detector" else ""
    policy = "-random" if config.get("eval_policy") == "random" else ""  # a baseline's own folder
    return ROOT / "logdir" / f"{config.task}-{blocks}-llcd{llcd}{gate}-seed{config.seed}{policy}"


# ----------------------------------------------------------------- files


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file;
    a failed write (e.g. disk full) removes its temp file and re-raises."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Checkpoints never run code. torch.load(weights_only=True) rebuilds tensors, numbers, strings,
# None and plain containers, and refuses anything else without calling it. NumPy arrays and scalars
# (replay chunks being filled, RNG and detector states) are written as tagged tensors
# ({NUMPY_TAG: tensor, "scalar": bool}) and turned back on load, dtype and value exact.
NUMPY_TAG = "__numpy__"


class UnsafeCheckpointError(Exception):
    """A checkpoint that torch.load(weights_only=True) refuses: it was not loaded, nothing in it ran."""


def save_checkpoint(path, payload):
    buffer = io.BytesIO()
    torch.save(to_safe(payload), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path, device):
    """The payload of a checkpoint written by ``save_checkpoint``; raises UnsafeCheckpointError for a
    file that holds anything else (a crafted pickle, or a checkpoint of a version before this form)."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds objects that a checkpoint of this project never holds "
            f"({found.group(1) if found else 'not plain data'}); it was refused and nothing in it ran. "
            "Checkpoints of versions before weights-only loading are refused the same way: start the run over"
        ) from None
    return from_safe(payload)


def to_safe(value):
    """``value`` with every NumPy array or scalar inside it (dicts, lists, tuples) as a tagged tensor."""
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"a checkpoint holds no {value.dtype} arrays (only booleans and numbers)")
        return {NUMPY_TAG: torch.from_numpy(np.array(value)), "scalar": isinstance(value, np.generic)}
    if isinstance(value, dict):
        return rebuild_dict(value, to_safe)
    if type(value) in (list, tuple):
        return type(value)(to_safe(item) for item in value)
    return value


def from_safe(value):
    """Undo ``to_safe``: tagged tensors back to NumPy arrays and scalars."""
    if isinstance(value, dict) and NUMPY_TAG in value:
        array = value[NUMPY_TAG].cpu().numpy()
        return array[()] if value["scalar"] else array
    if isinstance(value, dict):
        return rebuild_dict(value, from_safe)
    if type(value) in (list, tuple):
        return type(value)(from_safe(item) for item in value)
    return value


def rebuild_dict(value, convert):
    """A dict of the same type (a module state dict's OrderedDict keeps its ``_metadata``), values converted."""
    out = type(value)((key, convert(item)) for key, item in value.items())
    if hasattr(value, "_metadata"):
        out._metadata = value._metadata
    return out


# Settings a checkpoint is tied to: the network shapes, the data its replay and counters describe,
# and the resolved precision (``auto`` differs between machines: a run keeps its numerics on resume).
CHECKPOINT_KEYS = (
    "precision", "task", "pixels", "size", "camera", "action_repeat", "envs", "prefill", "replay", "replay_chunk", "dataset_size",
    "crl_tasks", "crl_steps_per_task", "dyn_hidden", "dyn_deter", "dyn_stoch", "dyn_discrete", "units", "act",
    "norm", *(f"{net}.{key}" for net in ("encoder", "decoder") for key in
              ("mlp_layers", "mlp_units", "cnn_depth", "kernel_size", "minres")),
    "actor.layers", "critic.layers", "reward_head.layers", "cont_head.layers", "expl_behavior",
    "disag_target", "disag_models", "disag_layers", "disag_units", "disag_action_cond",
    "llcd", "llcd_gate", "llcd_context_len", "llcd_context_dim", "llcd_units",
)


def config_value(config, key):
    """``config['a']['b']`` for key 'a.b'; KeyError if absent."""
    for part in key.split("."):
        config = config[part]
    return config


def check_checkpoint_config(path, saved, given, fix, keys=CHECKPOINT_KEYS):
    """Raise ConfigError listing every key of ``keys`` whose value in the checkpoint's config
    ``saved`` differs from ``given`` (keys an older checkpoint lacks are not compared), then ``fix``."""
    diffs = []
    for key in keys:
        try:
            before = config_value(saved, key)
        except KeyError:
            continue
        if before != config_value(given, key):
            diffs.append(f"{key} {before!r} (saved) vs {config_value(given, key)!r} (given)")
    if diffs:
        raise ConfigError(f"checkpoint {path} was saved with another config: {', '.join(diffs)}; {fix}")


# ----------------------------------------------------------------- logging


class Logger:
    """Scalars and videos to TensorBoard, ``metrics.jsonl`` and the console.

    On resume, ``metrics.jsonl`` is cut back to the ``rows`` it had when the
    checkpoint was written (without a checkpoint: to rows at or before
    ``step``), and TensorBoard purges events after ``step``, so nothing that
    is logged again after a resume appears twice. Scalars named in
    ``exclude_from_jsonl`` (wall-clock rates in deterministic runs) go to TensorBoard
    and the console but not to ``metrics.jsonl``.
    """

    def __init__(self, logdir, step=0, rows=None, exclude_from_jsonl=()):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = pathlib.Path(logdir)
        self.step = step
        self.metrics_path = self.logdir / "metrics.jsonl"
        self.rows = self.truncate_rows(step, rows)
        self.writer = SummaryWriter(str(self.logdir), purge_step=step + 1, max_queue=1000)
        self.exclude_from_jsonl = set(exclude_from_jsonl)
        self.scalars, self.videos = {}, {}

    def truncate_rows(self, step, rows):
        """Keep the first ``rows`` valid rows (or those with step <= ``step``); return the count."""
        if not self.metrics_path.exists():
            return 0
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (len(kept) < rows) if rows is not None else row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.metrics_path, "".join(f"{line}\n" for line in kept).encode())
        return len(kept)

    def scalar(self, name, value):
        self.scalars[name] = float(value)

    def video(self, name, frames):
        self.videos[name] = np.asarray(frames)

    def write(self, step=None, console=True):
        step = self.step if step is None else step
        if self.scalars:
            for name, value in self.scalars.items():
                self.writer.add_scalar(name, value, step)
            row = {name: value for name, value in self.scalars.items() if name not in self.exclude_from_jsonl}
            if row:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, **row}) + "\n")
                self.rows += 1
            if console:
                text = " / ".join(f"{k} {v:.4g}" for k, v in self.scalars.items())
                print(f"[{step}] {text}", flush=True)
        for name, frames in self.videos.items():
            self.add_gif(name, frames, step)
        self.writer.flush()
        self.scalars, self.videos = {}, {}

    def add_gif(self, name, frames, step, fps=16):
        """frames: (T, H, W, C) or (B, T, H, W, C) uint8; a batch is tiled side by side."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        if frames.ndim == 5:
            frames = np.concatenate(list(frames), axis=2)
        data = encode_gif(frames, fps)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=frames.shape[3],
                              encoded_image_string=data)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)

    def close(self):
        self.writer.close()


def encode_gif(frames, fps):
    from PIL import Image

    images = [Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


class Progress:
    """Progress bar over agent steps with env steps/s, updates/s and ETA."""

    def __init__(self, desc, total, initial, action_repeat):
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        mininterval=0.5 if interactive else 30, smoothing=0.05)
        self.action_repeat = action_repeat
        self.start, self.start_updates, self.start_steps = time.time(), 0, initial

    def update(self, steps, updates=None):
        self.bar.update(steps)
        elapsed = max(time.time() - self.start, 1e-6)
        done = self.bar.n - self.start_steps
        postfix = {"env_sps": f"{done * self.action_repeat / elapsed:.0f}"}
        if updates is not None:
            postfix["upd/s"] = f"{(updates - self.start_updates) / elapsed:.2f}"
        self.bar.set_postfix(postfix, refresh=False)

    def mark_updates(self, updates):
        self.start_updates = updates

    def close(self):
        self.bar.close()


# ----------------------------------------------------------------- replay


class Replay:
    """Step replay in fixed-size chunks with an on-disk mirror; capacity in steps.

    Storage: steps enter as they arrive (``add_step``), one open chunk per env. A chunk
    closes when it holds ``chunk`` steps, whatever the episode boundaries inside it, is
    written to ``<stamp>-<stream>-<seq>.npz`` and is sampleable at once: the running
    episode is trainable after at most one chunk. The chunks of one env form a stream
    (``seq`` counts them), so a window can run on into the next chunk.

    Sampling: every stored step is equally likely to be in a training window, whatever its
    position in its chunk and whatever was evicted around it (DreamerV3 samples uniformly
    over stored steps). A window of ``length`` steps starts at a uniformly drawn stored
    step and runs on through the stored successors of its chunk; windows cross episode
    boundaries, ``is_first`` marking each start. Where the run of consecutively stored
    chunks ends (the successor is evicted, or not yet closed), the window wraps round to
    the first step of that run and marks the step it resumes at with ``is_first``: the
    model restarts from its initial state there, as it does at every window's first step.
    Each run is thus a ring: each of its steps starts one window and lies in exactly
    ``length`` of them. (Without the wrap, a window must fit before the run's end, and a
    step at the end of an isolated chunk lies in 1 window where a middle step lies in
    ``length``: under reservoir eviction most chunks are isolated.)
    ``prefix`` > 0 adds the steps before each window (the LLCD context) where the
    predecessor chunk is stored, zeros elsewhere, with ``prefix_stored`` (B, prefix) telling
    which are real.

    ``policy`` decides which chunks stay once ``capacity // chunk`` are stored:
    - ``fifo``: the oldest chunk is evicted;
    - ``reservoir``: Vitter's Algorithm R over chunks: the n-th chunk ever closed is
      stored with probability k/n, replacing a uniformly chosen stored one. All chunks
      have the same size, so every step ever collected is kept with the same probability
      whatever the episode lengths, and old physics stay represented.

    Crash consistency with a checkpoint: ``state_dict`` holds the stored chunk names in
    order, the open chunks, ``seen`` and the RNG; ``remove`` moves an evicted file into
    ``.evicted/`` until ``purge_evicted`` (called after each checkpoint). On resume,
    ``load_state_dict`` deletes files written after the checkpoint, moves back the ones it
    lists and reloads them in its order, so memory, disk and checkpoint agree, no step the
    checkpoint counted is lost or stored twice, and the reservoir continues exactly.
    """

    EVICTED = ".evicted"

    POLICIES = ("fifo", "reservoir")

    def __init__(self, directory, capacity, seed=0, policy="fifo", chunk=64):
        """``directory`` None keeps the chunks in memory only."""
        if policy not in self.POLICIES:
            raise ValueError(f"replay policy must be one of {self.POLICIES}, got {policy!r}")
        self.directory = pathlib.Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.chunk, self.policy = chunk, policy
        self.slots = max(1, capacity // chunk)  # k: chunks the buffer holds
        self.chunks = OrderedDict()  # name -> {key: (chunk, ...) array}, oldest first
        self.positions = {}  # (stream, seq) -> name of every stored chunk
        self.open = {}  # env index -> {key: [values]}: the chunk being filled
        self.streams = {}  # env index -> [stream id, seq of its open chunk]
        self.rng = np.random.default_rng(seed)
        self.seen = 0  # chunks ever closed

    @property
    def evicted_dir(self):
        return self.directory / self.EVICTED

    @property
    def num_steps(self):
        return len(self.chunks) * self.chunk

    @property
    def num_chunks(self):
        return len(self.chunks)

    def file_names(self):
        """Names of the chunk files in the folder, oldest first (names start with a timestamp)."""
        return sorted(path.stem for path in self.directory.glob("*.npz"))

    # -- adding

    def add_step(self, env_index, transition):
        """Append one step of env ``env_index``; closes its chunk when full."""
        steps = self.open.setdefault(env_index, {})
        for key, value in transition.items():
            steps.setdefault(key, []).append(value)
        if len(steps[next(iter(steps))]) == self.chunk:
            self.close(env_index)

    def close(self, env_index):
        """Offer env ``env_index``'s full chunk to the buffer (FIFO or Algorithm R)."""
        steps = self.open.pop(env_index)
        stream, seq = self.streams.setdefault(env_index, [uuid.uuid4().hex[:12], 0])
        self.streams[env_index][1] += 1
        self.seen += 1
        if self.admit():
            stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
            self.store(f"{stamp}-{stream}-{seq:06d}", {key: np.stack(values) for key, values in steps.items()})

    def admit(self):
        """Algorithm R: once k chunks are stored, keep the n-th with probability k/n in place
        of a uniformly chosen one (FIFO admits everything and evicts the oldest)."""
        if self.policy == "fifo" or len(self.chunks) < self.slots:
            return True
        slot = self.rng.integers(0, self.seen)
        if slot >= self.slots:
            return False
        self.remove(list(self.chunks)[slot])
        return True

    def store(self, name, chunk):
        if self.directory is not None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **chunk)
            atomic_write_bytes(self.directory / f"{name}.npz", buffer.getvalue())
        self.insert(name, chunk)
        self.evict_oldest()

    def insert(self, name, chunk):
        self.chunks[name] = chunk
        self.positions[chunk_position(name)] = name

    def evict_oldest(self):
        while len(self.chunks) > self.slots:
            self.remove(next(iter(self.chunks)))

    def remove(self, name):
        """Evict a chunk; its file moves to ``.evicted/`` until the next checkpoint."""
        del self.chunks[name]
        del self.positions[chunk_position(name)]
        if self.directory is not None:
            self.evicted_dir.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.directory / f"{name}.npz", self.evicted_dir / f"{name}.npz")

    # -- sampling

    def can_sample(self, length):
        return bool(self.chunks) and length <= self.chunk

    def successor(self, name):
        stream, seq = chunk_position(name)
        return self.positions.get((stream, seq + 1))

    def predecessor(self, name):
        stream, seq = chunk_position(name)
        return self.positions.get((stream, seq - 1))

    def run_start(self, name):
        """The first chunk of the run of consecutively stored chunks that holds ``name``."""
        while (before := self.predecessor(name)) is not None:
            name = before
        return name

    def sample(self, batch, length, prefix=0):
        """``batch`` windows -> {key: (B, prefix + length, ...)}, plus ``prefix_stored``
        (B, prefix) when ``prefix`` > 0 (see the class docstring)."""
        if not self.chunks:
            raise RuntimeError("the replay holds no complete chunk yet; prefill more steps")
        if length > self.chunk or prefix > self.chunk:
            raise ValueError(f"windows of {length} steps with {prefix} context steps need "
                             f"replay_chunk >= {max(length, prefix)}, it is {self.chunk}")
        names = list(self.chunks)
        picks = self.rng.integers(0, len(names) * self.chunk, size=batch)  # uniform over stored steps
        windows = [self.window(names[pick // self.chunk], int(pick % self.chunk), length, prefix) for pick in picks]
        return {key: np.stack([window[key] for window in windows]) for key in windows[0]}

    def window(self, name, offset, length, prefix):
        """Steps [offset - prefix, offset + length) counted from the start of chunk ``name``,
        wrapped round to the start of its run past the run's end (``is_first`` set where it
        resumes); the prefix is zero-padded where the predecessor chunk is not stored."""
        before, after = self.predecessor(name), self.successor(name)
        wraps = after is None and offset + length > self.chunk
        after = self.run_start(name) if wraps else after
        begin, end = offset - prefix, offset + length
        padding = max(0, -begin) if before is None else 0
        begin += padding
        segments = [(self.chunks[piece], start) for piece, start in
                    ((before, -self.chunk), (name, 0), (after, self.chunk))
                    if piece is not None and begin < start + self.chunk and end > start]
        out = {}
        for key, value in self.chunks[name].items():
            pad = np.zeros((padding, *value.shape[1:]), value.dtype)
            out[key] = np.concatenate([pad, *(chunk[key][max(begin - start, 0):end - start]
                                             for chunk, start in segments)])
        if wraps:
            out["is_first"][prefix + self.chunk - offset] = True
        if prefix:
            out["prefix_stored"] = np.arange(prefix) >= padding
        return out

    def task_fractions(self):
        """Fraction of stored steps per task id (steps carry a ``task_id`` key in CRL runs)."""
        counts = {}
        for chunk in self.chunks.values():
            if "task_id" in chunk:
                ids, sizes = np.unique(chunk["task_id"], return_counts=True)
                for task, size in zip(ids.tolist(), sizes.tolist()):
                    counts[task] = counts.get(task, 0) + size
        total = sum(counts.values())
        return {task: size / total for task, size in sorted(counts.items())}

    # -- files and checkpoints

    def load(self, names=None):
        """Read the chunks ``names`` in that order (default: every file, oldest first); keeps
        the newest ``capacity // chunk`` of them."""
        for name in self.file_names() if names is None else names:
            chunk = self.read(name)
            if chunk is not None:
                self.insert(name, chunk)
        self.seen = max(self.seen, len(self.chunks))
        self.evict_oldest()
        return self

    def read(self, name):
        """One chunk file, or None with a warning if it is unreadable (then renamed to
        ``<name>.npz.corrupt``, so the folder keeps mirroring memory)."""
        path = self.directory / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:  # an object array is refused, never unpickled
                chunk = {key: data[key] for key in data.files}
            if any(len(value) != self.chunk for value in chunk.values()):
                raise ValueError(f"it does not hold {self.chunk} steps (another replay_chunk?)")
            return chunk
        except Exception as error:  # noqa: BLE001 - any corruption: skip the file, keep going
            warnings.warn(f"skipping unreadable replay chunk {path.name}: {error}")
            if path.exists():
                os.replace(path, path.with_name(f"{path.name}.corrupt"))
            return None

    def state_dict(self):
        return {"seen": self.seen, "rng": self.rng.bit_generator.state, "chunks": list(self.chunks),
                "open": {index: {key: np.stack(values) for key, values in steps.items()}
                         for index, steps in self.open.items()},
                "streams": {index: list(stream) for index, stream in self.streams.items()}}

    def load_state_dict(self, state):
        """Restore the buffer a checkpoint saw: its chunks in its order, on disk and in memory,
        and the chunks that were being filled."""
        self.chunks.clear()
        self.positions.clear()
        deleted = self.restore_files(state["chunks"])
        if deleted:
            print(f"Deleted {deleted} replay chunk files written after the checkpoint; "
                  "those steps are collected again.", flush=True)
        self.load(state["chunks"])
        self.seen = max(state["seen"], len(self.chunks))
        self.rng.bit_generator.state = state["rng"]
        self.open = {index: {key: list(values) for key, values in steps.items()}
                     for index, steps in state["open"].items()}
        self.streams = {index: list(stream) for index, stream in state["streams"].items()}

    def restore_files(self, names):
        """Make the folder hold exactly the files ``names``: move evicted ones back, delete
        the others and leftover temp files. Returns the number of chunk files deleted."""
        wanted = set(names)
        for path in self.evicted_dir.glob("*.npz"):
            if path.stem in wanted:
                os.replace(path, self.directory / path.name)
        self.purge_evicted()
        unwanted = [path for path in self.directory.glob("*.npz") if path.stem not in wanted]
        for path in [*unwanted, *self.directory.glob(".*.tmp")]:
            path.unlink()
        return len(unwanted)

    def discard_files(self):
        """Start a run that has no checkpoint with an empty folder.

        Files found here come from a run killed before its first checkpoint (saved right
        after prefill), i.e. from an unfinished prefill. They are deleted rather than
        counted: no checkpoint vouches for them (the step counters, the reservoir's
        ``seen`` and the RNG states that produced them were never saved), prefill is
        cheap random acting, and starting over makes the run identical to one that was
        never interrupted.
        """
        deleted = self.restore_files([])
        if deleted:
            print(f"No checkpoint: deleted {deleted} replay chunk files of an unfinished prefill; "
                  "prefill starts over.", flush=True)

    def purge_evicted(self):
        """Delete the files evicted since the last checkpoint (call after saving one)."""
        shutil.rmtree(self.evicted_dir, ignore_errors=True)


def chunk_position(name):
    """'<stamp>-<stream>-<seq>' -> (stream, seq)."""
    _, stream, seq = name.rsplit("-", 2)
    return stream, int(seq)


# ----------------------------------------------------------------- driver


class Driver:
    """Steps N environments with a batched policy and records transitions.

    Keeps each env's current observation and the policy state between calls,
    so training can alternate with evaluation without cutting episodes.
    A stored transition holds obs_t, the action that led to it, and r_t. Transitions go
    to ``replay`` as they arrive; with ``keep_episodes`` each finished episode is also
    handed to ``on_episode`` as {key: (L, ...) array} (e.g. for eval videos). Without it,
    ``on_episode`` gets only the observations' ``log_*`` entries (per-episode statistics an
    env reports, e.g. Crafter's achievements) that way, or None for an env without any.
    """

    def __init__(self, envs, replay=None, before_reset=None, keep_episodes=False):
        self.envs = envs
        self.replay = replay
        self.keep_episodes = keep_episodes
        self.episodes = {}  # env index -> {key: [values]} of its running episode
        self.before_reset = before_reset  # called with the env index before each reset
        self.obs = [None] * len(envs)
        self.returns = np.zeros(len(envs))
        self.rewards = np.zeros(len(envs), np.float32)  # each env's last reward, shown to the policy
        self.lengths = np.zeros(len(envs), dtype=np.int64)
        self.state = None
        self.running = set()  # run_each_once: the envs whose episode has not ended

    def reset_envs(self, indices):
        if self.before_reset:
            for i in indices:
                self.before_reset(i)
        promises = [(i, self.envs[i].reset()) for i in indices]
        for i, promise in promises:
            obs = promise()
            self.obs[i] = obs
            self.returns[i], self.rewards[i], self.lengths[i] = 0.0, 0.0, 0
            self.record(i, obs, np.zeros(action_shape(self.envs[i].action_space), np.float32), 0.0, 1.0)

    def record(self, index, obs, action, reward, discount):
        """Store the step in the replay, its ``log_*`` entries only with the running episode."""
        logs = {key: value for key, value in obs.items() if is_log(key)}
        transition = {**{key: value for key, value in obs.items() if not is_log(key)}, "action": action,
                      "reward": np.float32(reward), "discount": np.float32(discount)}
        if self.replay is not None:
            self.replay.add_step(index, transition)
        kept = {**transition, **logs} if self.keep_episodes else logs
        for key, value in kept.items():
            self.episodes.setdefault(index, {}).setdefault(key, []).append(value)

    def run(self, policy, steps=0, episodes=0, on_step=None, on_episode=None):
        """Run until ``steps`` agent steps (summed over envs) or ``episodes`` episodes end."""
        step = episode = 0
        while (steps and step < steps) or (episodes and episode < episodes):
            needs_reset = [i for i, obs in enumerate(self.obs) if obs is None]
            if needs_reset:
                self.reset_envs(needs_reset)
            actions, self.state = policy(self.policy_batch(), self.state)  # (N, A)
            episode += len(self.step_envs(range(len(self.envs)), actions, on_episode))
            step += len(self.envs)
            if on_step:
                on_step(len(self.envs))

    def run_each_once(self, policy, on_episode=None):
        """Every env runs one episode from a reset, all in one policy batch (evaluation: one
        policy call serves N episodes, and no env starts a second, shorter-biased episode).
        An env whose episode has ended waits, an earlier observation of it still in the batch and
        its actions dropped, until the last episode ends. ``self.running``: the envs still running."""
        self.reset_envs(range(len(self.envs)))
        self.running = set(range(len(self.envs)))
        while self.running:
            actions, self.state = policy(self.policy_batch(), self.state)  # (N, A)
            before = list(self.obs)
            for index in self.step_envs(sorted(self.running), actions, on_episode):
                self.obs[index] = before[index]  # a placeholder row: the episode is over
                self.running.discard(index)

    def policy_batch(self):
        """The envs' current observations stacked {key: (N, ...)}, with the reward that came with each."""
        batch = {key: np.stack([obs[key] for obs in self.obs]) for key in self.obs[0] if not is_log(key)}
        batch["reward"] = self.rewards.copy()  # (N,)
        return batch

    def step_envs(self, indices, actions, on_episode):
        """Step the envs ``indices`` with their rows of ``actions``; returns those whose episode ended."""
        promises = [(index, self.envs[index].step(actions[index])) for index in indices]
        ended = []
        for index, promise in promises:
            obs, reward, done, info = promise()
            self.obs[index] = obs
            self.returns[index] += reward
            self.rewards[index] = reward
            self.lengths[index] += 1
            self.record(index, obs, actions[index], reward, info.get("discount", 1.0))
            if done:
                ended.append(index)
                self.end_episode(index, on_episode)
        return ended

    def end_episode(self, index, on_episode):
        kept = self.episodes.pop(index, None)
        episode = {key: np.stack(values) for key, values in kept.items()} if kept else None
        if on_episode:
            on_episode(self.returns[index], int(self.lengths[index]), episode)
        self.obs[index] = None


def is_log(key):
    """``log_*`` observation entries are per-episode statistics, neither model input nor replay data."""
    return key.startswith("log_")


def action_shape(space):
    """Shape of the agent's actions in ``space``: (n,) one-hot vectors for a Discrete space."""
    return (int(space.n),) if isinstance(space, gym.spaces.Discrete) else tuple(space.shape)


# ----------------------------------------------------------------- optimisation


class Optimizer:
    """Adam with gradient clipping and an fp16 grad scaler; ``step(loss)`` does it all.

    Gradients are computed only for this optimiser's parameters
    (``backward(inputs=...)``), so the actor loss does not pay for world-model
    weight gradients it would throw away.
    """

    def __init__(self, name, params, lr, eps, clip, weight_decay, precision):
        self.name = name
        self.params = [p for p in params if p.requires_grad]
        kwargs = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.opt = torch.optim.AdamW(self.params, fused=fused, **kwargs) if weight_decay else \
            torch.optim.Adam(self.params, fused=fused, **kwargs)
        self.clip = clip
        self.scaler = torch.amp.GradScaler(enabled=precision == 16)

    def step(self, loss, retain_graph=False):
        """``backward`` then ``apply``: one update of this optimiser's parameters on ``loss``."""
        self.backward(loss, retain_graph)
        return self.apply(loss)

    def backward(self, loss, retain_graph=False):
        """This optimiser's gradients of ``loss``. Call it for every optimiser whose loss shares
        a graph before any of them applies: an update changes weights that graph saved."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward(inputs=self.params, retain_graph=retain_graph)

    def apply(self, loss):
        """Clip and apply the gradients of ``backward``. A non-finite loss or gradient norm skips
        the update (parameters and Adam state stay as they were; fp16 still lowers its loss
        scale) and sets ``<name>_nonfinite`` to 1."""
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        if finite:
            self.scaler.step(self.opt)
        self.scaler.update()
        return {f"{self.name}_loss": loss.detach(), f"{self.name}_grad_norm": norm.detach(),
                f"{self.name}_nonfinite": float(not finite)}

    def state_dict(self):
        return {"opt": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])
        self.scaler.load_state_dict(state["scaler"])


def autocast(precision, device):
    """Mixed-precision context: bf16 (CPU and GPU), fp16 (GPU) or a no-op for 32."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == 16:
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------- probes


def probe_accuracy(features, iterations=300, seed=0):
    """How well a linear classifier tells tasks apart from features (docs/design.md#llcd-logs).

    ``features``: {task: (n, D) array in time order}. A multinomial logistic regression
    is fitted on the first half of every task's rows and scored on the second half (a
    time split: neighbouring steps are near-duplicates, a random split would leak).
    Returns held-out accuracy in [0, 1]; chance is 1 / number of tasks.
    """
    halves = [(np.asarray(x, np.float32)[: len(x) // 2], np.asarray(x, np.float32)[len(x) // 2:])
              for x in features.values()]
    train_x = torch.as_tensor(np.concatenate([a for a, _ in halves]))
    test_x = torch.as_tensor(np.concatenate([b for _, b in halves]))
    train_y = torch.cat([torch.full((len(a),), k) for k, (a, _) in enumerate(halves)])
    test_y = torch.cat([torch.full((len(b),), k) for k, (_, b) in enumerate(halves)])
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(train_x.shape[1], len(halves))
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe((train_x - mean) / std), train_y)
        loss = loss + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((probe((test_x - mean) / std).argmax(-1) == test_y).float().mean())


# ----------------------------------------------------------------- seeding


def set_seed(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
