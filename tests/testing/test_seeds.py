"""Recorded seeds: a failing randomized test prints the command that replays its inputs."""

from __future__ import annotations

import random
import re

import pytest
import torch

from sloth_core.testing import seeds

pytest_plugins = ["pytester"]

FAILING = """
import torch

def test_fresh(seed):
    value = torch.rand(()).item()
    print(f"value={value!r} seed={seed}")
    assert value < 0
"""


@pytest.fixture(autouse=True)
def _own_rng(monkeypatch):
    """These tests reseed the global generators: the suite's state is put back after."""
    monkeypatch.setattr(seeds, "_current", None)
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state)


def _run(pytester, *args):
    pytester.makeconftest(
        "from sloth_core.testing.seeds import pytest_runtest_makereport, seed  # noqa: F401"
    )
    pytester.makepyfile(test_it=FAILING)
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    value = re.search(r"value=(\S+) seed=(\d+)", out)
    rerun = re.search(r"SLOTH_TEST_SEED=(\d+) pytest '(\S+)'", out)
    assert value and rerun, out
    assert rerun.group(1) == value.group(2) and rerun.group(2) == "test_it.py::test_fresh", out
    return value.group(1), int(value.group(2))


def test_a_failure_prints_its_seed_and_the_seed_replays_it(pytester, monkeypatch):
    monkeypatch.delenv(seeds.ENV, raising=False)
    first_value, first_seed = _run(pytester)
    monkeypatch.setenv(seeds.ENV, str(first_seed))
    assert _run(pytester) == (first_value, first_seed)  # the same inputs again


def test_fresh_seed_seeds_torch_and_draw_uses_it(monkeypatch):
    monkeypatch.setenv(seeds.ENV, "0x2a")
    assert seeds.fresh_seed() == 42
    expected = torch.rand(3)
    seed, sizes = seeds.draw((1, 5), (7, 7))
    assert seed == 42 and 1 <= sizes[0] <= 5 and sizes[1] == 7
    seeds.fresh_seed()
    assert torch.equal(torch.rand(3), expected)
    monkeypatch.delenv(seeds.ENV)
    assert len({seeds.fresh_seed() for _ in range(4)}) > 1  # fresh without the variable
