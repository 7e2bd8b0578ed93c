"""Fresh random inputs that a failure can replay: one recorded seed per test.

Tests on random inputs are there to find the rare input that breaks a kernel, so they
draw new inputs on every run; a failure is only worth something if it can be run again
with the same inputs. Hence every such test starts from a new seed, and a failing test
says which:

    ---------------------------- seed ----------------------------
    inputs drawn from seed 2718281828; rerun them with
      SLOTH_TEST_SEED=2718281828 pytest 'kernels/tests/test_lora.py::test_lora_mlp[...]'

``SLOTH_TEST_SEED`` (decimal or ``0x...``) replaces the fresh seed of every test that
runs, so rerun the one test it was printed for. The seed drives torch's generators (CPU
and every CUDA device) and ``random``; a test that makes its own ``torch.Generator``
must seed it from :func:`current_seed` to be replayable too.

Wiring, in a test folder's ``conftest.py``::

    from sloth_core.testing.seeds import pytest_runtest_makereport, seed  # noqa: F401

``seed`` is an autouse fixture (its value is the test's seed, for messages) and the hook
adds the section above to the report of a failing test. Not part of the ``sloth``
pytest plugin: a test folder opts in, the rest of the suite keeps its own fixed seeds.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import torch

#: Environment variable that replaces every test's fresh seed, to replay a failure.
ENV = "SLOTH_TEST_SEED"

_SEED = pytest.StashKey[int]()
_current: int | None = None


def fresh_seed() -> int:
    """Seed torch (CPU and CUDA) and ``random`` with a new seed, or ``$SLOTH_TEST_SEED``
    when set, and return it; :func:`current_seed` returns it from then on."""
    global _current
    value = os.environ.get(ENV, "").strip()
    seed = int(value, 0) if value else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    random.seed(seed)
    _current = seed
    return seed


def current_seed() -> int:
    """The seed the running test's inputs come from (a fresh one if none was drawn yet)."""
    return fresh_seed() if _current is None else _current


def draw(*bounds: tuple[int, int]) -> tuple[int, list[int]]:
    """The test's seed and one random size per ``(lo, hi)`` bound (both included)."""
    return current_seed(), [int(torch.randint(lo, hi + 1, ()).item()) for lo, hi in bounds]


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> Iterator[int]:
    """A fresh seed for this test, recorded for its report (see the module docstring)."""
    global _current
    value = fresh_seed()
    request.node.stash[_SEED] = value
    request.node.user_properties.append(("seed", value))  # also in --junitxml
    yield value
    _current = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failing test's report gets a ``seed`` section: the command that replays it."""
    report = yield
    value = item.stash.get(_SEED, None)
    if value is not None and report.failed:
        report.sections.append(
            ("seed", f"inputs drawn from seed {value}; rerun them with\n"
                     f"  {ENV}={value} pytest '{item.nodeid}'")
        )  # fmt: skip
    return report
