"""How fast the agent runs, measured: one command, one table.

    python bench.py                                  # dmc_proprio, small, atari100k, dmc_vision; fp32, bf16; CPU (+ GPU)
    python bench.py --sizes small --precisions 32 --updates 5
    python bench.py --compile                        # also time updates with compile: True
    python bench.py --sizes small --padding --skip act env pixel-update   # what the 256-output heads buy here
    python bench.py --sizes small --floor --skip act env pixel-update     # what bounds the update from below
    python bench.py --default-malloc                 # without keeping freed memory (see below)
    python bench.py --skip update act --envs 2       # env steps/s of every suite only
    python bench.py --skip update act env --pixel-sizes atari100k --updates 1   # one pixel block's update

Rows:
- ``update``: one gradient update (``Dreamer.train_step``: world model and
  actor-critic) on a 16x64 batch of walker-sized proprio data (24 obs dims,
  6 action dims). ``GFLOP`` is counted by torch's FlopCounterMode on one
  update; ``s`` is the median over ``--updates`` timed updates after
  ``--warmup``; ``GFLOP/s`` = GFLOP / s; ``peak`` is the best GFLOP/s of up
  to ten 2048^3 matmuls (~5 s of them at most) of the same dtype on the
  same device, measured now, and ``%peak`` = GFLOP/s / peak.
- ``pixel update``: the same for each of ``--pixel-sizes`` (the pixel blocks
  ``atari100k``, ``crafter``, ``memorymaze``, ``dmc_vision``, at their paper
  sizes) on 16x64 batches of 64x64x3 uint8 images with the suite's actions:
  one-hots of 6 (the minimal action set of Pong, the atari100k block's task),
  17 (Crafter), 6 (Memory Maze), or 6
  continuous (dmc_vision, walker). By default atari100k and dmc_vision (size
  S); the XL blocks (Crafter, Memory Maze) take minutes per update on a CPU and
  run only when named: ``--updates`` and ``--warmup`` bound the updates of a row
  (one more counts its FLOPs), and each row prints when it is done.
- ``update 255 out`` / ``update 256 out`` (``--padding``): the update with the two-hot heads'
  output layers unpadded and padded to 256 outputs (the default, ``networks.padded_linear``),
  alternating update by update on one agent; the padding pays where a 255-wide matmul is
  slower than a 256-wide one (AVX2 CPUs), so this shows what it buys on this machine.
- ``matmuls alone`` / ``floor`` (``--floor``): the update's matmuls (mm, addmm, bmm,
  baddbmm: the ops FlopCounterMode counts here) recorded during one update and replayed alone
  at the same shapes, strides and dtypes, alternating with whole updates (medians of
  ``--updates`` each): what the update would take if everything else were free. ``floor``
  adds two lower bounds: the matmul FLOPs at the measured ``peak``, and the update's
  exp-type elements (exp, softmax, logsumexp, SiLU and its backward, sigmoid, tanh, log) at
  the per-element time of ``torch.exp`` on 4M elements, measured now. An update cannot be
  made faster than that floor without changing its math.
- ``act``: latency of one policy step (encoder, posterior step, actor) for
  one env, median over ``--act-steps`` steps; with and without LLCD (which
  adds the context step and the surprise score).
- ``env``: env steps/s of each of ``--env-tasks`` (one per suite: DMC, Atari,
  Crafter, Memory Maze, with its paper block's settings, e.g. Atari's action
  repeat 4) under random actions with 1 env and ``--envs`` envs in parallel
  processes (``parallel: True``, wrappers.Parallel), counted in env steps (agent
  steps x action_repeat) over ``--env-seconds`` of stepping, resets included.
- ``pixels``: env steps/s of each of ``--pixel-tasks`` (DMC) from 64x64 pixels,
  1 env, with MuJoCo's default offscreen rendering (shadow map, 4x multisampling)
  and with ``fast_render`` (neither; ``envs.dmc.configure_fast_render``).

Like ``dreamer.py`` on CPU, the benchmark first calls ``tools.keep_freed_memory``
(glibc keeps freed pages instead of unmapping them); ``--default-malloc``
measures without it.
"""

import argparse
import functools
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import dreamer
import networks
import tools
from envs import atari

OBS_DIM, ACTION_DIM = 24, 6
# (observation space, action space) of the update rows: walker proprio, and for the pixel rows
# 64x64 colour images with each block's actions (Atari: the action set of the atari100k block's
# task as its env offers it, ALE's minimal set of Pong: 6; Crafter's, Memory Maze's; dmc_vision:
# walker's joints).
PROPRIO = (gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)}),
           gym.spaces.Box(-1, 1, (ACTION_DIM,), np.float32))
IMAGE = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})


def atari_actions(block):
    """The action count of the Atari env of config ``block`` (its task and ``atari`` settings)."""
    config = tools.load_config(["--configs", block])
    return atari.action_count(config.task.removeprefix("atari_"), config.atari["full_action_space"])


PIXEL_SPACES = {"atari100k": (IMAGE, gym.spaces.Discrete(atari_actions("atari100k"))),
                "crafter": (IMAGE, gym.spaces.Discrete(17)), "memorymaze": (IMAGE, gym.spaces.Discrete(6)),
                "dmc_vision": (IMAGE, PROPRIO[1])}


def fake_batch(spaces, batch, length, rng):
    """A replay batch of ``batch`` x ``length`` random steps of ``spaces`` (observation, action)."""
    obs_space, act_space = spaces
    shape = (batch, length)
    return {
        **{key: fake_values(space, shape, rng) for key, space in obs_space.spaces.items()},
        "action": fake_actions(act_space, shape, rng),
        "reward": rng.uniform(0, 1, size=shape).astype(np.float32),
        "is_first": np.eye(1, length, dtype=bool).repeat(batch, 0),
        "is_terminal": np.zeros(shape, dtype=bool),
    }


def fake_values(space, shape, rng):
    """Random observations of a Box ``space``: (*shape, *space.shape), uint8 pixels or normal floats."""
    if space.dtype == np.uint8:
        return rng.integers(0, 256, size=(*shape, *space.shape), dtype=np.uint8)
    return rng.normal(size=(*shape, *space.shape)).astype(np.float32)


def fake_actions(space, shape, rng):
    """Uniform actions (*shape, A): one-hots of a Discrete ``space``, values in [-1, 1] of a Box."""
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[rng.integers(space.n, size=shape)]
    return rng.uniform(-1, 1, size=(*shape, *space.shape)).astype(np.float32)


def build_agent(blocks, precision, device, batch=16, length=64, extra=(), spaces=PROPRIO):
    """An agent of the config ``blocks`` (a list; 'defaults' adds nothing) for ``spaces``."""
    names = [block for block in blocks if block != "defaults"]
    args = ["--configs", *names] if names else []
    config = tools.load_config(args + ["--precision", str(precision), "--device", device,
                                       "--batch_size", str(batch), "--batch_length", str(length), *extra])
    config.device = tools.resolve_device(config.device)
    return dreamer.Dreamer(*spaces, config).to(config.device), config


def update_setup(blocks, spaces, precision, device, batch, length, extra=()):
    """The agent of an update row and its fake replay batch of ``spaces``."""
    agent, config = build_agent(blocks, precision, device, batch, length, extra, spaces)
    return agent, fake_batch(spaces, config.batch_size, config.batch_length, np.random.default_rng(0))


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, device):
    """Wall time of one ``step()``, device work included."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def median_seconds(step, device, repeats, warmup):
    """Median wall time of ``step()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        timed(step, device)
    return statistics.median(timed(step, device) for _ in range(repeats))


def alternating_medians(steps, device, args):
    """Median seconds of each of ``steps`` {name: step()}, timed in turn (the order swapped each
    round) so that all see the same machine state: ``--updates`` rounds after ``--warmup``."""
    times = {name: [] for name in steps}
    for index in range(args.warmup + args.updates):
        for name in sorted(steps, reverse=bool(index % 2)):
            seconds = timed(steps[name], device)
            if index >= args.warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def update_flops(agent, batch):
    counter = FlopCounterMode(display=False)
    with counter:
        agent.train_step(batch)
    return counter.get_total_flops()


@functools.cache
def matmul_peak(device, precision):
    """Best GFLOP/s of 2048^3 matmuls in the dtype that autocast gives ``precision``."""
    dtype = {32: torch.float32, 16: torch.float16, "bf16": torch.bfloat16}[precision]
    size = 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    timed(lambda: a @ b, device)  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < 10 and (len(times) < 2 or time.perf_counter() - start < 5.0):
        times.append(timed(lambda: a @ b, device))
    return 2 * size ** 3 / min(times) / 1e9


def bench_update(size, precision, device, compiled, args, spaces=PROPRIO, label="update"):
    extra = ["--compile", "True"] if compiled else []
    agent, batch = update_setup([size], spaces, precision, device, args.batch, args.length, extra)
    flops = update_flops(agent, batch) / 1e9
    seconds = median_seconds(lambda: agent.train_step(batch), device, args.updates, args.warmup)
    peak = matmul_peak(device, precision)
    label = f"{label}{' compiled' if compiled else ''}"
    return (f"{label:<17} {size:<12} {device:<5} {str(precision):<5} {flops:>8.1f} {seconds:>8.3f} "
            f"{flops / seconds:>8.1f} {peak:>8.1f} {100 * flops / seconds / peak:>6.1f}%")


def bench_padding(size, precision, device, args):
    """Rows ``update 255 out`` / ``update 256 out``: one agent's update with the two-hot heads'
    output layers as they are (255 bins) and padded to 256 (``networks.padded_linear``, the
    default), timed by ``alternating_medians``, and their ratio."""
    agent, batch = update_setup([size], PROPRIO, precision, device, args.batch, args.length)
    padded = networks.padded_linear

    def update_with(heads):
        def step():
            networks.padded_linear = heads
            agent.train_step(batch)
        return step

    try:
        medians = alternating_medians({"255 out": update_with(lambda x, layer: layer(x)),
                                       "256 out": update_with(padded)}, device, args)
    finally:
        networks.padded_linear = padded
    ratio = medians["255 out"] / medians["256 out"]
    return [f"{'update ' + name:<17} {size:<12} {device:<5} {str(precision):<5} {'':>8} {seconds:>8.3f}"
            + (f"   time 255 out / 256 out: {ratio:.3f}" if name == "256 out" else "")
            for name, seconds in medians.items()]


aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
EXP_TYPE = {aten.exp.default, aten.exp_.default, aten._softmax.default, aten._log_softmax.default,
            aten.logsumexp.default, aten.silu.default, aten.silu_backward.default, aten.sigmoid.default,
            aten.tanh.default, aten.log.default, aten.log1p.default, aten.expm1.default}


class UpdateOps(TorchDispatchMode):
    """Records the matmuls that run under it (op, argument layouts, keywords) and counts the
    input elements of its exp-type ops."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.exp_elements = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            self.matmuls.append((func, [(a.shape, a.stride(), a.dtype, a.device) for a in args], kwargs))
        elif func in EXP_TYPE:
            self.exp_elements += args[0].numel()
        return func(*args, **kwargs)


def matmul_flops(layouts):
    """FLOPs of one recorded matmul: 2 * (batch) * m * k * n of its last two operands."""
    (*batch, m, k), n = layouts[-2][0], layouts[-1][0][-1]
    return 2 * int(np.prod(batch, dtype=np.int64)) * m * k * n


def random_like_layout(shape, stride, dtype, device):
    """A random tensor of this shape and stride (a 0 stride: an expanded operand)."""
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride))
    return torch.randn(extent, device=device).to(dtype).as_strided(shape, stride)


def replay(matmuls):
    """A step that runs the recorded matmuls again on fresh random tensors of their layouts."""
    calls = [(func, [random_like_layout(*layout) for layout in layouts], kwargs) for func, layouts, kwargs in matmuls]
    return lambda: [func(*tensors, **kwargs) for func, tensors, kwargs in calls]


def exp_seconds_per_element(device):
    """Best time per element of an in-place ``exp_`` over 4M fp32 values in [-5, 5]."""
    values = torch.empty(1 << 22, device=device).uniform_(-5, 5)
    return min(timed(values.exp_, device) for _ in range(20)) / values.numel()


def bench_floor(size, precision, device, args):
    """Rows ``matmuls alone`` and ``floor`` (see the module docstring)."""
    agent, batch = update_setup([size], PROPRIO, precision, device, args.batch, args.length)
    agent.train_step(batch)  # warm: the first update builds optimiser state
    ops = UpdateOps()
    with ops:
        agent.train_step(batch)
    medians = alternating_medians({"update": lambda: agent.train_step(batch), "matmuls": replay(ops.matmuls)},
                                  device, args)
    update, matmuls = medians["update"], medians["matmuls"]
    gflop = sum(matmul_flops(layouts) for _, layouts, _ in ops.matmuls) / 1e9
    peak = matmul_peak(device, precision)
    at_peak, exp_floor = gflop / peak, ops.exp_elements * exp_seconds_per_element(device)
    head = f"{size:<12} {device:<5} {str(precision):<5}"
    return [f"{'update':<17} {head} {'':>8} {update:>8.3f}",
            f"{'matmuls alone':<17} {head} {gflop:>8.1f} {matmuls:>8.3f} {gflop / matmuls:>8.1f} {peak:>8.1f} "
            f"{100 * gflop / matmuls / peak:>6.1f}%   {len(ops.matmuls)} calls, {100 * matmuls / update:.0f}% "
            f"of the update",
            f"{'floor':<17} {head} {'':>8} {at_peak + exp_floor:>8.3f}   matmuls at peak {at_peak:.3f} s + "
            f"{ops.exp_elements / 1e6:.1f}M exp-type elements at exp's {exp_floor / ops.exp_elements * 1e9:.2f} "
            f"ns: {exp_floor:.3f} s; update / floor {update / (at_peak + exp_floor):.1f}x"]


def bench_act(size, precision, device, llcd, args):
    agent, config = build_agent([size], precision, device, extra=["--llcd", str(llcd)])
    rng = np.random.default_rng(0)
    state = {"value": None}

    def step():
        obs = {"state": rng.normal(size=(1, OBS_DIM)).astype(np.float32), "is_first": np.array([False])}
        _, state["value"] = agent.policy(obs, state["value"], "train")

    seconds = median_seconds(step, device, args.act_steps, warmup=5)
    return f"{'act llcd=' + str(llcd):<17} {size:<12} {device:<5} {str(precision):<5} {'':>8} {seconds * 1e3:>7.2f}ms"


# The config block whose env settings a suite's env row uses (DMC: the defaults).
SUITE_BLOCKS = {"atari": ["atari100k"], "crafter": ["crafter"], "memorymaze": ["memorymaze"]}


def bench_env(task, count, args, extra=(), label=""):
    blocks = SUITE_BLOCKS.get(task.split("_", 1)[0], [])
    config = tools.load_config(["--configs", *blocks, "--task", task, "--envs", str(count),
                                "--parallel", str(count > 1), *extra])
    envs = dreamer.make_envs(config, "train", count)
    try:
        for env in envs:
            env.reset()()
        action_space = envs[0].action_space
        rounds, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.env_seconds:
            promises = [env.step(action_space.sample()) for env in envs]
            for env, promise in zip(envs, promises):
                if promise()[2]:
                    env.reset()()
            rounds += 1
        rate = rounds * count * config.action_repeat / (time.perf_counter() - start)
    finally:
        dreamer.close_envs(envs)
    label = label or f"env {count}{' parallel' if count > 1 else ''}"
    return f"{label:<17} {task:<16} {'cpu':<5} {'':<5} {'':>8} {rate:>8.0f} env steps/s"


def skipped(size, precision, device, args):
    """Print a 'skipped' row and return True for bf16 on a CPU without native bf16 (unless ``--all``)."""
    warning = tools.precision_warning(precision, device)
    if not warning or args.all:
        return False
    print(f"{'skipped':<17} {size:<12} {device:<5} {precision:<5} "
          f"{warning.removeprefix('warning: ')}; --all runs it anyway", flush=True)
    return True


def print_updates(size, precision, device, args, spaces=PROPRIO, label="update"):
    """The update rows of one size: eager, and with ``--compile`` compiled too, each printed when done."""
    for compiled in [False, True] if args.compile else [False]:
        print(bench_update(size, precision, device, compiled, args, spaces, label), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["dmc_proprio", "small"])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16"])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time updates with compile: True")
    parser.add_argument("--act-steps", type=int, default=200)
    parser.add_argument("--env-tasks", nargs="+",
                        default=["dmc_walker_walk", "atari_pong", "crafter_reward", "memorymaze_9x9"])
    parser.add_argument("--pixel-tasks", nargs="+", default=["dmc_walker_walk", "dmc_cartpole_swingup"],
                        help="DMC tasks timed from 64x64 pixels, with the default and the fast renderer")
    parser.add_argument("--env-seconds", type=float, default=10.0, help="stepping time per env measurement")
    parser.add_argument("--envs", type=int, default=4, help="parallel envs of the second env row")
    parser.add_argument("--pixel-sizes", nargs="+", default=["atari100k", "dmc_vision"], choices=list(PIXEL_SPACES),
                        help="blocks timed on 64x64 pixel batches with their suite's actions (crafter and "
                             "memorymaze, size XL, take minutes per update on a CPU: name them to time them)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["update", "pixel-update", "act", "env"])
    parser.add_argument("--padding", action="store_true",
                        help="also time the update with the two-hot heads' 255 outputs unpadded vs padded to 256")
    parser.add_argument("--floor", action="store_true",
                        help="also time the update's matmuls alone and print the floor below which it cannot go")
    parser.add_argument("--all", action="store_true", help="also run bf16 on CPUs without native bf16")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as is (dreamer.py keeps freed memory on CPU)")
    args = parser.parse_args()
    kept = not args.default_malloc and tools.keep_freed_memory()
    precisions = [int(p) if p.isdigit() else p for p in args.precisions]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"native CPU bf16: {tools.cpu_has_native_bf16()}, batch {args.batch}x{args.length}, "
          f"freed memory kept: {kept}")
    print(f"{'row':<17} {'size':<12} {'dev':<5} {'prec':<5} {'GFLOP':>8} {'s':>8} {'GFLOP/s':>8} {'peak':>8} {'%peak':>7}")
    for device in args.devices:
        for size in args.sizes:
            for precision in precisions:
                if skipped(size, precision, device, args):
                    continue
                if "update" not in args.skip:
                    print_updates(size, precision, device, args)
                if args.padding:
                    print("\n".join(bench_padding(size, precision, device, args)), flush=True)
                if args.floor:
                    print("\n".join(bench_floor(size, precision, device, args)), flush=True)
                if "act" not in args.skip:
                    for llcd in (False, True):
                        print(bench_act(size, precision, device, llcd, args), flush=True)
        for block in args.pixel_sizes if "pixel-update" not in args.skip else []:
            for precision in precisions:
                if not skipped(block, precision, device, args):
                    print_updates(block, precision, device, args, PIXEL_SPACES[block], "pixel update")
    if "env" not in args.skip:
        for task in args.env_tasks:
            for count in (1, args.envs):
                print(bench_env(task, count, args), flush=True)
        for task in args.pixel_tasks:
            for fast in (False, True):
                extra = ["--pixels", "True", "--fast_render", str(fast)]
                print(bench_env(task, 1, args, extra, f"pixels {'fast' if fast else 'default'}"), flush=True)


if __name__ == "__main__":
    main()
