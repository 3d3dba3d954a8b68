"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from reslab.data import DataSplits, Split, load_data


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


def _class_shifted(n: int, seed: int, size: int = 8) -> Split:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    base = torch.rand(10, 3, size, size, generator=torch.Generator().manual_seed(99)) * 255
    x = 0.5 * base[y] + 0.5 * torch.rand(n, 3, size, size, generator=g) * 255
    return Split(x.to(torch.uint8), y)


@pytest.fixture(scope="session")
def class_shifted() -> DataSplits:
    """128 / 32 / 32 RGB 8x8 images whose class shifts their mean, so that the loss falls within
    a few steps: small enough to train several networks in a test (seed-packed training)."""
    classes = [str(i) for i in range(10)]
    splits = (_class_shifted(128, 0), _class_shifted(32, 1), _class_shifted(32, 2))
    return DataSplits(*splits, classes, "synth")
