"""Fixtures shared by every test module."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _restore_op_determinism():
    """Op determinism is process-wide, and a binary run in-process with ``--deterministic`` turns
    it on for good; later tests that compare compiled and plain steps then see other kernels. After
    each test, switch it back off when the test turned it on (TensorFlow's switch back is
    private)."""
    was_on = _determinism() is not None and _determinism().is_op_determinism_enabled()
    yield
    config = _determinism()
    if config is not None and not was_on and config.is_op_determinism_enabled():
        config.disable_op_determinism()


def _determinism():
    """TensorFlow's private config module once TensorFlow is loaded (None before: importing it
    here would load TensorFlow for tests that check it stays unloaded)."""
    if "tensorflow" not in sys.modules:
        return None
    from tensorflow.python.framework import config
    return config
