"""Shared fixtures and hypothesis settings."""

import os

import pytest
import torch
from hypothesis import settings


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: one thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# CI runs the same hypothesis examples every time (seeded); local runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
