"""The reference-op tests draw fresh random inputs from a recorded seed per test; a failure
prints ``SLOTH_TEST_SEED=... pytest ...`` to replay them (:mod:`sloth_core.testing.seeds`)."""

from sloth_core.testing.seeds import pytest_runtest_makereport, seed  # noqa: F401
