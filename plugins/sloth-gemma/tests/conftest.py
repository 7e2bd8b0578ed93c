"""Fresh random inputs with a recorded seed: a failing test's report says how to replay it
(``sloth_core.testing.seeds``)."""

from sloth_core.testing.seeds import pytest_runtest_makereport, seed  # noqa: F401
