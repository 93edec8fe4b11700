"""Tests for configs.yaml and block composition: every block combination the project uses
resolves to the values stored before blocks could build on others (tests/data), and a
block's ``base`` merges before its own keys, with unknown bases and cycles as errors."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "data"))

import make_resolved_configs as combinations  # noqa: E402
import tools  # noqa: E402

with open(combinations.STORED) as f:
    STORED = json.load(f)
BLOCKS = [name for name in tools.read_yaml(tools.ROOT / "configs.yaml") if name != "defaults"]


def leaves(data, where=""):
    """Every leaf of nested dicts as {'a.b': (type name, value)}: 1 and 1.0, or 1 and True, differ."""
    if not isinstance(data, dict):
        return {where: (type(data).__name__, data)}
    return {path: leaf for key, value in data.items()
            for path, leaf in leaves(value, f"{where}.{key}" if where else str(key)).items()}


def blocks_file_with(tmp_path, **blocks):
    """A copy of configs.yaml with ``blocks`` added (or replacing blocks of the same name)."""
    data = tools.read_yaml(tools.ROOT / "configs.yaml")
    path = tmp_path / "configs.yaml"
    tools.write_yaml({**data, **blocks}, path)
    return path


def load(path, *argv):
    return tools.load_config(list(argv), path)


# ----------------------------------------------------------------- equivalence


def test_stored_file_holds_every_combination():
    assert list(STORED) == [combinations.name_of(blocks) for blocks in combinations.COMBINATIONS]


@pytest.mark.parametrize("blocks", combinations.COMBINATIONS, ids=combinations.name_of)
def test_combination_resolves_as_before(blocks):
    assert leaves(combinations.resolve(blocks)) == leaves(STORED[combinations.name_of(blocks)])


def test_one_wrong_size_value_changes_the_resolved_configs(tmp_path):
    blocks = tools.read_yaml(tools.ROOT / "configs.yaml")
    path = blocks_file_with(tmp_path, size_s={**blocks["size_s"], "units": 256})
    for name in ("dmc_proprio", "dmc_vision", "atari100k", "dmc_proprio vision"):
        assert combinations.resolve(name.split(), path) != STORED[name], name
    assert combinations.resolve(["crafter"], path) == STORED["crafter"]  # built on size_xl


@pytest.mark.parametrize("block", BLOCKS)
def test_resolved_config_has_no_base_key(block):
    config = tools.load_config(["--configs", block])
    assert "base" not in config
    assert set(config) == set(tools.read_yaml(tools.ROOT / "configs.yaml")["defaults"]) | {"configs"}
    assert config.configs == [block]  # the blocks named, not their bases


# ----------------------------------------------------------------- base


def test_paper_blocks_build_on_the_size_blocks():
    blocks = tools.read_yaml(tools.ROOT / "configs.yaml")
    for block, size in (("dmc_proprio", "size_s"), ("dmc_vision", "size_s"), ("atari100k", "size_s"),
                        ("crafter", "size_xl"), ("memorymaze", "size_xl")):
        config = tools.load_config(["--configs", block])
        assert config.dyn_deter == blocks[size]["dyn_deter"] and config.units == blocks[size]["units"], block
        assert config.encoder.cnn_depth == blocks[size]["encoder"]["cnn_depth"], block
        assert config.actor.layers == blocks[size]["actor"]["layers"], block


def test_crl_blocks_share_dmc_crl_and_keep_their_own_keys():
    blocks = tools.read_yaml(tools.ROOT / "configs.yaml")
    walker = tools.load_config(["--configs", "dmc_crl_walker"])
    assert walker.crl_steps_per_task == blocks["dmc_crl_walker"]["crl_steps_per_task"] != \
        blocks["dmc_crl"]["crl_steps_per_task"]
    assert walker.replay == blocks["dmc_crl"]["replay"]
    for block in ("dmc_crl_cartpole", "dmc_crl_cup", "dmc_crl_pendulum"):
        assert set(blocks[block]) == {"base", "task"}, block


def test_base_merges_before_the_blocks_own_keys(tmp_path):
    path = blocks_file_with(tmp_path, mine={"base": ["size_s"], "dyn_deter": 64, "encoder": {"mlp_units": 32}})
    config = load(path, "--configs", "mine")
    assert config.dyn_deter == 64 and config.encoder.mlp_units == 32  # its own keys win
    assert config.units == 512 and config.encoder.cnn_depth == 32  # the rest comes from size_s


def test_bases_merge_left_to_right_and_recursively(tmp_path):
    path = blocks_file_with(tmp_path, s_then_xl={"base": ["size_s", "size_xl"]},
                            xl_then_s={"base": ["size_xl", "size_s"]}, on_top={"base": ["xl_then_s"], "units": 8})
    assert load(path, "--configs", "s_then_xl").dyn_deter == 4096
    assert load(path, "--configs", "xl_then_s").dyn_deter == 512
    on_top = load(path, "--configs", "on_top")
    assert on_top.dyn_deter == 512 and on_top.units == 8


def test_configs_order_wins_over_bases():
    """A later --configs block overrides an earlier block and its bases; --key overrides both."""
    assert tools.load_config(["--configs", "atari100k", "small"]).units == 64
    assert tools.load_config(["--configs", "small", "atari100k"]).units == 512  # atari100k brings size_s
    assert tools.load_config(["--configs", "atari100k", "--units", "48"]).units == 48


def test_unknown_base_is_a_one_line_error(tmp_path):
    path = blocks_file_with(tmp_path, mine={"base": ["size_ss"]})
    with pytest.raises(tools.ConfigError) as info:
        load(path, "--configs", "mine")
    message = str(info.value)
    assert "unknown config block 'size_ss' in the base of 'mine' (did you mean 'size_s'?)" in message
    assert "\n" not in message


def test_base_cycle_is_a_one_line_error(tmp_path):
    path = blocks_file_with(tmp_path, one={"base": ["two"]}, two={"base": ["size_s", "one"]},
                            loop={"base": ["loop"]})
    with pytest.raises(tools.ConfigError) as info:
        load(path, "--configs", "one")
    assert "config block 'one' builds on itself: one -> two -> one" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(tools.ConfigError, match="'loop' builds on itself: loop -> loop"):
        load(path, "--configs", "loop")


@pytest.mark.parametrize("base", ["size_s", [["size_s"]], ["defaults"]])
def test_bad_base_is_an_error(tmp_path, base):
    path = blocks_file_with(tmp_path, mine={"base": base})
    with pytest.raises(tools.ConfigError, match="'mine'"):
        load(path, "--configs", "mine")


def test_the_paired_default_binds_only_dmc_llcd_runs():
    """The detector default scores paired_kl, which needs fixed-length dmc_ episodes: a run without LLCD takes
    any task, and the other suites' blocks bring their own score."""
    assert tools.load_config(["--task", "atari_pong"])["llcd_score"].startswith("paired_kl")
    for block in ("atari100k", "crafter", "memorymaze"):
        config = tools.load_config(["--configs", block, "small", "--llcd", "True", "--llcd_max_delay", "500"])
        assert config["llcd_score"] == "latent_kl"
    with pytest.raises(tools.ConfigError, match="e.g. --llcd_score latent_kl"):
        tools.load_config(["--task", "atari_pong", "--llcd", "True"])
