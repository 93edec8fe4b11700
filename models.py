"""The two learners of DreamerV3: ``WorldModel`` and ``ImagBehavior``.

``WorldModel.train_step`` returns the posterior states and a metrics dict; the
loss terms are kept in a dict (``losses``) scaled by ``loss_scales`` so later
terms (the LLCD adaptation loss) plug in without touching the rest.
``ImagBehavior.train_step`` imagines ``imag_horizon`` steps from every
posterior state and trains the actor (dynamics backprop for continuous
actions, REINFORCE for discrete) and the two-hot critic on λ-returns.
"""

import copy

import torch
from torch import nn

import networks
import tools


class WorldModel(nn.Module):
    """Encoder, RSSM, decoder, reward and continue heads, trained on replayed sequences."""

    def __init__(self, obs_shapes, action_dim, config):
        super().__init__()
        self.config = config
        self.encoder = networks.MultiEncoder(obs_shapes, config)
        self.dynamics = networks.RSSM(
            config.dyn_stoch, config.dyn_discrete, config.dyn_deter, config.dyn_hidden, action_dim,
            self.encoder.out_dim, config.unimix_ratio, config.act, config.norm,
            context_dim=config.llcd_context_dim if config.llcd else 0)
        self.context = None
        if config.llcd:
            self.context = networks.ContextEncoder(self.encoder.out_dim, action_dim, config.llcd_context_len,
                                                   config.llcd_units, config.llcd_context_dim, config.act,
                                                   config.norm)
        feat = self.dynamics.feat_dim
        self.decoder = networks.MultiDecoder(feat, obs_shapes, config)
        rh, ch = config.reward_head, config.cont_head
        self.reward = networks.MLP(feat, 1, rh.layers, config.units, config.act, config.norm,
                                   dist="symlog_disc", outscale=rh.outscale)
        self.cont = networks.MLP(feat, 1, ch.layers, config.units, config.act, config.norm,
                                 dist="binary", outscale=ch.outscale)
        self.loss_scales = {"reward": rh.loss_scale, "cont": ch.loss_scale,
                            "dyn": config.dyn_scale, "rep": config.rep_scale,
                            **{key: 1.0 for key in obs_shapes}}
        context_params = set(self.context.parameters()) if self.context is not None else set()
        model_params = [p for p in self.parameters() if p not in context_params]
        self.optimizer = tools.Optimizer("model", model_params, config.model_lr, config.opt_eps,
                                         config.grad_clip, config.weight_decay, config.precision)
        if self.context is not None:
            self.context_opt = tools.Optimizer("context", self.context.parameters(), config.llcd_lr,
                                               config.opt_eps, config.grad_clip, 0.0, config.precision)

    def preprocess(self, data):
        """Numpy/tensor batch -> float tensors on the model's device; images to [-0.5, 0.5]."""
        device = self.dynamics.initial_deter.device
        out = {key: to_device(value, device) for key, value in data.items()}
        if "image" in out:
            out["image"] = out["image"].float() / 255.0 - 0.5
        for key in ("state", "action", "reward"):
            if key in out:
                out[key] = out[key].float()
        if "is_terminal" in out:
            out["cont"] = 1.0 - out["is_terminal"].float()
        return out

    @property
    def context_prefix(self):
        """Steps before a replayed window that the LLCD context of its first step needs:
        K transitions and the embedding before them (0 without LLCD)."""
        return self.config.llcd_context_len + 1 if self.context is not None else 0

    def infer_context(self, embed, data, adapt, before=None):
        """LLCD context of every replayed step: (z (B,T,Z), KL to N(0,I) (B,T)), or (None, None)
        without LLCD. ``before``: the steps before the window (see ``split_prefix``), so that
        a window starting mid-episode does not start with an empty context. The context
        encoder is in the graph only while ``adapt`` (gate open); otherwise z is still
        inferred and used, with the encoder frozen."""
        if self.context is None:
            return None, None
        embed, action, is_first, stored, start = embed.detach(), data["action"], data["is_first"], None, 0
        if before is not None:
            with torch.no_grad():
                embed = torch.cat([self.encoder(before), embed], 1)  # (B, P + T, E)
            action = torch.cat([before["action"], action], 1)
            is_first = torch.cat([before["is_first"], is_first], 1)
            stored = torch.cat([before["stored"], torch.ones_like(data["is_first"], dtype=torch.bool)], 1)
            start = before["stored"].shape[1]
        with torch.set_grad_enabled(adapt and torch.is_grad_enabled()):
            mean, std = self.context.sequence(embed, action, is_first, stored, start)
            z = mean + std * torch.randn_like(std)  # (B, T, Z)
            return z, networks.gaussian_kl_to_standard(mean, std)

    def compute_losses(self, data, adapt=False, before=None):
        """All loss terms, each (B, T), the posterior and prior states, the raw KL and the
        LLCD context KL (None without LLCD)."""
        embed = self.encoder(data)  # (B, T, E)
        context, context_kl = self.infer_context(embed, data, adapt, before)
        post, prior = self.dynamics.observe(embed, data["action"], data["is_first"], context=context)
        dyn, rep, kl = self.dynamics.kl_losses(post["logit"], prior["logit"], self.config.kl_free)
        feat = self.dynamics.feat(post)  # (B, T, F)
        losses = {key: -dist.log_prob(data[key]) for key, dist in self.decoder(feat).items()}
        losses["reward"] = -self.reward(feat).log_prob(data["reward"])
        losses["cont"] = -self.cont(feat).log_prob(data["cont"])
        losses["dyn"], losses["rep"] = dyn, rep
        return losses, post, prior, kl, context_kl

    def train_step(self, data, adapt=False, before=None):
        """One world-model update; with ``adapt`` (LLCD gate open) also one update of the
        context encoder on llcd_scale * (model loss through z + llcd_beta * KL[q(z)||N(0,I)]).
        ``before``: the steps before each window, for the LLCD context (``split_prefix``)."""
        cfg = self.config
        with tools.autocast(cfg.precision, cfg.device):
            losses, post, prior, kl, context_kl = self.compute_losses(data, adapt, before)
            means = {key: value.mean() for key, value in losses.items()}
            model_loss = sum(self.loss_scales[key] * value for key, value in means.items())
        self.optimizer.backward(model_loss, retain_graph=adapt)
        if adapt:  # both gradients come from this graph, before either optimiser changes a weight
            adapt_loss = cfg.llcd_scale * (model_loss + cfg.llcd_beta * context_kl.mean())
            self.context_opt.backward(adapt_loss)
        metrics = self.optimizer.apply(model_loss)
        if adapt:
            metrics.update(self.context_opt.apply(adapt_loss))
        if context_kl is not None:
            metrics["context_kl"] = context_kl.mean().detach()
            metrics["context_z_std"] = post["context"].std(dim=(0, 1)).mean().detach()
        metrics.update({f"{key}_loss": value.detach() for key, value in means.items()})
        metrics["kl"] = kl.mean()
        metrics["prior_ent"] = networks.OneHotCategorical(prior["logit"], self.config.unimix_ratio).entropy().sum(-1).mean().detach()
        metrics["post_ent"] = networks.OneHotCategorical(post["logit"], self.config.unimix_ratio).entropy().sum(-1).mean().detach()
        return post, metrics

    @torch.no_grad()
    def surprise(self, post, data):
        """LLCD candidate scores of live steps (docs/design.md#llcd-score), each (N,) float32 with NaN
        where ``is_first``. post: state after ``obs_step`` (N, ...); the prior is the one-step
        prediction from the previous posterior and action (``deter`` of post).
        - ``obs_nll``: NLL of the observation under the decoder applied to the prior's mode;
        - ``latent_kl``: KL[posterior || prior] of the stochastic latent (nats), how far the
          observation moved the model's belief from what its dynamics predicted;
        - ``reward_nll`` (when ``data`` holds the step's reward): its NLL under the reward head
          on the prior's mode."""
        logit = self.dynamics.prior_logit(post["deter"])  # (N, S, K)
        prior = {"deter": post["deter"], "stoch": networks.OneHotCategorical(logit, self.config.unimix_ratio).mode()}
        feat = self.dynamics.feat(prior)  # (N, F)
        scores = {"obs_nll": sum(-dist.log_prob(data[key]) for key, dist in self.decoder(feat).items()),  # (N,)
                  "latent_kl": self.latent_kl(post, logit)}
        if "reward" in data:
            scores["reward_nll"] = -self.reward(feat).log_prob(data["reward"])
        first = data["is_first"].bool()
        return {name: score.float().masked_fill(first, float("nan")) for name, score in scores.items()}

    def latent_kl(self, post, prior_logit=None):
        """KL[posterior || one-step prior] (unimix) of the stochastic latent, (N,) nats."""
        mix = self.config.unimix_ratio
        prior_logit = self.dynamics.prior_logit(post["deter"]) if prior_logit is None else prior_logit  # (N, S, K)
        return networks.categorical_kl(networks.unimix_log_probs(post["logit"], mix),
                                       networks.unimix_log_probs(prior_logit, mix))

    @torch.no_grad()
    def openloop_surprise(self, openloop, post, action, context, data):
        """LLCD candidate score ``openloop_nll``: NLL of the observation under a prediction made
        ``llcd_openloop_horizon`` steps earlier and rolled forward open loop (prior modes, the
        actions taken), so that errors of the learned dynamics accumulate instead of being
        corrected by each observation. ``openloop``: {latent: state dict (N, ...), age: (N,)}
        (``initial_openloop``); post: this step's posterior; action (N, A): the action that led
        here; context (N, Z) or None. Returns (score (N,), NaN except where a prediction
        reaches its horizon; the next ``openloop``), re-anchored on the posterior there and at
        episode starts."""
        keys = ("deter", "stoch", "logit")
        state = {key: openloop["latent"][key] for key in keys}
        if context is not None:
            state["context"] = context
        predicted = self.dynamics.img_step(state, action, sample=False)
        age = openloop["age"] + 1  # (N,)
        first = data["is_first"].bool()
        due = (age >= self.config.llcd_openloop_horizon) & ~first
        nll = sum(-dist.log_prob(data[key]) for key, dist in self.decoder(self.dynamics.feat(predicted)).items())
        anchor = due | first
        latent = {key: torch.where(anchor.view(-1, *[1] * (post[key].dim() - 1)), post[key], predicted[key])
                  for key in keys}
        return nll.float().masked_fill(~due, float("nan")), {"latent": latent, "age": torch.where(anchor, 0, age)}

    def initial_openloop(self, batch):
        return {"latent": self.dynamics.initial(batch),
                "age": torch.zeros(batch, dtype=torch.long, device=self.dynamics.initial_deter.device)}

    @torch.no_grad()
    def video_pred(self, data, observed=5, count=6):
        """Open-loop prediction video: observe ``observed`` frames, imagine the rest.
        Returns uint8 (count, T, H, 3*W): truth | model | error, side by side."""
        data, before = split_prefix({key: value[:count] for key, value in data.items()})
        embed = self.encoder(data)
        z, _ = self.infer_context(embed, data, False, before)
        z = z[:, :observed] if z is not None else None
        post, _ = self.dynamics.observe(embed[:, :observed], data["action"][:, :observed],
                                        data["is_first"][:, :observed], context=z)
        state = {key: value[:, -1] for key, value in post.items()}
        states = []
        for t in range(observed, data["action"].shape[1]):
            state = self.dynamics.img_step(state, data["action"][:, t])
            states.append(state)
        feats = torch.cat([self.dynamics.feat(post), torch.stack([self.dynamics.feat(s) for s in states], 1)], 1)
        model = self.decoder(feats)["image"].mode() + 0.5
        truth = data["image"] + 0.5
        error = (model - truth + 1) / 2
        video = torch.cat([truth, model, error], 3).clamp(0, 1)
        return (video * 255).to(torch.uint8).cpu().numpy()


class ImagBehavior(nn.Module):
    """Actor-critic trained on imagined rollouts of the world model."""

    def __init__(self, config, world_model, action_dim, discrete):
        super().__init__()
        self.config = config
        self.wm = world_model
        self.discrete = discrete
        feat = world_model.dynamics.policy_feat_dim
        a, c = config.actor, config.critic
        self.actor = networks.MLP(feat, action_dim, a.layers, config.units, config.act, config.norm,
                                  dist="onehot" if discrete else "normal", outscale=a.outscale,
                                  min_std=a.min_std, max_std=a.max_std, unimix=a.unimix_ratio)
        self.critic = networks.MLP(feat, 1, c.layers, config.units, config.act, config.norm,
                                   dist="symlog_disc", outscale=c.outscale)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("return_range", torch.zeros(2))  # EMA of (P5, P95) of λ-returns
        self.updates = 0  # a Python int (saved as extra state): reading a device counter would sync
        p = config.precision
        self.actor_opt = tools.Optimizer("actor", self.actor.parameters(), a.lr, a.eps, a.grad_clip, 0.0, p)
        self.critic_opt = tools.Optimizer("critic", self.critic.parameters(), c.lr, c.eps, c.grad_clip, 0.0, p)

    def train_step(self, start, objective):
        """start: ``imagination_starts`` (posterior states and ``cont``, (B, T, ...)); objective(states {key: (H+1, N, ...)},
        feat (H+1, N, F), actions (H, N, A)) -> reward (H, N) for arriving at imagined states 1..H.
        One update of the actor and of the critic; both gradients come from one imagined graph."""
        with tools.autocast(self.config.precision, self.config.device):
            actor_loss, critic_loss, stats = self.losses(start, objective)
        metrics = self.actor_opt.step(actor_loss, retain_graph=True)
        metrics.update(self.critic_opt.step(critic_loss))
        self.update_slow_critic()
        metrics.update({key: value.detach() for key, value in stats.items()})
        return metrics

    def losses(self, start, objective):
        """Imagine from ``start`` and return (actor loss, critic loss, {name: scalar statistic}).
        Heads run on all H+1 states and their small outputs are sliced: slicing the large
        feature tensor instead would make its backward allocate and zero (H+1, N, F) per slice."""
        cfg = self.config
        dynamics = self.wm.dynamics
        states, actions, entropies, log_probs, stats = self.imagine(start, cfg.imag_horizon)
        feat = dynamics.feat(states)  # (H+1, N, F)
        reward = objective(states, feat, actions)  # (H, N)
        discount = cfg.discount * self.wm.cont(feat).mode()[1:]  # (H, N), no gradient: 0 or γ
        feats = dynamics.policy_feat(states, feat)  # (H+1, N, F + Z)
        critic = self.critic(feats)  # over (H+1, N); one forward serves actor and critic losses
        value = critic.mode()  # (H+1, N)
        returns = lambda_return(reward, value, discount, cfg.discount_lambda)  # (H, N)
        alive = start["cont"].flatten()[None]  # (1, N): a terminal start state has nothing ahead
        weights = alive * torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]]), 0)
        scale = self.update_return_scale(returns)
        adv = (returns - value[:-1]) / scale  # (H, N); dynamics backprop also through v(s_t)
        policy_term = adv if log_probs is None else log_probs * adv.detach()
        actor_loss = -(weights * (policy_term + cfg.actor.entropy * entropies)).mean()
        critic_loss = self.critic_loss(critic, feats.detach(), returns.detach(), weights)
        stats.update({"imag_reward": reward.mean(), "imag_return": returns.mean(),
                      "actor_entropy": entropies.mean(), "return_scale": scale})
        return actor_loss, critic_loss, stats

    def imagine(self, start, horizon):
        """Roll the prior forward with the actor from every start state (the LLCD context z
        stays fixed along a rollout). Continuous actions reach the model bounded to [-1, 1],
        as acting clips them, by DreamerV3's scaling a * sg(1 / max(1, |a|)): the value of a
        clip, with a clipped sample's gradient scaled by 1 / |a| (``bound_action``).
        Returns states {deter, stoch[, context]: (H+1, N, ...)}, the actions the model saw
        (H, N, A), entropies (H, N), log-probs of the sampled actions (H, N), the latter
        only for the REINFORCE gradient (None with dynamics backprop, which does not use
        them), and statistics of the continuous actor: the fraction of clipped action
        components and the actor's mean std."""
        dynamics = self.wm.dynamics
        reinforce = self.discrete or self.config.imag_gradient == "reinforce"
        keys = [key for key in ("deter", "stoch", "context") if key in start]
        state = {key: start[key].detach().flatten(0, 1) for key in keys}  # (N, ...)
        states, actions, entropies, log_probs, samples, stds = [state], [], [], [], [], []
        for _ in range(horizon):
            dist = self.actor(dynamics.policy_feat(state).detach())
            sample = dist.sample()
            action = sample if self.discrete else bound_action(sample)
            state = dynamics.img_step(state, action)
            states.append(state)
            actions.append(action)
            entropies.append(dist.entropy())
            if reinforce:
                log_probs.append(dist.log_prob(sample.detach()))
            if not self.discrete:
                samples.append(sample.detach())
                stds.append(dist.std.detach())
        states = {key: torch.stack([s[key] for s in states]) for key in keys}
        log_probs = torch.stack(log_probs) if reinforce else None
        stats = {} if self.discrete else {"actor_clip_fraction": (torch.stack(samples).abs() > 1).float().mean(),
                                          "actor_std": torch.stack(stds).mean()}
        return states, torch.stack(actions), torch.stack(entropies), log_probs, stats

    def critic_loss(self, dist, feats, returns, weights):
        """Two-hot NLL of λ-returns plus regularisation toward the slow critic's prediction.
        ``dist``: the critic's output on all H+1 ``feats`` (H+1, N, F); returns and weights (H, N)
        are for states 0..H-1. The loss runs on every state and drops the last one's (a value
        padded in for it), so no slice of the logits is made; its backward only reaches critic
        weights."""
        slow = self.slow_critic(feats).mode().detach()  # (H+1, N)
        returns = torch.cat([returns, slow[-1:]])  # (H+1, N): the last row is dropped below
        nll = dist.cross_entropy([returns, slow], [1.0, self.config.critic.slow_reg])[:-1]  # (H, N)
        return (weights * nll).mean()

    @torch.no_grad()
    def update_return_scale(self, returns):
        """EMA of the 5th and 95th return percentiles; scale = max(1, P95 - P5)."""
        low_high = torch.quantile(returns.float().flatten(), returns.new_tensor([0.05, 0.95]).float())
        decay = self.config.return_norm_decay
        self.return_range.lerp_(low_high, 1 - decay)
        return torch.clamp(self.return_range[1] - self.return_range[0], min=1.0)

    def get_extra_state(self):
        return {"updates": self.updates}

    def set_extra_state(self, state):
        self.updates = state["updates"]

    @torch.no_grad()
    def update_slow_critic(self):
        c = self.config.critic
        if self.updates % c.slow_target_update == 0:
            slow, fast = list(self.slow_critic.parameters()), list(self.critic.parameters())
            torch._foreach_lerp_(slow, fast, c.slow_target_fraction)
        self.updates += 1


def bound_action(sample):
    """A continuous action sample (..., A) bounded to [-1, 1] as DreamerV3 does it:
    a * sg(1 / max(1, |a|)). The value is the clip's; the gradient is 1 inside the bounds
    and 1 / |a| outside, so a sample beyond a bound still tells the actor's std to shrink
    (a straight-through clip passes 1 and leaves the std to the entropy bonus alone)."""
    return sample / sample.detach().abs().clamp(min=1)


def imagination_starts(post, data):
    """Start states of imagination: the posterior states (B, T, ...) without gradient, and
    ``cont`` (B, T) = 1 - is_terminal, which weights each start (nothing follows a terminal)."""
    return {**{key: value.detach() for key, value in post.items()}, "cont": data["cont"]}


def split_prefix(data):
    """A replayed batch -> (its windows {key: (B, T, ...)}, the steps before them
    {key: (B, P, ...), stored: (B, P)} or None). The replay marks a batch that carries
    P context steps before each window with ``prefix_stored`` (B, P)."""
    if "prefix_stored" not in data:
        return data, None
    size = data["prefix_stored"].shape[1]
    window = {key: value[:, size:] for key, value in data.items() if key != "prefix_stored"}
    before = {key: value[:, :size] for key, value in data.items() if key != "prefix_stored"}
    before["stored"] = data["prefix_stored"].bool()
    return window, before


def to_device(value, device):
    """A numpy array or tensor on ``device``; on a GPU through pinned memory, asynchronously."""
    tensor = torch.as_tensor(value)
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def lambda_return(reward, value, discount, lam):
    """λ-returns. reward, discount (H, N) for steps 1..H; value (H+1, N) for steps 0..H.
    R_t = r_{t+1} + d_{t+1} ((1 - λ) v_{t+1} + λ R_{t+1}), R_H = v_H. Returns (H, N)."""
    returns, last = [], value[-1]
    for t in reversed(range(reward.shape[0])):
        last = reward[t] + discount[t] * ((1 - lam) * value[t + 1] + lam * last)
        returns.append(last)
    return torch.stack(returns[::-1])
