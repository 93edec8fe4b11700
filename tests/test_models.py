"""Tests for models.py: λ-returns, world-model and actor-critic updates, return scale."""

import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import networks  # noqa: E402
import tools  # noqa: E402

OBS_DIM, ACTION_DIM = 5, 1


# ----------------------------------------------------------------- λ-returns


def test_lambda_return_hand_computed_h3():
    # one trajectory (N = 1) of H = 3 imagined steps
    r = [1.0, 2.0, 3.0]          # rewards for arriving at steps 1, 2, 3
    d = [0.9, 0.8, 0.5]          # discounts (γ·continue) of steps 1, 2, 3
    v = [10.0, 20.0, 30.0, 40.0]  # values of steps 0..3
    lam = 0.5
    reward = torch.tensor(r)[:, None]
    discount = torch.tensor(d)[:, None]
    value = torch.tensor(v)[:, None]
    returns = models.lambda_return(reward, discount=discount, value=value, lam=lam)
    # R_2 = r3 + d3 * v3 (bootstrap at the horizon)
    r2 = 3.0 + 0.5 * 40.0                                   # = 23
    # R_1 = r2 + d2 * ((1-λ) v2 + λ R_2)
    r1 = 2.0 + 0.8 * (0.5 * 30.0 + 0.5 * 23.0)               # = 23.2
    # R_0 = r1 + d1 * ((1-λ) v1 + λ R_1)
    r0 = 1.0 + 0.9 * (0.5 * 20.0 + 0.5 * 23.2)               # = 20.44
    assert returns.shape == (3, 1)
    assert returns[:, 0].tolist() == pytest.approx([r0, r1, r2], abs=1e-5)
    assert [r0, r1, r2] == pytest.approx([20.44, 23.2, 23.0])


def test_lambda_return_lambda_one_is_discounted_monte_carlo_with_bootstrap():
    reward = torch.tensor([[1.0, -1.0], [2.0, 0.5], [3.0, 4.0]])   # (H=3, N=2)
    discount = torch.tensor([[0.9, 1.0], [0.8, 0.5], [0.5, 0.25]])
    value = torch.tensor([[7.0, 7.0], [10.0, -3.0], [20.0, 6.0], [40.0, 8.0]])
    returns = models.lambda_return(reward, value, discount, 1.0)
    # first column: R_0 = r1 + d1 r2 + d1 d2 r3 + d1 d2 d3 v3
    col0 = [1.0 + 0.9 * 2.0 + 0.9 * 0.8 * 3.0 + 0.9 * 0.8 * 0.5 * 40.0,
            2.0 + 0.8 * 3.0 + 0.8 * 0.5 * 40.0,
            3.0 + 0.5 * 40.0]
    col1 = [-1.0 + 1.0 * 0.5 + 1.0 * 0.5 * 4.0 + 1.0 * 0.5 * 0.25 * 8.0,
            0.5 + 0.5 * 4.0 + 0.5 * 0.25 * 8.0,
            4.0 + 0.25 * 8.0]
    assert returns[:, 0].tolist() == pytest.approx(col0, abs=1e-5)
    assert returns[:, 1].tolist() == pytest.approx(col1, abs=1e-5)


def test_lambda_return_lambda_zero_is_one_step_td():
    reward = torch.tensor([[1.0], [2.0], [3.0], [-4.0]])
    discount = torch.tensor([[0.9], [0.8], [0.5], [0.0]])
    value = torch.tensor([[0.0], [10.0], [20.0], [40.0], [99.0]])
    returns = models.lambda_return(reward, value, discount, 0.0)
    expected = [1.0 + 0.9 * 10.0, 2.0 + 0.8 * 20.0, 3.0 + 0.5 * 40.0, -4.0 + 0.0 * 99.0]
    assert returns[:, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_lambda_return_value_zero_bootstrap_constant_reward():
    # constant reward 1 with discount γ and zero values, λ = 1: a truncated geometric series
    horizon, gamma = 15, 0.997
    reward = torch.ones(horizon, 1)
    discount = torch.full((horizon, 1), gamma)
    value = torch.zeros(horizon + 1, 1)
    returns = models.lambda_return(reward, value, discount, 1.0)
    expected = [(1 - gamma ** (horizon - t)) / (1 - gamma) for t in range(horizon)]
    assert returns[:, 0].tolist() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------- learners


def debug_config(*extra):
    config = tools.load_config(["--configs", "debug", *extra])
    config.device = "cpu"
    return config


def random_batch(config, seed=0, length=None):
    rng = np.random.default_rng(seed)
    batch, length = config.batch_size, length or config.batch_length
    is_first = np.zeros((batch, length), bool)
    is_first[:, 0] = True
    is_first[1, 7] = True  # an episode boundary inside a window
    action = rng.uniform(-1, 1, (batch, length, ACTION_DIM)).astype(np.float32)
    action[is_first] = 0.0
    terminal = np.zeros((batch, length), bool)
    terminal[2, -1] = True
    return {
        "state": rng.normal(size=(batch, length, OBS_DIM)).astype(np.float32),
        "action": action,
        "reward": rng.uniform(0, 1, (batch, length)).astype(np.float32),
        "discount": (1.0 - terminal).astype(np.float32),
        "is_first": is_first,
        "is_last": np.zeros((batch, length), bool),
        "is_terminal": terminal,
    }


def params_vector(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def make_learners(seed=0):
    torch.manual_seed(seed)
    config = debug_config()
    wm = models.WorldModel({"state": (OBS_DIM,)}, ACTION_DIM, config)
    behavior = models.ImagBehavior(config, wm, ACTION_DIM, discrete=False)
    return config, wm, behavior


def test_world_model_train_step_metrics_and_update():
    config, wm, _ = make_learners()
    data = wm.preprocess(random_batch(config))
    assert data["cont"].shape == (config.batch_size, config.batch_length)
    assert data["cont"][2, -1] == 0 and data["cont"][0, 0] == 1
    before = params_vector(wm)
    post, metrics = wm.train_step(data)
    for key in ("model_loss", "kl", "reward_loss", "cont_loss", "state_loss", "dyn_loss", "rep_loss"):
        assert key in metrics, key
        assert math.isfinite(float(metrics[key])), (key, metrics[key])
    # loss terms: free bits clamp KL terms at kl_free; NLL terms of random data are positive
    assert float(metrics["dyn_loss"]) >= config.kl_free - 1e-6
    assert float(metrics["rep_loss"]) >= config.kl_free - 1e-6
    assert float(metrics["kl"]) >= 0
    expected_total = (float(metrics["state_loss"]) + float(metrics["reward_loss"]) + float(metrics["cont_loss"])
                      + config.dyn_scale * float(metrics["dyn_loss"]) + config.rep_scale * float(metrics["rep_loss"]))
    assert float(metrics["model_loss"]) == pytest.approx(expected_total, rel=1e-5)
    after = params_vector(wm)
    assert not torch.equal(before, after)
    assert torch.isfinite(after).all()
    b, t = config.batch_size, config.batch_length
    assert post["deter"].shape == (b, t, config.dyn_deter)
    assert post["stoch"].shape == (b, t, config.dyn_stoch, config.dyn_discrete)


def test_world_model_loss_decreases_on_a_fixed_batch():
    config, wm, _ = make_learners(1)
    data = wm.preprocess(random_batch(config, seed=1))
    first = float(wm.train_step(data)[1]["model_loss"])
    for _ in range(15):
        last = float(wm.train_step(data)[1]["model_loss"])
    assert last < first


def test_imag_behavior_train_step_updates_actor_critic_and_slow_critic():
    config, wm, behavior = make_learners(2)
    data = wm.preprocess(random_batch(config, seed=2))
    post, _ = wm.train_step(data)
    start = models.imagination_starts(post, data)

    def objective(states, feat, actions):
        assert states["deter"].shape[0] == config.imag_horizon + 1 and actions.shape[0] == config.imag_horizon
        assert torch.equal(feat, wm.dynamics.feat(states))
        return wm.reward(feat).mode()[1:]

    actor_before = params_vector(behavior.actor)
    slow_before = [p.detach().clone() for p in behavior.slow_critic.parameters()]
    critic_before = params_vector(behavior.critic)
    assert torch.equal(critic_before, params_vector(behavior.slow_critic))
    wm_before = params_vector(wm)
    metrics = behavior.train_step(start, objective)
    for key in ("actor_loss", "critic_loss"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert not torch.equal(actor_before, params_vector(behavior.actor))
    critic_after = params_vector(behavior.critic)
    assert not torch.equal(critic_before, critic_after)
    # the actor-critic update leaves the world model alone
    assert torch.equal(wm_before, params_vector(wm))
    # slow critic: one EMA step of fraction f toward the updated critic
    frac = config.critic.slow_target_fraction
    for old, new, fast in zip(slow_before, behavior.slow_critic.parameters(), behavior.critic.parameters()):
        assert torch.allclose(new, old + frac * (fast.detach() - old), atol=1e-7)
    slow_after = params_vector(behavior.slow_critic)
    assert not torch.equal(slow_after, critic_before)
    assert (slow_after - critic_after).norm() < (critic_before - critic_after).norm()
    assert not any(p.requires_grad for p in behavior.slow_critic.parameters())
    assert int(behavior.updates) == 1
    # the update counter is saved with the weights (as extra state) and restored
    _, _, fresh = make_learners(2)
    fresh.load_state_dict(behavior.state_dict())
    assert fresh.updates == 1


def test_slow_critic_tracks_critic_over_updates():
    config, wm, behavior = make_learners(3)
    data = wm.preprocess(random_batch(config, seed=3))
    post, _ = wm.train_step(data)
    start = models.imagination_starts(post, data)
    objective = lambda states, feat, actions: torch.ones(actions.shape[:2])  # noqa: E731
    behavior.train_step(start, objective)
    # freeze the critic afterwards: the slow copy must converge to it geometrically
    behavior.critic_opt.opt.param_groups[0]["lr"] = 0.0
    behavior.actor_opt.opt.param_groups[0]["lr"] = 0.0
    gap0 = (params_vector(behavior.slow_critic) - params_vector(behavior.critic)).norm()
    for _ in range(5):
        behavior.train_step(start, objective)
    gap5 = (params_vector(behavior.slow_critic) - params_vector(behavior.critic)).norm()
    frac = config.critic.slow_target_fraction
    assert float(gap5) == pytest.approx(float(gap0) * (1 - frac) ** 5, rel=1e-3)


# ----------------------------------------------------------------- return scale


def test_return_range_converges_to_percentiles_and_scale_at_least_one():
    config, _, behavior = make_learners(4)
    decay = config.return_norm_decay
    returns = torch.linspace(0.0, 100.0, 10001).reshape(-1, 1)  # P5 = 5, P95 = 95
    scale = behavior.update_return_scale(returns)
    # first EMA step from (0, 0): (1 - decay) * (5, 95)
    assert behavior.return_range.tolist() == pytest.approx([(1 - decay) * 5.0, (1 - decay) * 95.0], rel=1e-4)
    assert float(scale) == pytest.approx(1.0)  # 0.9 < 1 -> clamped
    for _ in range(1999):
        scale = behavior.update_return_scale(returns)
    factor = 1 - decay ** 2000
    assert behavior.return_range.tolist() == pytest.approx([5.0 * factor, 95.0 * factor], rel=1e-3)
    assert float(scale) == pytest.approx(90.0, rel=1e-3)
    # small spread: the scale never goes below 1
    _, _, fresh = make_learners(5)
    for _ in range(300):
        small = fresh.update_return_scale(torch.linspace(2.0, 2.5, 101).reshape(-1, 1))
    assert float(small) == 1.0
    assert fresh.return_range.tolist() == pytest.approx([2.025, 2.475], rel=0.1)


# ----------------------------------------------------------------- actor objective and imagination


def actor_grad_norm(gradient, monkeypatch, detach_log_prob=False):
    """Actor gradient norm of one update when the λ-returns carry no gradient and the
    entropy bonus is off, so what reaches the actor can only come through the baseline
    v(s_t) (or, with REINFORCE, through the log-probabilities)."""
    config, wm, behavior = make_learners(4)
    torch.nn.init.normal_(behavior.critic.head.weight)  # zero-initialised: v would not depend on s yet
    config.actor.entropy = 0.0
    config.imag_gradient = gradient
    data = wm.preprocess(random_batch(config, seed=4))
    post, _ = wm.train_step(data)
    start = models.imagination_starts(post, data)
    returns = models.lambda_return
    monkeypatch.setattr(models, "lambda_return", lambda *args: returns(*args).detach())
    if detach_log_prob:
        log_prob = networks.BoundedNormal.log_prob
        monkeypatch.setattr(networks.BoundedNormal, "log_prob", lambda self, x: log_prob(self, x).detach())
    metrics = behavior.train_step(start, lambda states, feat, actions: wm.reward(feat).mode()[1:])
    return float(metrics["actor_grad_norm"])


def test_dynamics_backprop_reaches_the_actor_through_the_baseline(monkeypatch):
    """-(R - v(s_t)): v(s_t) of imagined states depends on the actions that led there."""
    assert actor_grad_norm("dynamics", monkeypatch) > 0


def test_reinforce_keeps_the_baseline_out_of_the_gradient(monkeypatch):
    """log pi(a|s) * sg(R - v): without the log-prob path nothing is left."""
    assert actor_grad_norm("reinforce", monkeypatch, detach_log_prob=True) == 0


def imagination_setup(seed):
    config, wm, behavior = make_learners(seed)
    data = wm.preprocess(random_batch(config, seed=seed))
    post, _ = wm.train_step(data)
    return config, wm, behavior, models.imagination_starts(post, data)


def test_imagined_actions_reach_the_model_clipped_with_the_gradient_scaled(monkeypatch):
    """DreamerV3's bound a * sg(1 / max(1, |a|)): the model sees the clipped sample, and the
    gradient of what it sees with respect to the sample is 1 inside the bounds, 1 / |a| outside
    (a straight-through clip would pass 1 everywhere)."""
    config, wm, behavior, start = imagination_setup(5)
    samples, seen = [], []
    sample, img_step = networks.BoundedNormal.sample, wm.dynamics.img_step

    def record_sample(self):
        samples.append(sample(self))
        return samples[-1]

    def record_step(state, action):
        seen.append(action)
        return img_step(state, action)

    monkeypatch.setattr(networks.BoundedNormal, "sample", record_sample)
    monkeypatch.setattr(wm.dynamics, "img_step", record_step)
    states, actions, _, _, stats = behavior.imagine(start, config.imag_horizon)
    drawn, model_in = torch.stack(samples), torch.stack(seen)
    outside = drawn.detach().abs() > 1
    assert outside.any() and (~outside).any()  # the actor's Gaussian does leave the bounds
    torch.testing.assert_close(model_in, drawn.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(actions, model_in)
    grads = torch.stack(torch.autograd.grad(model_in.sum(), samples))
    assert torch.all(grads[~outside] == 1)
    torch.testing.assert_close(grads[outside] * drawn.detach().abs()[outside], torch.ones(int(outside.sum())))
    assert float(stats["actor_clip_fraction"]) == pytest.approx(float(outside.float().mean()))
    assert 0.1 <= float(stats["actor_std"]) <= 1.0  # between the actor's min_std and max_std


def test_bound_action_pushes_the_std_down_once_the_mean_saturates():
    """Mean 0.95, std 0.5, upstream gradient +1 on the bounded action: the std's gradient is
    E[eps * g(mu + sigma * eps)] with g = 1 inside the bounds and 1/|a| outside, a number
    below zero (about -0.13); a straight-through clip gives E[eps] = 0. Monte Carlo through
    autograd against quadrature of the definition."""
    from scipy import integrate, stats
    mu = torch.tensor(0.95, requires_grad=True)
    sigma = torch.tensor(0.5, requires_grad=True)
    eps = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    models.bound_action(mu + sigma * eps).mean().backward()
    slope = lambda a: 1.0 if abs(a) <= 1 else 1.0 / abs(a)  # noqa: E731
    expected, _ = integrate.quad(lambda e: e * slope(0.95 + 0.5 * e) * stats.norm.pdf(e), -12, 12, points=[-3.9, 0.1])
    assert expected < -0.1
    assert float(sigma.grad) == pytest.approx(expected, abs=0.01)
    assert float(mu.grad) == pytest.approx(integrate.quad(lambda e: slope(0.95 + 0.5 * e) * stats.norm.pdf(e),
                                                          -12, 12, points=[-3.9, 0.1])[0], abs=0.01)


def test_imagined_continuation_is_the_mode_without_gradient(monkeypatch):
    """The λ-return discounts with γ times the continue head's mode (0 or 1), as DreamerV3,
    so the actor cannot raise its return by raising the predicted continue probability."""
    config, wm, behavior, start = imagination_setup(6)
    torch.nn.init.normal_(wm.cont.head.weight, std=3.0)  # spread the continue probabilities
    seen = {}
    returns = models.lambda_return

    def record(reward, value, discount, lam):
        seen["discount"] = discount
        return returns(reward, value, discount, lam)

    monkeypatch.setattr(models, "lambda_return", record)
    behavior.losses(start, lambda states, feat, actions: wm.reward(feat).mode()[1:])
    discount = seen["discount"]
    assert not discount.requires_grad
    gamma = torch.tensor(config.discount, dtype=discount.dtype)
    assert torch.all((discount == 0) | (discount == gamma))
    assert (discount == 0).any() and (discount == gamma).any()


def test_imagination_from_terminal_start_states_has_no_weight():
    """Every start weighted by 1 - is_terminal: with all starts terminal both losses vanish;
    marking some starts terminal changes the losses only through them."""
    config, wm, behavior, start = imagination_setup(7)
    objective = lambda states, feat, actions: wm.reward(feat).mode()[1:]  # noqa: E731
    torch.manual_seed(0)
    actor_loss, critic_loss, _ = behavior.losses({**start, "cont": torch.zeros_like(start["cont"])}, objective)
    assert float(actor_loss.detach()) == 0 and float(critic_loss.detach()) == 0
    torch.manual_seed(0)
    alive, _, _ = behavior.losses(start, objective)
    assert float(alive.detach()) != 0


# ----------------------------------------------------------------- paper sizes

# DreamerV3 paper (arXiv 2301.04104v1), model-size table, column S.
PAPER_SIZE_S = {"gru_units": 512, "hidden_units": 512, "mlp_layers": 2, "cnn_multiplier": 32}


@pytest.mark.parametrize("block", ["dmc_proprio", "dmc_vision"])
def test_paper_blocks_build_the_paper_size_s(block):
    config = tools.load_config(["--configs", block])
    config.device = "cpu"
    shapes = {"image": (64, 64, 3)} if config.pixels else {"state": (24,)}  # walker
    wm = models.WorldModel(shapes, 6, config)
    behavior = models.ImagBehavior(config, wm, 6, discrete=False)
    assert wm.dynamics.deter == PAPER_SIZE_S["gru_units"]
    heads = [wm.reward, wm.cont, behavior.actor, behavior.critic]
    if not config.pixels:
        heads += [wm.encoder.mlp, wm.decoder.heads["state"]]
    for mlp in heads:
        linears = [layer for layer in mlp.body.modules() if isinstance(layer, torch.nn.Linear)]
        assert len(linears) == PAPER_SIZE_S["mlp_layers"]
        assert all(layer.out_features == PAPER_SIZE_S["hidden_units"] for layer in linears)
    assert config.encoder.cnn_depth == config.decoder.cnn_depth == PAPER_SIZE_S["cnn_multiplier"]
    assert config.dyn_hidden == PAPER_SIZE_S["hidden_units"]
