"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from reslab.data import DataSplits, load_data


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    """scikit-learn's digits split as the trainer splits them (1,295 train / 143 val / 359 test)."""
    return load_data("digits")
