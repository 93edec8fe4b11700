"""The fast paths keep the math: a short training run with bf16 autocast, with
``compile: True``, or with the hand-written backward passes of the heads and latents
replaced by plain autograd gives the same losses as the default fp32 run, within
stated tolerances.

Each run starts from the same weights and RNG state and trains on the same
batches. Tolerances:
- hand-written backward passes (``networks.SoftmaxMean``, ``TwoHotCrossEntropy``,
  ``SmallSoftmax``; debug's 4-class latents take the SmallSoftmax path) vs plain
  autograd of the same formulas: float32 round-off only, so after 4 updates the
  losses agree to 1e-4 relative.
- compile (fp32): kernels are fused and reductions reordered, so results match
  fp32 to float32 round-off; after 4 updates the losses agree to 1e-3 relative.
- bf16 autocast: matmul inputs are rounded to 8 mantissa bits (relative error
  ~4e-3 per product), so losses agree to 5% relative over 4 updates, while
  the parts kept in fp32 (two-hot, KL, normalisers) stay finite.
"""

import ctypes
import os
import platform
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dreamer  # noqa: E402
import networks  # noqa: E402
import tools  # noqa: E402
from test_models import ACTION_DIM, OBS_DIM, random_batch  # noqa: E402

LOSSES = ("model_loss", "state_loss", "reward_loss", "dyn_loss", "actor_loss", "critic_loss")
UPDATES = 4


def build(*extra):
    config = tools.load_config(["--configs", "debug", *extra])
    config.device = "cpu"
    obs = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)})
    act = gym.spaces.Box(-1, 1, (ACTION_DIM,), np.float32)
    torch.manual_seed(0)
    return dreamer.Dreamer(obs, act, config), config


def train_losses(*extra):
    """Losses of UPDATES updates from seed 0 on fixed batches: {name: [per update]}."""
    return train_losses_with(build(*extra)[0])


def train_losses_with(agent, keys=LOSSES):
    config = agent.config
    torch.manual_seed(1)
    history = {key: [] for key in keys}
    for index in range(UPDATES):
        metrics = agent.train_step(random_batch(config, seed=index))
        for key in keys:
            history[key].append(float(metrics[key]))
    return history


def assert_close(fast, reference, rel, keys=LOSSES):
    for key in keys:
        np.testing.assert_allclose(fast[key], reference[key], rtol=rel, atol=rel, err_msg=key)


@pytest.fixture(scope="module")
def fp32():
    return train_losses()


def test_bf16_autocast_matches_fp32(fp32):
    bf16 = train_losses("--precision", "bf16")
    assert all(np.isfinite(bf16[key]).all() for key in LOSSES)
    assert_close(bf16, fp32, rel=5e-2)
    assert bf16["model_loss"] != fp32["model_loss"]  # autocast really ran in bf16


def plain_softmax_mean(logits, bins):
    return torch.softmax(logits, -1) @ bins


def plain_two_hot_cross_entropy(logits, index, weight):
    return -(weight * torch.gather(torch.log_softmax(logits, -1), -1, index)).sum(-1)


GRAD_NORMS = ("model_grad_norm", "actor_grad_norm", "critic_grad_norm")


def test_hand_written_backward_passes_match_plain_autograd(monkeypatch):
    """Heads not zero-initialised (outscale 1), so that the actor's gradient through the reward
    and value means is not zero, and gradient norms compared too."""
    flags = ("--critic.outscale", "1.0", "--reward_head.outscale", "1.0")
    fast = train_losses_with(build(*flags)[0], LOSSES + GRAD_NORMS)
    monkeypatch.setattr(networks.SoftmaxMean, "apply", plain_softmax_mean)
    monkeypatch.setattr(networks.TwoHotCrossEntropy, "apply", plain_two_hot_cross_entropy)
    monkeypatch.setattr(networks, "softmax", lambda logits: torch.softmax(logits, -1))
    plain = train_losses_with(build(*flags)[0], LOSSES + GRAD_NORMS)
    assert_close(fast, plain, rel=1e-4, keys=LOSSES + GRAD_NORMS)


def test_compiled_update_matches_fp32(fp32):
    if not tools.compile_available():
        pytest.skip("torch.compile is unavailable on this machine (the run falls back to eager)")
    assert_close(train_losses("--compile", "True"), fp32, rel=1e-3)


def test_compile_falls_back_to_eager_when_unavailable(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    agent, _ = build("--compile", "True")
    assert "running eager" in capsys.readouterr().err
    bodies = [module.body for module in agent.modules() if isinstance(module, networks.MLP)]
    assert bodies and all(body._compiled_call_impl is None for body in bodies)
    train_losses_with(agent)  # and it trains


def test_compile_compiles_every_mlp_body_and_the_rssm_step():
    if not tools.compile_available():
        pytest.skip("torch.compile is unavailable on this machine")
    agent, _ = build("--compile", "True")
    bodies = [module.body for module in agent.modules() if isinstance(module, networks.MLP)]
    assert bodies and all(body._compiled_call_impl is not None for body in bodies)
    assert agent.wm.dynamics.recur is not networks.RSSM.recur.__get__(agent.wm.dynamics)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_keeps_a_freed_large_tensor_in_the_heap():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    assert tools.keep_freed_memory()
    size = 64 * 2**20
    torch.ones(size // 4)  # 64 MB of float32, touched and freed at once
    # by default glibc would serve it with mmap and unmap it on free; now its pages stay
    # in the heap as free memory for the next activation of that size
    assert libc.mallinfo2().fordblks >= size
