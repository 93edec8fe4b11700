"""The block combinations the project uses, and their resolved configs as data.

``COMBINATIONS`` lists every ``--configs`` combination named in README.md, the
Makefile, studies/*.yaml, bench.py, sweep.py and the tests (a sweep's grid
blocks go before its fixed ones), plus every block alone and followed by
``small`` or ``debug``. tests/test_configs.py checks that each still resolves to
the values stored in ``resolved_configs.json``.

This script was run once, at the commit before configs.yaml gained ``base``
(9ce77ed), to write that file:

    MUJOCO_GL=egl python tests/data/make_resolved_configs.py

Rerun it only when a config value is meant to change, and check the diff.
"""

import json
import os
import sys
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import tools  # noqa: E402

STORED = os.path.join(HERE, "resolved_configs.json")
BLOCKS = ("dmc_proprio", "dmc_vision", "vision", "small", "debug", "dmc_crl_cartpole", "dmc_crl_cup",
          "dmc_crl_pendulum", "dmc_crl_walker", "atari100k", "crafter", "memorymaze")
USED = (
    (),                                  # defaults only (tests, bench.py)
    ("small", "debug"),                  # tests/test_tools.py
    ("debug", "small"),                  # tests/test_tools.py
    ("small", "vision"),                 # tests/test_sweep.py grid value
    ("small", "vision", "debug"),        # tests/test_sweep.py grid point
    ("dmc_proprio", "vision"),
    ("dmc_crl_cartpole", "vision"),
)
COMBINATIONS = tuple(dict.fromkeys(
    USED + tuple((block,) for block in BLOCKS) + tuple((block, "small") for block in BLOCKS if block != "small")
    + tuple((block, "debug") for block in BLOCKS if block != "debug")))


def name_of(blocks):
    """The key of a combination in the stored file: its blocks, space-separated."""
    return " ".join(blocks) or "defaults"


def resolve(blocks, path=tools.ROOT / "configs.yaml"):
    """``tools.load_config`` of ``--configs *blocks`` as plain JSON data; precision is left
    unresolved, since what 'auto' becomes depends on the machine."""
    with mock.patch.object(tools, "resolve_precision", lambda precision, device: precision):
        config = tools.load_config(["--configs", *blocks], path)
    return json.loads(json.dumps(config.to_dict()))


def main():
    resolved = {name_of(blocks): resolve(blocks) for blocks in COMBINATIONS}
    with open(STORED, "w") as f:
        json.dump(resolved, f, indent=1)
        f.write("\n")
    print(f"wrote {len(resolved)} resolved configs to {STORED}")


if __name__ == "__main__":
    main()
