"""Tests for networks.py: symlog, two-hot, unimix categorical, KL balancing,
RSSM shapes and episode resets, bounded normal.

Expected values are derived by hand or recomputed here independently of the
code under test (dense formulas instead of the gather-based fast paths).
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import networks  # noqa: E402

BINS = torch.linspace(-20, 20, 255)


# ----------------------------------------------------------------- symlog


def test_symlog_symexp_round_trip_wide_range():
    x = torch.tensor([-1e6, -12345.5, -100.0, -1.0, -1e-3, 0.0, 1e-6, 0.5, 1.0, 3.0, 1e3, 1e6],
                     dtype=torch.float64)
    assert torch.allclose(networks.symexp(networks.symlog(x)), x, rtol=1e-10, atol=1e-12)
    y = torch.linspace(-14, 14, 57, dtype=torch.float64)
    assert torch.allclose(networks.symlog(networks.symexp(y)), y, rtol=1e-10, atol=1e-12)


def test_symlog_known_values():
    e = math.e
    x = torch.tensor([0.0, e - 1, -(e - 1), e ** 2 - 1, 1.0, -1e6], dtype=torch.float64)
    expected = torch.tensor([0.0, 1.0, -1.0, 2.0, math.log(2.0), -math.log(1e6 + 1)], dtype=torch.float64)
    assert torch.allclose(networks.symlog(x), expected, atol=1e-12)
    # odd and monotone
    grid = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    values = networks.symlog(grid)
    assert torch.all(values[1:] > values[:-1])
    assert torch.allclose(networks.symlog(-grid), -values)


# ----------------------------------------------------------------- two-hot


def test_two_hot_is_a_distribution_with_the_right_mean_on_two_neighbours():
    x = torch.tensor([-19.99, -7.3, -0.01, 0.0, 0.05, 1.234, 5.5, 19.9, 20.0, -20.0])
    target = networks.two_hot(x, BINS)  # (N, K)
    assert target.shape == (len(x), len(BINS))
    assert torch.all(target >= 0)
    assert torch.allclose(target.sum(-1), torch.ones(len(x)), atol=1e-6)
    assert torch.allclose(target @ BINS, x, atol=1e-4)
    for row, value in zip(target, x):
        nonzero = torch.nonzero(row > 0).flatten().tolist()
        assert 1 <= len(nonzero) <= 2
        # the support lies on the bins that bracket the value
        below = int(torch.searchsorted(BINS, value, right=True)) - 1
        allowed = {max(below, 0), min(below + 1, len(BINS) - 1)}
        assert set(nonzero) <= allowed, (value, nonzero, allowed)
        if len(nonzero) == 2:
            assert nonzero[1] == nonzero[0] + 1


def test_two_hot_weights_are_linear_interpolation():
    bins = torch.tensor([-1.0, 0.0, 2.0, 6.0])
    target = networks.two_hot(torch.tensor([0.5, 3.0, 2.0]), bins)
    expected = torch.tensor([[0.0, 0.75, 0.25, 0.0],   # 0.5 = 0.75*0 + 0.25*2
                             [0.0, 0.0, 0.75, 0.25],   # 3.0 = 0.75*2 + 0.25*6
                             [0.0, 0.0, 1.0, 0.0]])    # exactly on a bin
    assert torch.allclose(target, expected, atol=1e-6)


def test_two_hot_clips_outside_the_bin_range():
    target = networks.two_hot(torch.tensor([100.0, -100.0]), BINS)
    assert target[0, -1] == pytest.approx(1.0)
    assert target[1, 0] == pytest.approx(1.0)


def test_twohot_symlog_mode_recovers_value():
    values = torch.tensor([-3000.0, -12.5, -1.0, 0.0, 0.3, 1.0, 7.0, 250.0, 9999.0])
    logits = torch.log(networks.two_hot(networks.symlog(values), BINS) + 1e-12)
    mode = networks.TwoHotSymlog(logits, BINS).mode()
    assert mode.shape == values.shape
    assert torch.allclose(mode, values, rtol=1e-4, atol=1e-4)


def test_twohot_symlog_log_prob_matches_dense_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 255)
    values = torch.randn(3, 7) * 50
    values[0, 0], values[1, 1] = 0.0, 1e9  # exact bin, beyond the top bin
    dist = networks.TwoHotSymlog(logits, BINS)
    dense = (networks.two_hot(networks.symlog(values), BINS) * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(dist.log_prob(values), dense, atol=1e-5)
    # the likelihood is highest at the distribution's own two-hot
    peaked = torch.log(networks.two_hot(networks.symlog(torch.tensor([4.0])), BINS) + 1e-8)
    d = networks.TwoHotSymlog(peaked, BINS)
    assert d.log_prob(torch.tensor([4.0])) > d.log_prob(torch.tensor([40.0]))


def test_twohot_hand_written_backward_passes_match_finite_differences():
    """SoftmaxMean and TwoHotCrossEntropy replace autograd's backward with their own formulas:
    gradcheck compares them with numerical derivatives (float64)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 3, 255, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: networks.SoftmaxMean.apply(x, BINS.double()), (logits,))
    index = torch.randint(0, 255, (4, 3, 4))
    weight = torch.rand(4, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: networks.TwoHotCrossEntropy.apply(x, index, weight), (logits,))


def test_twohot_mean_and_mixed_cross_entropy_match_plain_formulas():
    torch.manual_seed(2)
    logits = torch.randn(5, 255, requires_grad=True)
    dist = networks.TwoHotSymlog(logits, BINS)
    assert torch.allclose(dist.mode(), networks.symexp(torch.softmax(logits, -1) @ BINS), rtol=1e-5)
    a, b = torch.randn(5) * 10, torch.randn(5)
    dense = (networks.two_hot(networks.symlog(a), BINS) + 0.5 * networks.two_hot(networks.symlog(b), BINS))
    plain = -(dense * torch.log_softmax(logits, -1)).sum(-1)
    mixed = dist.cross_entropy([a, b], [1.0, 0.5])
    assert torch.allclose(mixed, plain, atol=1e-5)
    grad_fast, = torch.autograd.grad(mixed.sum(), logits)
    grad_plain, = torch.autograd.grad(plain.sum(), logits)
    assert torch.allclose(grad_fast, grad_plain, atol=1e-6)


@pytest.mark.parametrize("classes", [8, 32])
def test_softmax_fast_path_matches_torch_and_its_gradient(classes):
    torch.manual_seed(3)
    logits = torch.randn(64, 8, classes, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(networks.softmax(logits), torch.softmax(logits, -1))
    assert torch.autograd.gradcheck(networks.SmallSoftmax.apply, (logits[:3].detach().requires_grad_(),))
    weights = torch.randn_like(logits)
    grad_fast, = torch.autograd.grad((networks.softmax(logits) * weights).sum(), logits)
    grad_plain, = torch.autograd.grad((torch.softmax(logits, -1) * weights).sum(), logits)
    assert torch.allclose(grad_fast, grad_plain)


# ----------------------------------------------------------------- unimix categorical


def test_unimix_probs_floor_and_normalisation():
    unimix, classes = 0.01, 8
    logits = torch.tensor([[50.0, -50.0, -50.0, -50.0, 0.0, 0.0, -80.0, 3.0]])
    dist = networks.OneHotCategorical(logits, unimix)
    assert torch.all(dist.probs >= unimix / classes - 1e-7)
    assert torch.allclose(dist.probs.sum(-1), torch.ones(1))
    expected = (1 - unimix) * torch.softmax(logits, -1) + unimix / classes
    assert torch.allclose(dist.probs, expected)


def test_unimix_samples_are_one_hot_with_straight_through_gradient():
    torch.manual_seed(1)
    logits = torch.randn(6, 4, 5, requires_grad=True)
    dist = networks.OneHotCategorical(logits, 0.01)
    sample = dist.sample()
    assert sample.shape == (6, 4, 5)
    values = sample.detach()  # straight-through: onehot + p - sg(p), exact up to rounding
    assert torch.allclose(values, values.round(), atol=1e-6)
    assert torch.all(values.round().sum(-1) == 1)
    weights = torch.randn(5)
    (sample * weights).sum().backward()
    assert logits.grad is not None
    assert logits.grad.abs().sum() > 0
    # the straight-through gradient is the gradient of the probabilities
    probe = logits.detach().clone().requires_grad_(True)
    probs = 0.99 * torch.softmax(probe, -1) + 0.01 / 5
    (probs * weights).sum().backward()
    assert torch.allclose(logits.grad, probe.grad, atol=1e-6)


def test_unimix_empirical_frequencies_match_probs():
    torch.manual_seed(123)
    n, unimix = 20000, 0.01
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, -3.0])
    dist = networks.OneHotCategorical(logits.expand(n, -1), unimix)
    counts = dist.sample().detach().round().sum(0)
    probs = (1 - unimix) * torch.softmax(logits, -1) + unimix / 5
    expected = n * probs
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    # 4 degrees of freedom: the 99.9% quantile is 18.47
    assert chi2 < 18.47, (counts, expected)
    assert counts.sum() == n


def test_unimix_mode_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.9]])
    mode = networks.OneHotCategorical(logits, 0.01).mode().detach()
    assert torch.allclose(mode, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)


# ----------------------------------------------------------------- KL balancing


def small_rssm(stoch=3, discrete=4, deter=8, hidden=8, action_dim=2, embed_dim=6, unimix=0.01):
    return networks.RSSM(stoch, discrete, deter, hidden, action_dim, embed_dim, unimix)


def reference_kl(post_logit, prior_logit, unimix):
    """KL[post || prior] over (S, K) with unimix-mixed probabilities, in float64."""
    k = post_logit.shape[-1]
    p = (1 - unimix) * torch.softmax(post_logit.double(), -1) + unimix / k
    q = (1 - unimix) * torch.softmax(prior_logit.double(), -1) + unimix / k
    return (p * (p.log() - q.log())).sum((-2, -1))


def test_kl_losses_match_reference_and_clamp_at_free_bits():
    torch.manual_seed(2)
    rssm = small_rssm()
    post = torch.randn(2, 5, 3, 4) * 3
    prior = torch.randn(2, 5, 3, 4) * 3
    prior[0, 0] = post[0, 0]  # identical distributions: KL 0 -> clamped to free
    prior[1, 2] = post[1, 2] + 0.05  # tiny KL
    free = 1.0
    dyn, rep, raw = rssm.kl_losses(post, prior, free)
    kl = reference_kl(post, prior, 0.01).float()
    assert dyn.shape == rep.shape == raw.shape == (2, 5)
    assert torch.allclose(raw, kl, atol=1e-5)
    assert raw[0, 0].abs() < 1e-6
    assert raw[1, 2] < free
    assert (kl > free).any() and (kl < free).any()
    expected = torch.clamp(kl, min=free)
    assert torch.allclose(dyn, expected, atol=1e-5)
    assert torch.allclose(rep, expected, atol=1e-5)
    assert dyn[0, 0] == pytest.approx(free) and dyn[1, 2] == pytest.approx(free)


def test_kl_losses_route_gradients_to_prior_and_posterior():
    torch.manual_seed(3)
    rssm = small_rssm()
    post = (torch.randn(2, 4, 3, 4) * 3).requires_grad_(True)
    prior = (torch.randn(2, 4, 3, 4) * 3).requires_grad_(True)
    dyn, rep, _ = rssm.kl_losses(post, prior, 0.0)  # free 0: nothing clamped away
    g_post, g_prior = torch.autograd.grad(dyn.sum(), [post, prior], allow_unused=True, retain_graph=True)
    assert g_post is None or g_post.abs().max() == 0
    assert g_prior is not None and g_prior.abs().max() > 0
    g_post, g_prior = torch.autograd.grad(rep.sum(), [post, prior], allow_unused=True)
    assert g_post is not None and g_post.abs().max() > 0
    assert g_prior is None or g_prior.abs().max() == 0
    # values below the free bits are clamped and contribute no gradient at all
    post2 = post.detach().clone().requires_grad_(True)
    prior2 = post.detach().clone().requires_grad_(True)
    dyn2, rep2, _ = rssm.kl_losses(post2, prior2, 1.0)
    assert torch.allclose(dyn2, torch.ones_like(dyn2)) and torch.allclose(rep2, torch.ones_like(rep2))
    g_post, g_prior = torch.autograd.grad((dyn2 + rep2).sum(), [post2, prior2], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in (g_post, g_prior))


# ----------------------------------------------------------------- RSSM


def test_rssm_observe_and_img_step_shapes():
    torch.manual_seed(4)
    batch, length, stoch, discrete, deter, action_dim, embed_dim = 3, 7, 4, 5, 10, 2, 6
    rssm = networks.RSSM(stoch, discrete, deter, 12, action_dim, embed_dim, 0.01)
    embed = torch.randn(batch, length, embed_dim)
    action = torch.rand(batch, length, action_dim) * 2 - 1
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    post, prior = rssm.observe(embed, action, is_first)
    assert post["deter"].shape == (batch, length, deter)
    assert post["stoch"].shape == (batch, length, stoch, discrete)
    assert post["logit"].shape == (batch, length, stoch, discrete)
    assert prior["logit"].shape == (batch, length, stoch, discrete)
    assert torch.allclose(post["stoch"].detach().sum(-1), torch.ones(batch, length, stoch), atol=1e-6)
    assert torch.allclose(post["stoch"].detach().amax(-1), torch.ones(batch, length, stoch), atol=1e-6)
    feat = rssm.feat(post)
    assert rssm.feat_dim == stoch * discrete + deter
    assert feat.shape == (batch, length, stoch * discrete + deter)
    state = {key: value[:, -1] for key, value in post.items()}
    nxt = rssm.img_step(state, action[:, -1])
    assert nxt["deter"].shape == (batch, deter)
    assert nxt["stoch"].shape == (batch, stoch, discrete)
    assert nxt["logit"].shape == (batch, stoch, discrete)
    assert rssm.feat(nxt).shape == (batch, rssm.feat_dim)
    init = rssm.initial(batch)
    assert init["deter"].shape == (batch, deter) and init["stoch"].shape == (batch, stoch, discrete)
    one = rssm.obs_step(state, action[:, 0], embed[:, 0], is_first[:, 0])
    assert one["deter"].shape == (batch, deter) and one["stoch"].shape == (batch, stoch, discrete)


def test_rssm_prior_is_a_function_of_deter_and_posterior_uses_embedding():
    torch.manual_seed(5)
    rssm = small_rssm()
    embed = torch.randn(2, 4, 6)
    action = torch.randn(2, 4, 2)
    is_first = torch.zeros(2, 4, dtype=torch.bool)
    post, prior = rssm.observe(embed, action, is_first)
    assert torch.allclose(prior["logit"], rssm.prior_logit(post["deter"]))
    # changing only the last embedding changes only the last posterior logit
    embed2 = embed.clone()
    embed2[:, -1] += 1.0
    torch.manual_seed(6)
    post_a, _ = rssm.observe(embed, action, is_first)
    torch.manual_seed(6)
    post_b, _ = rssm.observe(embed2, action, is_first)
    assert torch.allclose(post_a["logit"][:, :-1], post_b["logit"][:, :-1])
    assert not torch.allclose(post_a["logit"][:, -1], post_b["logit"][:, -1])


def test_rssm_is_first_resets_state_stochastic():
    """With is_first at t, deter_t depends only on the initial state (action is masked),
    and logit_t only on deter_t and embed_t: both equal a fresh run started at t."""
    torch.manual_seed(7)
    rssm = small_rssm()
    batch, length, t = 2, 6, 3
    embed = torch.randn(batch, length, 6)
    action = torch.randn(batch, length, 2)
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[0, t] = True  # only the first sequence resets at t
    post, _ = rssm.observe(embed, action, is_first)
    sub_first = torch.zeros(batch, length - t, dtype=torch.bool)
    sub_first[:, 0] = True
    fresh, _ = rssm.observe(embed[:, t:], action[:, t:], sub_first)
    assert torch.allclose(post["deter"][0, t], fresh["deter"][0, 0], atol=1e-6)
    assert torch.allclose(post["logit"][0, t], fresh["logit"][0, 0], atol=1e-6)
    # the action at a reset step is ignored
    action2 = action.clone()
    action2[0, t] += 5.0
    post2, _ = rssm.observe(embed, action2, is_first)
    assert torch.allclose(post2["deter"][0, t], post["deter"][0, t], atol=1e-6)
    # a sequence without the reset keeps its history
    assert not torch.allclose(post["deter"][1, t], fresh["deter"][1, 0], atol=1e-4)


def test_rssm_steps_without_an_episode_start_skip_the_reset_and_keep_the_result():
    """observe resets only at steps where some sequence starts an episode: a sequence that
    does not start there gets bit-identical states whether or not another one does."""
    rssm = small_rssm()
    embed, action = torch.randn(2, 6, 6), torch.randn(2, 6, 2)
    quiet = torch.zeros(2, 6, dtype=torch.bool)
    other = quiet.clone()
    other[0, 3] = True  # the reset path runs at step 3, for sequence 0 only
    torch.manual_seed(9)
    post_quiet, _ = rssm.observe(embed, action, quiet)
    torch.manual_seed(9)
    post_other, _ = rssm.observe(embed, action, other)
    for key in ("deter", "stoch", "logit"):
        assert torch.equal(post_quiet[key][1], post_other[key][1])
    assert not torch.allclose(post_quiet["deter"][0, 3], post_other["deter"][0, 3])


def test_rssm_is_first_resets_state_whole_suffix(monkeypatch):
    """With deterministic latents (sample -> mode) the whole suffix after a reset
    equals a fresh run on the suffix, whatever came before."""
    monkeypatch.setattr(networks.OneHotCategorical, "sample", networks.OneHotCategorical.mode)
    torch.manual_seed(8)
    rssm = small_rssm()
    batch, length, t = 2, 7, 4
    embed = torch.randn(batch, length, 6)
    action = torch.randn(batch, length, 2)
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[:, t] = True
    post, prior = rssm.observe(embed, action, is_first)
    sub_first = torch.zeros(batch, length - t, dtype=torch.bool)
    sub_first[:, 0] = True
    fresh, fresh_prior = rssm.observe(embed[:, t:], action[:, t:], sub_first)
    for key in ("deter", "stoch", "logit"):
        assert torch.allclose(post[key][:, t:], fresh[key], atol=1e-6), key
    assert torch.allclose(prior["logit"][:, t:], fresh_prior["logit"], atol=1e-6)
    # and a different history before t does not matter
    embed2 = embed.clone()
    embed2[:, :t] = torch.randn(batch, t, 6)
    post2, _ = rssm.observe(embed2, action, is_first)
    assert torch.allclose(post2["deter"][:, t:], post["deter"][:, t:], atol=1e-6)
    assert not torch.allclose(post2["deter"][:, :t], post["deter"][:, :t])


# ----------------------------------------------------------------- bounded normal


def test_bounded_normal_ranges_and_entropy():
    torch.manual_seed(9)
    raw_mean = torch.randn(50, 3) * 2
    raw_std = torch.randn(50, 3) * 10
    raw_mean[0], raw_std[0] = 1e4, 1e4
    raw_mean[1], raw_std[1] = -1e4, -1e4
    dist = networks.BoundedNormal(raw_mean, raw_std, 0.1, 1.0)
    assert torch.all(dist.mean >= -1) and torch.all(dist.mean <= 1)
    assert torch.all(dist.mean[2:].abs() < 1)
    assert torch.all(dist.std >= 0.1 - 1e-6) and torch.all(dist.std <= 1.0 + 1e-6)
    reference = torch.distributions.Normal(dist.mean, dist.std)
    assert torch.allclose(dist.entropy(), reference.entropy().sum(-1), atol=1e-5)
    x = torch.randn(50, 3)
    assert torch.allclose(dist.log_prob(x), reference.log_prob(x).sum(-1), atol=1e-4)
    assert torch.equal(dist.mode(), dist.mean)


def test_bounded_normal_samples_have_requested_moments():
    torch.manual_seed(10)
    dist = networks.BoundedNormal(torch.full((40000, 1), 0.5), torch.zeros(40000, 1), 0.1, 1.0)
    mean = math.tanh(0.5)
    std = 0.9 / (1 + math.exp(-2.0)) + 0.1
    samples = dist.sample()
    assert samples.mean().item() == pytest.approx(mean, abs=0.02)
    assert samples.std().item() == pytest.approx(std, rel=0.03)


def test_mlp_output_heads_and_zero_init():
    torch.manual_seed(11)
    mlp = networks.MLP(6, 1, 2, 16, dist="symlog_disc", outscale=0.0)
    out = mlp(torch.randn(4, 6))
    assert isinstance(out, networks.TwoHotSymlog)
    assert out.logits.shape == (4, 256)  # 255 bins and one padding column (padded_linear)
    # zero-initialised output layer: uniform over symmetric bins -> prediction 0
    assert torch.allclose(out.mode(), torch.zeros(4), atol=1e-5)
    normal = networks.MLP(6, 3, 1, 16, dist="normal")(torch.randn(5, 6))
    assert normal.mean.shape == (5, 3)
    feats = networks.MLP(6, None, 2, 16)(torch.randn(5, 6))
    assert feats.shape == (5, 16)
    assert np.isfinite(feats.detach().numpy()).all()


def test_padded_two_hot_head_gives_the_values_and_gradients_of_the_plain_255_outputs():
    """padded_linear adds a -inf column: mode, log-likelihood and every gradient must be those of
    the plain 255 logits (a wrong padding weight, bias or bin would change them)."""
    torch.manual_seed(5)
    mlp = networks.MLP(6, 1, 1, 16, dist="symlog_disc", outscale=1.0)
    torch.nn.init.normal_(mlp.head.bias)
    x = torch.randn(7, 6)
    values = torch.randn(7) * 30

    def outputs(dist):
        loss = (dist.mode() * torch.arange(7.0)).sum() - dist.log_prob(values).sum()
        grads = torch.autograd.grad(loss, [mlp.head.weight, mlp.head.bias, *mlp.body.parameters()])
        return [dist.mode().detach(), dist.log_prob(values).detach(), *grads]

    padded = mlp(x)
    assert padded.logits.shape[-1] == 256 and torch.isneginf(padded.logits[:, 255]).all()
    plain = networks.TwoHotSymlog(mlp.head(mlp.body(x)), mlp.bins)
    for got, expected in zip(outputs(padded), outputs(plain)):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
