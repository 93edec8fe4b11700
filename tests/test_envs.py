"""Tests for the continual-physics DMC envs (envs/dmc.py) and verify_physics.py.

Task tables come from configs.yaml `crl_task_defs` (the ones the agent uses), so every
defined task is constructed and stepped here.
"""

import functools
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import verify_physics as vp  # noqa: E402
from envs import dmc, wrappers  # noqa: E402

TASK_DEFS = vp.load_task_defs()

ENV_NAMES = {
    "cartpole": "cartpole_balance", "cup": "cup_catch", "pendulum": "pendulum_swingup", "walker": "walker_walk"
}


def make(domain, **kwargs):
    return dmc.make(ENV_NAMES[domain], task_defs=TASK_DEFS, **kwargs)


def wrapped(domain):
    """The continual env inside the wrapper stack the agent uses (dreamer.make_env)."""
    return wrappers.TimeLimit(wrappers.NormalizeActions(make(domain)), 100)


def run_steps(env, steps, seed=0):
    """Step with random actions; returns the last observation."""
    space = env.action_space
    rng = np.random.default_rng(seed)
    obs = None
    for _ in range(steps):
        obs, reward, done, info = env.step(rng.uniform(space.low, space.high).astype(np.float32))
        assert np.isfinite(reward)
        if done:
            obs = env.reset()
    return obs


def task_with(domain, factor):
    return next(task_id for task_id, factors in TASK_DEFS[domain].items() if factor in (factors or {}))


def test_task_tables_cover_every_domain_with_six_tasks():
    assert set(TASK_DEFS) == {"cartpole", "cup", "pendulum", "walker"}
    for domain, tasks in TASK_DEFS.items():
        assert len(tasks) >= 6, domain
        assert tasks[0] == {}, domain
        gravities = [factors["gravity"] for factors in tasks.values() if "gravity" in (factors or {})]
        assert min(gravities) < -9.81 < max(gravities), (domain, "needs a low and a high gravity task")
        assert TASK_DEFS[domain][task_with(domain, "mass_scale")]["mass_scale"] > 1, (domain, "needs a heavy task")
        task_with(domain, "wind")


def test_make_returns_plain_env_without_task_defs_and_continual_with():
    assert type(dmc.make("walker_walk")) is dmc.DeepMindControl
    expected = {"cartpole_swingup": dmc.ContinualCartPole, "cup_catch": dmc.ContinualCupCatch,
                "pendulum_swingup": dmc.ContinualPendulumSwingup, "walker_run": dmc.ContinualWalker}
    for name, cls in expected.items():
        env = dmc.make(name, task_defs=TASK_DEFS)
        assert type(env) is cls and env.task_id == 0


@pytest.mark.parametrize("domain", sorted(ENV_NAMES))
def test_every_task_constructs_steps_and_changes_the_model(domain):
    env = make(domain)
    fresh = dmc.make(ENV_NAMES[domain])
    assert env.task_ids == list(TASK_DEFS[domain])
    for task_id in env.task_ids:
        env.set_task(task_id)
        env.reset()
        obs = run_steps(env, 5)
        assert obs["state"].shape == env.observation_space["state"].shape
        assert np.isfinite(obs["state"]).all()
        differing = vp.model_differences(env, fresh)
        assert bool(differing) == bool(TASK_DEFS[domain][task_id]), (task_id, differing)


@pytest.mark.parametrize("domain", sorted(ENV_NAMES))
def test_baseline_restored_exactly_after_any_sequence_of_tasks(domain):
    env = make(domain)
    fresh = dmc.make(ENV_NAMES[domain])
    rng = np.random.default_rng(1)
    for task_id in rng.choice(env.task_ids, size=12):
        env.set_task(task_id)
        run_steps(env, 3)
    env.set_task(0)
    assert vp.model_differences(env, fresh) == []
    env.reset()
    run_steps(env, 3)
    assert vp.model_differences(env, fresh) == []


def test_blend_moves_every_factor_linearly_between_two_tasks():
    """cartpole task 0 (standard) -> 3 (gravity -25) and 0 -> 1 (wind 0.5): halfway is halfway
    for a factor both or only one task sets; the ends are the tasks themselves exactly."""
    env = make("cartpole")
    env.blend_tasks(0, 3, 0.5)
    assert env.physics_values()["gravity"] == pytest.approx((-9.81 - 25.0) / 2)
    assert env.task_id == 3  # labelled as the task it ramps to
    env.blend_tasks(0, 1, 0.25)
    env.reset()
    assert env.physics_values()["wind"] == pytest.approx(0.25 * 0.5)
    for source, target, fraction, same_as in [(2, 3, 1.0, 3), (2, 3, 0.0, 2), (4, 6, 1.0, 6)]:
        env.blend_tasks(source, target, fraction)
        blended = {k: v for k, v in env.physics_values().items() if k != "task_id"}
        env.set_task(same_as)
        exact = {k: v for k, v in env.physics_values().items() if k != "task_id"}
        assert blended == pytest.approx(exact), (source, target, fraction)


def test_task_survives_reset_and_the_suites_automatic_reset():
    env = make("cartpole")
    heavy, low_g = task_with("cartpole", "mass_scale"), task_with("cartpole", "gravity")
    env.set_task(heavy)
    scale = TASK_DEFS["cartpole"][heavy]["mass_scale"]
    base = dmc.make("cartpole_balance").physics.model
    for _ in range(3):
        env.reset()
        run_steps(env, 10)
        np.testing.assert_allclose(env.physics.model.body_mass, base.body_mass * scale)
        np.testing.assert_allclose(env.physics.model.body_inertia, base.body_inertia * scale)
    env.set_task(low_g)
    env.reset()
    for _ in range(1001):  # past the 1000-step episode end: the suite resets itself on the next step
        env.step(np.zeros(1, np.float32))
    assert env.physics_values()["gravity"] == TASK_DEFS["cartpole"][low_g]["gravity"]


@pytest.mark.parametrize("domain", sorted(ENV_NAMES))
def test_wind_force_persists_after_resets(domain):
    env = make(domain)
    windy = task_with(domain, "wind")
    force = TASK_DEFS[domain][windy]["wind"]
    env.set_task(windy)
    body = env.physics.model.name2id(env.WIND_BODY, "body")
    for _ in range(2):
        env.reset()
        assert env.physics.data.xfrc_applied[body, 0] == force
        run_steps(env, 5)
        assert env.physics.data.xfrc_applied[body, 0] == force
    env.set_task(0)
    assert not env.physics.data.xfrc_applied.any()


def test_wind_after_automatic_reset_drifts_the_cart_by_f_over_m():
    env = make("cartpole")
    windy = task_with("cartpole", "wind")
    env.set_task(windy)
    env.reset()
    for _ in range(1001):  # the suite's own reset inside step() must re-apply the wind too
        env.step(np.zeros(1, np.float32))
    physics = env.physics
    assert physics.data.xfrc_applied[physics.model.name2id("pole_1", "body"), 0] == TASK_DEFS["cartpole"][windy]["wind"]
    rig = vp.RIGS["cartpole"]
    physics.data.qpos[:] = [-0.5, np.pi]
    physics.data.qvel[:] = 0
    physics.forward()
    xs = vp.simulate(physics, rig.window, lambda p: vp.coordinate(p, rig))
    expected = TASK_DEFS["cartpole"][windy]["wind"] / physics.model.body_subtreemass[1]
    assert vp.fitted_acceleration(xs, physics.timestep()) == pytest.approx(expected, rel=0.02)


def test_subprocess_env_switches_tasks_through_wrappers():
    env = wrappers.Parallel(functools.partial(wrapped, "pendulum"))
    try:
        high_g, windy = task_with("pendulum", "gravity"), task_with("pendulum", "wind")
        assert env.attribute("task_id") == 0
        env.call("set_task", high_g)
        env.reset()()
        values = env.call("physics_values")
        assert values["task_id"] == high_g and values["gravity"] == TASK_DEFS["pendulum"][high_g]["gravity"]
        env.call("set_task", windy)
        env.reset()()
        env.step(np.zeros(1, np.float32))()
        values = env.call("physics_values")
        assert values["gravity"] == -9.81 and values["wind"] == TASK_DEFS["pendulum"][windy]["wind"]
    finally:
        env.close()


def test_set_task_reaches_the_env_through_in_process_wrappers():
    env = wrapped("walker")
    slippery = task_with("walker", "friction_scale")
    env.set_task(slippery)  # forwarded by every wrapper
    env.reset()
    base = dmc.make("walker_walk").physics.model.geom_friction
    scale = TASK_DEFS["walker"][slippery]["friction_scale"]
    np.testing.assert_array_equal(env.physics.model.geom_friction, base * scale)
    in_process = wrappers.InProcess(env)  # the interface of Parallel, used by the agent loop
    in_process.call("set_task", 0)
    assert in_process.attribute("task_id") == 0
    np.testing.assert_array_equal(env.physics.model.geom_friction, base)


def test_bad_task_ids_and_factor_names_are_rejected_listing_the_valid_ones():
    env = make("cup")
    with pytest.raises(ValueError, match=r"unknown cup task id 42; valid ids: 0, 1, 2, 3, 4, 5, 6"):
        env.set_task(42)
    with pytest.raises(ValueError, match=r"valid ids: 0, 1"):
        env.set_task("windy")
    bad = {"cup": {0: {}, 1: {"gravty": -3.0}}}
    with pytest.raises(ValueError, match=r"physics factor\(s\) gravty in cup task 1; valid factors: gravity, wind"):
        dmc.make("cup_catch", task_defs=bad)
    with pytest.raises(ValueError, match=r"supported domains: cartpole, cup, pendulum, walker"):
        dmc.make("cheetah_run", task_defs=TASK_DEFS)
    with pytest.raises(ValueError, match=r"no entry for domain 'walker'; they define: cup"):
        dmc.make("walker_walk", task_defs=bad)
    with pytest.raises(ValueError, match=r"valid tasks: walker_stand, walker_walk, walker_run"):
        dmc.ContinualWalker("walker_flip", TASK_DEFS["walker"])


def test_task_ids_may_be_strings_and_domain_may_be_spelled_ball_in_cup():
    env = dmc.make("cup_catch", task_defs={"ball_in_cup": {"0": {}, "1": {"wind": 0.1}}})
    env.set_task("1")
    assert env.task_id == 1 and env.physics_values()["wind"] == 0.1


def test_pixel_observations_of_a_continual_env():
    env = make("cup", pixels=True)
    env.set_task(task_with("cup", "wind"))
    obs = env.reset()
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    obs = run_steps(env, 2)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].std() > 0


def test_verify_physics_passes_for_the_defined_tasks_and_fails_for_a_no_op(tmp_path, capsys):
    assert vp.main([]) == 0
    no_op = tmp_path / "defs.yaml"
    no_op.write_text("crl_task_defs:\n  cartpole: {0: {}, 1: {friction_scale: 0.1}}\n")
    assert vp.main(["--task-defs", str(no_op)]) == 1
    assert "contacts disabled" in capsys.readouterr().out


def test_verify_physics_fails_when_set_task_does_not_apply_the_factors(monkeypatch, capsys):
    for factor in dmc.FACTORS:
        monkeypatch.setitem(dmc.APPLY_FACTOR, factor, lambda env, value: None)
    assert vp.main([]) == 1
    table = capsys.readouterr().out
    factor_rows = [line for line in table.splitlines() if any(f" {factor} " in line for factor in dmc.FACTORS)]
    assert len(factor_rows) == sum(len(factors or {}) for tasks in TASK_DEFS.values() for factors in tasks.values())
    assert all(row.endswith("FAIL") for row in factor_rows), table


def test_verify_physics_fails_when_the_wind_is_lost_on_reset(monkeypatch, capsys):
    monkeypatch.setattr(dmc.ContinualDMC, "_hook_episode_start", lambda self: None)
    assert vp.main(["--domain", "cup", "walker"]) == 1
    wind_rows = [line for line in capsys.readouterr().out.splitlines() if " wind " in line]
    assert len(wind_rows) == 2 and all(row.endswith("FAIL") for row in wind_rows)


def test_verify_physics_rejects_unknown_task_ids_listing_the_valid_ones(capsys):
    assert vp.main(["--domain", "cup", "--tasks", "0", "9"]) == 2
    assert "unknown cup task id 9; valid ids: 0, 1, 2, 3, 4, 5, 6" in capsys.readouterr().err


def test_a_change_too_small_to_tell_from_the_standard_physics_fails(tmp_path, capsys):
    defs = tmp_path / "defs.yaml"
    defs.write_text("crl_task_defs:\n  walker: {0: {}, 1: {gravity: -9.5}, 2: {gravity: -5.0}}\n")
    assert vp.main(["--task-defs", str(defs)]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if " gravity " in line]
    assert rows[0].endswith("FAIL") and rows[1].endswith("ok")


def test_speed_table_times_plain_standard_and_windy_env():
    lines = vp.speed_table(TASK_DEFS, ["pendulum"], repeats=2, n=20)
    domain, *numbers, verdict = lines[-1].split()
    assert domain == "pendulum" and verdict in ("ok", "SLOW")
    assert len(numbers) == 5 and all(float(number) > 0 for number in numbers)


BAD_VALUES = [{"mass_scale": 0}, {"friction_scale": -1}, {"wind": "strong"}, {"joint_friction": -0.5}]


@pytest.mark.parametrize("factors", BAD_VALUES)
def test_bad_factor_values_are_rejected(factors):
    with pytest.raises(ValueError, match=r"bad value for"):
        dmc.make("cup_catch", task_defs={"cup": {0: factors}})


def test_fast_render_draws_the_same_scene_without_shadows():
    """Same state, both renderers: the fast one has no shadow map or multisampling, and its
    image differs from the default one by little (the shadow, the edges), not by the scene."""
    images = {}
    for fast in (False, True):
        env = dmc.make("walker_walk", pixels=True, seed=3, fast_render=fast)
        images[fast] = env.reset()["image"].astype(float)
        assert (env.physics.model.vis.quality.shadowsize == 0) == fast
    other_pose = dmc.make("walker_walk", pixels=True, seed=4, fast_render=False).reset()["image"].astype(float)
    change = np.abs(images[True] - images[False])  # (64, 64, 3)
    assert 0 < change.mean() < np.abs(other_pose - images[False]).mean()
    assert (change.mean(-1) > 30).mean() < 0.1  # under 10% of the pixels change by much
