"""Suite-wide fixtures: process-wide settings are the test's to restore, never the next test's to inherit."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _process_settings_unchanged():
    """Fail a test that leaves torch's thread count or default dtype changed (and put them back).

    A leaked setting changes the numerics of every later test (one thread against two gives other float32 sums), so
    results would depend on test order.
    """
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    leaked = []
    if torch.get_num_threads() != threads:
        leaked.append(f"torch.get_num_threads() {threads} -> {torch.get_num_threads()}")
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"torch.get_default_dtype() {dtype} -> {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    if leaked:
        pytest.fail("the test changed process-wide settings without restoring them: " + "; ".join(leaked))


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (for bit-exact comparisons with a child process), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
