import math

import pyro
import pytest
import torch
from torch.distributions import MultivariateNormal
from torch.utils.data import DataLoader, TensorDataset

from pyro_scoreflow import VESDE, VPSDE, GaussianMixtureScore, ScoreSDEPrior, SubVPSDE, datasets
from pyro_scoreflow.metrics import energy_distance
from pyro_scoreflow.networks import ScoreNet
from pyro_scoreflow.training import EMA, FitHistory, fit, validation_loss

TINY = {"hidden": 16, "num_layers": 1, "embed_dim": 8, "channels": (8,), "groups": 4}
SDES = [VPSDE(), SubVPSDE(), VESDE()]
SDE_IDS = ["vp", "subvp", "ve"]


def tiny_net(sde=None, event_shape=(2,), seed=0, **kwargs):
    torch.manual_seed(seed)
    return ScoreNet(sde or VPSDE(), event_shape, **{**TINY, **kwargs})


def quick_fit(net, data, **kwargs):
    kwargs = {"steps": 10, "batch_size": 32, "lr": 1e-3, "progress": False, **kwargs}
    return fit(net, net.sde, data, **kwargs)


# -- the optimiser (the objective: tests/test_losses.py) -----------------------------------------
def test_ema_ramps_up_its_decay():
    p = torch.nn.Parameter(torch.zeros(()))
    module = torch.nn.Module()
    module.p = p
    ema = EMA(module, decay=0.999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(module)  # decay min(0.999, 1/10) = 0.1
    assert ema.params[0].item() == pytest.approx(0.9)
    ema.update(module)  # decay 2/11
    assert ema.params[0].item() == pytest.approx(1 - 0.1 * 2 / 11)
    ema.copy_to(module)
    assert p.item() == pytest.approx(1 - 0.1 * 2 / 11)


# -- fit: mechanics -----------------------------------------------------------------------------
def test_fit_is_reproducible_under_a_seed_and_leaves_the_global_rng_alone():
    data = datasets.load("moons", 500)
    a = quick_fit(tiny_net(), data, seed=3)
    state = torch.get_rng_state()
    b = quick_fit(tiny_net(), data, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    c = quick_fit(tiny_net(), data, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.fit_history.loss == b.fit_history.loss != c.fit_history.loss
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_fit_is_reproducible_with_a_shuffling_dataloader():
    loader = DataLoader(TensorDataset(datasets.load("moons", 300)), batch_size=32, shuffle=True)
    a = quick_fit(tiny_net(), loader, seed=1, steps=15)
    b = quick_fit(tiny_net(), loader, seed=1, steps=15)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_fit_returns_the_ema_weights_and_keeps_the_raw_ones():
    data = datasets.load("moons", 500)
    net = quick_fit(tiny_net(), data, seed=0, steps=30)
    history = net.fit_history
    assert isinstance(history, FitHistory) and len(history.loss) == 30 and history.steps_per_second > 0
    raw = history.raw_state_dict
    assert any(not torch.equal(raw[name], p) for name, p in net.named_parameters())
    plain = quick_fit(tiny_net(), data, seed=0, steps=30, ema_decay=None)
    assert all(torch.equal(raw[name], p) for name, p in plain.named_parameters())


def test_fit_learns_and_validates():
    data, held_out = datasets.load("moons", 2000, seed=1), datasets.load("moons", 500, seed=2)
    net = tiny_net(hidden=32).eval()
    with torch.no_grad():
        before = validation_loss(net, net.sde, held_out)
    assert before == pytest.approx(1.0, abs=0.05)  # a fresh net predicts eps = 0: E||z||^2 / D = 1
    quick_fit(net, data, seed=0, steps=150, batch_size=128, lr=3e-3, validation_data=held_out)
    assert net.fit_history.validation_loss < 0.5 * before
    assert not net.training  # the mode it came in


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_fit_likelihood_weighting(sde):
    net = tiny_net(sde)
    held_out = datasets.load("moons", 50, seed=1)
    quick_fit(net, datasets.load("moons", 500), weighting="likelihood", seed=0, validation_data=held_out)
    history = net.fit_history
    assert history.weighting == "likelihood" and all(math.isfinite(v) for v in history.loss)
    assert math.isfinite(history.validation_loss)


def test_fit_with_class_labels_from_a_dataloader():
    x = datasets.load("moons", 200)
    y = (x[:, 1] > 0).long()
    net = tiny_net(num_classes=2)
    quick_fit(net, DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True), seed=0, validation_data=x[:40],
              validation_context=y[:40])  # fmt: skip
    assert math.isfinite(net.fit_history.validation_loss)
    assert net(x[:3], torch.rand(3), y[:3]).shape == (3, 2)


def test_fit_with_vector_context_tensor_and_images():
    x = torch.rand(40, 1, 4, 4) * 2 - 1
    net = tiny_net(event_shape=(1, 4, 4), context_dim=3)
    quick_fit(net, x, context=torch.randn(40, 3), seed=0, steps=3, batch_size=16)
    assert len(net.fit_history.loss) == 3


def test_fit_in_float64_with_numpy_data():
    net = tiny_net().double()
    quick_fit(net, datasets.load("moons", 100).numpy(), seed=0, steps=3)
    assert all(p.dtype == torch.float64 for p in net.parameters())


# -- fit: bad input -----------------------------------------------------------------------------
def bad_data_cases():
    good = datasets.load("moons", 100)
    nan, inf = good.clone(), good.clone()
    nan[5, 0] = math.nan
    inf[7, 1] = -math.inf
    return [
        ({"data": good[:, :1]}, "event shape"),
        ({"data": good.reshape(50, 4)}, "event shape"),
        ({"data": good[0]}, "shape"),
        ({"data": good[:0]}, "N >= 1"),
        ({"data": nan}, "NaN"),
        ({"data": inf}, "inf"),
        ({"data": "moons"}, "data"),
        ({"validation_data": nan}, "validation_data"),
        ({"validation_data": good[:, :1]}, "validation_data"),
        ({"context": torch.zeros(99, 1)}, "context"),
        ({"data": DataLoader(TensorDataset(nan), batch_size=200)}, "a data batch contains NaN"),
        ({"data": DataLoader(TensorDataset(good[:, :1]), batch_size=10)}, "event shape"),
        ({"data": DataLoader(TensorDataset(good), batch_size=10), "context": torch.zeros(100)}, "DataLoader"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": "1e-3"}, "lr"),
        ({"weighting": "elbo"}, "weighting"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),
        ({"data": torch.zeros(10, 0)}, "empty"),
        ({"data": DataLoader(TensorDataset(good[:0]), batch_size=10)}, "empty DataLoader"),
        ({"data": good.to(torch.complex64)}, "real numbers"),
        ({"data": good > 0}, "real numbers"),
        ({"context": ["a"] * 100}, "context"),
        ({"validation_context": torch.zeros(10)}, "validation_context needs validation_data"),
        ({"validation_log_prob": True}, "validation_log_prob=True needs validation_data"),
        ({"validation_data": good, "validation_log_prob": "yes"}, "validation_log_prob"),
        ({"progress": "no"}, "progress"),
        ({"device": "cuda:99"}, "device"),
        ({"device": "not-a-device"}, "device"),
        ({"distributed": "yes"}, "distributed"),
    ]


@pytest.mark.parametrize(("kwargs", "match"), bad_data_cases())
def test_fit_rejects_bad_input_before_training(kwargs, match):
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kwargs = {"data": datasets.load("moons", 100), "steps": 5, "batch_size": 10, "lr": 1e-3, "progress": False,
              **kwargs}  # fmt: skip
    data = kwargs.pop("data")
    with pytest.raises(ValueError, match=match):
        fit(net, net.sde, data, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not hasattr(net, "fit_history")


def test_fit_type_errors():
    data = datasets.load("moons", 10)
    with pytest.raises(TypeError, match="score_model"):
        fit(lambda x, t: -x, VPSDE(), data, steps=1, batch_size=1, lr=1e-3)
    with pytest.raises(TypeError, match="sde"):
        fit(tiny_net(), "vp", data, steps=1, batch_size=1, lr=1e-3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(tiny_net().requires_grad_(False), VPSDE(), data, steps=1, batch_size=1, lr=1e-3)


# -- fit: ground truth --------------------------------------------------------------------------
def test_learned_score_approaches_the_exact_mixture_score():
    """Trained on samples of a 2-D Gaussian mixture, the net's score is close to the exact diffused score and,
    at small t where p_t is far from Gaussian, much closer than the exact score of the best single Gaussian."""
    sde = VPSDE()
    locs = torch.tensor([[-1.0, -0.5], [1.0, -0.5], [0.0, 1.0]])
    scale_tril = torch.stack([0.4 * torch.eye(2), torch.tensor([[0.5, 0.0], [0.2, 0.3]]), 0.35 * torch.eye(2)])
    mixture = GaussianMixtureScore(sde, locs, scale_tril)
    data = mixture.marginal(0).sample((5000,))
    gaussian = GaussianMixtureScore(sde, data.mean(0, keepdim=True), torch.linalg.cholesky(torch.cov(data.T))[None])
    torch.manual_seed(0)
    net = ScoreNet(sde, (2,), hidden=128, num_layers=3, embed_dim=64)
    fit(net, sde, data, steps=400, batch_size=256, lr=2e-3, seed=0, progress=False)
    with torch.no_grad():
        # relative L2 error bounds; measured about 0.16-0.21, 0.08, 0.045, 0.035, 0.035 (Gaussian: 0.76, 0.36, ...)
        for t, bound in ((0.1, 0.3), (0.2, 0.12), (0.3, 0.08), (0.6, 0.06), (1.0, 0.06)):
            x, tt = mixture.marginal(t).sample((4000,)), torch.full((4000,), t)
            exact = mixture(x, tt)
            error = ((net(x, tt) - exact).norm() / exact.norm()).item()
            assert error < bound, (t, error)
            if t <= 0.2:
                baseline = ((gaussian(x, tt) - exact).norm() / exact.norm()).item()
                assert error < 0.4 * baseline, (t, error, baseline)


@pytest.mark.slow
def test_two_moons_prior_beats_a_gaussian():
    """A few hundred steps on two moons: held-out log-likelihood clearly above a fitted Gaussian's, and samples
    whose energy distance to held-out data is at the two-sample noise floor (a Gaussian's is far above it)."""
    sde = VPSDE()
    train, held_out = datasets.load("moons", 5000, seed=1), datasets.load("moons", 500, seed=2)
    torch.manual_seed(0)
    net = ScoreNet(sde, (2,), hidden=128, num_layers=3, embed_dim=64)
    fit(net, sde, train, steps=500, batch_size=256, lr=2e-3, seed=0, progress=False, validation_data=held_out,
        validation_log_prob=True)  # fmt: skip
    prior = ScoreSDEPrior(net, sde, (2,), rtol=1e-3, atol=1e-3)
    with torch.no_grad():  # no graph through the parameters: 10x faster
        log_lik = prior.log_prob(held_out).mean().item()
    assert net.fit_history.validation_log_prob == pytest.approx(log_lik, abs=1e-6)  # fit's held-out log-lik
    gaussian = MultivariateNormal(train.mean(0), torch.cov(train.T))
    gaussian_log_lik = gaussian.log_prob(held_out).mean().item()
    assert log_lik > gaussian_log_lik + 0.25  # measured about -2.06 vs -2.55 nats

    n = 1000
    reference = datasets.load("moons", n, seed=3)
    # noise floor: mean energy distance between independent samples of the data, same sizes (about 0.005)
    floor = sum(energy_distance(datasets.load("moons", n, seed=10 + i), reference) for i in range(20)) / 20
    pyro.set_rng_seed(0)
    samples = prior.sample((n,))  # reverse-time SDE, 500 Euler-Maruyama steps
    assert energy_distance(samples, reference) < 3 * floor  # measured 0.0049, about the floor
    assert energy_distance(gaussian.sample((n,)), reference) > 3 * floor  # the test has power: 0.036
