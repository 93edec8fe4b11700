"""Tests for analyze_results.py on synthetic run directories with known curves.

Schedule of the main synthetic runs (all numbers in env steps):
prefill = 250 agent steps, crl_steps_per_task = 250 agent steps,
action_repeat = 2, crl_tasks = [0, 1, 2, 3]  ->  windows
task 0: [500, 1000), task 1: [1000, 1500), task 2: [1500, 2000),
task 3: [2000, 2500). Evals every 125 env steps at 0, 125, ..., 2500
(21 points, index k <-> step 125*k); the eval points of a window [s, e)
are those with s < t <= e, i.e. indices 5-8, 9-12, 13-16, 17-20.
"""

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from rliable import library as rly, metrics as rly_metrics
from ruamel.yaml import YAML
from scipy.stats import trim_mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import analyze_results as ar  # noqa: E402
import tools  # noqa: E402

EVAL_STEPS = [125 * k for k in range(21)]
# Seed-1 eval returns per task at EVAL_STEPS (see the module docstring).
CURVES_SEED1 = {
    0: [0, 0, 0, 0, 100, 400, 800, 900, 850,
        700, 700, 700, 700, 600, 600, 600, 600, 500, 500, 500, 500],
    1: [100] * 9 + [300, 950, 1000, 990, 900, 900, 900, 900, 800, 800, 800, 800],
    2: [200] * 13 + [200, 300, 400, 500] + [500, 450, 400, 400],
    3: [0] * 17 + [600, 600, 600, 600],
}
# Seed 2 = seed 1 + 50 everywhere (forgetting unchanged, best/final +50).
CURVES_SEED2 = {t: [v + 50 for v in vals] for t, vals in CURVES_SEED1.items()}


def base_config(**overrides):
    """A resolved config like the agent saves it."""
    config = {
        "task": "dmc_cartpole_balance", "configs": ["dmc_crl_cartpole", "small"],
        "seed": 1, "llcd": True, "replay": "reservoir",
        "crl_tasks": [0, 1, 2, 3], "crl_steps_per_task": 250, "prefill": 250,
        "action_repeat": 2, "eval_every": 125, "llcd_max_delay": 60,
    }
    config.update(overrides)
    return config


def write_run(path, config, rows, tail=""):
    """Write config.yaml and metrics.jsonl (plus an optional raw tail)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        YAML(typ="safe", pure=True).dump(config, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write(tail)
    return str(path)


def crl_rows(curves, losses, detections=(), probe=()):
    """metrics.jsonl rows: evals, model losses, detections, probe accuracy."""
    rows = [{"step": 0, "crl_task": 0}]
    for k, step in enumerate(EVAL_STEPS):
        row = {"step": step}
        row.update({f"task_{t}_eval_return": vals[k] for t, vals in curves.items()})
        rows.append(row)
    rows += [{"step": 100 * (i + 1), "model_loss": loss, "fps": 3.0, "note": "x"}
             for i, loss in enumerate(losses)]
    rows += [{"step": s, "llcd_detection": 1.0} for s in detections]
    rows += [{"step": s, "llcd_probe_accuracy": a} for s, a in probe]
    return rows


def reference_rows(key, steps, values):
    """Rows of a single-task reference run."""
    return [{"step": s, key: v} for s, v in zip(steps, values)]


def build_dataset(root):
    """Two seeds of one group, one run with another schedule, references."""
    runs = root / "runs"
    seed1 = write_run(
        runs / "s1", base_config(seed=1),
        crl_rows(CURVES_SEED1, losses=list(range(1, 21)),
                 detections=[300, 1100, 1200, 1650], probe=[(1000, 0.5), (2500, 0.75)]),
        tail='{"step": 2600, "task_0_eval_ret')  # crashed mid-write
    seed2 = write_run(
        runs / "s2", base_config(seed=2),
        crl_rows(CURVES_SEED2, losses=[2 * i for i in range(1, 21)],
                 detections=[1000, 1500, 2000], probe=[(2500, 1.0)]))
    # crl_steps_per_task 300: the schedule ends at env step (250 + 4 * 300) * 2 = 2900.
    odd = write_run(
        runs / "s3_other_schedule", base_config(seed=3, crl_steps_per_task=300),
        crl_rows(CURVES_SEED1, losses=[1.0]) + [{"step": 2900, "model_loss": 1.0}])
    refs = root / "refs"
    # Task 0 reference: crl_tasks == [0], prefill 0 -> window starts at step 0.
    write_run(refs / "ref0", base_config(crl_tasks=[0], prefill=0),
              reference_rows("task_0_eval_return", [0, 125, 250, 375, 500, 625],
                             [0, 200, 400, 600, 800, 1000]))
    # Task 1 reference: crl_tasks == [1], prefill 50 agent steps x 2
    # -> its window starts at env step 100; aligned by steps since 100.
    write_run(refs / "ref1", base_config(crl_tasks=[1], prefill=50),
              reference_rows("task_1_eval_return", [100, 225, 350, 475, 600, 725],
                             [0, 250, 500, 750, 1000, 1000]))
    return seed1, seed2, odd


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run the CLI once on the synthetic dataset; keep outputs and messages."""
    root = tmp_path_factory.mktemp("analysis")
    build_dataset(root)
    out = root / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = ar.main([str(root / "runs" / "s*"), "--out", str(out),
                        "--reference", str(root / "refs" / "*")])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    table = {(r["group"], r["metric"]): r for r in rows}
    return {"code": code, "out": out, "stdout": stdout.getvalue(),
            "stderr": stderr.getvalue(), "table": table, "root": root}


MAIN = "cartpole llcd=True replay=reservoir"


def cell(report, metric, group=MAIN):
    """(mean, std, n) of one CSV cell as floats."""
    row = report["table"][(group, metric)]
    return float(row["mean"]), float(row["std"]), int(row["n"])


def seed_pair(a, b):
    """Hand formula: mean and sample std (ddof=1) of two seeds."""
    mean = (a + b) / 2
    return mean, math.sqrt(((a - mean) ** 2 + (b - mean) ** 2) / (2 - 1))


def assert_cell(report, metric, seed1_value, seed2_value):
    """The CSV cell equals the hand-computed mean ± std of the two seeds."""
    mean, std, n = cell(report, metric)
    exp_mean, exp_std = seed_pair(seed1_value, seed2_value)
    assert n == 2
    assert mean == pytest.approx(exp_mean), metric
    assert std == pytest.approx(exp_std), metric


def test_cli_exit_code_and_groups(report):
    assert report["code"] == 0
    groups = {g for g, _ in report["table"]}
    assert MAIN in groups
    odd = [g for g in groups if g != MAIN]
    assert len(odd) == 1 and "crl_steps_per_task=300" in odd[0]
    assert report["table"][(MAIN, "best_return/task0")]["n_runs"] == "2"
    assert "different schedule" in report["stderr"]
    assert "s3_other_schedule" in report["stderr"]


def test_truncated_last_line_skipped_with_warning(report):
    assert "skipping truncated last line" in report["stderr"]
    assert "Traceback" not in report["stderr"]


def test_best_return_first_window(report):
    # seed 1, first-window eval points (indices 5-8 etc.):
    # task0 max(400, 800, 900, 850) = 900; task1 max(300, 950, 1000, 990) = 1000
    # task2 max(200, 400, 500, 500) = 500; task3 max(600 x4) = 600; seed 2 = +50.
    for task, best in {0: 900, 1: 1000, 2: 500, 3: 600}.items():
        assert_cell(report, f"best_return/task{task}", best, best + 50)


def test_best_return_every_window(report):
    # One window per task here, so window j == task j's first window.
    for task, best in {0: 900, 1: 1000, 2: 500, 3: 600}.items():
        assert_cell(report, f"best_return/window{task}_task{task}", best, best + 50)


def test_final_return_and_average_performance(report):
    # p_i(T) at step 2500: 500, 800, 400, 600 -> P(T) = 2300 / 4 = 575.
    for task, final in {0: 500, 1: 800, 2: 400, 3: 600}.items():
        assert_cell(report, f"final_return/task{task}", final, final + 50)
    assert_cell(report, "avg_performance/final", 575.0, 625.0)


def test_forgetting_both_definitions(report):
    # e_0 = step 1000 (850): F0 = 850 - 500 = 350, Fmax0 = 900 - 500 = 400
    # e_1 = step 1500 (990): F1 = 990 - 800 = 190, Fmax1 = 1000 - 800 = 200
    # e_2 = step 2000 (500): F2 = 500 - 400 = 100, Fmax2 = 500 - 400 = 100
    # e_3 = step 2500 = T:   F3 = 0,               Fmax3 = 600 - 600 = 0
    forgetting = {0: 350, 1: 190, 2: 100, 3: 0}
    forgetting_max = {0: 400, 1: 200, 2: 100, 3: 0}
    for task in range(4):  # a constant offset does not change forgetting
        assert_cell(report, f"forgetting/task{task}", forgetting[task], forgetting[task])
        assert_cell(report, f"forgetting_max/task{task}",
                    forgetting_max[task], forgetting_max[task])
    # the means leave out task 3, trained last (its forgetting is 0 by construction)
    assert_cell(report, "forgetting/mean", 640 / 3, 640 / 3)       # 213.3
    assert_cell(report, "forgetting_max/mean", 700 / 3, 700 / 3)   # 233.3


def test_forward_transfer(report):
    # Task 0, window [500, 1000], tau = 0, .25, .5, .75, 1.
    # seed 1 normalised: .1 .4 .8 .9 .85 -> trapezoid mean
    #   .25 * ((.1+.4)/2 + (.4+.8)/2 + (.8+.9)/2 + (.9+.85)/2) = .25 * 2.575
    auc0_s1 = 0.25 * 2.575
    auc0_s2 = auc0_s1 + 0.05  # +50 / 1000
    # reference 0: 0 .2 .4 .6 .8 over offsets 0..500 (step 625 is outside)
    ref0 = 0.25 * (0.1 + 0.3 + 0.5 + 0.7)  # = 0.4
    # Task 1, window [1000, 1500]: .1 .3 .95 1.0 .99
    auc1_s1 = 0.25 * ((0.1 + 0.3) / 2 + (0.3 + 0.95) / 2 + (0.95 + 1.0) / 2 + (1.0 + 0.99) / 2)
    auc1_s2 = auc1_s1 + 0.05
    # reference 1 (window starts at 100): 0 .25 .5 .75 1.0 -> mean .5
    ref1 = 0.25 * (0.125 + 0.375 + 0.625 + 0.875)
    ft0 = [(a - ref0) / (1 - ref0) for a in (auc0_s1, auc0_s2)]
    ft1 = [(a - ref1) / (1 - ref1) for a in (auc1_s1, auc1_s2)]
    assert ft0[0] == pytest.approx(0.40625) and ft1[0] == pytest.approx(0.3975)
    assert_cell(report, "forward_transfer/task0", *ft0)
    assert_cell(report, "forward_transfer/task1", *ft1)
    # no reference for tasks 2 and 3 -> undefined, the mean uses tasks 0 and 1
    assert cell(report, "forward_transfer/task2")[2] == 0
    assert_cell(report, "forward_transfer/mean",
                (ft0[0] + ft1[0]) / 2, (ft0[1] + ft1[1]) / 2)


def test_recovery_after_each_switch(report):
    # Window 1 (task 1, [1000, 1500)): first half (1000, 1250] = steps 1125, 1250 (indices 9, 10).
    # Reference 1's return at the end of its window [100, 600): step 600 -> 1000.
    assert_cell(report, "recovery/switch1_task1", (300 + 950) / 2 / 1000, (350 + 1000) / 2 / 1000)
    # no reference for tasks 2 and 3 -> undefined, the mean is switch 1's
    assert cell(report, "recovery/switch2_task2")[2] == 0
    assert_cell(report, "recovery/mean", 0.625, 0.675)


def test_switch_cost_compares_both_tasks_at_the_switch_eval(report):
    # At each switch s_j, the return on the old task and on the new one (seed 2: both +50).
    for switch, index, old, new in ((1, 8, 0, 1), (2, 12, 1, 2), (3, 16, 2, 3)):
        p_old, p_new = CURVES_SEED1[old][index], CURVES_SEED1[new][index]
        assert_cell(report, f"switch_cost/switch{switch}_task{new}", 1 - p_new / p_old, 1 - (p_new + 50) / (p_old + 50))


def test_a_continual_runs_first_window_is_the_reference_of_its_first_task():
    """Its curve after the first switch (here far higher) is not the reference's."""
    config = base_config(crl_tasks=[2, 0], prefill=0)  # windows [0, 500) on task 2, [500, 1000) on task 0
    steps = np.array([0.0, 250.0, 500.0, 750.0, 1000.0])
    ref = ar.Run("mem", config, {"task_2_eval_return": (steps, np.array([0.0, 100.0, 300.0, 900.0, 1000.0]))})
    assert ref.reference_task == 2
    assert ar.reference_return([ref], 2, "cartpole") == 300
    assert ar.reference_auc([ref], 2, "cartpole", 500) == pytest.approx((0 + 2 * 0.1 + 0.3) / 4)
    assert math.isnan(ar.reference_return([ref], 0, "cartpole"))  # task 0 comes second: not from scratch


def test_convergence_steps(report):
    # seed 1: task0 90% of 900 = 810 -> first at step 875 (800 < 810): 875-500
    # task1 90% of 1000 = 900 -> step 1250: 250; task2 450 -> step 2000: 500
    # task3 540 -> step 2125: 125.  seed 2: 855 -> 875; 945 -> 1250;
    # 495 -> 2000; 585 -> 2125: the same steps.
    for task, steps in {0: 375, 1: 250, 2: 500, 3: 125}.items():
        assert_cell(report, f"convergence_steps/task{task}", steps, steps)


def test_final_model_loss(report):
    # seed 1 losses 1..20 -> mean(11..20) = 15.5; seed 2 = 2x -> 31
    assert_cell(report, "model_loss/final", sum(range(11, 21)) / 10,
                2 * sum(range(11, 21)) / 10)


def test_llcd_metrics(report):
    # Strict scoring in agent steps (action_repeat 2), llcd_max_delay 60. Switches at agent
    # steps 500 (task 1), 750 (task 2), 1000 (task 3); the run ends at 1250.
    # seed 1 detections 150 (false alarm), 550 (delay 50), 600 (second after the switch: false
    # alarm), 825 (75 steps late: a miss of switch 2 and a false alarm), none in
    # [1000, 1060]: a miss. 3 false alarms over 1250 agent steps -> 240 per 100K.
    # seed 2 detects each switch exactly at the boundary: delays 0, no misses.
    # Chance level (seed 1): of the 39 fake switch times (real ones shifted by 60k, |k| >= 2,
    # inside [0, 1190], more than 60 from every real one), 90, 100, 140, 150 precede 150,
    # 570, 580 precede 600 and 820 precedes 825 by at most 60: 7 / 39. Seed 2's detections
    # sit on the real switches, more than 60 from every fake one: 0.
    assert_cell(report, "llcd_delay_agent_steps/switch1_task1", 50, 0)
    mean, std, n = cell(report, "llcd_delay_agent_steps/switch2_task2")
    assert (mean, n) == (0.0, 1) and math.isnan(std)  # seed 1 was too late
    mean, std, n = cell(report, "llcd_delay_agent_steps/switch3_task3")
    assert (mean, n) == (0.0, 1) and math.isnan(std)  # seed 1 missed it
    assert_cell(report, "llcd_delay_agent_steps/median", 50, 0.0)
    assert_cell(report, "llcd_hit_rate", 1 / 3, 1.0)
    assert_cell(report, "llcd_chance_hit_rate", 7 / 39, 0.0)
    assert_cell(report, "llcd_misses", 2, 0)
    assert_cell(report, "llcd_false_alarms_per_100k", 3 / 1250 * 100_000, 0.0)
    assert_cell(report, "llcd_probe_accuracy/final", 0.75, 1.0)


def test_console_and_markdown_tables(report):
    # best return task 0: mean (900 + 950) / 2 = 925, std 25 * sqrt(2) = 35.36
    assert "925.0 ± 35.4" in report["stdout"]
    assert "(n=2)" in report["stdout"] and "(n=1)" in report["stdout"]
    assert "± n/a" in report["stdout"]  # the one-seed group
    md = (report["out"] / "results.md").read_text()
    assert "| best_return/task0 | 925.0 ± 35.4 |" in md
    assert "| forgetting/mean | 213.3 ± 0.0 |" in md  # identical across seeds
    iqm = md.split("## IQM")[1].split("## Groups")[0].strip().splitlines()[2:]  # a row per group
    assert iqm[0].startswith("| group | final_return |")
    assert [row.split(" | ")[0].endswith(("(n=2)", "(n=1)")) for row in iqm[2:]] == [True, True]


def test_output_files_written(report):
    out = report["out"]
    for name in ["results.csv", "results_per_run.csv", "results.md",
                 "final_results_grid_shaded.png", "curve_eval_return_task0.png",
                 "curve_avg_performance.png", "curve_model_loss.png",
                 "curve_llcd_detections.png", "bars_forgetting.png", "iqm_intervals.png"]:
        assert (out / name).stat().st_size > 0, name
    with open(out / "final_results_grid_shaded.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out / "results_per_run.csv") as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == 3
    assert {r["seed"] for r in per_run} == {"1", "2", "3"}


def test_repeated_schedule_windows():
    # crl_tasks [0, 1, 0, 1], prefill 0, spt 100, action_repeat 1:
    # windows [0,100) [100,200) [200,300) [300,400); evals every 50.
    steps = [0, 50, 100, 150, 200, 250, 300, 350, 400]
    task0 = [0, 500, 600, 300, 200, 700, 800, 400, 300]
    task1 = [0, 0, 0, 400, 500, 100, 100, 900, 950]
    rows = {"task_0_eval_return": task0, "task_1_eval_return": task1}
    run = ar.Run("mem", base_config(crl_tasks=[0, 1, 0, 1], prefill=0,
                                    crl_steps_per_task=100, action_repeat=1),
                 {k: (np.array(steps, float), np.array(v, float)) for k, v in rows.items()})
    m = ar.compute_run_metrics(run)
    assert m["best_return/window0_task0"] == 600   # max(500, 600)
    assert m["best_return/window1_task1"] == 500   # max(400, 500)
    assert m["best_return/window2_task0"] == 800   # max(700, 800)
    assert m["best_return/window3_task1"] == 950   # max(900, 950)
    assert m["best_return/task0"] == 600 and m["best_return/task1"] == 500
    # e_0 = step 100 (600), T = 400 (300): F = 300, Fmax = 600 - 300
    assert m["forgetting/task0"] == 300 and m["forgetting_max/task0"] == 300
    # e_1 = step 200 (500), final 950: negative forgetting (backward transfer)
    assert m["forgetting/task1"] == -450 and m["forgetting_max/task1"] == -450
    assert m["avg_performance/final"] == (300 + 950) / 2
    # llcd on, no detections: all three switches (windows 1, 2, 3) missed
    assert m["llcd_misses"] == 3 and m["llcd_false_alarms_per_100k"] == 0 and m["llcd_hit_rate"] == 0
    assert math.isnan(m["llcd_delay_agent_steps/median"])
    assert math.isnan(m["model_loss/final"])


def test_single_seed_group_has_no_std(tmp_path, capsys):
    write_run(tmp_path / "a", base_config(llcd=False), crl_rows(CURVES_SEED1, [1.0]))
    assert ar.main([str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "900.0 ± n/a" in text and "nan" not in text.lower().replace("n/a", "")
    assert "llcd_misses" not in text  # llcd off and no detections logged


def test_llcd_keys_are_left_out_of_the_label_of_a_run_without_llcd():
    keys = ("domain", "llcd", "llcd_gate")
    assert ar.group_label(base_config(llcd=True, llcd_gate="never"), keys) == "cartpole llcd=True llcd_gate=never"
    assert ar.group_label(base_config(llcd=False, llcd_gate="never"), keys) == "cartpole llcd=False"


def test_group_by_replaces_default(tmp_path, capsys):
    for seed, replay in ((1, "fifo"), (2, "reservoir")):
        write_run(tmp_path / f"r{seed}", base_config(seed=seed, replay=replay),
                  crl_rows(CURVES_SEED1, [1.0]))
    groups = ar.group_runs(ar.load_runs(ar.expand_paths([str(tmp_path / "r*")])),
                           ["llcd", "configs"])
    assert [g.label for g in groups] == ["llcd=True configs=[dmc_crl_cartpole,small]"]
    assert len(groups[0].runs) == 2
    default = ar.group_runs(groups[0].runs)
    assert sorted(g.label for g in default) == [
        "cartpole llcd=True replay=fifo", "cartpole llcd=True replay=reservoir"]


def test_missing_files_clear_messages(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ar.main([str(tmp_path / "does_not_exist"), "--out", str(tmp_path / "o")])
    assert "no run directory with config.yaml and metrics.jsonl" in str(exc.value)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(SystemExit):
        ar.main([str(only_config), "--out", str(tmp_path / "o")])
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_no_eval_rows_message(tmp_path, capsys):
    write_run(tmp_path / "noeval", base_config(), [{"step": 10, "model_loss": 1.0}])
    with pytest.raises(SystemExit) as exc:
        ar.main([str(tmp_path / "noeval"), "--out", str(tmp_path / "o")])
    assert "no run has eval rows" in str(exc.value)
    err = capsys.readouterr().err
    assert "no eval rows" in err and "is empty" in err


def test_cli_subprocess_usage_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "analyze_results.py"),
                           str(tmp_path / "nothing_here")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("analyze_results: error:")


def write_offset_runs(root, offsets, **config):
    """One run per offset: the seed-1 curves plus that offset (complete schedule)."""
    return [write_run(root / f"o{i}", base_config(seed=i, **config),
                      crl_rows({t: [v + offset for v in vals] for t, vals in CURVES_SEED1.items()}, [1.0]))
            for i, offset in enumerate(offsets)]


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_iqm_and_ci_match_rliable(tmp_path, capsys):
    # Five seeds, final returns 500 800 400 600 per task plus offsets 0 10 20 200 -300.
    offsets = [0, 10, 20, 200, -300]
    write_offset_runs(tmp_path / "runs", offsets)
    assert ar.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    iqm = {r["metric"]: r for r in read_rows(tmp_path / "out" / "results_iqm.csv")}
    # P(T) = 575 + offset: 275, 575, 585, 595, 775 -> the IQM drops one value at each end (25% of 5)
    # and averages 575, 585, 595 = 585.
    perf = np.array([[575.0 + o] for o in offsets])
    assert float(iqm["avg_performance"]["iqm"]) == pytest.approx(585.0)
    final = np.array([[f + o for f in (500, 800, 400, 600)] for o in offsets])
    assert float(iqm["final_return"]["iqm"]) == pytest.approx(trim_mean(final, 0.25, axis=None))
    assert (iqm["final_return"]["runs"], iqm["final_return"]["tasks"]) == ("5", "4")
    # forgetting: tasks 0-2 only (task 3 is trained last), the same for every seed: 350 190 100
    assert iqm["forgetting"]["tasks"] == "3"
    assert float(iqm["forgetting"]["iqm"]) == pytest.approx(trim_mean([350, 190, 100] * 5, 0.25))
    for metric, scores in (("avg_performance", perf), ("final_return", final)):
        np.random.seed(0)
        _, ci = rly.get_interval_estimates({"x": scores}, lambda x: np.array([rly_metrics.aggregate_iqm(x)]),
                                           reps=2000)
        assert (float(iqm[metric]["ci_low"]), float(iqm[metric]["ci_high"])) == pytest.approx(tuple(ci["x"][:, 0]))
    assert "IQM" in capsys.readouterr().out


def test_mean_forgetting_leaves_out_last_trained_task():
    # crl_tasks [0, 1, 2], prefill 0, spt 100, action_repeat 1; evals every 50 up to T = 300.
    steps = [0, 50, 100, 150, 200, 250, 300]
    curves = {0: [0, 800, 900, 700, 600, 500, 400], 1: [0, 0, 0, 500, 700, 650, 600],
              2: [0, 0, 0, 0, 0, 300, 500]}
    run = ar.Run("mem", base_config(crl_tasks=[0, 1, 2], prefill=0, crl_steps_per_task=100, action_repeat=1),
                 {f"task_{t}_eval_return": (np.array(steps, float), np.array(v, float)) for t, v in curves.items()})
    m = ar.compute_run_metrics(run)
    # F0 = 900 - 400 = 500, F1 = 700 - 600 = 100, F2 = 500 - 500 = 0 (trained last: left out)
    assert (m["forgetting/task0"], m["forgetting/task1"], m["forgetting/task2"]) == (500, 100, 0)
    assert m["forgetting/mean"] == (500 + 100) / 2
    # Fmax0 = 900 - 400, Fmax1 = 700 - 600
    assert m["forgetting_max/mean"] == (500 + 100) / 2


def test_incomplete_run_left_out_and_unfinished_windows_missing(tmp_path, capsys):
    write_run(tmp_path / "runs" / "full", base_config(seed=1), crl_rows(CURVES_SEED1, [1.0]))
    # seed 2 stops at env step 1250, inside task 1's window [1000, 1500)
    short_rows = [r for r in crl_rows(CURVES_SEED2, [1.0]) if r["step"] <= 1250]
    short = write_run(tmp_path / "runs" / "short", base_config(seed=2), short_rows)
    assert ar.main([str(tmp_path / "runs"), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"{short}: incomplete, stops at env step 1250 before the schedule ends at 2500" in err
    table = {r["metric"]: r for r in read_rows(tmp_path / "a" / "results.csv")}
    assert table["forgetting/task0"]["n_runs"] == "1" and float(table["forgetting/task0"]["mean"]) == 350
    assert ar.main([str(tmp_path / "runs"), "--out", str(tmp_path / "b"), "--include-incomplete"]) == 0
    table = {r["metric"]: r for r in read_rows(tmp_path / "b" / "results.csv")}
    # seed 2: e_0 = step 1000 (850 + 50), T = 1250 (700 + 50): F0 = 150; task 1's window is unfinished
    assert table["forgetting/task0"]["n"] == "2" and float(table["forgetting/task0"]["mean"]) == (350 + 150) / 2
    assert table["forgetting/task1"]["n"] == "1" and float(table["forgetting/task1"]["mean"]) == 190
    m = ar.compute_run_metrics(ar.load_run(short))
    assert m["forgetting/task0"] == 150 and math.isnan(m["forgetting/task1"]) and math.isnan(m["forgetting_max/task2"])
    assert m["forgetting/mean"] == 150


def test_all_runs_incomplete_is_a_clear_error(tmp_path):
    write_run(tmp_path / "short", base_config(), [r for r in crl_rows(CURVES_SEED1, [1.0]) if r["step"] <= 1250])
    with pytest.raises(SystemExit) as exc:
        ar.main([str(tmp_path / "short"), "--out", str(tmp_path / "o")])
    assert "--include-incomplete" in str(exc.value)


def test_llcd_delays_in_agent_steps():
    # action_repeat 4, prefill 100, spt 500 agent steps: the switch to task 1 is at agent step 600 (env 2400);
    # llcd_max_delay 0 = one episode = time_limit 1000 / 4 = 250 agent steps. Detections at env steps 400
    # (agent 100: false alarm) and 2800 (agent 700: 100 agent steps after the switch, 400 env steps).
    config = base_config(crl_tasks=[0, 1], prefill=100, crl_steps_per_task=500, action_repeat=4,
                         llcd_max_delay=0, time_limit=1000)
    scalars = {"task_0_eval_return": (np.array([0.0, 4400.0]), np.array([1.0, 2.0])),
               "llcd_detection": (np.array([400.0, 2800.0]), np.array([1.0, 1.0]))}
    m = ar.compute_run_metrics(ar.Run("mem", config, scalars))
    assert m["llcd_delay_agent_steps/switch1_task1"] == 100 and m["llcd_hit_rate"] == 1
    # 1 false alarm over the run's 4400 / 4 = 1100 agent steps
    assert m["llcd_false_alarms_per_100k"] == pytest.approx(100_000 / 1100)


def test_reference_task_is_the_schedules_first():
    assert ar.Run("mem", base_config(crl_tasks=[2]), {}).reference_task == 2
    assert ar.Run("mem", base_config(crl_tasks=[3, 0, 3]), {}).reference_task == 3
    assert ar.Run("mem", base_config(crl_tasks=[], task_id=1), {}).reference_task is None


def test_compare_probability_of_improvement(tmp_path, capsys):
    write_offset_runs(tmp_path / "good", [100, 150], replay="fifo")
    write_offset_runs(tmp_path / "base", [0, 50])
    runs = [str(tmp_path / "good"), str(tmp_path / "base")]
    good, base = "cartpole llcd=True replay=fifo", "cartpole llcd=True replay=reservoir"
    argv = runs + ["--out", str(tmp_path / "o"), "--compare", good, base, "--compare", base, good]
    assert ar.main(argv) == 0
    out = capsys.readouterr().out
    assert f"P({good} improves on {base})" in out and f"P({base} improves on {good})" in out
    rows = read_rows(tmp_path / "o" / "compare.csv")
    forward = {r["metric"]: r for r in rows if r["group_a"] == good}
    backward = {r["metric"]: r for r in rows if r["group_a"] == base}
    # every final return / P(T) of 'good' beats every one of 'base': probability 1 (0 the other way round)
    for metric in ("final_return", "avg_performance"):
        assert [float(forward[metric][k]) for k in ("probability", "ci_low", "ci_high")] == [1.0, 1.0, 1.0]
        assert [float(backward[metric][k]) for k in ("probability", "ci_low", "ci_high")] == [0.0, 0.0, 0.0]
    assert forward["final_return"]["verdict"] == backward["final_return"]["verdict"] == "CI excludes 0.5"
    assert float(forward["forgetting"]["probability"]) == 0.5  # a constant offset forgets the same
    groups = ar.group_runs(ar.load_runs(ar.expand_paths(runs)))
    equal = ar.compare_table(ar.run_tables(groups, [])[0], groups[1], groups[1])
    assert list(equal["probability"]) == [0.5] * 3  # final return, P(T), forgetting (no forward transfer)
    assert list(equal["verdict"]) == ["CI includes 0.5"] * 2 + ["all scores tied"]  # every run forgets the same
    assert [ar.comparison_verdict(*ci) for ci in ((0.4, 0.6), (0.5, 0.9), (0.51, 0.9), (0.0, 0.49))] == [
        "CI includes 0.5", "CI includes 0.5", "CI excludes 0.5", "CI excludes 0.5"]
    with pytest.raises(SystemExit) as exc:
        ar.main(runs + ["--out", str(tmp_path / "q"), "--compare", good, "nope"])
    assert "no group 'nope'" in str(exc.value) and f"'{base}'" in str(exc.value)


# ----------------------------------------------------------------- offline detector replay


def test_detectors_mode_replays_recorded_streams_with_strict_scoring(tmp_path, capsys):
    """A recorded stream whose obs_nll rises by 1 std at each of the 2 switches (agent steps
    3500 and 6500) and whose latent_kl is pure noise: CUSUM finds both rises within one
    episode (500 agent steps), the sigma rule neither, and on the noise CUSUM finds nothing."""
    config = {**ar.config_defaults(), **base_config(crl_tasks=[0, 1, 2], crl_steps_per_task=3000, prefill=500,
                                                    time_limit=1000, llcd_max_delay=0)}
    run = write_run(tmp_path / "run", config, [{"step": 19000, "task_0_eval_return": 1.0}])
    steps = np.arange(500, 9500)
    rng = np.random.default_rng(0)
    level = (steps >= 3500).astype(float) + (steps >= 6500)
    np.savez(tmp_path / "run" / ar.SCORES_FILE, step=steps, obs_nll=rng.normal(size=len(steps)) + level,
             latent_kl=rng.normal(size=len(steps)))
    assert ar.main([run, "--detectors", "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "detectors.csv") as f:
        rows = {(r["run"].startswith("all"), r["score"], r["detector"]): r for r in csv.DictReader(f)}
    assert len(rows) == 20  # 2 scores x 4 detector settings and their max-of-CUSUMs fusion x 2, per run and pooled
    fused = rows[(False, "max(obs_nll+latent_kl)", "cusum(fa=1)")]
    assert (fused["hits"], fused["misses"]) == ("2", "0")  # the rise in one of its streams is enough
    cusum, sigma = rows[(False, "obs_nll", "cusum(fa=1)")], rows[(False, "obs_nll", "threshold(sigma=3)")]
    assert (cusum["hits"], cusum["misses"], float(cusum["hit_rate"])) == ("2", "0", 1.0)
    assert 0 < float(cusum["median_delay"]) <= 500
    assert (sigma["hits"], sigma["misses"]) == ("0", "2")
    noise = rows[(False, "latent_kl", "cusum(fa=1)")]
    assert noise["hits"] == "0" and noise["false_alarms"] == "0"
    assert rows[(True, "obs_nll", "cusum(fa=1)")]["hits"] == "2"
    assert "obs_nll" in capsys.readouterr().out
    with open(tmp_path / "out" / "switches.csv") as f:
        switches = [r for r in csv.DictReader(f) if (r["score"], r["detector"]) == ("obs_nll", "cusum(fa=1)")]
    assert [(r["change"], r["agent_step"], r["outcome"]) for r in switches] == [
        ("cartpole: task 1 (wind 0.5)", "3500.0", "hit"), ("cartpole: task 2 (gravity -1.62)", "6500.0", "hit")]
    assert all(r["first_detection"] == r["delay"] for r in switches)  # hits: the first one is in time
    assert sorted(float(r["delay"]) for r in switches)[-1] == float(cusum["median_delay"]) * 2 - min(
        float(r["delay"]) for r in switches)  # the median of two delays is their mean


def test_detectors_mode_adds_phase_normalised_scores_where_the_phase_was_recorded(tmp_path):
    """obs_nll follows the episode phase (amplitude 10 stds) and rises by half a std at each switch: its
    phase-normalised variant catches both rises within one episode; the raw score neither (on 20 seeds of
    such streams, measured once: 20 and 0 of 20)."""
    config = {**ar.config_defaults(), **base_config(crl_tasks=[0, 1, 2], crl_steps_per_task=15000, prefill=500,
                                                    time_limit=1000, llcd_max_delay=0)}
    run = write_run(tmp_path / "run", config, [{"step": 91000, "task_0_eval_return": 1.0}])
    steps = np.arange(500, 45500)
    phase = steps % 500
    profile = 10.0 * (np.exp(-phase / 20) + np.sin(phase * 2 * np.pi / 500))
    level = 0.5 * ((steps >= 15500).astype(float) + (steps >= 30500))
    noise = np.random.default_rng(1).normal(size=len(steps))
    np.savez(tmp_path / "run" / ar.SCORES_FILE, step=steps, phase=phase.astype(np.float32),
             obs_nll=profile + level + noise)
    assert ar.main([run, "--detectors", "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "detectors.csv") as f:
        rows = {(r["score"], r["detector"]): r for r in csv.DictReader(f) if not r["run"].startswith("all")}
    assert set(rows) == {(s, d) for s in ("obs_nll", "obs_nll@phase") for d, _, _ in ar.detector_settings()}
    assert rows[("obs_nll@phase", "cusum(fa=1)")]["hits"] == "2"
    assert rows[("obs_nll", "cusum(fa=1)")]["hits"] == "0"


def write_detection_run(path, task, rising, seed):
    """A recorded stream of two switches (agent steps 3500 and 6500) in which score ``rising`` rises by
    1 std at each and the other is noise."""
    config = {**ar.config_defaults(), **base_config(task=task, crl_tasks=[0, 1, 2], crl_steps_per_task=3000,
                                                    prefill=500, time_limit=1000, llcd_max_delay=0, seed=seed)}
    write_run(path, config, [{"step": 19000, "task_0_eval_return": 1.0}])
    steps = np.arange(500, 9500)
    rng = np.random.default_rng(seed)
    scores = {name: rng.normal(size=len(steps)) for name in ("obs_nll", "latent_kl")}
    scores[rising] += (steps >= 3500).astype(float) + (steps >= 6500)
    np.savez(path / ar.SCORES_FILE, step=steps, **scores)


def test_held_out_selection_chooses_on_some_domains_and_reports_on_the_others(tmp_path, capsys):
    """obs_nll carries the changes on cartpole, latent_kl on cup: chosen on cartpole, obs_nll finds nothing on
    held-out cup; chosen on cup, latent_kl finds nothing on held-out cartpole. The figures of each side come
    from its own runs only."""
    for seed in (0, 1):
        write_detection_run(tmp_path / f"cartpole{seed}", "dmc_cartpole_swingup", "obs_nll", seed)
        write_detection_run(tmp_path / f"cup{seed}", "dmc_cup_catch", "latent_kl", seed + 10)
    out = tmp_path / "out"
    assert ar.main([str(tmp_path / "c*"), "--detectors", "--select-on", "cartpole", "--out", str(out)]) == 0
    with open(out / "heldout.csv") as f:
        rows = {(r["split"], r["role"]): r for r in csv.DictReader(f)}
    chosen = rows[("chosen on cartpole", "selected on")]
    assert (chosen["score"], chosen["detector"][:5], chosen["hits"], chosen["domain"]) == ("obs_nll", "cusum", "4", "cartpole")
    held = rows[("chosen on cartpole", "held out")]
    assert (held["score"], held["hits"], held["misses"], held["domain"]) == ("obs_nll", "0", "4", "cup")
    swapped = rows[("chosen on cup", "selected on")]
    assert (swapped["score"], swapped["detector"][:5], swapped["hits"]) == ("latent_kl", "cusum", "4")
    assert rows[("chosen on cup", "held out")]["hits"] == "0"
    printed = capsys.readouterr().out.split(f"per change, chosen on cartpole ({ar.live_options('obs_nll', chosen['detector'])})"
                                            ", on held-out cup:")[1]
    changes = printed.split("per change,")[0]
    assert "cup: task 1" in changes and "cup: task 2" in changes and "cartpole:" not in changes
    with open(out / "heldout_types.csv") as f:  # each switch once, by the choice made on the other domain
        types = {r["type"].split(":")[0]: (r["hits"], r["switches"]) for r in csv.DictReader(f)}
    assert types == {"task 1": ("0", "4"), "task 2": ("0", "4")}


def pooled_row(score, detector, hit_rate, false_alarms, chance=0.05, delay=100.0):
    return {"score": score, "detector": detector, "hit_rate": hit_rate, "chance_hit_rate": chance,
            "false_alarms_per_100k": false_alarms, "median_delay": delay}


def test_the_choice_is_the_best_live_candidate_within_the_goal_or_the_smallest_budget_that_beats_chance():
    """Within 1 false alarm per 100K a candidate above chance wins; where none is, the budget doubles until one
    is (3 FA -> budget 4): the best hit rate within 4 wins, not the better one at 5, and never a fusion, which
    a live run cannot use."""
    rows = [pooled_row("a", "cusum(fa=1)", 0.5, 0.8), pooled_row("b", "cusum(fa=1)", 0.9, 1.5),
            pooled_row("max(a+b)", "cusum(fa=1)", 1.0, 0.0)]
    assert ar.choose_candidate(pd.DataFrame(rows))["score"] == "a"
    rows = [pooled_row("a", "cusum(fa=1)", 0.04, 0.5), pooled_row("b", "cusum(fa=1)", 0.3, 3.0),
            pooled_row("c", "threshold(sigma=3)", 0.5, 3.9), pooled_row("d", "cusum(fa=0.1)", 0.9, 5.0),
            pooled_row("max(b+c)", "cusum(fa=1)", 1.0, 0.0)]
    assert ar.choose_candidate(pd.DataFrame(rows))["score"] == "c"
    nothing = [pooled_row("a", "cusum(fa=1)", 0.0, 2.0), pooled_row("b", "cusum(fa=1)", 0.0, 1.0)]
    assert ar.choose_candidate(pd.DataFrame(nothing))["score"] == "b"  # none beats chance: the fewest false alarms


def test_a_chosen_candidate_is_a_live_setting():
    """Each replayed detector setting, given to dreamer.py as live_options says, configures that very setting."""
    for label, name, overrides in ar.detector_settings():
        options = ar.live_options("latent_kl@phase", label).split()
        config = tools.load_config(["--configs", "debug", *options])
        assert config["llcd_score"] == "latent_kl@phase" and config["llcd_detector"] == name
        assert ar.detector_label(name, config) == label and all(config[k] == v for k, v in overrides.items())


def test_select_on_needs_detectors_and_domains_on_both_sides(tmp_path):
    write_detection_run(tmp_path / "cartpole0", "dmc_cartpole_swingup", "obs_nll", 0)
    for args, fragment in ((["--select-on", "cartpole"], "--select-on chooses a detector: add --detectors"),
                           (["--detectors", "--select-on", "cartpole"], "needs runs of those domains and of others")):
        with pytest.raises(SystemExit) as error:
            ar.main([str(tmp_path / "cartpole0"), *args, "--out", str(tmp_path / "out")])
        assert fragment in str(error.value)


def test_detectors_mode_without_recorded_streams_is_a_clear_error(tmp_path):
    run = write_run(tmp_path / "run", base_config(), [{"step": 100, "task_0_eval_return": 1.0}])
    result = subprocess.run([sys.executable, "analyze_results.py", run, "--detectors"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "llcd_scores.npz" in result.stderr and "Traceback" not in result.stderr


def test_first_detection_in_a_window_tells_late_from_never():
    assert ar.first_in_window([10.0, 250.0, 900.0], 200.0, 800.0) == 50.0  # the one at 10 is before it
    assert math.isnan(ar.first_in_window([10.0, 900.0], 200.0, 800.0))  # the one at 900 is the next window's


# ----------------------------------------------------------------- learning table against an anchor


def single_task_run(path, task, seed, evals, trains, seconds, gz=False):
    """A single-task run directory: eval rows {step: return}, train rows {step: return}, the
    sweep's sweep_done.json (wall seconds); metrics.jsonl gzipped as kept results are."""
    config = {"task": task, "seed": seed, "prefill": 1000, "action_repeat": 2, "eval_every": 8000}
    rows = [{"step": s, "eval_return": r} for s, r in evals.items()] + [
        {"step": s, "train_return": r} for s, r in trains.items()]
    write_run(path, config, sorted(rows, key=lambda row: row["step"]))
    if gz:
        import gzip
        with open(os.path.join(path, "metrics.jsonl"), "rb") as f, gzip.open(os.path.join(path, "metrics.jsonl.gz"), "wb") as g:
            g.write(f.read())
        os.remove(os.path.join(path, "metrics.jsonl"))
    with open(os.path.join(path, "sweep_done.json"), "w") as f:
        json.dump({"seconds": seconds, "cpu": "Test CPU"}, f)
    return str(path)


def test_learning_table_sets_each_seed_beside_the_anchor(tmp_path):
    """The table takes each run's last eval at or before the anchor's step (not a later one, not
    one further back than eval_every), the training episodes of the 5K steps before it, the
    anchor's mean and range over its seeds, and reads gzipped metrics like plain ones."""
    anchor = tmp_path / "anchor.csv"
    anchor.write_text("task,seed,env_steps,return\n" + "".join(
        f"dmc_ball_in_cup_catch,{seed},{step},{value}\n"
        for seed, values in enumerate([(100, 500), (300, 700), (200, 900)]) for step, value in zip((50000, 100000), values)))
    runs = [single_task_run(tmp_path / f"s{seed}", "dmc_cup_catch", seed,
                            {42000: 1.0 + seed, 50000: 10.0 + seed, 58000: 99.0, 98000: 20.0 * (seed + 1)},
                            {46002: 4.0, 49002: 6.0 + seed, 51002: 999.0}, seconds=600 * (seed + 1), gz=seed == 1)
            for seed in range(3)]
    out = tmp_path / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert ar.main([*runs, "--anchor", str(anchor), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "learning_table.csv")))
    at = {int(row["env_steps"]): row for row in rows}
    assert set(at) == {50000, 100000}
    assert at[50000]["seeds"] == "10 / 11 / 12" and float(at[50000]["mean"]) == pytest.approx(11.0)
    assert at[100000]["seeds"] == "20 / 40 / 60"  # the evals at 98K, 2K before the anchor's step
    assert float(at[50000]["anchor_mean"]) == pytest.approx(200.0)
    assert (float(at[100000]["anchor_min"]), float(at[100000]["anchor_max"])) == (500.0, 900.0)
    assert at[50000]["train_seeds"] == "5 / 6 / 6"  # (4 + 6 + seed) / 2, rounded; the episode after 50K left out
    assert float(at[50000]["minutes"]) == pytest.approx(20.0)
    assert "| cup_catch | 50K | 200 [100, 300] (3) | 11 ± 1 | 10 / 11 / 12 |" in printed.getvalue()
    assert (out / "learning.png").stat().st_size > 0


def test_learning_table_misses_a_run_that_stopped_early(tmp_path):
    anchor = tmp_path / "anchor.csv"
    anchor.write_text("task,seed,env_steps,return\ndmc_cartpole_balance,0,50000,400\ndmc_cartpole_balance,0,100000,800\n")
    run = single_task_run(tmp_path / "r", "dmc_cartpole_balance", 0, {26000: 5.0, 34000: 7.0}, {}, 60)
    with pytest.raises(SystemExit, match="no run has an eval at an env step of the anchor"):
        ar.main([run, "--anchor", str(anchor), "--out", str(tmp_path / "out")])
    bad = tmp_path / "bad.csv"
    bad.write_text("task,steps\nx,1\n")
    with pytest.raises(SystemExit, match="no column env_steps, return, seed"):
        ar.main([run, "--anchor", str(bad), "--out", str(tmp_path / "out")])


def test_the_learning_table_regenerates_from_the_committed_results(tmp_path):
    """The command of docs/results/learning-table.md on the kept results in the repo: every kept
    run is in the table, at 50K env steps with the eval its metrics hold (read here as raw JSON)."""
    import gzip
    results = os.path.join(ROOT, "studies", "results", "learning_table")
    anchor = os.path.join(ROOT, "studies", "anchors", "dreamerv3_dmc_proprio.csv")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "analyze_results.py", results, "--anchor", anchor, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out / "learning_table.csv")))
    runs = sorted(os.listdir(results))
    assert runs
    for run in runs:
        with gzip.open(os.path.join(results, run, "metrics.jsonl.gz"), "rt") as f:
            evals = {row["step"]: row["eval_return"] for row in map(json.loads, f) if "eval_return" in row}
        task = YAML(typ="safe", pure=True).load(open(os.path.join(results, run, "config.yaml")))["task"]
        row = next(r for r in rows if r["task"] == task and int(r["env_steps"]) == 50000)
        assert f"{evals[50000]:.0f}" in row["seeds"].split(" / "), (run, row["seeds"])
    assert (out / "learning.png").stat().st_size > 0


def ab_curve(steps, low, high, start, end):
    """A return that climbs linearly from ``low`` to ``high`` over env steps [start, end] and stays there."""
    return np.clip(low + (high - low) * (steps - start) / (end - start), min(low, high), max(low, high))


def test_the_crl_ab_analysis_script_runs_on_kept_results_named_as_the_sweep_names_them(tmp_path):
    """studies/crl_ab_analyze.sh on synthetic kept results of its grid (one seed of each arm, the B
    references): it finds every group and reference, writes every P(improvement) pair, and the LLCD-off
    runs' first windows serve as A's reference (recovery of A's return after the second switch)."""
    steps = np.arange(0, 154001, 5000.0)  # prefill 1K agent steps, 3 windows of 25K, action repeat 2
    steps = np.union1d(steps, [2000.0, 52000.0, 102000.0, 152000.0])
    common = dict(crl_steps_per_task=25000, prefill=1000, action_repeat=2, eval_every=5000, replay="reservoir")
    arms = [("-llcdFalse", dict(llcd=False)), *[(f"-llcdTrue-llcd_gate{g}", dict(llcd=True, llcd_gate=g))
                                              for g in ("always", "never", "detector")]]
    for task, domain_bonus in (("dmc_cup_catch", 0), ("dmc_cartpole_swingup", 50)):
        for seed in (0,):
            for k, (suffix, arm) in enumerate(arms):
                config = base_config(task=task, seed=seed, crl_tasks=[0, 3, 0], **common, **arm)
                a = ab_curve(steps, 0, 800 + 20 * k + domain_bonus + seed, 2000, 52000)
                b = ab_curve(steps, 100, 700 + 10 * k + seed, 52000, 102000)
                rows = [{"step": float(s), "task_0_eval_return": float(x), "task_3_eval_return": float(y)}
                        for s, x, y in zip(steps, a, b)]
                write_run(tmp_path / "results" / f"seed{seed}-task{task}-crl_tasks_0_3_0_{suffix}", config, rows)
            ref = base_config(task=task, seed=seed, crl_tasks=[3], **common, llcd=False)
            ref_steps = steps[steps <= 52000]
            write_run(tmp_path / "results" / f"seed{seed}-task{task}-crl_tasks_3_-llcdFalse", ref,
                      reference_rows("task_3_eval_return", ref_steps, ab_curve(ref_steps, 0, 650, 2000, 52000)))
    out = tmp_path / "out"
    result = subprocess.run(["bash", os.path.join(ROOT, "studies", "crl_ab_analyze.sh"), str(tmp_path / "results"),
                             str(out), "--bootstrap-reps", "50"], env={**os.environ, "PYTHON": sys.executable},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "compare.csv") as f:
        pairs = {(r["group_a"], r["group_b"]) for r in csv.DictReader(f)}
    assert len(pairs) == 10
    assert (out / "curves_by_domain.png").stat().st_size > 0 and (out / "compare.png").stat().st_size > 0
    assert ("cup llcd=True llcd_gate=detector", "cup llcd=False") in pairs
    assert ("cartpole llcd=True llcd_gate=detector", "cartpole llcd=True llcd_gate=never") in pairs
    with open(out / "results.csv") as f:
        table = {(r["group"], r["metric"]): r for r in csv.DictReader(f)}
    # switch 2 (back to A) of the off arm: A's curve holds 800 through window 3 and the reference (the off
    # run's own first window) ends window 1 at 800: recovery 1; the always arm (k = 1) holds 820
    off = table[("cup llcd=False", "recovery/switch2_task0")]
    assert float(off["mean"]) == pytest.approx(1.0)
    assert float(table[("cup llcd=True llcd_gate=always", "recovery/switch2_task0")]["mean"]) == pytest.approx(820 / 800)
    # switch 1 (to B): the first half of window 2 is (52K, 77K]; the reference ends its window at 650
    early = ab_curve(np.arange(55000.0, 77001, 5000), 100, 700, 52000, 102000)
    assert float(table[("cup llcd=False", "recovery/switch1_task3")]["mean"]) == pytest.approx(np.mean(early) / 650)


def test_the_by_domain_figure_gives_each_arm_one_colour_in_every_domain():
    """curves_by_domain.png: one row per domain (first-seen order), and an arm keeps its colour across rows
    while different arms get different ones."""
    runs = [ar.Run("mem", base_config(task=task, llcd=llcd, llcd_gate="always"), {})
            for task in ("dmc_cup_catch", "dmc_cartpole_swingup") for llcd in (False, True)]
    groups = ar.group_runs(runs, ["domain", "llcd", "llcd_gate"])
    rows = ar.domain_rows(groups)
    assert [(domain, [g.label for g in members]) for domain, members in rows] == [
        ("cup", ["cup llcd=False", "cup llcd=True llcd_gate=always"]),
        ("cartpole", ["cartpole llcd=False", "cartpole llcd=True llcd_gate=always"])]
    palette = ar.arm_palette(groups)
    cup, cartpole = (members for _, members in rows)
    assert [palette[g.heading] for g in cup] == [palette[g.heading] for g in cartpole]
    assert palette[cup[0].heading] != palette[cup[1].heading]


def test_the_crl_ab_analysis_regenerates_from_the_committed_results_of_the_arms_kept_so_far(tmp_path):
    """studies/crl_ab_analyze.sh on the study's kept results (the README's command): every arm with kept
    continual runs is a group of exactly those runs; an arm without any is named and its comparisons left out."""
    results = os.path.join(ROOT, "studies", "results", "crl_ab")
    kept = [name for name in os.listdir(results) if "crl_tasks_0_3_0_" in name]
    assert kept
    done = subprocess.run(["bash", os.path.join(ROOT, "studies", "crl_ab_analyze.sh"), results, str(tmp_path),
                           "--bootstrap-reps", "50"], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {r["group"]: int(r["runs"]) for r in csv.DictReader(open(tmp_path / "results_iqm.csv"))}
    for domain, task in (("cup", "cup_catch"), ("cartpole", "cartpole_swingup")):
        for arm, suffix in (("llcd=False", "-llcdFalse"), *[(f"llcd=True llcd_gate={g}", f"-llcdTrue-llcd_gate{g}")
                                                          for g in ("always", "never", "detector")]):
            count = sum(name.endswith(f"-taskdmc_{task}-crl_tasks_0_3_0_{suffix}") for name in kept)
            assert runs.get(f"{domain} {arm}", 0) == count, (domain, arm)
            if count == 0 and arm != "llcd=False" and runs.get(f"{domain} llcd=False"):
                assert f"no kept run of {domain} gate {arm.split('=')[-1]} yet" in done.stderr
    assert_published_study_matches(tmp_path)


def assert_published_study_matches(out) -> None:
    """The committed copies of the study's IQM table and P(improvement) (docs/results/crl_ab) and the README's
    table hold what the committed results give now (regenerated into ``out``), and the README's count of
    intervals that exclude chance is the committed compare.csv's: all go stale when a run is kept and the
    script is not rerun. (Point estimates only: ``out`` has fewer bootstrap samples.)"""
    published_compare = pd.read_csv(os.path.join(ROOT, "docs", "results", "crl_ab", "compare.csv"))
    regenerated_compare = pd.read_csv(out / "compare.csv")
    keys = ["group_a", "group_b", "metric", "tasks"]
    assert published_compare[keys].equals(regenerated_compare[keys])
    np.testing.assert_allclose(published_compare["probability"], regenerated_compare["probability"], rtol=1e-9)
    readme = open(os.path.join(ROOT, "README.md")).read()
    excluding = (published_compare["verdict"] == "CI excludes 0.5").sum()
    assert f"Of the {len(published_compare)} P(improvement) intervals (`compare.csv`), {excluding} exclude 0.5" \
        in " ".join(readme.split()), excluding
    regenerated = pd.read_csv(out / "results_iqm.csv")
    published = pd.read_csv(os.path.join(ROOT, "docs", "results", "crl_ab", "results_iqm.csv"))
    assert published[["group", "metric", "runs"]].equals(regenerated[["group", "metric", "runs"]])
    np.testing.assert_allclose(published["iqm"], regenerated["iqm"], rtol=1e-9)
    for group, rows in regenerated.groupby("group", sort=False):
        line = next((l for l in readme.splitlines() if l.startswith(f"| {group} (n={rows['runs'].iloc[0]}) |")), None)
        assert line, f"README: no study table row for {group}"
        points = [cell.split(" [")[0] for cell in line.strip("| ").split(" | ")[1:]]
        assert len(points) == len(rows), (group, line)
        for shown, iqm in zip(points, rows["iqm"]):  # as rounded, give or take a last-digit tie (936.45)
            assert abs(float(shown) - iqm) <= 0.5 * 10 ** -ar.digits(iqm) + 1e-9, (group, shown, iqm)


def test_the_study_pages_state_how_many_crl_ab_runs_are_kept():
    """Every kept crl_ab run is a point of studies/crl_ab.yaml, and the README, the study's page and the
    results index all state the kept count out of the grid's size (they went stale before)."""
    import pathlib
    import sweep
    spec = sweep.read_spec_file(os.path.join(ROOT, "studies", "crl_ab.yaml"))
    points = {point.name for point in sweep.grid_points(spec, pathlib.Path("runs"))}
    kept = os.listdir(os.path.join(ROOT, "studies", "results", "crl_ab"))
    assert set(kept) <= points, sorted(set(kept) - points)
    status = f"{len(kept)} of {len(points)} runs kept"
    for page in ("README.md", "docs/results/crl-ab.md", "docs/results/index.md"):
        assert status in open(os.path.join(ROOT, page)).read(), (page, status)


# ----------------------------------------------------------------- the detection corpus


CORPUS = os.path.join(ROOT, "studies", "results", "llcd_detection")


@pytest.mark.parametrize("kept", [CORPUS, os.path.join(ROOT, "studies", "results", "llcd_live")])
def test_the_committed_corpus_replays_exactly_the_changes_each_run_declared_live(kept):
    """The kept float16 scores are enough to stand for a run: its own score and detector, replayed from
    them with its settings, declare the changes the live run declared (its llcd_detection metric rows),
    as many and each within 16 agent steps: rounding to float16 can move a threshold crossing by a few
    calls (measured on the corpus: 70 of 72 at the same step, two moved by 6 and 1). Also for the live
    check of the chosen default."""
    import gzip
    runs = sorted(os.listdir(kept))
    assert runs
    for name in runs:
        path = os.path.join(kept, name)
        settings = {**ar.config_defaults(), **ar.read_config(os.path.join(path, "config.yaml"))}
        with gzip.open(os.path.join(path, "metrics.jsonl.gz"), "rt") as f:
            live = [row["step"] // settings["action_repeat"] for row in map(json.loads, f) if "llcd_detection" in row]
        with np.load(os.path.join(path, ar.SCORES_FILE)) as data:
            stream = {key: data[key] if key == "step" else data[key].astype(np.float32) for key in data.files}
        inputs = ar.detector_inputs(stream, settings)
        replayed = ar.replay_detections(inputs, [settings["llcd_score"]], stream["step"], settings,
                                        settings["llcd_detector"])
        assert len(replayed) == len(live) and np.all(np.abs(np.subtract(replayed, live)) <= 16), (name, replayed, live)


def test_the_detection_table_regenerates_from_the_committed_corpus(tmp_path):
    """The command of docs/llcd.md on the corpus: every run, every candidate (each score, phase-normalised
    too, and the two fusions) under each detector, with hits within the switches; with runs of several
    domains, the held-out table: chosen on one half of the domains, then on the other."""
    domains = sorted({ar.domain_of(ar.read_config(os.path.join(CORPUS, name, "config.yaml"))["task"])
                      for name in os.listdir(CORPUS)})
    select = ["--select-on", *domains[:len(domains) // 2]] if len(domains) > 1 else []
    done = subprocess.run([sys.executable, "analyze_results.py", CORPUS, "--detectors", *select, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "detectors.csv")))
    for name in os.listdir(CORPUS):
        with np.load(os.path.join(CORPUS, name, ar.SCORES_FILE)) as data:
            scores = [key for key in data.files if key not in ("step", "phase")]
        mine = [row for row in rows if row["run"] == os.path.join(CORPUS, name)]
        settings, cusums = len(ar.detector_settings()), len(ar.DETECTOR_GRID["cusum"][2])
        assert len(mine) == 2 * settings * len(scores) + 2 * cusums, name  # (score, score@phase) x settings + fusions
        assert all(int(row["hits"]) <= int(row["switches"]) for row in mine)
    if select:
        held_out = list(csv.DictReader(open(tmp_path / "heldout.csv")))
        halves = ["+".join(domains[:len(domains) // 2]), "+".join(domains[len(domains) // 2:])]
        assert [(row["split"], row["role"]) for row in held_out] == [
            (f"chosen on {half}", role) for half in halves for role in ("selected on", "held out")] + [
            ("chosen on all", "selected on")]
