import os

import pyro
import pytest
import torch


def pytest_configure(config):
    # The tensors here are small: one intra-op thread avoids OpenMP oversubscription when CI's two
    # cores are shared (e.g. with the 2-process distributed test). Override with PYRO_SCOREFLOW_TEST_THREADS.
    torch.set_num_threads(int(os.environ.get("PYRO_SCOREFLOW_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Every test starts from the same RNG state and an empty param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
