"""One intra-op thread for the SAE tests: their tensors are tiny, and on a shared, busy machine
OpenMP's spinning worker threads made each small op ~100x slower (measured: 20 s vs 0.08 s)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
