"""Measure, without any agent, that every continual task really changes the physics.

For each domain and task of ``crl_task_defs`` (configs.yaml, top level or
``defaults``; or ``--task-defs FILE``) the robot is
put into a clean pose, the raw MuJoCo physics is stepped with fixed controls,
and the outcome is compared with a physics prediction or with a fresh standard
env of the same domain. One row per (task, factor):

  gravity         free-fall acceleration (cup: the ball; walker: dropped in the
                  air), or from the period T of small swings of the hanging
                  pole, wind off (cartpole, pendulum): g = g0 (T0 / T)^2
  wind            drift acceleration F / M of a free body (cartpole: cart and
                  pole on the rail; cup: the ball; walker: in the air); pendulum:
                  the hanging equilibrium tilts by atan(F / (m g))
  mass_scale      the same probe push accelerates the body mass_scale times less
  damping_scale   pendulum: decay rate of the swing amplitude; cup: damping of
                  the cup's rail from its momentum balance; cartpole, walker:
                  energy lost per sum(b0 v^2) dt, relative to the standard env
  joint_friction  energy lost beyond damping per sum(|v|) dt: the dry friction force
  friction_scale  walker sliding on its feet: horizontal / normal impulse = mu
  actuator_scale  displacement of the actuated joints under full control vs std

Each row also shows the quantity's value under the standard physics. Checks:
"predicted +-10%" (measured within 10% of the prediction, and the standard value
more than 10% off it, so that a change that did not take effect fails), "direction
vs std" (no clean prediction: the change from the standard value must have the
expected sign and half to twice the expected size; used for the energy checks
of walker and pendulum, whose Euler step keeps energy only approximately), and
"arrays equal" (tasks without factors, and the standard task again after all
others: every model array equals a fresh env's). A factor with no measurement
for its domain (e.g. friction with contacts disabled) fails. ``--speed`` also
times env steps of the plain DMC env and of the continual env under its standard
and its windy task (interleaved runs; rates from the 10th-percentile step time,
which other jobs on the machine distort little) and marks SLOW a continual env
below 90% of the plain rate; timing does not change the exit status, which is 1
if any physics check fails.

    python verify_physics.py [--domain cartpole walker] [--tasks 0 3] [--speed]
"""

import argparse
import dataclasses
import math
import pathlib
import sys
import time
from typing import Callable

import mujoco
import numpy as np
from ruamel.yaml import YAML

from envs import dmc

ROOT = pathlib.Path(__file__).resolve().parent
TOLERANCE = 0.1
SPEED_LIMIT = 0.9  # a continual env must keep at least 90% of the plain env's steps/s
SPEED_PERCENTILE = 10  # step time that rates are computed from: robust to other jobs on the machine
SPEED_ENVS = ("plain", "standard", "windy")  # plain DMC env; continual env under its standard / a windy task
PREDICTED = "predicted +-10%"
DIRECTION = "direction vs std"
EQUAL = "arrays equal"
UNMEASURED = "no measurement"


def load_task_defs(path=None):
    """``crl_task_defs`` from ``path``, else from configs.yaml (top level or ``defaults``)."""
    yaml = YAML(typ="safe")
    candidates = [pathlib.Path(path)] if path else [ROOT / "configs.yaml"]
    for candidate in candidates:
        config = yaml.load(candidate.read_text()) if candidate.exists() else None
        for block in (config or {}, (config or {}).get("defaults") or {}):
            if block.get("crl_task_defs"):
                return block["crl_task_defs"]
    raise ValueError(f"no crl_task_defs in {', '.join(map(str, candidates))}")


# ---------------------------------------------------------------------------
# Clean starting poses (zero velocities, zero controls).
# ---------------------------------------------------------------------------


def _set_pose(physics, **qpos):
    physics.data.qpos[:] = 0.0
    physics.data.qvel[:] = 0.0
    physics.data.ctrl[:] = 0.0
    for joint, value in qpos.items():
        physics.named.data.qpos[joint] = value


def cartpole_hanging(physics):
    _set_pose(physics, slider=-0.5, hinge_1=math.pi)


def pendulum_hanging(physics):
    _set_pose(physics, hinge=math.pi)


def cup_ball_aside(physics):
    """Ball 0.2 m beside the cup at rim height: string slack, no contact for 0.1 s."""
    _set_pose(physics, ball_x=0.2, ball_z=0.4)


def walker_in_air(physics):
    """Torso 4.3 m up, joints mid-range: no floor contact and no joint limit for 0.25 s."""
    angles = {"hip": 0.5, "knee": -1.0, "ankle": 0.3}
    joints = {f"{side}_{name}": angle for side in ("left", "right") for name, angle in angles.items()}
    _set_pose(physics, rootz=3.0, **joints)


def walker_on_feet(physics):
    """Straight legs, both feet touching the floor."""
    _set_pose(physics)


@dataclasses.dataclass(frozen=True)
class Rig:
    """How one domain is measured."""

    env: str  # suite task loaded for the measurements
    body: str  # tracked body: its subtree's centre of mass (or the pendulum's pole)
    pose: Callable  # clean starting pose
    window: int  # physics steps of a fall / drift / probe measurement
    probe: tuple  # xfrc 6-vector pushed onto `body` for the mass test
    kick: dict  # joint velocities for the damping / joint-friction tests
    free: bool = True  # the body's subtree translates freely along x
    falls: bool = False  # ... and along z (else gravity comes from a swing period)
    swing_joint: str = ""  # hinge whose small swings give the period (and damping, from their decay)
    spring_joint: str = ""  # spring-loaded slide joint whose damping comes from its momentum balance
    kick_window: int = 50
    energy_check: str = PREDICTED  # energy bookkeeping of an Euler step is inexact (walker, pendulum)


RIGS = {
    "cartpole": Rig("cartpole_swingup", "cart", cartpole_hanging, window=100, probe=(1.0, 0, 0, 0, 0, 0),
                    kick={"slider": 1.0}, swing_joint="hinge_1", kick_window=30),
    "cup": Rig("cup_catch", "ball", cup_ball_aside, window=50, probe=(0.1, 0, 0, 0, 0, 0),
               kick={"cup_x": 0.5}, falls=True, spring_joint="cup_x"),
    "pendulum": Rig("pendulum_swingup", "pole", pendulum_hanging, window=5, probe=(0, 0, 0, 0, 0.5, 0),
                    kick={"hinge": 3.0}, free=False, swing_joint="hinge", kick_window=100, energy_check=DIRECTION),
    "walker": Rig("walker_walk", "torso", walker_in_air, window=100, probe=(30.0, 0, 0, 0, 0, 0),
                  kick={f"{s}_{j}": 3.0 for s in ("left", "right") for j in ("hip", "knee", "ankle")}, falls=True,
                  kick_window=10, energy_check=DIRECTION),
}


# ---------------------------------------------------------------------------
# Simulation primitives.
# ---------------------------------------------------------------------------


def start(env, pose, velocities=None):
    """Reset the env (which re-applies its wind), then put the robot into ``pose``."""
    env.reset()
    physics = env.physics
    pose(physics)
    for joint, value in (velocities or {}).items():
        physics.named.data.qvel[joint] = value
    physics.forward()
    return physics


def simulate(physics, steps, observe, ctrl=0.0, push=None):
    """Step ``steps`` times with constant controls and an optional extra push (body id, 6-vector)."""
    physics.data.ctrl[:] = ctrl
    if push is not None:
        physics.data.xfrc_applied[push[0]] += push[1]
    values = [observe(physics)]
    for _ in range(steps):
        physics.step()
        values.append(observe(physics))
    return np.array(values)


def fitted_acceleration(values, dt):
    """Second derivative of the least-squares parabola through ``values`` sampled every ``dt``."""
    times = np.arange(len(values)) * dt
    return 2.0 * np.polyfit(times, values, 2)[0]


def body_id(physics, name):
    return physics.model.name2id(name, "body")


def qpos_index(physics, joint):
    model = physics.model
    return int(model.jnt_qposadr[model.name2id(joint, "joint")])


def com(physics, body, axis):
    return float(physics.data.subtree_com[body, axis])


def coordinate(physics, rig):
    """The tracked coordinate: subtree COM x of a free body, else the swing joint's angle."""
    if rig.free:
        return com(physics, body_id(physics, rig.body), 0)
    return float(physics.data.qpos[qpos_index(physics, rig.swing_joint)])


def energy(physics):
    model, data = physics.model.ptr, physics.data.ptr
    mujoco.mj_energyPos(model, data)
    mujoco.mj_energyVel(model, data)
    return float(data.energy.sum())


def subtree_mass(env, body):
    physics = env.physics
    return float(physics.model.body_subtreemass[body_id(physics, body)])


# ---------------------------------------------------------------------------
# Raw measurements on one env.
# ---------------------------------------------------------------------------


def fall_acceleration(env, rig):
    physics = start(env, rig.pose)
    body = body_id(physics, rig.body)
    heights = simulate(physics, rig.window, lambda p: com(p, body, 2))
    return fitted_acceleration(heights, physics.timestep())


def start_swing(env, rig, amplitude):
    """Hanging pose tilted by ``amplitude`` (rad) with the wind switched off, which would shift
    the equilibrium (the wind has its own check); returns the physics and the swing's qpos index."""
    physics = start(env, rig.pose)
    joint = qpos_index(physics, rig.swing_joint)
    physics.data.qpos[joint] += amplitude
    physics.data.xfrc_applied[:] = 0.0
    physics.forward()
    return physics, joint


def swing_period(env, rig, amplitude=0.05, seconds=15.0):
    """Mean period of small swings about the hanging position (upward zero crossings)."""
    physics, joint = start_swing(env, rig, amplitude)
    steps = int(seconds / physics.timestep())
    angle = simulate(physics, steps, lambda p: float(p.data.qpos[joint])) - math.pi
    up = np.flatnonzero((angle[:-1] < 0) & (angle[1:] >= 0))
    crossings = (up + angle[up] / (angle[up] - angle[up + 1])) * physics.timestep()
    if len(crossings) < 2:
        return math.inf
    return float(np.mean(np.diff(crossings)))


def drift_acceleration(env, rig, push=None):
    physics = start(env, rig.pose)
    push = None if push is None else (body_id(physics, rig.body), np.asarray(push, float))
    values = simulate(physics, rig.window, lambda p: coordinate(p, rig), push=push)
    return fitted_acceleration(values, physics.timestep())


def probe_acceleration(env, rig):
    """Acceleration caused by the rig's probe push alone (a run without it subtracted)."""
    return drift_acceleration(env, rig, rig.probe) - drift_acceleration(env, rig)


def hanging_tilt(env, rig, seconds=30.0):
    """Settled angle (rad) of the pendulum's centre of mass from straight down; + along +x."""
    physics = start(env, rig.pose)
    body, joint = body_id(physics, rig.body), physics.model.name2id(rig.swing_joint, "joint")

    def tilt(p):
        offset = p.data.xipos[body] - p.data.xanchor[joint]
        return math.atan2(offset[0], -offset[2])

    angles = simulate(physics, int(seconds / physics.timestep()), tilt)
    return float(np.mean(angles[-len(angles) // 6:]))


def dissipation(env, rig, baseline_damping):
    """Energy lost over the kick window and the integrals of sum(b0 v^2) and of sum(|v|) (actuated dofs)."""
    physics = start(env, rig.pose, rig.kick)
    dofs = dmc.actuated_dofs(physics.model)
    samples = simulate(physics, rig.kick_window, lambda p: (
        energy(p), float(baseline_damping @ p.data.qvel ** 2), float(np.abs(p.data.qvel[dofs]).sum())))
    dt = physics.timestep()
    lost = samples[0, 0] - samples[-1, 0]
    return lost, np.trapezoid(samples[:, 1], dx=dt), np.trapezoid(samples[:, 2], dx=dt)


def actuated_displacement(env, rig, steps=10):
    """Size of the displacement of the actuated joints that full control adds in ``steps`` steps."""
    def positions(ctrl):
        physics = start(env, rig.pose)
        joints = physics.model.actuator_trnid[:, 0]
        qpos = physics.model.jnt_qposadr[joints]
        return simulate(physics, steps, lambda p: p.data.qpos[qpos].copy(), ctrl=ctrl)[-1]

    return float(np.linalg.norm(positions(1.0) - positions(0.0)))


def swing_decay(env, rig, amplitude=0.3, seconds=15.0):
    """Decay rate (1/s) of the swing amplitude about the hanging position, from its peaks."""
    physics, joint = start_swing(env, rig, amplitude)
    angle = simulate(physics, int(seconds / physics.timestep()), lambda p: float(p.data.qpos[joint])) - math.pi
    before, here, after = angle[:-2], angle[1:-1], angle[2:]
    peaks = np.flatnonzero((here > before) & (here >= after))
    curvature = before[peaks] - 2 * here[peaks] + after[peaks]
    shift = 0.5 * (before[peaks] - after[peaks]) / curvature  # parabola through the three samples
    heights = here[peaks] - 0.25 * (before[peaks] - after[peaks]) * shift
    times = (peaks + 1 + shift) * physics.timestep()
    return -float(np.polyfit(times, np.log(heights), 1)[0])


def spring_joint_damping(env, rig):
    """Damping b of a kicked spring-loaded joint from its momentum balance under MuJoCo's
    semi-implicit Euler step, m (v_N - v_0) = -k dt sum_{n<N} (x_n - x_ref) - b (x_N - x_0)."""
    physics = start(env, rig.pose, rig.kick)
    model, data = physics.model.ptr, physics.data.ptr
    joint = model.joint(rig.spring_joint)
    qpos, dof = int(joint.qposadr[0]), int(joint.dofadr[0])
    inertia = np.zeros((model.nv, model.nv))
    mujoco.mj_fullM(model, data, inertia)
    mass = inertia[dof, dof]  # the joint's generalised mass (no coupling to other dofs here)
    states = simulate(physics, rig.kick_window, lambda p: (p.data.qpos[qpos], p.data.qvel[dof]))
    stretch = states[:-1, 0] - model.qpos_spring[qpos]
    spring_impulse = model.jnt_stiffness[joint.id] * physics.timestep() * stretch.sum()
    change = states[-1] - states[0]
    return -(mass * change[1] + spring_impulse) / change[0]


def sliding_friction(env, wind_acceleration=0.0, speed=2.0, steps=20):
    """Walker on straight legs, both feet on the floor, pushed along x: friction coefficient
    measured as the horizontal impulse over the normal impulse, both from its centre of mass
    (per unit mass; the wind's known share of the horizontal impulse is taken out)."""
    physics = start(env, walker_on_feet, {"rootx": speed})
    model, data, torso = physics.model.ptr, physics.data.ptr, body_id(physics, "torso")

    def velocity():
        mujoco.mj_subtreeVel(model, data)
        return data.subtree_linvel[torso].copy()

    before = velocity()
    simulate(physics, steps, lambda p: None)
    change = velocity() - before
    duration = steps * physics.timestep()
    normal_impulse = change[2] - model.opt.gravity[2] * duration
    return -(change[0] - wind_acceleration * duration) / normal_impulse


# ---------------------------------------------------------------------------
# Checks: one row per (task, factor).
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    """What one check found: ``expected`` is the physics prediction for ``measured`` and
    ``standard`` the value the quantity has under the standard physics.

    ``PREDICTED`` rows must agree within 10%, and the standard value must not (else an
    unapplied change would pass). ``DIRECTION`` rows (no clean prediction) must move
    away from ``standard`` in the expected direction by half to twice the expected amount."""

    quantity: str
    expected: float
    measured: float
    check: str = PREDICTED
    standard: float = 0.0

    @property
    def ratio(self):
        return self.measured / self.expected if self.expected else math.nan

    @property
    def ok(self):
        if self.check == PREDICTED:
            detectable = abs(self.expected - self.standard) > TOLERANCE * abs(self.expected)
            return bool(detectable and abs(self.ratio - 1.0) <= TOLERANCE)
        if self.check == DIRECTION:
            return bool(0.5 <= (self.measured - self.standard) / (self.expected - self.standard) <= 2.0)
        if self.check == EQUAL:
            return self.measured == self.expected
        return False


def unmeasured(reason):
    return Measurement(reason, math.nan, math.nan, UNMEASURED, math.nan)


@dataclasses.dataclass
class Row:
    domain: str
    task: int
    factor: str
    result: Measurement


class Checker:
    """Runs the checks of one domain against a fresh standard env, caching its measurements."""

    def __init__(self, domain, tasks):
        self.domain = domain
        self.rig = RIGS[domain]
        self.env = dmc.make(self.rig.env, task_defs={domain: tasks})
        self.ref = dmc.make(self.rig.env)
        self._cache = {}

    def reference(self, name, measure):
        if name not in self._cache:
            self._cache[name] = measure(self.ref)
        return self._cache[name]

    def rows(self, task_id):
        self.env.set_task(task_id)
        factors = self.env.task_factors()
        if not factors:
            return [self.baseline_row(task_id)]
        return [Row(self.domain, task_id, name, CHECKS[name](self, value, factors)) for name, value in factors.items()]

    def baseline_row(self, task_id, factor="(none)"):
        differing = model_differences(self.env, self.ref)
        quantity = f"model arrays != fresh env {differing or ''}"
        return Row(self.domain, task_id, factor, Measurement(quantity, 0, len(differing), EQUAL))

    def gravity(self, factors):
        return factors.get("gravity", float(self.ref.physics.model.opt.gravity[2]))

    def mass(self, body, factors):
        return subtree_mass(self.ref, body) * factors.get("mass_scale", 1.0)


def check_gravity(checker, value, factors):
    rig = checker.rig
    g0 = float(checker.ref.physics.model.opt.gravity[2])
    if rig.falls:
        return Measurement("free-fall accel (m/s^2)", value, fall_acceleration(checker.env, rig), standard=g0)
    period0 = checker.reference("period", lambda env: swing_period(env, rig))
    measured = g0 * (period0 / swing_period(checker.env, rig)) ** 2
    return Measurement("g0*(T0/T)^2 from swings (m/s^2)", value, measured, standard=g0)


def check_wind(checker, value, factors):
    rig = checker.rig
    if rig.free:
        drift0 = checker.reference("drift", lambda env: drift_acceleration(env, rig))
        expected = value / checker.mass(rig.body, factors)
        return Measurement("drift accel F/M (m/s^2)", expected, drift_acceleration(checker.env, rig) - drift0)
    tilt0 = checker.reference("tilt", lambda env: hanging_tilt(env, rig))
    expected = math.degrees(math.atan2(value, checker.mass(rig.body, factors) * -checker.gravity(factors)))
    return Measurement("hanging tilt atan(F/mg) (deg)", expected, math.degrees(hanging_tilt(checker.env, rig) - tilt0))


def check_mass(checker, value, factors):
    rig = checker.rig
    accel0 = checker.reference("probe", lambda env: probe_acceleration(env, rig))
    return Measurement("probe accel a0/a (x mass)", value, accel0 / probe_acceleration(checker.env, rig), standard=1.0)


def check_damping(checker, value, factors):
    rig, b0 = checker.rig, checker.ref.physics.model.dof_damping.copy()
    if not rig.free:
        decay0 = checker.reference("decay", lambda env: swing_decay(env, rig))
        measured = swing_decay(checker.env, rig) / decay0
        return Measurement("swing decay rate vs std (x damping)", value, measured, standard=1.0)
    if rig.spring_joint:
        b = b0[checker.ref.physics.model.joint(rig.spring_joint).dofadr[0]]
        measured = spring_joint_damping(checker.env, rig)
        return Measurement(f"{rig.spring_joint} damping, momentum (N s/m)", b * value, measured, standard=b)
    lost0, power0, _ = checker.reference("dissipation", lambda env: dissipation(env, rig, b0))
    lost, power, speed = dissipation(checker.env, rig, b0)
    lost -= factors.get("joint_friction", 0.0) * speed  # the dry friction's share of the loss
    measured = (lost / power) / (lost0 / power0)
    return Measurement("loss/int(b0 v^2) vs std (x damping)", value, measured, rig.energy_check, 1.0)


def check_joint_friction(checker, value, factors):
    rig, b0 = checker.rig, checker.ref.physics.model.dof_damping.copy()
    lost, power, speed = dissipation(checker.env, rig, b0)
    damping_loss = power * factors.get("damping_scale", 1.0)
    model = checker.ref.physics.model
    standard = float(model.dof_frictionloss[dmc.actuated_dofs(model)].mean())
    measured = (lost - damping_loss) / speed
    return Measurement("(loss - damping loss)/int|v| (N)", value, measured, rig.energy_check, standard)


def check_friction(checker, value, factors):
    model = checker.ref.physics.model
    if model.opt.disableflags & mujoco.mjtDisableBit.mjDSBL_CONTACT:
        return unmeasured("contacts disabled: friction has no effect")
    if checker.domain != "walker":
        return unmeasured("no sliding test for this domain")
    pair = [model.name2id(name, "geom") for name in ("floor", "right_foot")]
    mu0 = float(model.geom_friction[pair, 0].max())  # a contact takes the larger friction of its two geoms
    wind = factors.get("wind", 0.0) / checker.mass("torso", factors)
    return Measurement("friction coef from impulses", mu0 * value, sliding_friction(checker.env, wind), standard=mu0)


def check_actuators(checker, value, factors):
    rig = checker.rig
    shift0 = checker.reference("actuated", lambda env: actuated_displacement(env, rig))
    measured = actuated_displacement(checker.env, rig) / shift0
    return Measurement("actuated displacement vs std", value, measured, standard=1.0)


CHECKS = {
    "gravity": check_gravity,
    "wind": check_wind,
    "mass_scale": check_mass,
    "damping_scale": check_damping,
    "joint_friction": check_joint_friction,
    "friction_scale": check_friction,
    "actuator_scale": check_actuators,
}
assert CHECKS.keys() == dmc.FACTORS.keys()


def model_arrays(env):
    """Every array of the env's MuJoCo model, every field of its ``opt`` and ``stat``
    (gravity, mean inertia, ...) and the applied forces."""
    model = env.physics.model.ptr
    arrays = {name: getattr(model, name) for name in dir(model) if isinstance(getattr(model, name, None), np.ndarray)}
    for struct in ("opt", "stat"):
        fields = getattr(model, struct)
        arrays.update({f"{struct}.{name}": np.asarray(getattr(fields, name)) for name in dir(fields)
                       if not name.startswith("_")})
    arrays["data.xfrc_applied"] = env.physics.data.xfrc_applied
    return arrays


def model_differences(env, reference):
    """Names of the model arrays that differ between two envs of the same task."""
    mine, theirs = model_arrays(env), model_arrays(reference)
    return sorted(name for name in mine if not np.array_equal(mine[name], theirs[name]))


# ---------------------------------------------------------------------------
# Speed.
# ---------------------------------------------------------------------------


def step_times(env, n=500, seed=0):
    """Wall time (s) of each of ``n`` env steps under uniform random actions (resets not timed)."""
    space = env.action_space
    actions = np.random.default_rng(seed).uniform(space.low, space.high, (n,) + space.shape).astype(np.float32)
    env.reset()
    times = np.empty(n)
    for index, action in enumerate(actions):
        begin = time.perf_counter()
        done = env.step(action)[2]
        times[index] = time.perf_counter() - begin
        if done:
            env.reset()
    return times


def speed_envs(task_defs, domain):
    """The plain env and the continual env under its standard task and under a windy task."""
    name, tasks = RIGS[domain].env, rig_tasks(task_defs, domain)
    envs = {"plain": dmc.make(name)}
    for label, wanted in (("standard", lambda factors: not factors), ("windy", lambda factors: "wind" in factors)):
        env = dmc.make(name, task_defs={domain: tasks})
        task_id = next((task_id for task_id in env.task_ids if wanted(env.task_factors(task_id))), None)
        if task_id is not None:
            env.set_task(task_id)
            envs[label] = env
    return envs


def interleaved_step_times(envs, repeats, n):
    """Step times of every env pooled over ``repeats`` rounds, in rotating order so that load
    changes hit all envs alike."""
    labels = list(envs)
    times = {label: [] for label in labels}
    for repeat in range(repeats):
        shift = repeat % len(labels)
        for label in labels[shift:] + labels[:shift]:
            times[label].append(step_times(envs[label], n))
    return {label: np.concatenate(values) for label, values in times.items()}


def speed_row(domain, times):
    """One table line: steps/s at the ``SPEED_PERCENTILE`` step time, ratios continual / plain, ok or SLOW."""
    rate = {label: 1.0 / np.percentile(times[label], SPEED_PERCENTILE) if label in times else math.nan
            for label in SPEED_ENVS}
    ratio = {label: rate[label] / rate["plain"] for label in SPEED_ENVS[1:]}
    slow = any(value < SPEED_LIMIT for value in ratio.values())
    return (f"{domain:9s} {rate['plain']:8.0f} {rate['standard']:10.0f} {ratio['standard']:6.3f} "
            f"{rate['windy']:8.0f} {ratio['windy']:6.3f} {'SLOW' if slow else 'ok'}")


def speed_table(task_defs, domains, repeats=6, n=500):
    """Stepping speed of the plain and the continual envs of ``domains``, one line each."""
    lines = [f"env steps/s = 1 / {SPEED_PERCENTILE}th-percentile step time of {repeats} interleaved runs of {n} "
             "random-action steps per env (slower steps are mostly other jobs' interference)",
             f"{'domain':9s} {'plain/s':>8s} {'standard/s':>10s} {'ratio':>6s} {'windy/s':>8s} {'ratio':>6s} ok"]
    for domain in domains:
        lines.append(speed_row(domain, interleaved_step_times(speed_envs(task_defs, domain), repeats, n)))
        progress(f"[speed] {lines[-1]}")
    return lines


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def progress(message):
    print(message, file=sys.stderr, flush=True)


def format_rows(rows):
    header = (
        f"{'domain':9s} {'task':>4s} {'factor':15s} {'quantity':38s} {'standard':>9s} {'expected':>9s} "
        f"{'measured':>9s} {'ratio':>6s} {'check':16s} ok"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        result = row.result
        lines.append(
            f"{row.domain:9s} {row.task:4d} {row.factor:15s} {result.quantity[:38]:38s} {result.standard:9.4g} "
            f"{result.expected:9.4g} {result.measured:9.4g} {result.ratio:6.3f} {result.check:16s} "
            f"{'ok' if result.ok else 'FAIL'}"
        )
    return lines


def rig_tasks(task_defs, domain):
    """The task table of a rig's domain, keyed either way ('cup' or 'ball_in_cup')."""
    return dmc.domain_tasks(task_defs, dmc.split_task_name(RIGS[domain].env)[0])


def defined_domains(task_defs):
    suite_domains = {domain: dmc.split_task_name(rig.env)[0] for domain, rig in RIGS.items()}
    return [domain for domain, suite in suite_domains.items() if {domain, suite} & set(task_defs)]


def verify_domain(domain, tasks, task_ids=None):
    """All rows of one domain, then a final check that the standard physics is restored exactly."""
    checker = Checker(domain, tasks)
    rows = []
    for task_id in checker.env.task_ids if task_ids is None else task_ids:
        progress(f"[{domain}] task {task_id}: {checker.env.task_factors(task_id) or 'standard'}")  # checks the id
        rows.extend(checker.rows(task_id))
    standard = [task_id for task_id in checker.env.task_ids if not checker.env.task_factors(task_id)]
    if standard:
        checker.env.set_task(standard[0])
        rows.append(checker.baseline_row(standard[0], "(restored)"))
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", nargs="+", choices=sorted(RIGS), help="domains (default: all defined)")
    parser.add_argument("--tasks", nargs="+", type=int, default=None, help="task ids to check (default: all)")
    parser.add_argument("--task-defs", default=None, help="YAML file with crl_task_defs (default: configs.yaml)")
    parser.add_argument("--speed", action="store_true",
                        help="also time env steps/s, plain vs continual (SLOW: continual >10%% slower)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    begin = time.time()
    try:
        task_defs = load_task_defs(args.task_defs)
        args.domain = args.domain or defined_domains(task_defs)
        rows = [row for domain in args.domain
                for row in verify_domain(domain, rig_tasks(task_defs, domain), args.tasks)]
    except ValueError as error:
        print(f"verify_physics.py: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(format_rows(rows)))
    failed = [row for row in rows if not row.result.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks ok in {time.time() - begin:.1f}s")
    if args.speed:
        print("\n" + "\n".join(speed_table(task_defs, args.domain)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
