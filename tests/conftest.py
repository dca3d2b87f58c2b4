"""Fixtures shared across the test tree (keep this file small)."""

from __future__ import annotations

import numpy as np
import pytest


def max_rel_err(actual, ref) -> float:
    """max |actual - ref| / max |ref|: the error measure the parity tests state tolerances in."""
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    return float(np.abs(actual - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture
def rel_err():
    """The :func:`max_rel_err` function, for tests that compare against a reference."""
    return max_rel_err
