"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from reslab.data import DataSplits, load_data


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    """scikit-learn's digits split as the trainer splits them (1,295 train / 143 val / 359 test)."""
    return load_data("digits")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Two cores shared by several jobs: one thread avoids oversubscription. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
