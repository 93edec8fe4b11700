"""DeepMind Control Suite tasks as gym-style environments for the agent.

An environment returns observation dicts: ``state`` (all proprio readings
flattened into one float32 vector) or ``image`` (64x64x3 uint8) for pixel
runs, plus the flags ``is_first``, ``is_last`` and ``is_terminal``.
``step(action)`` returns ``(obs, reward, done, info)``; ``action_repeat``
physics-control steps are taken per agent step and their rewards summed.

Continual physics: ``ContinualCartPole``, ``ContinualCupCatch``,
``ContinualPendulumSwingup`` and ``ContinualWalker`` run the same task under
physics that ``set_task(task_id)`` switches between tasks given as data,
``{task_id: {factor: value}}`` with the factors of ``FACTORS`` (gravity, wind,
mass, friction, damping, joint friction, motor strength). ``make`` builds the
right env for a task name: plain without task definitions, continual with.
"""

import functools
import operator
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

# mujoco and dm_control are imported where used: importing them loads the MUJOCO_GL backend,
# which fails under a broken setting; gl_problem turns that failure into a one-line message.

DOMAIN_ALIASES = {"cup": "ball_in_cup"}


def split_task_name(name):
    """'walker_walk' -> ('walker', 'walk'); 'cup_catch' -> ('ball_in_cup', 'catch')."""
    if name.startswith("ball_in_cup_"):
        return "ball_in_cup", name[len("ball_in_cup_"):]
    domain, _, task = name.partition("_")
    if not task:
        raise ValueError(f"DMC task name '{name}' must look like 'domain_task', e.g. 'walker_walk'")
    return DOMAIN_ALIASES.get(domain, domain), task


def load_suite_env(domain, task, seed):
    """Load a DMC env, turning an unknown domain/task into a one-line error."""
    from dm_control import suite

    if (domain, task) not in suite.ALL_TASKS:
        valid = ", ".join(f"{d}_{t}" for d, t in suite.ALL_TASKS)
        raise ValueError(f"unknown DMC task '{domain}_{task}'; valid tasks: {valid}")
    return suite.load(domain, task, task_kwargs={"random": seed})


def gl_problem(render=False):
    """None if dm_control imports under this process's ``MUJOCO_GL`` (and, with ``render``,
    draws one tiny frame); otherwise a one-line message naming the backend and the fix."""
    backend = os.environ.get("MUJOCO_GL", "")
    try:
        from dm_control import mujoco as dm_mujoco

        if render:
            dm_mujoco.Physics.from_xml_string("<mujoco/>").render(8, 8)
    except Exception as error:  # noqa: BLE001 - every GL failure gets the same advice
        reason = (str(error).strip().splitlines() or [""])[-1]
        what = "render pixels" if render else "import dm_control"
        no_render = "" if render else "; runs without pixels also work with MUJOCO_GL=disable"
        return (f"MuJoCo cannot {what} with MUJOCO_GL={backend!r} ({type(error).__name__}: {reason}); "
                f"install libegl1 and set MUJOCO_GL=egl, or install libosmesa6 and set MUJOCO_GL=osmesa{no_render}")
    return None


def configure_fast_render(model, size):
    """Offscreen rendering without the shadow map and multisampling, into a buffer of the
    observation's ``size`` (height, width): ~10x faster on a software renderer; images lose
    the shadows and the anti-aliasing of edges. Must run before the first render."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    model.vis.global_.offheight, model.vis.global_.offwidth = size


class DeepMindControl:
    """One DMC task: proprio (``state``) or pixel (``image``) observations."""

    def __init__(self, name, action_repeat=1, size=(64, 64), camera=None, seed=0, pixels=False, fast_render=True):
        self.domain, self.task = split_task_name(name)
        self._env = load_suite_env(self.domain, self.task, seed)
        if pixels and fast_render:
            configure_fast_render(self._env.physics.model, size)
        self._action_repeat = action_repeat
        self._size = tuple(size)
        self._camera = camera if camera is not None else (2 if self.domain == "quadruped" else 0)
        self._pixels = pixels

    @property
    def physics(self):
        return self._env.physics

    @property
    def observation_space(self):
        flags = {k: gym.spaces.Box(0, 1, (), dtype=bool) for k in ("is_first", "is_last", "is_terminal")}
        if self._pixels:
            spaces = {"image": gym.spaces.Box(0, 255, self._size + (3,), dtype=np.uint8)}
        else:
            size = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
            spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (size,), dtype=np.float32)}
        return gym.spaces.Dict({**spaces, **flags})

    @property
    def action_space(self):
        spec = self._env.action_spec()
        low, high = (np.asarray(b, np.float32) for b in (spec.minimum, spec.maximum))
        return gym.spaces.Box(low, high, dtype=np.float32)

    def step(self, action):
        assert np.isfinite(action).all(), action
        reward = 0.0
        for _ in range(self._action_repeat):
            time_step = self._env.step(action)
            reward += time_step.reward or 0.0
            if time_step.last():
                break
        terminal = time_step.last() and time_step.discount == 0
        obs = self._observe(time_step, is_first=False, is_last=time_step.last(), is_terminal=terminal)
        return obs, reward, time_step.last(), {"discount": np.float32(time_step.discount)}

    def reset(self):
        time_step = self._env.reset()
        return self._observe(time_step, is_first=True, is_last=False, is_terminal=False)

    def render(self):
        return self._env.physics.render(*self._size, camera_id=self._camera)

    def _observe(self, time_step, is_first, is_last, is_terminal):
        if self._pixels:
            obs = {"image": self.render()}
        else:
            parts = [np.asarray(v, dtype=np.float32).reshape(-1) for v in time_step.observation.values()]
            obs = {"state": np.concatenate(parts)}
        obs.update(is_first=is_first, is_last=is_last, is_terminal=is_terminal)
        return obs


# ---------------------------------------------------------------------------
# Continual physics: the same DMC task under switchable physical conditions.
# ---------------------------------------------------------------------------

FACTORS = {
    "gravity": "z component of gravity in m/s^2 (negative = down)",
    "wind": "horizontal force in newtons along +x on the domain's wind body, at its centre of mass, every physics step",
    "mass_scale": "multiplies the mass and rotational inertia of every moving body",
    "friction_scale": "multiplies the (sliding, torsional, rolling) friction of every geom; acts only through contacts",
    "damping_scale": "multiplies the viscous damping of every joint",
    "joint_friction": "dry (Coulomb) friction, N or N*m, on every actuated joint (e.g. the cart's rail)",
    "actuator_scale": "multiplies the force or torque of every motor",
}

# The value of each factor that leaves the physics as it is (gravity: the model's own).
NEUTRAL = {"wind": 0.0, "mass_scale": 1.0, "friction_scale": 1.0, "damping_scale": 1.0, "joint_friction": 0.0,
           "actuator_scale": 1.0}

# Every model array a factor may change; set_task copies all of them back before applying a task.
BASELINE_FIELDS = (
    "opt.gravity",
    "body_mass",
    "body_inertia",
    "geom_friction",
    "dof_damping",
    "dof_frictionloss",
    "actuator_gainprm",
)


def _set_gravity(env, value):
    env.physics.model.opt.gravity[2] = value


def _set_wind(env, value):
    env.wind_force = value


def _scale_mass(env, value):
    model = env.physics.model
    model.body_mass[1:] *= value  # body 0 is the static world
    model.body_inertia[1:] *= value


def _scale_friction(env, value):
    env.physics.model.geom_friction[:] *= value


def _scale_damping(env, value):
    env.physics.model.dof_damping[:] *= value


def _set_joint_friction(env, value):
    model = env.physics.model
    model.dof_frictionloss[actuated_dofs(model)] = value


def _scale_actuators(env, value):
    env.physics.model.actuator_gainprm[:, 0] *= value  # motor force = gain * ctrl


APPLY_FACTOR = {
    "gravity": _set_gravity,
    "wind": _set_wind,
    "mass_scale": _scale_mass,
    "friction_scale": _scale_friction,
    "damping_scale": _scale_damping,
    "joint_friction": _set_joint_friction,
    "actuator_scale": _scale_actuators,
}
assert APPLY_FACTOR.keys() == FACTORS.keys()
assert NEUTRAL.keys() | {"gravity"} == FACTORS.keys()


def actuated_dofs(model):
    """Dof indices of the joints driven by the model's actuators."""
    joints = model.actuator_trnid[:, 0]
    return sorted({int(model.jnt_dofadr[j]) for j in joints})


def parse_tasks(tasks, domain):
    """Validate one domain's task table: {task_id: {factor: value}} -> {int: {str: float}}."""
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"task definitions for '{domain}' must be a non-empty mapping id -> factors, got {tasks!r}")
    return {_task_id(key, domain): _task_factors(factors, domain, key) for key, factors in tasks.items()}


def _task_id(key, domain):
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ValueError(f"task ids for '{domain}' must be integers, got {key!r}") from None


def _task_factors(factors, domain, key):
    factors = factors or {}
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown:
        raise ValueError(
            f"unknown physics factor(s) {', '.join(unknown)} in {domain} task {key}; "
            f"valid factors: {', '.join(FACTORS)}"
        )
    return {name: _factor_value(name, value, domain, key) for name, value in factors.items()}


def _factor_value(name, raw, domain, key):
    """A finite float; positive for scales, non-negative for joint friction."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    lowest_ok = {"joint_friction": 0.0}.get(name, float("-inf"))
    if not np.isfinite(value) or value < lowest_ok or (name.endswith("_scale") and value <= 0):
        raise ValueError(f"bad value for {name} in {domain} task {key}: {raw!r} ({FACTORS[name]})")
    return value


def _config_key(domain):
    """Short domain name used in task definitions: 'ball_in_cup' -> 'cup'."""
    return next((alias for alias, full in DOMAIN_ALIASES.items() if full == domain), domain)


def domain_tasks(task_defs, domain):
    """The task table of ``domain`` from a mapping domain -> tasks (keyed 'cup' or 'ball_in_cup')."""
    for key in (_config_key(domain), domain):
        if key in task_defs:
            return task_defs[key]
    defined = ", ".join(map(str, task_defs))
    raise ValueError(f"task definitions have no entry for domain '{domain}'; they define: {defined}")


class ContinualDMC(DeepMindControl):
    """A DMC task whose physics switches between tasks defined as data.

    ``tasks`` maps task ids to physics factors (see ``FACTORS``). ``set_task``
    restores the physics captured at construction exactly, then applies the
    task's factors; the model changes survive ``reset()``, and the wind force is
    re-applied at the start of every episode (MuJoCo's reset clears it), so it
    acts on every physics step at no per-step cost.
    """

    DOMAIN = ""
    SUITE_TASKS = ()
    WIND_BODY = ""

    def __init__(self, name, tasks, action_repeat=1, size=(64, 64), camera=None, seed=0, pixels=False,
                 fast_render=True):
        self._check_name(name)
        super().__init__(name, action_repeat, size, camera, seed, pixels, fast_render)
        self._tasks = parse_tasks(tasks, _config_key(self.DOMAIN))
        model = self.physics.model
        self._baseline = {field: operator.attrgetter(field)(model).copy() for field in BASELINE_FIELDS}
        import mujoco

        self._set_const = functools.partial(mujoco.mj_setConst, model.ptr, mujoco.MjData(model.ptr))
        self._wind_body = model.name2id(self.WIND_BODY, "body")
        self.wind_force = 0.0
        self._hook_episode_start()
        self.task_id = None
        self.set_task(next(iter(self._tasks)))

    @property
    def task_ids(self):
        return list(self._tasks)

    def task_factors(self, task_id=None):
        """Factors of ``task_id`` (default: the current task)."""
        return dict(self._tasks[self._valid_id(self.task_id if task_id is None else task_id)])

    def set_task(self, task_id):
        """Switch the physics to task ``task_id``; takes effect immediately and survives resets."""
        task_id = self._valid_id(task_id)
        self._apply_factors(self._tasks[task_id])
        self._label(task_id)

    def blend_tasks(self, source, target, fraction):
        """Physics ``fraction`` (0..1) of the way from task ``source`` to task ``target``: every
        factor of either moves linearly between its values there (a factor a task does not
        set is at its neutral value), for gradual changes. Labelled as ``target``."""
        a, b = self._tasks[self._valid_id(source)], self._tasks[self._valid_id(target)]
        neutral = {**NEUTRAL, "gravity": float(self._baseline["opt.gravity"][2])}
        self._apply_factors({name: (1 - fraction) * a.get(name, neutral[name]) + fraction * b.get(name, neutral[name])
                             for name in {**a, **b}})
        self._label(self._valid_id(target))

    def _apply_factors(self, factors):
        self._restore_baseline()
        for name, value in factors.items():
            APPLY_FACTOR[name](self, value)
        self._set_const()  # masses changed: refresh derived constants
        self._apply_wind()
        self.physics.forward()

    def _label(self, task_id):
        self.task_id = task_id
        self._task_id_obs = np.int32(task_id)  # built once, not on every step

    def physics_values(self):
        """Current values of the quantities the factors change (picklable; for logs and checks)."""
        model, data = self.physics.model, self.physics.data
        return {
            "task_id": self.task_id,
            "gravity": float(model.opt.gravity[2]),
            "wind": float(data.xfrc_applied[self._wind_body, 0]),
            "total_mass": float(model.body_mass.sum()),
            "friction": float(model.geom_friction[:, 0].mean()),
            "damping": float(model.dof_damping.sum()),
            "joint_friction": float(model.dof_frictionloss.sum()),
            "actuator_gain": float(model.actuator_gainprm[:, 0].mean()),
        }

    def _observe(self, time_step, is_first, is_last, is_terminal):
        obs = super()._observe(time_step, is_first, is_last, is_terminal)
        obs["task_id"] = self._task_id_obs
        return obs

    def _check_name(self, name):
        domain, task = split_task_name(name)
        if domain != self.DOMAIN or task not in self.SUITE_TASKS:
            valid = ", ".join(f"{self.DOMAIN}_{t}" for t in self.SUITE_TASKS)
            raise ValueError(f"{type(self).__name__} cannot run '{name}'; valid tasks: {valid}")

    def _valid_id(self, task_id):
        try:
            if int(task_id) in self._tasks:
                return int(task_id)
        except (TypeError, ValueError):
            pass
        valid = ", ".join(map(str, self._tasks))
        raise ValueError(f"unknown {_config_key(self.DOMAIN)} task id {task_id!r}; valid ids: {valid}")

    def _restore_baseline(self):
        model = self.physics.model
        for field, values in self._baseline.items():
            operator.attrgetter(field)(model)[:] = values
        self.wind_force = 0.0

    def _apply_wind(self):
        self.physics.data.xfrc_applied[self._wind_body, 0] = self.wind_force

    def _hook_episode_start(self):
        """Re-apply the wind after every episode reset, including the suite's automatic ones."""
        task = self._env.task
        initialize_episode = task.initialize_episode

        def initialize_episode_with_wind(physics):
            initialize_episode(physics)
            self._apply_wind()

        task.initialize_episode = initialize_episode_with_wind


class ContinualCartPole(ContinualDMC):
    """Cart-pole (balance or swing-up); wind pushes the pole, joint friction acts on the rail."""

    DOMAIN = "cartpole"
    SUITE_TASKS = ("balance", "balance_sparse", "swingup", "swingup_sparse")
    WIND_BODY = "pole_1"


class ContinualCupCatch(ContinualDMC):
    """Ball-in-cup catch; wind pushes the ball, damping acts on the cup's two slide rails."""

    DOMAIN = "ball_in_cup"
    SUITE_TASKS = ("catch",)
    WIND_BODY = "ball"


class ContinualPendulumSwingup(ContinualDMC):
    """Pendulum swing-up; wind pushes the pole's bob, damping acts on the hinge."""

    DOMAIN = "pendulum"
    SUITE_TASKS = ("swingup",)
    WIND_BODY = "pole"


class ContinualWalker(ContinualDMC):
    """Planar walker (stand, walk or run); wind pushes the torso, friction acts on foot contacts."""

    DOMAIN = "walker"
    SUITE_TASKS = ("stand", "walk", "run")
    WIND_BODY = "torso"


CONTINUAL_ENVS = {
    cls.DOMAIN: cls for cls in (ContinualCartPole, ContinualCupCatch, ContinualPendulumSwingup, ContinualWalker)
}


def make(name, *, task_defs=None, action_repeat=1, size=(64, 64), camera=None, seed=0, pixels=False,
         fast_render=True):
    """Build the env for ``name``: plain ``DeepMindControl`` without ``task_defs``, else the
    domain's continual env with its tasks from ``task_defs`` (mapping domain -> {task_id: factors});
    ``fast_render``: see ``configure_fast_render``."""
    kwargs = dict(action_repeat=action_repeat, size=size, camera=camera, seed=seed, pixels=pixels,
                  fast_render=fast_render)
    if task_defs is None:
        return DeepMindControl(name, **kwargs)
    domain, _ = split_task_name(name)
    if domain not in CONTINUAL_ENVS:
        supported = ", ".join(sorted(_config_key(d) for d in CONTINUAL_ENVS))
        raise ValueError(f"no continual-physics env for domain '{domain}' ('{name}'); supported domains: {supported}")
    return CONTINUAL_ENVS[domain](name, domain_tasks(task_defs, domain), **kwargs)
