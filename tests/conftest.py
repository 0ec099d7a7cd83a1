import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Every test starts from the same RNG state and an empty param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))
