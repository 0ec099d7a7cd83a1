import math
import sys

import pytest
import torch

from pyro_scoreflow import datasets

TOY = ["moons", "circles", "eight_gaussians", "checkerboard", "swissroll", "pinwheel"]
# (population mean, scale) of the raw sets: x_standardised = (x_raw - mean) / scale
RAW = {name: (torch.tensor(mean), scale) for name, (_, mean, scale) in datasets._TOY.items()}


def raw(name, n=20_000, seed=0):
    mean, scale = RAW[name]
    return datasets.load(name, n, seed=seed).double() * scale + mean.double()


def test_names_and_event_shapes():
    assert datasets.names() == TOY + ["digits"]
    assert all(datasets.event_shape(name) == (2,) for name in TOY)
    assert datasets.event_shape("digits") == (64,)


@pytest.mark.parametrize("name", TOY)
def test_toy_shape_dtype_and_unit_scale(name):
    assert datasets.load(name).shape == (10_000, 2)
    x = datasets.load(name, 50_000, seed=1)
    assert x.shape == (50_000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # standardised: mean ~ 0, mean square per coordinate (averaged) ~ 1; MC error ~ 0.01
    assert x.mean(0).abs().max() < 0.05
    assert abs(x.pow(2).mean().item() - 1) < 0.05


@pytest.mark.parametrize("name", TOY)
def test_toy_seeding(name):
    a, b = datasets.load(name, 100, seed=3), datasets.load(name, 100, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, datasets.load(name, 100, seed=4))
    assert torch.equal(a, datasets.load(name, 100, seed=3, split="test"))  # split ignored


def test_load_leaves_global_rng_alone():
    state = torch.get_rng_state()
    datasets.load("moons", 10)
    datasets.load("digits", 10)
    assert torch.equal(state, torch.get_rng_state())


def test_moons_lie_on_two_half_circles():
    x = raw("moons")
    upper = ((x - torch.tensor([0.0, 0.0])).norm(dim=-1) - 1).abs()  # unit circle around (0, 0)
    lower = ((x - torch.tensor([1.0, 0.5])).norm(dim=-1) - 1).abs()  # unit circle around (1, 0.5)
    # distance to the nearest arc of noise N(0, 0.1^2 I): median |radial offset| ~ 0.0674
    assert torch.minimum(upper, lower).median() < 0.08
    # each moon holds about half the points (binomial sd 0.0035)
    assert abs((upper < lower).double().mean().item() - 0.5) < 0.02


def test_circles_radii():
    r = raw("circles").norm(dim=-1)
    inner = r < 0.75
    assert abs(inner.double().mean().item() - 0.5) < 0.02
    assert abs(r[inner].mean().item() - 0.5) < 0.02 and abs(r[~inner].mean().item() - 1.0) < 0.02


def test_eight_gaussians_centres():
    x = raw("eight_gaussians")
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 4 / 1.414 * torch.stack([angles.cos(), angles.sin()], -1)
    nearest = torch.cdist(x, centres).argmin(-1)
    counts = torch.bincount(nearest, minlength=8).double() / x.shape[0]
    assert (counts - 1 / 8).abs().max() < 0.02
    resid = x - centres[nearest]
    assert abs(resid.std().item() - 0.5 / 1.414) < 0.02


def test_checkerboard_only_black_squares():
    x = raw("checkerboard")
    assert ((x >= -2) & (x <= 2)).all()
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert (parity == 0).all()


@pytest.mark.parametrize("name", ["swissroll", "pinwheel"])
def test_spirals_spread_over_angles(name):
    angles = torch.atan2(*raw(name).T.flip(0))
    counts = torch.histc(angles, bins=8, min=-math.pi, max=math.pi) / angles.shape[0]
    assert (counts > 0.05).all()  # no empty octant


def pixels():
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data, dtype=torch.float64)


def requantize(x):
    return torch.floor((x.double() + 1) / 2 * 17)


@pytest.mark.parametrize(("split", "size", "offset"), [("train", 1500, 0), ("test", 297, 1500), ("all", 1797, 0)])
def test_digits_splits_and_dequantization(split, size, offset):
    x = datasets.load("digits", split=split)
    assert x.shape == (size, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() < 1
    assert torch.equal(requantize(x), pixels()[offset : offset + size])


def test_digits_dequantization_noise_is_uniform_and_seeded():
    x = datasets.load("digits", seed=5)
    u = (x.double() + 1) / 2 * 17 - requantize(x)
    # U[0, 1): mean 1/2, variance 1/12 (n = 115008 -> sd of the mean ~ 0.001)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.003
    assert torch.equal(x, datasets.load("digits", seed=5))
    y = datasets.load("digits", seed=6)
    assert not torch.equal(x, y) and torch.equal(requantize(x), requantize(y))


def test_digits_num_samples_cycles_with_fresh_noise():
    x = datasets.load("digits", 3100, split="train")
    assert x.shape == (3100, 64)
    train = pixels()[:1500]
    q = requantize(x)
    assert torch.equal(q[:1500], train) and torch.equal(q[1500:3000], train) and torch.equal(q[3000:], train[:100])
    assert not torch.equal(x[:1500], x[1500:3000])
    assert torch.equal(requantize(datasets.load("digits", 10, split="test")), pixels()[1500:1510])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, "name"),
        ({"name": "moons", "split": "valid"}, "split"),
        ({"name": "digits", "split": None}, "split"),
        ({"name": "moons", "num_samples": 0}, "num_samples"),
        ({"name": "digits", "num_samples": -5}, "num_samples"),
        ({"name": "moons", "num_samples": 2.5}, "num_samples"),
        ({"name": "moons", "num_samples": True}, "num_samples"),
        ({"name": "moons", "seed": "zero"}, "seed"),
        ({"name": "moons", "seed": 2**64}, "seed"),
        ({"name": 3}, "name"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.load(**kwargs)


def test_unknown_event_shape():
    with pytest.raises(ValueError, match="name"):
        datasets.event_shape("mnist")


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install pyro_scoreflow\[digits\]"):
        datasets.load("digits")
    assert datasets.load("moons", 5).shape == (5, 2)  # the 2-D sets need no scikit-learn
