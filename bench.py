"""Seconds per gradient update (world model + actor-critic) at given model sizes.

    python bench.py                               # dmc_proprio and small, fp32 and bf16, CPU (+GPU if present)
    python bench.py --sizes small --precisions bf16 --updates 20

An update is one ``Dreamer.train_step`` on a replay batch of
``batch_size`` x ``batch_length`` (16 x 64 unless --batch/--length say
otherwise) of walker-sized proprio data (24 obs dims, 6 action dims).
Timing excludes ``--warmup`` updates and takes the median over ``--updates``.
"""

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

import tools
from dreamer import Dreamer

OBS_DIM, ACTION_DIM = 24, 6


def fake_batch(batch, length, rng):
    """A replay batch shaped like walker proprio data."""
    return {
        "state": rng.normal(size=(batch, length, OBS_DIM)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(batch, length, ACTION_DIM)).astype(np.float32),
        "reward": rng.uniform(0, 1, size=(batch, length)).astype(np.float32),
        "is_first": np.eye(1, length, dtype=bool).repeat(batch, 0),
        "is_terminal": np.zeros((batch, length), dtype=bool),
    }


def build_agent(block, precision, device, batch, length):
    args = ["--configs", block] if block != "defaults" else []
    config = tools.load_config(args + ["--precision", str(precision), "--device", device,
                                       "--batch_size", str(batch), "--batch_length", str(length)])
    config.device = tools.resolve_device(config.device)
    obs_space = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)})
    act_space = gym.spaces.Box(-1, 1, (ACTION_DIM,), np.float32)
    return Dreamer(obs_space, act_space, config).to(config.device), config


def time_updates(agent, config, updates, warmup):
    rng = np.random.default_rng(0)
    batch = fake_batch(config.batch_size, config.batch_length, rng)
    times = []
    for index in range(warmup + updates):
        sync(config.device)
        start = time.perf_counter()
        agent.train_step(batch)
        sync(config.device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["dmc_proprio", "small"])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16"])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch}x{args.length}")
    print(f"{'size':<12} {'device':<6} {'precision':<9} {'params (M)':>10} {'s/update':>9} {'updates/s':>9}")
    for device in args.devices:
        for size in args.sizes:
            for precision in args.precisions:
                precision = int(precision) if precision.isdigit() else precision
                agent, config = build_agent(size, precision, device, args.batch, args.length)
                params = sum(p.numel() for p in agent.parameters()) / 1e6
                seconds = time_updates(agent, config, args.updates, args.warmup)
                print(f"{size:<12} {device:<6} {str(precision):<9} {params:>10.2f} {seconds:>9.3f} {1 / seconds:>9.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
