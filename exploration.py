"""Exploration behaviours selected by ``expl_behavior``.

- ``Random``: uniform random actions (also used for prefill and the ``eval_policy: random`` baseline).
- ``Plan2Explore``: an ensemble of one-step predictors of the next latent
  (``disag_target``); their disagreement (std across members) is an
  intrinsic reward for a second actor-critic trained in imagination, mixed
  with the extrinsic reward as ``expl_intr_scale``·intrinsic +
  ``expl_extr_scale``·extrinsic.
"""

import torch
import torch.nn.functional as F
from torch import nn

import models
import networks
import tools


class UniformActions:
    """Distribution-like object: uniform actions in [-1, 1] or uniform one-hots."""

    def __init__(self, shape, discrete, device):
        self.shape, self.discrete, self.device = shape, discrete, device

    def sample(self):
        if self.discrete:
            index = torch.randint(0, self.shape[-1], self.shape[:-1], device=self.device)
            return F.one_hot(index, self.shape[-1]).float()
        return torch.rand(self.shape, device=self.device) * 2 - 1

    mode = sample


class Random(nn.Module):
    """Acts uniformly at random; learns nothing."""

    def __init__(self, action_dim, discrete):
        super().__init__()
        self.action_dim, self.discrete = action_dim, discrete

    def actor(self, feat):
        return UniformActions((*feat.shape[:-1], self.action_dim), self.discrete, feat.device)

    def policy(self, obs, state, mode):
        """``Dreamer.policy``'s interface: uniform actions (N, A) for the N envs of ``obs``, in every
        mode; the state stays empty."""
        feat = torch.zeros(len(obs["is_first"]), 1)  # (N, 1): only its batch shape is used
        return self.actor(feat).sample().numpy(), {}

    def train_step(self, start, post, data):
        return {}


class Plan2Explore(nn.Module):
    """Ensemble disagreement as intrinsic reward for an exploration actor-critic."""

    def __init__(self, config, world_model, action_dim, discrete):
        super().__init__()
        self.config, self.wm = config, world_model
        self.behavior = models.ImagBehavior(config, world_model, action_dim, discrete)
        dynamics = world_model.dynamics
        sizes = {"stoch": dynamics.stoch * dynamics.discrete, "deter": dynamics.deter,
                 "feat": dynamics.feat_dim, "embed": world_model.encoder.out_dim}
        inp = dynamics.feat_dim + (action_dim if config.disag_action_cond else 0)
        self.ensemble = nn.ModuleList([
            networks.MLP(inp, sizes[config.disag_target], config.disag_layers, config.disag_units,
                         config.act, config.norm) for _ in range(config.disag_models)])
        self.opt = tools.Optimizer("ensemble", self.ensemble.parameters(), config.model_lr, config.opt_eps,
                                   config.grad_clip, 0.0, config.precision)

    def actor(self, feat):
        return self.behavior.actor(feat)

    def disagreement(self, inputs):
        """Std across ensemble members, averaged over output dims: (..., I) -> (...)."""
        preds = torch.stack([member(inputs) for member in self.ensemble])  # (M, ..., O)
        return preds.float().std(0).mean(-1)

    def inputs(self, feat, action):
        return torch.cat([feat, action], -1) if self.config.disag_action_cond else feat

    def targets(self, post, embed):
        return {"stoch": post["stoch"].flatten(-2), "deter": post["deter"],
                "feat": self.wm.dynamics.feat(post), "embed": embed}[self.config.disag_target]

    def train_step(self, start, post, data):
        """Fit the ensemble on replayed transitions, then the exploration actor-critic."""
        cfg = self.config
        with tools.autocast(cfg.precision, cfg.device), torch.no_grad():
            embed = self.wm.encoder(data) if cfg.disag_target == "embed" else None
            target = self.targets(post, embed).detach()[:, 1:]  # (B, T-1, O)
            feat = self.wm.dynamics.feat(post).detach()
            inputs = self.inputs(feat[:, :-1], data["action"][:, 1:])  # (B, T-1, I)
        with tools.autocast(cfg.precision, cfg.device):
            loss = sum(((member(inputs).float() - target.float()) ** 2).mean() for member in self.ensemble)
        metrics = self.opt.step(loss)
        expl = self.behavior.train_step(start, self.objective)
        metrics.update({f"expl_{k}": v for k, v in expl.items()})
        return metrics

    def objective(self, states, feat, actions):
        """Reward for imagined step t -> t+1: feat (H+1, N, F), actions (H, N, A) -> (H, N)."""
        intrinsic = self.disagreement(self.inputs(feat[:-1], actions))
        reward = self.config.expl_intr_scale * intrinsic
        if self.config.expl_extr_scale:
            reward = reward + self.config.expl_extr_scale * self.wm.reward(feat).mode()[1:]
        return reward
