"""DreamerV3 on DeepMind Control, Atari, Crafter and Memory Maze: the agent and the training loop.

    python dreamer.py --configs dmc_proprio --task dmc_walker_walk
    python dreamer.py --configs dmc_vision --task dmc_cartpole_swingup
    python dreamer.py --configs small --task dmc_cartpole_balance
    python dreamer.py --configs atari100k --task atari_pong
    python dreamer.py --configs crafter small
    python dreamer.py --configs memorymaze --task memorymaze_9x9
    python dreamer.py --eval_only True --checkpoint logdir/RUN/latest.pt
    python dreamer.py --eval_only True --checkpoint logdir/RUN/latest.pt --eval_tasks [0,3]
    python dreamer.py --configs atari100k --task atari_breakout --eval_only True --eval_policy random

The loop: prefill the replay with random actions, then alternate acting in
``envs`` environments with gradient updates so that on average
``train_ratio`` replayed steps are trained on per agent step; evaluate every
``eval_every`` env steps, log every ``log_every``, checkpoint every
``checkpoint_every`` to ``latest.pt`` (atomic). Re-running the same command
resumes from ``latest.pt``, with the episodes on disk put back as that
checkpoint saw them (after a kill -9 too). Bad input, an incompatible
checkpoint, a failed save and repeated non-finite updates end the run with
one ``error: ...`` line naming the fix.
"""

import collections
import errno
import functools
import io
import json
import math
import pathlib
import sys
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import detector
import exploration
import models
import networks
import tools
from crl_schedule import Schedule, forgetting
from envs import atari, crafter, dmc, memorymaze, wrappers


class Dreamer(nn.Module):
    """World model + task actor-critic (+ optional exploration behaviour)."""

    def __init__(self, obs_space, act_space, config):
        super().__init__()
        self.config = config
        shapes = {key: tuple(space.shape) for key, space in obs_space.spaces.items() if key in ("state", "image")}
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        self.action_dim = tools.action_shape(act_space)[0]  # one-hot actions when discrete
        self.wm = models.WorldModel(shapes, self.action_dim, config)
        self.task_behavior = models.ImagBehavior(config, self.wm, self.action_dim, self.discrete)
        self.expl_behavior = {
            "greedy": None,
            "random": lambda: exploration.Random(self.action_dim, self.discrete),
            "plan2explore": lambda: exploration.Plan2Explore(config, self.wm, self.action_dim, self.discrete),
        }[config.expl_behavior]
        self.expl_behavior = self.expl_behavior() if self.expl_behavior else None
        self.paired_period = paired_period(config)
        if config.compile and tools.compile_available():
            self.compile_hot_pieces()

    def compile_hot_pieces(self):
        """compile: True: torch.compile, in place (parameter names and checkpoints unchanged), the
        pieces that run many times per update: every MLP body and the RSSM's GRU step."""
        for module in self.modules():
            if isinstance(module, networks.MLP):
                module.body.compile(dynamic=False)
            if isinstance(module, networks.RSSM):
                module.recur = torch.compile(module.recur, dynamic=False)

    @torch.no_grad()
    def policy(self, obs, state, mode, explore=False):
        """obs: dict of (N, ...) arrays; state: None at the start, then what the last call returned.
        mode: 'train' samples actions (and z), 'eval' takes the modes. Returns (actions (N, A), state);
        with LLCD, ``state`` also holds the context mean ``z`` (N, Z) used for this step and, in
        'train' mode, each env's candidate surprise scores ``surprise`` {name: (N,)} (NaN at
        episode starts)."""
        data = self.wm.preprocess({k: v for k, v in obs.items() if k in ("state", "image", "is_first", "reward")})
        if state is None:
            state = self.initial_state(data["is_first"].shape[0], data["is_first"].device)
        action, z = state["action"], None  # the action that led to this observation
        with tools.autocast(self.config.precision, self.config.device):
            embed = self.wm.encoder(data)  # (N, E)
            if self.wm.context is not None:
                (mean, std), context = self.wm.context.step(state["context"], action, embed, data["is_first"])
                z = mean + std * torch.randn_like(std) if mode == "train" else mean  # (N, Z)
            latent = self.wm.dynamics.obs_step(state["latent"], action, embed, data["is_first"], z)
            feat = self.wm.dynamics.policy_feat(latent)
            actor = self.expl_behavior.actor if explore and self.expl_behavior else self.task_behavior.actor
            dist = actor(feat)
            action = (dist.sample() if mode == "train" else dist.mode()).float()
        action = action.clamp(-1, 1)
        new_state = {"latent": latent, "action": action}
        if z is not None:
            new_state.update(context=context, z=mean.float().cpu().numpy())
        if z is not None and mode == "train":  # the surprise scores feed the detector: training steps only
            new_state.update(self.surprise(latent, data, state, embed, z, mean, obs))
        return action.cpu().numpy(), new_state

    def surprise(self, latent, data, state, embed, z, z_mean, obs):
        """LLCD candidate scores of a training step: {openloop, phase, reference, surprise {name: (N,) array}}.
        ``obs``: the step's observations as observed (``data`` preprocessed), which the ring keeps.
        ``latent_kl_zmean`` is latent_kl of the step taken again with the context at its mean
        instead of the sampled z (one noise source less); ``phase`` (N,) counts each env's steps
        since its episode started, and ``surprise["phase"]`` is it as floats."""
        scores = self.wm.surprise(latent, data)
        rng = tools.rng_states()  # the retaken step samples a latent: acting and training draw as without it
        z_mean_latent = self.wm.dynamics.obs_step(state["latent"], state["action"], embed, data["is_first"], z_mean)
        tools.set_rng_states(rng)
        scores["latent_kl_zmean"] = self.wm.latent_kl(z_mean_latent).float().masked_fill(
            data["is_first"].bool(), float("nan"))
        scores["openloop_nll"], openloop = self.wm.openloop_surprise(state["openloop"], latent, state["action"],
                                                                     z, data)
        phase = torch.where(data["is_first"].bool(), 0, state["phase"] + 1)  # (N,)
        scores["phase"] = phase.float()
        observed = {key: torch.as_tensor(obs[key]).clone() for key in ("state", "image", "is_first") if key in obs}
        step = {"data": observed, "action": state["action"], "z": z_mean, "phase": phase}
        reference = state["reference"].advance(step, self.rescore) if state["reference"] else None
        scores["paired_kl"] = reference.paired(scores["latent_kl_zmean"], phase) if reference else \
            torch.full_like(phase, math.nan, dtype=torch.float32)
        return {"openloop": openloop, "phase": phase, "reference": reference,
                "surprise": {name: score.cpu().numpy() for name, score in scores.items()}}

    def rescore(self, steps):
        """latent_kl (N,) of each block step of ``steps`` (``ReferenceRing``), taken again by the
        current world model: a posterior filter from the initial state over the ``WARMUP``
        steps before the block (episode starts inside still reset it), with the actions and
        context means used live. -> [(phase (N,), latent_kl (N,))] for the block's steps."""
        data = self.wm.preprocess({key: torch.stack([step["data"][key] for step in steps], 1)
                                   for key in steps[0]["data"]})  # (N, T, ...)
        action = torch.stack([step["action"] for step in steps], 1)  # (N, T, A)
        z = torch.stack([step["z"] for step in steps], 1)  # (N, T, Z)
        is_first = data["is_first"].bool().clone()  # (N, T)
        is_first[:, 0] = True
        rng = tools.rng_states()  # the filter samples latents: acting and training draw as without it
        post, _ = self.wm.dynamics.observe(self.wm.encoder(data), action, is_first, None, z)
        tools.set_rng_states(rng)
        kl = self.wm.latent_kl(post).float().masked_fill(is_first, math.nan)  # (N, T)
        return [(steps[t]["phase"], kl[:, t]) for t in range(ReferenceRing.WARMUP, len(steps))]

    def initial_state(self, batch, device, reference=None):
        """A policy state from scratch; ``reference``: a checkpointed ``ReferenceRing`` to carry on."""
        state = {"latent": self.wm.dynamics.initial(batch), "action": torch.zeros(batch, self.action_dim, device=device)}
        if self.wm.context is not None:
            state["context"] = self.wm.context.initial(batch, self.wm.encoder.out_dim, device)
            state["openloop"] = self.wm.initial_openloop(batch)
            state["phase"] = torch.zeros(batch, dtype=torch.long, device=device)
            state["reference"] = reference or (ReferenceRing(self.paired_period) if self.paired_period else None)
        return state

    def train_step(self, batch, adapt=False):
        """One update of the world model (and, with ``adapt``, of the LLCD context encoder),
        the task actor-critic and the exploration behaviour."""
        data, before = models.split_prefix(self.wm.preprocess(batch))
        post, metrics = self.wm.train_step(data, adapt, before)
        start = models.imagination_starts(post, data)
        metrics.update(self.task_behavior.train_step(start, self.task_objective))
        if self.expl_behavior is not None:
            metrics.update(self.expl_behavior.train_step(start, post, data))
        return metrics

    def task_objective(self, states, feat, actions):
        """Extrinsic reward of imagined steps: feat (H+1, N, F) -> (H, N)."""
        return self.wm.reward(feat).mode()[1:]

    def optimizers(self):
        """Every tools.Optimizer inside the agent, keyed by module path."""
        found = {}
        for path, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, tools.Optimizer):
                    found[f"{path}.{name}"] = value
        return found


# ----------------------------------------------------------------- environments


def make_env(config, mode, index):
    """One wrapped env of the task's suite (``<suite>_<name>``; a Continual DMC env for CRL runs);
    eval seeds are disjoint from train seeds. Continuous actions are normalised to [-1, 1],
    discrete ones are one-hot vectors as they are."""
    seed = config.seed * 1000 + index + (500 if mode == "eval" else 0)
    suite, name = config.task.split("_", 1)
    env = SUITE_ENVS[suite](config, name, seed)
    if isinstance(env.action_space, gym.spaces.Box):
        env = wrappers.NormalizeActions(env)
    return wrappers.TimeLimit(env, config.time_limit // config.action_repeat)


def dmc_env(config, name, seed):
    continual = config.crl_tasks or config.get("eval_tasks")  # old checkpoints' configs lack eval_tasks
    task_defs = config.crl_task_defs if continual else None
    return dmc.make(name, task_defs=task_defs, action_repeat=config.action_repeat, size=config.size,
                    camera=config.camera, seed=seed, pixels=config.pixels, fast_render=config.fast_render)


def atari_env(config, name, seed):
    return atari.Atari(name, config.action_repeat, config.size, seed, **config.atari)


def crafter_env(config, name, seed):
    return crafter.Crafter(name, config.size, seed)


def memorymaze_env(config, name, seed):
    return memorymaze.MemoryMaze(name, config.size, seed)


SUITE_ENVS = {"dmc": dmc_env, "atari": atari_env, "crafter": crafter_env, "memorymaze": memorymaze_env}
assert SUITE_ENVS.keys() == set(tools.SUITES)


def make_envs(config, mode, count):
    if config.parallel:
        return [wrappers.Parallel(functools.partial(make_env, config, mode, i)) for i in range(count)]
    return [wrappers.InProcess(make_env(config, mode, i)) for i in range(count)]


def close_envs(envs):
    for env in envs:
        if isinstance(env, wrappers.Parallel):
            env.close()


def set_task(envs, task):
    for env in envs:
        env.call("set_task", task)


# ----------------------------------------------------------------- LLCD


def paired_period(config):
    """Policy calls between a live step and its ``paired_kl`` reference: whole episodes, at least
    ``llcd_max_delay`` (so the reference comes from before any change the deadline still covers).
    Only DMC episodes have a fixed length, which keeps phases matched; elsewhere None (no score)."""
    if not (config.llcd and config.task.startswith("dmc_")):
        return None
    episode = config.time_limit // config.action_repeat
    max_delay = detector.resolve_max_delay(config.llcd_max_delay, config.time_limit, config.action_repeat)
    return episode * math.ceil(max_delay / episode)


class ReferenceRing:
    """The live steps the ``paired_kl`` score needs: what the last ``period + WARMUP + 1`` policy
    calls fed the world model (the observations as observed, images in uint8; the action before,
    the context mean, the phase), and the reference latent_kl of the steps one ``period`` before the
    coming calls.

    paired_kl = latent_kl_zmean of a live step minus that of the step one period earlier at the
    same episode phase, both taken by the current model. The model's own learning and the
    phase profile move both alike and cancel; a change of the physics raises the live one only,
    for one period. Every ``BLOCK`` calls the current model re-filters the next block of
    reference steps (``Dreamer.rescore``): about 2 posterior steps per call. A ring is never
    changed in place: ``advance`` returns the next one, as the policy state is threaded."""

    BLOCK = 16  # reference steps re-scored together
    WARMUP = 16  # steps the re-filter runs before a block's first step

    def __init__(self, period, steps=(), pending=()):
        self.period = period
        self.steps = collections.deque(steps, maxlen=period + self.WARMUP + 1)  # oldest: call t - period - WARMUP
        self.pending = collections.deque(pending)  # (phase (N,), latent_kl (N,)) of the coming calls' references

    def advance(self, step, rescore):
        """The ring after this call's ``step``; a new block is re-scored when the last one is used up."""
        ring = ReferenceRing(self.period, (*self.steps, step), self.pending)
        if not ring.pending and len(ring.steps) == ring.steps.maxlen:
            ring.pending.extend(rescore(list(ring.steps)[:self.WARMUP + self.BLOCK]))
        return ring

    def state_dict(self):
        """The ring as checkpoint data: its held steps and pending references, as held."""
        return {"period": self.period, "steps": list(self.steps), "pending": list(self.pending)}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["period"], state["steps"], state["pending"])

    def paired(self, live, phase):
        """This call's paired_kl (N,) from its live latent_kl_zmean (N,): NaN until a period is
        held, and for an env whose reference step is at another phase."""
        if not self.pending:
            return torch.full_like(live, math.nan)
        reference_phase, reference = self.pending.popleft()
        return torch.where(reference_phase == phase, live - reference, math.nan)


class ChangeMonitor:
    """LLCD bookkeeping of a run (docs/design.md#llcd): the live score streams, the change detector,
    the adaptation gate and the agent steps of every detection.

    Each training policy call gives one value per candidate score (``Dreamer.surprise``):
    the mean over the train envs that are not at an episode start. Every value is recorded
    with its agent step and the envs' mean episode phase (``stream``, written to
    ``llcd_scores.npz`` at each checkpoint) so detectors can be replayed offline; ``llcd_score``
    names the one the detector sees, averaged over the last ``llcd_smoothing`` calls. A
    detection opens the gate; so does
    the start of training, the first change the agent sees (otherwise ``llcd_gate:
    detector`` would act with an untrained context encoder until the first detection).
    """

    SCORES = tools.LLCD_SCORES
    FILE = "llcd_scores.npz"

    def __init__(self, config):
        self.detector = detector.from_config(config)
        self.gate = detector.AdaptationGate(config.llcd_gate, adapt_window_updates(config))
        self.max_delay = detector.resolve_max_delay(config.llcd_max_delay, config.time_limit, config.action_repeat)
        self.candidate = detector.CandidateScore(config, config.llcd_score)
        self.detections = []  # agent steps
        self.scores = []  # detector inputs since the last log
        self.stream = {key: [] for key in ("step", "phase", *self.SCORES)}  # every call's candidate scores

    def observe(self, surprise, agent_step):
        """Feed one policy call's candidate scores {name: (N,)}; True when it declares a change."""
        means = {name: finite_mean(surprise[name]) if name in surprise else math.nan for name in self.SCORES}
        phase = finite_mean(surprise["phase"]) if "phase" in surprise else math.nan
        self.stream["step"].append(agent_step)
        self.stream["phase"].append(phase)
        for name, value in means.items():
            self.stream[name].append(value)
        score = self.candidate.update(means, phase)
        if math.isfinite(score):
            self.scores.append(score)
        if not self.detector.update(score):
            return False
        self.detections.append(agent_step)
        self.gate.trigger()
        return True

    def write_stream(self, logdir):
        """Write every recorded score to ``logdir/llcd_scores.npz`` (atomically)."""
        buffer = io.BytesIO()
        np.savez(buffer, **{key: np.asarray(values, np.int64 if key == "step" else np.float32)
                            for key, values in self.stream.items()})
        tools.atomic_write_bytes(pathlib.Path(logdir) / self.FILE, buffer.getvalue())

    def log_scalars(self):
        """Score, threshold, gate and detection count since the last call."""
        out = {"llcd_gate": float(self.gate.open), "llcd_detections": float(len(self.detections))}
        if self.scores:
            out["llcd_score"] = float(np.mean(self.scores))
        if isinstance(self.detector, detector.CusumDetector):
            out["llcd_cusum"] = self.detector.statistic
        elif math.isfinite(self.detector.threshold):
            out["llcd_threshold"] = self.detector.threshold
        self.scores = []
        return out

    def switch_scalars(self, schedule, agent_step):
        """Strict detection scores so far (docs/design.md#llcd-scoring): delay (agent steps) per switch detected
        within ``llcd_max_delay``, misses among switches past that deadline, hit rate and its
        chance level, false alarms per 100K agent steps."""
        switches = [w for w in schedule.switches() if w.start_agent_step <= agent_step]
        spans = [(w.start_agent_step, w.end_agent_step) for w in switches]
        report = detector.detection_report(self.detections, spans, agent_step, self.max_delay)
        out = {"llcd_false_alarms_per_100k": report["false_alarms_per_unit"], "llcd_misses": float(report["misses"])}
        for key in ("hit_rate", "chance_hit_rate"):
            if math.isfinite(report[key]):
                out[f"llcd_{key}"] = report[key]
        for window, delay in zip(switches, report["delays"]):
            if math.isfinite(delay):
                out[f"llcd_delay_window_{window.index}"] = delay
        return out

    def state_dict(self):
        return {"detector": self.detector.state_dict(), "gate": self.gate.state_dict(),
                "detections": list(self.detections),
                "stream": {key: list(values) for key, values in self.stream.items()}}

    def load_state_dict(self, state):
        self.detector.load_state_dict(state["detector"])
        self.gate.load_state_dict(state["gate"])
        self.detections = list(state["detections"])
        if "stream" not in state:  # older checkpoints: the filter's last values only
            self.candidate.filter.values.extend(state["recent"])
            return
        calls = len(state["stream"]["step"])  # a score newer than the checkpoint: NaN before it
        self.stream = {key: list(state["stream"].get(key, [math.nan] * calls)) for key in self.stream}
        self.replay_candidate()

    def replay_candidate(self):
        """Bring the candidate's filter and phase baseline to where they were: replay the recorded stream."""
        name = self.candidate.score
        for value, phase in zip(self.stream[name], self.stream["phase"]):
            self.candidate.update({name: value}, phase)


def adapt_window_updates(config):
    """Updates the LLCD gate stays open after a detection: ``llcd_adapt_fraction`` of the updates
    of one task window (of the whole run without ``crl_tasks``), rounded up, so that it means the
    same in a short run and a long one."""
    agent_steps = config.crl_steps_per_task if config.crl_tasks else config.steps // config.action_repeat - config.prefill
    updates = agent_steps * config.train_ratio / (config.batch_size * config.batch_length)
    return math.ceil(round(config.llcd_adapt_fraction * updates, 6))  # round: 0.07 * 100 is 7.000000000000001


def finite_mean(values):
    """Mean of the finite entries of an array (NaN if none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


# ----------------------------------------------------------------- training run


class Run:
    """State and phases of one training run (prefill, train, eval, checkpoint)."""

    def __init__(self, config, logdir, payload=None):
        """``payload``: the checkpoint to resume from (see ``resume_payload``), or None."""
        self.config, self.logdir = config, pathlib.Path(logdir)
        self.agent_step = 0  # agent steps collected, prefill included, all envs summed
        self.updates = 0
        self.nonfinite_updates = 0  # updates in which an optimiser skipped a non-finite step
        self.nonfinite_streak = 0  # such updates in a row
        self.schedule = Schedule.from_config(config)
        self.eval_history = {}  # task -> [(agent_step, eval return)]
        self.task = None  # task the train envs run now
        self.pending_task = {}  # env index -> task to apply at its next reset (crl_switch: episode)
        self.replay = tools.Replay(self.logdir / "train_eps", config.dataset_size, config.seed, config.replay,
                                  config.replay_chunk)
        self.train_envs = make_envs(config, "train", config.envs)
        self.eval_envs = make_envs(config, "eval", eval_env_count(config))
        space = self.train_envs[0]
        self.agent = Dreamer(space.observation_space, space.action_space, config).to(config.device)
        self.random = exploration.Random(self.agent.action_dim, self.agent.discrete)
        self.monitor = ChangeMonitor(config) if config.llcd else None
        if self.monitor:
            self.monitor.gate.trigger()  # the start of training is the first change (restore overrides)
        self.checkpoint_path = self.logdir / "latest.pt"
        self.restored_eval, self.restored_rows = None, None
        if payload is not None:
            self.restore(payload)
        else:
            self.replay.discard_files()
        wall_clock = ("fps", "update_rate") if config.deterministic_run else ()
        self.logger = tools.Logger(self.logdir, self.env_step, self.restored_rows, exclude_from_jsonl=wall_clock)
        self.metrics, self.episode_stats = {}, []
        self.driver = tools.Driver(self.train_envs, self.replay, before_reset=self.apply_pending_task)
        if payload is not None:
            self.driver.state = self.resumed_policy_state(payload.get("paired_reference"))  # absent in older ones
        self.blend = None  # (previous task, task, fraction) the train envs run during a ramp
        if self.schedule.active:
            self.task = self.schedule.window_at(self.agent_step).task
            set_task(self.train_envs, self.task)
            self.follow_ramp()
        self.last = {"log": self.env_step, "eval": self.restored_eval, "ckpt": self.env_step, "time": time.time(),
                     "log_step": self.env_step, "log_updates": self.updates}

    @property
    def env_step(self):
        return self.agent_step * self.config.action_repeat

    @property
    def total_agent_steps(self):
        if self.schedule.active:
            return self.schedule.total_agent_steps
        return self.config.steps // self.config.action_repeat

    # -- continual schedule

    def follow_schedule(self):
        task = self.schedule.window_at(self.agent_step).task
        if self.schedule.active and task != self.task:
            self.switch_task(task, self.config.crl_switch == "immediate")
        self.follow_ramp()

    def follow_ramp(self):
        """During a ``crl_ramp`` move the train envs' physics one increment at a time toward the
        window's task; at the ramp's end they run exactly that task."""
        blend = self.schedule.blend_at(self.agent_step, self.config.get("crl_ramp", 0))
        if blend == self.blend:
            return
        for env in self.train_envs if blend else []:
            env.call("blend_tasks", *blend)
        if blend is None:
            set_task(self.train_envs, self.task)
        self.blend = blend

    def switch_task(self, task, immediate):
        """Move every train env to ``task`` now, or at each env's next episode start."""
        if immediate:
            set_task(self.train_envs, task)
        else:
            self.pending_task = {index: task for index in range(len(self.train_envs))}
        self.task = task
        self.logger.scalar("crl_task", task)
        self.logger.write(self.env_step)

    def apply_pending_task(self, index):
        if index in self.pending_task:
            self.train_envs[index].call("set_task", self.pending_task.pop(index))

    # -- checkpoints

    def checkpoint_payload(self):
        return {"agent": self.agent.state_dict(),
                "optimizers": {k: v.state_dict() for k, v in self.agent.optimizers().items()},
                "agent_step": self.agent_step, "updates": self.updates, "last_eval": self.last["eval"],
                "nonfinite_updates": self.nonfinite_updates,
                "eval_history": self.eval_history, "metrics_rows": self.logger.rows, "rng": tools.rng_states(),
                "replay": self.replay.state_dict(), "config": self.config.to_dict(),
                "llcd": self.monitor.state_dict() if self.monitor else None,
                "paired_reference": self.train_reference()}

    def train_reference(self):
        """The train policy state's ``paired_kl`` ring as checkpoint data, or None (no LLCD, or no train call yet)."""
        ring = self.driver.state.get("reference") if isinstance(self.driver.state, dict) else None
        return ring.state_dict() if ring else None

    def resumed_policy_state(self, ring):
        """The train policy state a resumed run starts from: from scratch (the envs restart their episodes)
        but for the checkpointed ``paired_kl`` ring, so the score is not blind for a period after every
        resume; None (the agent starts its own) without a ring of this run's period."""
        if ring is None or ring["period"] != self.agent.paired_period:
            return None
        return self.agent.initial_state(len(self.train_envs), self.config.device, ReferenceRing.from_state_dict(ring))

    def restore(self, payload):
        load_agent(self.agent, payload, self.checkpoint_path, "pass another --logdir", optimizers=True)
        if "chunks" not in payload["replay"]:
            raise tools.ConfigError(f"checkpoint {self.checkpoint_path} holds an episode replay of a version "
                                    "before replay chunks and cannot resume with this one: pass another --logdir")
        self.agent_step, self.updates = payload["agent_step"], payload["updates"]
        self.nonfinite_updates = payload.get("nonfinite_updates", 0)  # absent in older checkpoints
        self.restored_eval = payload["last_eval"]
        self.eval_history = payload["eval_history"]
        self.restored_rows = payload["metrics_rows"]
        tools.set_rng_states(payload["rng"])
        self.replay.load_state_dict(payload["replay"])
        if self.monitor:
            self.monitor.load_state_dict(payload["llcd"])
        print(f"Resumed from {self.checkpoint_path} at env step {self.env_step} ({self.updates} updates, "
              f"{self.replay.num_chunks} replay chunks on disk).", flush=True)

    def save(self):
        """Write latest.pt atomically, then drop the replay chunk files evicted since the last one.
        A failed write stops the run with one line; the previous latest.pt stays valid."""
        try:
            tools.save_checkpoint(self.checkpoint_path, self.checkpoint_payload())
        except OSError as error:
            raise SystemExit(self.save_error(error)) from None
        if self.monitor:
            self.monitor.write_stream(self.logdir)
        self.replay.purge_evicted()
        self.last["ckpt"] = self.env_step

    def save_error(self, error):
        previous = (f"the previous checkpoint (env step {self.last['ckpt']}) is intact"
                    if self.checkpoint_path.exists() else "no checkpoint was written before")
        fix = "free disk space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make the logdir writable"
        return (f"error: saving {self.checkpoint_path} failed ({error.strerror or error}); {previous}: "
                f"{fix} and rerun the same command to resume")

    # -- phases

    def prefill(self):
        missing = self.config.prefill - self.agent_step
        if missing <= 0:
            return
        print(f"Prefill: {missing} random agent steps.", flush=True)
        progress = tools.Progress("prefill", self.config.prefill, self.agent_step, self.config.action_repeat)

        def on_step(count):
            self.agent_step += count
            progress.update(count)

        random_policy = functools.partial(self.random.policy, mode="train")
        self.driver.run(random_policy, steps=missing, on_step=on_step, on_episode=self.on_train_episode)
        self.driver.state = None
        progress.close()
        self.save()  # a kill before the first eval keeps the prefill

    def train(self):
        cfg = self.config
        progress = tools.Progress("train", self.total_agent_steps, self.agent_step, cfg.action_repeat)
        progress.mark_updates(self.updates)

        def policy(obs, state):
            explore = not cfg.expl_until or self.agent_step < cfg.expl_until // cfg.action_repeat
            actions, state = self.agent.policy(obs, state, "train", explore)
            if self.monitor and self.monitor.observe(state["surprise"], self.agent_step):
                self.logger.scalar("llcd_detection", 1.0)
                self.logger.write(self.env_step)
            return actions, state

        def on_step(count):
            self.agent_step += count
            self.follow_schedule()
            self.train_due_updates()
            progress.update(count, self.updates)
            self.maybe_log_and_save()

        if self.agent_step == cfg.prefill and self.schedule.active:
            self.logger.scalar("crl_task", self.task)
        try:
            while self.agent_step < self.total_agent_steps:
                if self.eval_due():
                    self.evaluate()
                self.driver.run(policy, steps=self.steps_to_next_stop(), on_step=on_step,
                                on_episode=self.on_train_episode)
        finally:
            progress.close()
        if self.last["eval"] != self.env_step:
            self.evaluate()
        self.save()

    def eval_due(self):
        """Every ``eval_every`` env steps, and at every task boundary of the schedule."""
        if self.last["eval"] is None or self.env_step - self.last["eval"] >= self.config.eval_every:
            return True
        at_boundary = self.schedule.next_boundary_agent_step(self.agent_step - 1) == self.agent_step
        return at_boundary and self.last["eval"] != self.env_step

    def steps_to_next_stop(self):
        """Agent steps until the next eval point, task boundary or the end of the run."""
        cfg = self.config
        stops = [self.last["eval"] // cfg.action_repeat + cfg.eval_every // cfg.action_repeat, self.total_agent_steps,
                 self.schedule.next_boundary_agent_step(self.agent_step)]  # math.inf past the last boundary
        return max(min(stops) - self.agent_step, 1)

    def train_due_updates(self):
        """Run the updates that keep replayed/collected steps at ``train_ratio``."""
        cfg = self.config
        trained = max(0, self.agent_step - cfg.prefill) * cfg.train_ratio
        due = int(trained // (cfg.batch_size * cfg.batch_length)) - self.updates
        if due > 0 and not self.replay.can_sample(cfg.batch_length):
            return  # no chunk is complete yet; the due updates run once one is
        for _ in range(due):
            batch = self.sample_batch(cfg.batch_size)
            adapt = bool(self.monitor and self.monitor.gate.open)
            metrics, skipped = self.update(batch, adapt)
            for key, value in metrics.items():
                self.metrics.setdefault(key, []).append(value)
            if self.monitor:
                self.monitor.gate.consume()
            self.updates += 1
            self.count_nonfinite(skipped)

    def sample_batch(self, size):
        """``size`` replayed windows, with the steps before each that the LLCD context needs."""
        return self.replay.sample(size, self.config.batch_length, self.agent.wm.context_prefix)

    def update(self, batch, adapt):
        """One agent train step -> (metrics, names of the optimisers that skipped a non-finite
        step). After a skip the agent's float buffers (e.g. the return-scale EMA) are put back
        too, so a skipped update leaves the agent as it was."""
        buffers = [buffer for buffer in self.agent.buffers() if buffer.is_floating_point()]
        before = [buffer.clone() for buffer in buffers]
        metrics = self.agent.train_step(batch, adapt)
        skipped = [key.removesuffix("_nonfinite") for key, value in metrics.items()
                   if key.endswith("_nonfinite") and value]
        if skipped:
            for buffer, value in zip(buffers, before):
                buffer.copy_(value)
        return metrics, skipped

    def count_nonfinite(self, skipped):
        """Count skipped updates; ``nonfinite_limit`` in a row log, save and stop the run."""
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_updates += 1
        self.nonfinite_streak += 1
        if self.nonfinite_streak < self.config.nonfinite_limit:
            return
        self.log_training()
        self.save()
        raise SystemExit(
            f"error: {self.nonfinite_streak} updates in a row had non-finite losses or gradients "
            f"({', '.join(skipped)}) and were skipped; stopped at env step {self.env_step} with latest.pt "
            "holding the last finite agent: lower the learning rates, try --precision 32, or check the "
            "observations and rewards for NaN/inf")

    def on_train_episode(self, episode_return, length, episode):
        """Collect the episode's return and length; an episode whose env reports ``log_*``
        statistics (e.g. Crafter's achievements) gets a metrics row of its own with
        ``episode_return``, ``episode_length`` and ``episode_<name>`` (the final values)."""
        self.episode_stats.append((episode_return, length))
        if episode is None:
            return
        self.logger.scalar("episode_return", episode_return)
        self.logger.scalar("episode_length", length)
        for key, values in episode.items():
            self.logger.scalar(f"episode_{key.removeprefix('log_')}", values[-1])
        self.logger.write(self.env_step, console=False)

    def maybe_log_and_save(self):
        cfg = self.config
        if self.env_step - self.last["log"] >= cfg.log_every:
            self.log_training()
        if self.env_step - self.last["ckpt"] >= cfg.checkpoint_every:
            self.save()

    def log_training(self):
        now = time.time()
        elapsed = max(now - self.last["time"], 1e-6)
        log = self.logger
        for key, values in self.metrics.items():
            log.scalar(key, torch.stack([torch.as_tensor(v).float() for v in values]).mean().item())
        if self.episode_stats:
            returns, lengths = zip(*self.episode_stats)
            log.scalar("train_return", np.mean(returns))
            log.scalar("train_length", np.mean(lengths))
        log.scalar("fps", (self.env_step - self.last["log_step"]) / elapsed)
        log.scalar("update_rate", (self.updates - self.last["log_updates"]) / elapsed)
        log.scalar("updates", self.updates)
        log.scalar("nonfinite_updates", self.nonfinite_updates)
        log.scalar("replay_steps", self.replay.num_steps)
        for task, fraction in self.replay.task_fractions().items():
            log.scalar(f"replay_task_{task}_fraction", fraction)
        for key, value in (self.monitor.log_scalars() if self.monitor else {}).items():
            log.scalar(key, value)
        if cfg_pixels(self.config) and self.config.video_pred_log and self.replay.num_chunks:
            batch = self.agent.wm.preprocess(self.sample_batch(6))
            log.video("train_openl", self.agent.wm.video_pred(batch))
        log.write(self.env_step, console=False)
        self.metrics, self.episode_stats = {}, []
        self.last.update(log=self.env_step, time=now, log_step=self.env_step, log_updates=self.updates)

    def evaluate(self):
        """Evaluate, log and checkpoint. The random streams are put back as evaluation found them,
        so how often and on how many tasks a run evaluates does not change its training: the first
        window of a continual run trains exactly as the single-task run of its task."""
        self.last["eval"] = self.env_step
        if self.config.eval_episode_num <= 0:
            return
        rng = tools.rng_states()
        if self.schedule.active:
            self.evaluate_every_task()
        else:
            self.log_eval("eval", self.eval_envs)
        tools.set_rng_states(rng)
        self.logger.write(self.env_step)
        self.save()

    def log_eval(self, prefix, envs):
        """Evaluate, log return (and video); returns (mean return, context means (n, Z) or None)."""
        returns, video, zs = evaluate(self.agent, envs, self.config.eval_episode_num, cfg_pixels(self.config))
        self.logger.scalar(f"{prefix}_return", np.mean(returns))
        self.logger.scalar(f"{prefix}_return_std", np.std(returns))
        normalized = human_normalized(self.config.task, np.mean(returns))
        if normalized is not None:
            self.logger.scalar(f"{prefix}_human_normalized", normalized)
        if video is not None:
            self.logger.video(f"{prefix}_policy", video[None])
        return float(np.mean(returns)), zs

    def evaluate_every_task(self):
        """Eval on every task of the schedule (eval envs only) and log the forgetting metrics
        and, with LLCD, the detection report and how well z tells the tasks apart."""
        current, contexts = {}, {}
        for task in self.schedule.first_windows():
            set_task(self.eval_envs, task)
            current[task], contexts[task] = self.log_eval(f"task_{task}_eval", self.eval_envs)
            self.eval_history.setdefault(task, []).append((self.agent_step, current[task]))
        self.logger.scalar("crl_avg_reward_all_tasks", np.mean(list(current.values())))
        if self.monitor:
            for key, value in self.monitor.switch_scalars(self.schedule, self.agent_step).items():
                self.logger.scalar(key, value)
            if len(contexts) > 1:
                self.logger.scalar("llcd_probe_accuracy", tools.probe_accuracy(contexts))
        drops = []
        for task, window in self.schedule.first_windows().items():
            drop, drop_max = forgetting(self.eval_history[task], window.end_agent_step)
            if not math.isnan(drop):  # NaN while the task's first window is unfinished
                self.logger.scalar(f"crl_forgetting_task_{task}", drop)
                self.logger.scalar(f"crl_forgetting_max_task_{task}", drop_max)
                drops.append(drop)
        if drops:
            self.logger.scalar("crl_avg_forgetting", np.mean(drops))

    def close(self):
        close_envs(self.train_envs + self.eval_envs)
        self.logger.close()


def cfg_pixels(config):
    """Whether observations are images: DMC with ``pixels``, every other suite always."""
    return bool(config.pixels) or not config.task.startswith("dmc_")


def human_normalized(task, score):
    """Atari's human-normalised score of ``score`` (None for other suites and games without references)."""
    return atari.human_normalized(task.removeprefix("atari_"), score) if task.startswith("atari_") else None


VIDEO_FRAMES = 1000  # eval videos show at most this many frames (Atari and Crafter episodes run to 10K+)


def evaluate(agent, envs, episodes, record_video):
    """Greedy-policy returns of ``episodes`` episodes, the first episode's first ``VIDEO_FRAMES``
    frames if ``record_video``, and with LLCD the context mean z of every step, in time order (n, Z).
    The episodes run in rounds of up to ``len(envs)``, one episode per env, the envs of a round in
    one policy batch (see ``eval_env_count``)."""
    if episodes <= 0:
        return [], None, None
    returns, frames, zs = [], [], []

    def on_episode(episode_return, length, episode):
        returns.append(float(episode_return))
        if record_video and not frames:
            frames.append(episode["image"][:VIDEO_FRAMES])

    agent.eval()
    for first in range(0, episodes, len(envs)):
        driver = tools.Driver(envs[:episodes - first], keep_episodes=record_video)

        def policy(obs, state):
            actions, state = agent.policy(obs, state, "eval")
            if "z" in state:
                zs.append(state["z"][sorted(driver.running)])  # (running, Z): waiting envs left out
            return actions, state

        driver.run_each_once(policy, on_episode=on_episode)
    agent.train()
    return returns, (frames[0] if frames else None), (np.concatenate(zs) if zs else None)


def eval_env_count(config):
    """Eval envs: one per eval episode (they run in one policy batch), at most ``eval_envs_max``."""
    return max(1, min(config.eval_episode_num, config.eval_envs_max))


def setup_logdir(config, logdir, write_config=True):
    """Create ``logdir`` and write the resolved config there (unless not ``write_config``)."""
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        if write_config:
            tools.write_yaml({**config.to_dict(), "logdir": str(logdir)}, logdir / "config.yaml")
    except OSError as error:
        raise tools.ConfigError(f"cannot write to logdir '{logdir}' ({error.strerror}); pass --logdir DIR") from error


def check_rendering(config):
    """MuJoCo pixel runs (DMC with pixels, Memory Maze) need a working GL backend: render one
    tiny frame before anything else."""
    mujoco_pixels = (config.pixels and config.task.startswith("dmc_")) or config.task.startswith("memorymaze_")
    problem = dmc.gl_problem(render=True) if mujoco_pixels else None
    if problem:
        raise tools.ConfigError(problem)


def read_checkpoint(path, device):
    try:
        return tools.load_checkpoint(path, device)
    except tools.UnsafeCheckpointError as error:
        raise tools.ConfigError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise tools.ConfigError(f"cannot read checkpoint {path} ({type(error).__name__}: {one_line(error)}); "
                                "move it away to start the run over") from None


def resume_payload(config, logdir):
    """The checkpoint in ``logdir`` to resume from (None for a new run), checked against ``config``
    before anything in the logdir changes."""
    path = logdir / "latest.pt"
    if not path.exists():
        return None
    payload = read_checkpoint(path, config.device)
    tools.check_checkpoint_config(path, payload["config"], config,
                                  fix="resume with the flags the run was started with, or pass another --logdir")
    return payload


def load_agent(agent, payload, path, fix, optimizers):
    """Load the checkpoint's weights (and optimiser states); a mismatch is a one-line ConfigError."""
    try:
        agent.load_state_dict(payload["agent"])
        if optimizers:
            for name, opt in agent.optimizers().items():
                opt.load_state_dict(payload["optimizers"][name])
    except (RuntimeError, ValueError, KeyError) as error:
        raise tools.ConfigError(f"checkpoint {path} does not fit this agent ({one_line(error)}); it was written "
                                f"by another code version or config: {fix}") from None


def one_line(error, limit=300):
    return " ".join(str(error).split())[:limit]


def eval_only(config):
    """Evaluate a saved agent: print returns and write eval_returns.json next to the checkpoint.
    The agent is built from the checkpoint's config; architecture flags given on the command
    line (those differing from the defaults) must agree with it. ``eval_policy: random``
    evaluates uniform random actions instead (``eval_random``); ``eval_tasks`` evaluates on
    each of those physics tasks (``evaluate_and_write``)."""
    if config.eval_policy == "random":
        return eval_random(config)
    if not config.checkpoint or not pathlib.Path(config.checkpoint).exists():
        raise tools.ConfigError(f"--eval_only needs --checkpoint PATH to an existing latest.pt, got {config.checkpoint!r}")
    payload = read_checkpoint(config.checkpoint, config.device)
    defaults = tools.load_config([])
    given = [key for key in tools.CHECKPOINT_KEYS
             if tools.config_value(config, key) != tools.config_value(defaults, key)]
    tools.check_checkpoint_config(config.checkpoint, payload["config"], config, keys=given,
                                  fix="drop those flags (eval uses the checkpoint's config) or pick another one")
    saved = tools.Config(payload["config"])
    saved.update(device=config.device, eval_episode_num=config.eval_episode_num, parallel=config.parallel,
                 eval_envs_max=config.eval_envs_max, eval_tasks=config.eval_tasks)
    tools.validate_physics_tasks(saved, "eval_tasks")
    check_rendering(saved)
    envs = make_envs(saved, "eval", eval_env_count(saved))
    agent = Dreamer(envs[0].observation_space, envs[0].action_space, saved).to(config.device)
    load_agent(agent, payload, config.checkpoint, "pick another --checkpoint", optimizers=False)
    summary = evaluate_and_write(agent, saved, envs, pathlib.Path(config.checkpoint).parent,
                                 checkpoint=str(config.checkpoint), task=saved.task,
                                 env_step=payload["agent_step"] * saved.action_repeat)
    close_envs(envs)
    return summary


def eval_random(config):
    """The random-policy baseline: ``eval_episode_num`` episodes of uniform random actions on the
    task's eval envs, through ``evaluate`` as an agent's; eval_returns.json goes to the logdir."""
    tools.validate_physics_tasks(config, "eval_tasks")
    check_rendering(config)
    logdir = pathlib.Path(config.logdir) if config.logdir else tools.default_logdir(config)
    setup_logdir(config, logdir, write_config=False)  # it may hold a training run's config
    envs = make_envs(config, "eval", eval_env_count(config))
    space = envs[0].action_space
    policy = exploration.Random(tools.action_shape(space)[0], isinstance(space, gym.spaces.Discrete))
    summary = evaluate_and_write(policy, config, envs, logdir, policy="random", task=config.task, seed=config.seed)
    close_envs(envs)
    return summary


def evaluate_and_write(actor, config, envs, folder, **info):
    """Evaluate ``actor`` (an agent or a policy) on ``envs`` into ``folder``/eval_returns.json; with ``eval_tasks``, on
    each of those physics tasks in turn, into eval_returns_task<k>.json (a list of summaries)."""
    if not config.eval_tasks:
        returns, _, _ = evaluate(actor, envs, config.eval_episode_num, False)
        return write_eval_summary(folder / "eval_returns.json", returns, **info)
    summaries = []
    for task in config.eval_tasks:
        set_task(envs, task)
        returns, _, _ = evaluate(actor, envs, config.eval_episode_num, False)
        summaries.append(write_eval_summary(folder / f"eval_returns_task{task}.json", returns,
                                            physics_task=task, **info))
    return summaries


def write_eval_summary(path, returns, **info):
    """Write ``info`` (with ``task``), the returns, their mean and std (and on Atari the
    human-normalised mean) to ``path`` as JSON, print them in one line, return them."""
    summary = {**info, "returns": returns, "mean": float(np.mean(returns)), "std": float(np.std(returns))}
    normalized = human_normalized(info["task"], summary["mean"])
    if normalized is not None:
        summary["human_normalized"] = normalized
    tools.atomic_write_bytes(path, json.dumps(summary, indent=2).encode())
    print(f"eval over {len(returns)} episodes: {summary['mean']:.1f} ± {summary['std']:.1f} -> {path}")
    return summary


def main(argv):
    try:
        config = tools.load_config(argv)
        config.device = tools.resolve_device(config.device)
        warning = tools.precision_warning(config.precision, config.device)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.device == "cpu":
            tools.keep_freed_memory()
        tools.set_seed(config.seed, config.deterministic_run)
        if config.eval_only:
            return eval_only(config)
        check_rendering(config)
        logdir = pathlib.Path(config.logdir) if config.logdir else tools.default_logdir(config)
        payload = resume_payload(config, logdir)
        setup_logdir(config, logdir)
        print(f"Logdir: {logdir}", flush=True)
        run = Run(config, logdir, payload)
    except tools.ConfigError as error:
        sys.exit(f"error: {error}")
    try:
        run.prefill()
        run.train()
    finally:
        run.close()


if __name__ == "__main__":
    main(sys.argv[1:])
