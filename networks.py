"""Building blocks of the DreamerV3 agent: RSSM, MLP, conv encoder/decoder,
multi-modal encoder/decoder and the output distributions.

Speed notes (CPU at small sizes is bound by per-op overhead, not FLOPs):
- In ``RSSM.observe`` every input that does not depend on the recurrent
  state (the embedding's share of the posterior layer, the action's share of
  the input layer, the ``is_first`` masks) is computed for all time steps
  before the scan, and the prior logits are computed after it, batched over
  time, so the sequential loop holds only what must be sequential.
- Distributions are light classes without argument validation.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def symlog(x):
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x):
    return torch.sign(x) * torch.expm1(torch.abs(x))


# ----------------------------------------------------------------- distributions


class TwoHotSymlog:
    """Categorical over fixed symlog-spaced bins; predicts real values via two-hot targets.

    The heads run on (H+1, N) imagined states (16K rows of 255 logits at batch 16x64), where
    elementwise passes over the logits dominate an update on CPU, so the mean and the
    cross-entropy have hand-written backward passes (``SoftmaxMean``, ``TwoHotCrossEntropy``):
    the same gradients as autograd's, without materialising the outer-product and
    scatter/zero-fill tensors it would build.

    ``logits`` may have padding columns after the K real ones, each -inf (probability 0):
    ``padded_linear`` gives the 255-bin heads 256 outputs, which a CPU matmul runs ~2x faster."""

    def __init__(self, logits, bins):
        self.logits = logits.float()  # (..., K + padding)
        self.bins = bins  # (K,) in symlog space

    def mode(self):
        padding = self.logits.shape[-1] - len(self.bins)
        bins = F.pad(self.bins, (0, padding))  # the padding columns' probability is 0
        return symexp(SoftmaxMean.apply(self.logits, bins))  # (...)

    mean = mode

    def log_prob(self, x):
        """Two-hot log-likelihood of ``x`` (...) without building the dense target."""
        return -self.cross_entropy([x], [1.0])

    def cross_entropy(self, values, weights):
        """-sum_i weights[i] * log_prob(values[i]): one pass over the logits for the mix of
        several two-hot targets (e.g. the critic's λ-return and its slow-critic target). The
        targets are data: no gradient reaches ``values``."""
        index, weight = [], []
        for value, scale in zip(values, weights):
            below, above, weight_above = two_hot_indices(symlog(value.float()), self.bins)
            index += [below, above]
            weight += [scale * (1 - weight_above), scale * weight_above]
        return TwoHotCrossEntropy.apply(self.logits, torch.stack(index, -1), torch.stack(weight, -1))


class SoftmaxMean(torch.autograd.Function):
    """softmax(logits) @ bins: (..., K) -> (...). Backward: d/dl_k = p_k (b_k - mean)."""

    @staticmethod
    def forward(ctx, logits, bins):
        probs = torch.softmax(logits, -1)  # (..., K)
        mean = probs @ bins  # (...)
        ctx.save_for_backward(probs, bins, mean)
        return mean

    @staticmethod
    def backward(ctx, grad):
        probs, bins, mean = ctx.saved_tensors
        grad = grad.unsqueeze(-1)  # (..., 1)
        return probs * torch.addcmul(-grad * mean.unsqueeze(-1), grad, bins), None


class TwoHotCrossEntropy(torch.autograd.Function):
    """-sum_j weight_j log softmax(logits)[index_j]: logits (..., K), index and weight (..., M)
    -> (...). Backward: d/dl = (sum_j weight_j) softmax(logits) - scatter(weight)."""

    @staticmethod
    def forward(ctx, logits, index, weight):
        norm = torch.logsumexp(logits, -1, keepdim=True)  # (..., 1)
        ctx.save_for_backward(logits, norm, index, weight)
        return -(weight * (torch.gather(logits, -1, index) - norm)).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, norm, index, weight = ctx.saved_tensors
        grad = grad.unsqueeze(-1)  # (..., 1)
        out = torch.sub(logits, norm).exp_().mul_(grad * weight.sum(-1, keepdim=True))
        return out.scatter_add_(-1, index, -grad * weight), None, None


def two_hot_indices(x, bins):
    """Neighbouring bin indices of ``x`` (...) and the weight of the upper one."""
    x = x.clamp(bins[0], bins[-1])
    above = torch.searchsorted(bins, x.contiguous(), right=True).clamp(1, len(bins) - 1)  # (...)
    below = above - 1
    weight_above = (x - bins[below]) / (bins[above] - bins[below])
    return below, above, weight_above


def two_hot(x, bins):
    """Dense two-hot encoding of ``x`` (...) over sorted ``bins`` (K,) -> (..., K)."""
    below, above, weight_above = two_hot_indices(x, bins)
    target = torch.zeros(*x.shape, len(bins), device=x.device)
    target.scatter_(-1, below.unsqueeze(-1), (1 - weight_above).unsqueeze(-1))
    return target.scatter_add_(-1, above.unsqueeze(-1), weight_above.unsqueeze(-1))


class SymlogMSE:
    """Vector prediction in symlog space; log_prob is the negative symlog squared error."""

    def __init__(self, pred):
        self.pred = pred.float()  # (..., D)

    def mode(self):
        return symexp(self.pred)

    def log_prob(self, x):
        return -((self.pred - symlog(x.float())) ** 2).sum(-1)


class MSE:
    """Image prediction; log_prob is the negative squared error summed over pixels."""

    def __init__(self, pred, event_dims=3):
        self.pred = pred.float()
        self.dims = tuple(range(-event_dims, 0))

    def mode(self):
        return self.pred

    def log_prob(self, x):
        return -((self.pred - x.float()) ** 2).sum(self.dims)


class Bernoulli:
    def __init__(self, logits):
        self.logits = logits.float().squeeze(-1)  # (...)

    def mode(self):
        return (self.logits > 0).float()

    def mean(self):
        return torch.sigmoid(self.logits)

    def log_prob(self, x):
        return -F.binary_cross_entropy_with_logits(self.logits, x.float(), reduction="none")


class BoundedNormal:
    """Diagonal Normal with tanh-bounded mean and std in [min_std, max_std]."""

    def __init__(self, raw_mean, raw_std, min_std, max_std):
        self.mean = torch.tanh(raw_mean.float())  # (..., A)
        self.std = (max_std - min_std) * torch.sigmoid(raw_std.float() + 2.0) + min_std

    def mode(self):
        return self.mean

    def sample(self):
        return self.mean + self.std * torch.randn_like(self.mean)

    def log_prob(self, x):
        return (-0.5 * ((x - self.mean) / self.std) ** 2 - torch.log(self.std)
                - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self):
        return (torch.log(self.std) + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)


class OneHotCategorical:
    """Categorical with unimix; samples are one-hot with straight-through gradients."""

    def __init__(self, logits, unimix):
        probs = softmax(logits.float())
        self.probs = (1 - unimix) * probs + unimix / probs.shape[-1]  # (..., K)

    def mode(self):
        return straight_through(one_hot(self.probs.argmax(-1), self.probs), self.probs)

    def sample(self):
        """Inverse-CDF sampling: index = number of CDF entries below a uniform draw."""
        cdf = self.probs.detach().cumsum(-1)
        draw = torch.rand_like(cdf[..., :1]) * cdf[..., -1:]
        index = (cdf < draw).sum(-1).clamp(max=self.probs.shape[-1] - 1)
        return straight_through(one_hot(index, self.probs), self.probs)

    def log_prob(self, onehot):
        return (onehot * torch.log(self.probs)).sum(-1)

    def entropy(self):
        return -(self.probs * torch.log(self.probs)).sum(-1)


def softmax(logits):
    """Softmax over the last axis. Below 16 classes (the small preset's 8x8 latents) torch's
    CPU kernel, which vectorises along that axis, is ~3x slower than ``SmallSoftmax``."""
    if logits.shape[-1] < 16 and logits.device.type == "cpu":
        return SmallSoftmax.apply(logits)
    return torch.softmax(logits, -1)


class SmallSoftmax(torch.autograd.Function):
    """Softmax over a short last axis as a few whole-tensor ops; backward p * (g - sum(p g))."""

    @staticmethod
    def forward(ctx, logits):
        exp = torch.sub(logits, logits.amax(-1, keepdim=True)).exp_()
        probs = exp.div_(exp.sum(-1, keepdim=True))
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        weighted = probs * grad
        return weighted.sub_(probs * weighted.sum(-1, keepdim=True))


def one_hot(index, like):
    """Float one-hot of ``index`` (...) with the shape and dtype of ``like`` (..., K)."""
    return torch.zeros_like(like).scatter_(-1, index.unsqueeze(-1), 1.0)


def straight_through(onehot, probs):
    """``onehot`` exactly in the forward pass (the bracket is 0), the gradient of ``probs`` backward."""
    return onehot + (probs - probs.detach())


def unimix_log_probs(logits, unimix):
    """Log-probabilities of the unimix categorical over the last axis."""
    probs = softmax(logits.float())
    return torch.log((1 - unimix) * probs + unimix / probs.shape[-1])


def categorical_kl(log_p, log_q):
    """KL[p || q] summed over the (stoch, classes) axes: (..., S, K) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


# ----------------------------------------------------------------- layers


class NormLayer(nn.Sequential):
    """Linear (no bias) -> LayerNorm -> activation, DreamerV3's basic block."""

    def __init__(self, inp, out, act="SiLU", norm=True):
        layers = [nn.Linear(inp, out, bias=not norm)]
        if norm:
            layers.append(nn.LayerNorm(out, eps=1e-3))
        layers.append(getattr(nn, act)())
        super().__init__(*layers)
        self.apply(fan_avg_init_)


class MLP(nn.Module):
    """Stack of NormLayers followed by an output head that returns a distribution.

    ``dist``: 'symlog_disc' (two-hot over 255 symlog bins), 'symlog_mse',
    'binary', 'normal' (bounded, for actions), 'onehot' (discrete actions)
    or None (raw features).
    """

    def __init__(self, inp, out, layers, units, act="SiLU", norm=True, dist=None,
                 outscale=1.0, min_std=0.1, max_std=1.0, unimix=0.01, bins=255):
        super().__init__()
        self.dist_name = dist
        dims = [inp] + [units] * layers
        self.body = nn.Sequential(*[NormLayer(a, b, act, norm) for a, b in zip(dims[:-1], dims[1:])])
        self.min_std, self.max_std, self.unimix = min_std, max_std, unimix
        if dist == "symlog_disc":
            self.register_buffer("bins", torch.linspace(-20, 20, bins), persistent=False)
            out = bins
        head_out = 2 * out if dist == "normal" else out
        self.head = nn.Linear(dims[-1], head_out) if head_out else None
        if self.head is not None:
            init_output(self.head, outscale)

    def forward(self, x):
        x = self.body(x)
        if self.head is None:
            return x
        if self.dist_name == "symlog_disc":
            return TwoHotSymlog(padded_linear(x, self.head), self.bins)
        x = self.head(x)
        if self.dist_name == "symlog_mse":
            return SymlogMSE(x)
        if self.dist_name == "binary":
            return Bernoulli(x)
        if self.dist_name == "normal":
            mean, std = x.chunk(2, -1)
            return BoundedNormal(mean, std, self.min_std, self.max_std)
        if self.dist_name == "onehot":
            return OneHotCategorical(x, self.unimix)
        return x


def padded_linear(x, layer, multiple=16):
    """``layer(x)`` (..., K) followed by -inf columns up to a multiple of ``multiple``
    (255 -> 256): a matmul with 255 outputs runs at about half the speed of one with 256 on
    an AVX2 CPU (16384x64 @ 64x255: 19.5 ms vs 9.0 ms, one core). The extra outputs have zero
    weights and a -inf bias, so softmax gives them probability 0 and gradient 0."""
    padding = -layer.out_features % multiple
    weight = F.pad(layer.weight, (0, 0, 0, padding))  # (K + padding, U), zero rows
    bias = F.pad(layer.bias, (0, padding), value=float("-inf"))  # (K + padding,)
    return F.linear(x, weight, bias)  # (..., K + padding)


def fan_avg(weight):
    """Average of fan-in and fan-out of a linear or conv weight."""
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    return (weight.shape[0] + weight.shape[1]) * receptive / 2


def fan_avg_init_(module):
    """DreamerV3 initialisation: truncated normal with variance 1/fan_avg; zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        std = math.sqrt(1.0 / fan_avg(module.weight)) / 0.87962566103423978  # unit normal truncated at +-2
        nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_output(layer, scale):
    """Scaled fan-average uniform init for an output layer; scale 0 gives zeros."""
    if scale == 0.0:
        nn.init.zeros_(layer.weight)
    else:
        limit = math.sqrt(3 * scale / fan_avg(layer.weight))
        nn.init.uniform_(layer.weight, -limit, limit)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of (N, C, H, W) feature maps."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-3)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvEncoder(nn.Module):
    """64x64 images -> stride-2 convs with doubling depth down to ``minres`` -> flat vector."""

    def __init__(self, shape, depth=32, kernel=4, minres=4, act="SiLU"):
        super().__init__()
        height, _, channels = shape
        layers, inp, out = [], channels, depth
        for _ in range(int(np.log2(height // minres))):
            layers += [nn.Conv2d(inp, out, kernel, 2, padding=1, bias=False), ChannelNorm(out), getattr(nn, act)()]
            inp, out = out, out * 2
        self.layers = nn.Sequential(*layers)
        self.out_dim = inp * minres * minres
        self.apply(fan_avg_init_)

    def forward(self, image):  # (..., H, W, C) in [0, 1] - 0.5
        lead = image.shape[:-3]
        x = image.reshape(-1, *image.shape[-3:]).permute(0, 3, 1, 2)
        return self.layers(x).reshape(*lead, -1)  # (..., out_dim)


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: features -> transposed convs -> (..., H, W, C) image mean."""

    def __init__(self, feat_dim, shape, depth=32, kernel=4, minres=4, act="SiLU", outscale=1.0):
        super().__init__()
        height, _, channels = shape
        stages = int(np.log2(height // minres))
        self.minres, self.first_depth = minres, depth * 2 ** (stages - 1)
        self.project = nn.Linear(feat_dim, self.first_depth * minres * minres)
        layers, inp = [], self.first_depth
        for index in range(stages):
            last = index == stages - 1
            out = channels if last else inp // 2
            layers.append(nn.ConvTranspose2d(inp, out, kernel, 2, padding=1, bias=last))
            if not last:
                layers += [ChannelNorm(out), getattr(nn, act)()]
            inp = out
        self.layers = nn.Sequential(*layers)
        self.shape = shape
        self.apply(fan_avg_init_)
        init_output(layers[-1], outscale)

    def forward(self, feat):  # (..., F)
        lead = feat.shape[:-1]
        x = self.project(feat).reshape(-1, self.first_depth, self.minres, self.minres)
        x = self.layers(x).permute(0, 2, 3, 1)
        return MSE(x.reshape(*lead, *self.shape))


class MultiEncoder(nn.Module):
    """Encodes the observation dict: ``state`` via symlog -> MLP, ``image`` via convs."""

    def __init__(self, obs_shapes, config):
        super().__init__()
        self.keys = [k for k in ("state", "image") if k in obs_shapes]
        self.out_dim = 0
        if "state" in obs_shapes:
            c = config.encoder
            self.mlp = MLP(obs_shapes["state"][0], None, c.mlp_layers, c.mlp_units, config.act, config.norm)
            self.symlog_inputs = c.symlog_inputs
            self.out_dim += c.mlp_units
        if "image" in obs_shapes:
            c = config.encoder
            self.conv = ConvEncoder(obs_shapes["image"], c.cnn_depth, c.kernel_size, c.minres, config.act)
            self.out_dim += self.conv.out_dim

    def forward(self, obs):
        parts = []
        if "state" in self.keys:
            state = obs["state"]
            parts.append(self.mlp(symlog(state) if self.symlog_inputs else state))
        if "image" in self.keys:
            parts.append(self.conv(obs["image"]))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # (..., E)


class MultiDecoder(nn.Module):
    """Predicts every observation key from the features; returns {key: distribution}."""

    def __init__(self, feat_dim, obs_shapes, config):
        super().__init__()
        c = config.decoder
        self.heads = nn.ModuleDict()
        if "state" in obs_shapes:
            self.heads["state"] = MLP(feat_dim, obs_shapes["state"][0], c.mlp_layers, c.mlp_units,
                                      config.act, config.norm, dist="symlog_mse", outscale=c.outscale)
        if "image" in obs_shapes:
            self.heads["image"] = ConvDecoder(feat_dim, obs_shapes["image"], c.cnn_depth, c.kernel_size,
                                              c.minres, config.act, c.outscale)

    def forward(self, feat):
        return {key: head(feat) for key, head in self.heads.items()}


# ----------------------------------------------------------------- RSSM


class RSSM(nn.Module):
    """Recurrent state-space model with discrete stochastic latents.

    State dict: ``deter`` (..., D), ``stoch`` (..., S, K) one-hot samples,
    ``logit`` (..., S, K) of the distribution ``stoch`` was drawn from.
    """

    def __init__(self, stoch, discrete, deter, hidden, action_dim, embed_dim,
                 unimix=0.01, act="SiLU", norm=True, context_dim=0):
        super().__init__()
        self.stoch, self.discrete, self.deter, self.unimix = stoch, discrete, deter, unimix
        self.context_dim = context_dim
        flat = stoch * discrete
        self.in_stoch = nn.Linear(flat, hidden, bias=False)
        self.in_action = nn.Linear(action_dim, hidden, bias=False)
        self.in_context = nn.Linear(context_dim, hidden, bias=False) if context_dim else None
        self.in_norm = nn.Sequential(nn.LayerNorm(hidden, eps=1e-3), getattr(nn, act)())
        self.gru = nn.Linear(hidden + deter, 3 * deter, bias=False)
        self.gru_norm = nn.LayerNorm(3 * deter, eps=1e-3)
        self.prior_net = nn.Sequential(NormLayer(deter, hidden, act, norm), nn.Linear(hidden, flat))
        self.post_deter = nn.Linear(deter, hidden, bias=False)
        self.post_embed = nn.Linear(embed_dim, hidden, bias=False)
        self.post_norm = nn.Sequential(nn.LayerNorm(hidden, eps=1e-3), getattr(nn, act)())
        self.post_logit = nn.Linear(hidden, flat)
        self.initial_deter = nn.Parameter(torch.zeros(deter))
        self.apply(fan_avg_init_)

    @property
    def feat_dim(self):
        return self.stoch * self.discrete + self.deter

    def initial(self, batch):
        """Learned initial state for ``batch`` sequences."""
        deter = torch.tanh(self.initial_deter).expand(batch, -1)  # (B, D)
        logit = self.prior_logit(deter)
        stoch = OneHotCategorical(logit, self.unimix).mode()
        return {"deter": deter, "stoch": stoch, "logit": logit}

    @property
    def policy_feat_dim(self):
        return self.feat_dim + self.context_dim

    def feat(self, state):
        return torch.cat([state["stoch"].flatten(-2), state["deter"]], -1)  # (..., S*K + D)

    def policy_feat(self, state, feat=None):
        """Actor/critic input: feat (``self.feat(state)`` unless given) plus the LLCD
        context z when the model has one."""
        feat = self.feat(state) if feat is None else feat
        if self.in_context is None:
            return feat
        return torch.cat([feat, state["context"]], -1)  # (..., S*K + D + Z)

    def input_projection(self, action, context=None):
        """Everything the GRU input gets besides the stochastic state: action (and context z)."""
        projected = self.in_action(action)  # (..., H)
        if self.in_context is not None:
            projected = projected + self.in_context(context)
        return projected

    def prior_logit(self, deter):
        return self.prior_net(deter).unflatten(-1, (self.stoch, self.discrete))  # (..., S, K)

    def recur(self, stoch, action_in, deter):
        """One GRU step: (stoch (N,S,K), projected action (N,H), deter (N,D)) -> deter (N,D)."""
        x = self.in_norm(self.in_stoch(stoch.flatten(-2)) + action_in)
        parts = self.gru_norm(self.gru(torch.cat([x, deter], -1)))
        reset, cand, update = parts.chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1).type_as(deter)  # (N, D); under autocast deter may be fp32
        return torch.lerp(deter, cand.type_as(deter), update)  # update * cand + (1 - update) * deter

    def observe(self, embed, action, is_first, state=None, context=None):
        """Posterior scan. embed (B,T,E), action (B,T,A) = action that led to each step,
        is_first (B,T), context (B,T,Z) or None. Returns (post, prior) state dicts with
        (B,T,...) tensors; with a context, post carries it as ``context``."""
        batch, length = embed.shape[:2]
        state = state or self.initial(batch)
        first = is_first.float().unsqueeze(-1)  # (B, T, 1)
        action_in = self.input_projection(action * (1 - first), context)  # (B, T, H)
        embed_in = self.post_embed(embed)  # (B, T, H)
        init = self.initial(batch)
        starts = is_first.bool().any(0).tolist()  # per step: does any sequence start an episode there
        deter, stoch = state["deter"], state["stoch"]
        deters, stochs, logits = [], [], []
        for t in range(length):
            if starts[t]:  # reset those sequences to the initial state; most steps have none
                keep = 1 - first[:, t]  # (B, 1)
                deter = keep * deter + (1 - keep) * init["deter"]
                stoch = keep.unsqueeze(-1) * stoch + (1 - keep.unsqueeze(-1)) * init["stoch"]
            deter = self.recur(stoch, action_in[:, t], deter)
            logit = self.post_logit(self.post_norm(self.post_deter(deter) + embed_in[:, t]))
            logit = logit.unflatten(-1, (self.stoch, self.discrete))  # (B, S, K)
            stoch = OneHotCategorical(logit, self.unimix).sample()
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        deter = torch.stack(deters, 1)  # (B, T, D)
        post = {"deter": deter, "stoch": torch.stack(stochs, 1), "logit": torch.stack(logits, 1)}
        if context is not None:
            post["context"] = context
        prior = {"deter": deter, "logit": self.prior_logit(deter)}
        return post, prior

    def obs_step(self, state, action, embed, is_first, context=None):
        """One live posterior step for acting: (N,...) tensors, ``is_first`` (N,), context (N,Z)."""
        context = context[:, None] if context is not None else None
        post, _ = self.observe(embed[:, None], action[:, None], is_first[:, None], state, context)
        return {key: value[:, 0] for key, value in post.items()}

    def img_step(self, state, action, sample=True):
        """One prior step: state (N,...), action (N,A) -> next state sampled from the prior
        (its mode if not ``sample``). A ``context`` in ``state`` conditions the step and is
        carried to the next state."""
        context = state.get("context")
        deter = self.recur(state["stoch"], self.input_projection(action, context), state["deter"])
        logit = self.prior_logit(deter)
        prior = OneHotCategorical(logit, self.unimix)
        nxt = {"deter": deter, "stoch": prior.sample() if sample else prior.mode(), "logit": logit}
        if context is not None:
            nxt["context"] = context
        return nxt

    def kl_losses(self, post_logit, prior_logit, free):
        """DreamerV3 KL balancing terms, each (B, T) and clipped below at ``free`` nats.
        Returns (dyn, rep, raw_kl): dyn trains the prior, rep the posterior."""
        post = unimix_log_probs(post_logit, self.unimix)
        prior = unimix_log_probs(prior_logit, self.unimix)
        dyn = categorical_kl(post.detach(), prior)
        rep = categorical_kl(post, prior.detach())
        return dyn.clamp(min=free), rep.clamp(min=free), dyn.detach()


# ----------------------------------------------------------------- LLCD context


class ContextEncoder(nn.Module):
    """LLCD context latent: a Gaussian z inferred from the last K transitions (docs/design.md#llcd-context).

    Transition j is (e_{j-1}, a_j, e_j): the embeddings before and after action a_j, so
    a feature of it can carry how the world responded to the action (the physics).
    Each becomes ``f_j = MLP([e_{j-1}, a_j, e_j])``; z_t's posterior comes from the
    masked mean of f over the K transitions before step t of the same episode (lags
    1..K, none across an ``is_first``), so z_t never sees observation t and the prior
    prediction of step t (the LLCD surprise) is a real prediction.

    Acting and training run the same ``posterior(history, valid)``: at acting time on
    a live (N, K, U) history (``step``), at training time on the (B, T, K, U) stack of
    lagged features of a replayed sequence (``sequence``).
    """

    def __init__(self, embed_dim, action_dim, length, units, dim, act="SiLU", norm=True, min_std=0.1):
        super().__init__()
        self.length, self.units, self.dim, self.min_std = length, units, dim, min_std
        self.transition = MLP(2 * embed_dim + action_dim, None, 1, units, act, norm)
        self.head = MLP(units, 2 * dim, 1, units, act, norm)

    def features(self, prev_embed, action, embed):
        return self.transition(torch.cat([prev_embed, action, embed], -1))  # (..., U)

    def posterior(self, history, valid):
        """history (..., K, U), valid (..., K) -> mean, std of q(z | context), each (..., Z)."""
        weights = valid.to(history.dtype).unsqueeze(-1)  # (..., K, 1)
        pooled = (history * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)  # (..., U)
        mean, raw_std = self.head(pooled).float().chunk(2, -1)
        return mean, F.softplus(raw_std) + self.min_std

    def sequence(self, embed, action, is_first, stored=None, start=0):
        """Training-time posteriors for steps ``start``.. of replayed sequences.
        embed (B,T,E), action (B,T,A), is_first (B,T); ``stored`` (B,T) False on padding
        steps (none if None), whose transitions are not used. The steps before ``start``
        only serve as context. Returns mean, std (B, T - start, Z)."""
        batch, length = is_first.shape
        prev = torch.cat([torch.zeros_like(embed[:, :1]), embed[:, :-1]], 1)  # (B, T, E)
        feats = self.features(prev, action, embed)  # (B, T, U)
        time = torch.arange(length, device=embed.device)
        episode = is_first.long().cumsum(1)  # (B, T) episode index inside the sequence
        valid = ~is_first.bool() & (time > 0)  # transition j needs e_{j-1} of the same episode
        if stored is not None:
            valid = valid & stored & torch.cat([torch.zeros_like(stored[:, :1]), stored[:, :-1]], 1)
        lags = torch.arange(1, self.length + 1, device=embed.device)  # (K,)
        steps = time[start:]  # (T', ) steps whose context is wanted
        source = steps[:, None] - lags  # (T', K): step of the transition at each lag
        inside = source >= 0
        index = source.clamp(min=0)
        history = feats[:, index]  # (B, T', K, U)
        same = episode[:, index] == episode[:, steps, None]  # (B, T', K)
        mask = valid[:, index] & same & inside  # (B, T', K)
        return self.posterior(history, mask)

    def initial(self, batch, embed_dim, device):
        """Empty live context for ``batch`` envs."""
        return {"history": torch.zeros(batch, self.length, self.units, device=device),
                "valid": torch.zeros(batch, self.length, dtype=torch.bool, device=device),
                "embed": torch.zeros(batch, embed_dim, device=device)}

    def step(self, context, action, embed, is_first):
        """One live step. Returns q(z_t)'s (mean, std) from the history before step t and
        the history with transition t pushed. action (N,A), embed (N,E), is_first (N,)."""
        keep = ~is_first.bool()
        valid = context["valid"] & keep[:, None]  # an episode start clears the history
        mean, std = self.posterior(context["history"], valid)
        feat = self.features(context["embed"], action, embed)  # (N, U)
        history = torch.cat([feat[:, None].to(context["history"].dtype), context["history"][:, :-1]], 1)
        valid = torch.cat([keep[:, None], valid[:, :-1]], 1)
        return (mean, std), {"history": history, "valid": valid, "embed": embed}


def gaussian_kl_to_standard(mean, std):
    """KL[N(mean, std^2) || N(0, I)] summed over the last axis."""
    return 0.5 * (mean ** 2 + std ** 2 - 1.0 - 2.0 * torch.log(std)).sum(-1)
