"""ScoreSDEPrior as a Pyro distribution: shapes, expand, support, validation and failures."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_scoreflow import VPSDE, ScoreSDEPrior, SolverError

from helpers import mixture_2d


@pytest.fixture
def prior():
    sde = VPSDE()
    return ScoreSDEPrior(mixture_2d(sde), sde, (2,), num_steps=20, rtol=1e-3, atol=1e-3)


def test_is_torch_distribution_with_support(prior):
    assert isinstance(prior, dist.TorchDistribution)
    assert prior.batch_shape == () and prior.event_shape == (2,)
    assert prior.support.event_dim == 1
    assert isinstance(prior.support, constraints.independent)
    assert prior.support.base_constraint is constraints.real


@pytest.mark.parametrize("sampler", ["sde", "ode", "dpm-solver"])
def test_sample_shapes(prior, sampler):
    p = prior.with_options(sampler=sampler)
    assert p.sample().shape == (2,)
    assert p.sample((3,)).shape == (3, 2)
    assert p.sample((4, 5)).shape == (4, 5, 2)
    assert p.expand((3,)).sample((2,)).shape == (2, 3, 2)
    assert p.sample((0,)).shape == (0, 2)


def test_log_prob_shapes_and_broadcasting(prior):
    x = torch.randn(4, 2, dtype=torch.float64)
    assert prior.log_prob(x[0]).shape == ()
    assert prior.log_prob(x).shape == (4,)
    expanded = prior.expand((3,))
    assert expanded.batch_shape == (3,)
    lp = expanded.log_prob(x.unsqueeze(1))  # (4, 1, 2) against batch (3,)
    assert lp.shape == (4, 3)
    torch.testing.assert_close(lp[:, 0], lp[:, 2])
    torch.testing.assert_close(lp[:, 0], prior.log_prob(x))
    assert prior.log_prob(torch.randn(0, 2)).shape == (0,)


def test_image_event_shape():
    """Multi-dimensional event shapes are flattened for the solvers and restored for the model."""
    sde = VPSDE()
    score = mixture_2d(sde)
    seen = []

    def image_score(x, t):
        seen.append(tuple(x.shape))
        return score(x.reshape(x.shape[0], 2), t).reshape(x.shape)

    p = ScoreSDEPrior(image_score, sde, (1, 2, 1), num_steps=10, rtol=1e-3, atol=1e-3)
    x = p.sample((5,))
    assert x.shape == (5, 1, 2, 1)
    assert all(s[1:] == (1, 2, 1) for s in seen)
    torch.testing.assert_close(
        p.log_prob(x.double()), ScoreSDEPrior(score, sde, (2,), rtol=1e-3, atol=1e-3).log_prob(x.reshape(5, 2).double())
    )


def test_pyro_sample_site(prior):
    def model():
        return pyro.sample("x", prior)

    tr = pyro.poutine.trace(model).get_trace()
    assert tr.nodes["x"]["value"].shape == (2,)
    tr.compute_log_prob()
    assert torch.isfinite(tr.nodes["x"]["log_prob"])


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.zeros(3), "event shape"),
        (torch.zeros(2, 3), "event shape"),
        (torch.zeros(()), "event shape"),
        (torch.tensor([0.0, float("nan")]), "NaN"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), "inf"),
        (torch.tensor([-float("inf"), 0.0]), "inf"),
    ],
)
def test_bad_values_raise(prior, value, match):
    with pytest.raises(ValueError, match=match):
        prior.log_prob(value)


def test_bad_batch_shape_raises(prior):
    with pytest.raises(ValueError, match="batch"):
        prior.expand((3,)).log_prob(torch.zeros(4, 2))


def test_validation_can_be_disabled():
    sde = VPSDE()
    p = ScoreSDEPrior(mixture_2d(sde), sde, (2,), validate_args=False, rtol=1e-3, atol=1e-3)
    with pytest.raises(RuntimeError):  # the NaN now reaches the score check, which names the time
        p.log_prob(torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sampler": "annealing"}, ValueError, "sampler"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
        ({"sde_method": "rk4"}, ValueError, "sde_method"),
        ({"ode_method": "lsoda"}, ValueError, "ode_method"),
        ({"rtol": 0.0}, ValueError, "rtol"),
        ({"atol": -1e-5}, ValueError, "atol"),
        ({"rtol": "small"}, TypeError, "rtol"),
        ({"divergence": "trace"}, ValueError, "divergence"),
        ({"hutchinson_samples": 0}, ValueError, "hutchinson_samples"),
        ({"hutchinson_probe": "sphere"}, ValueError, "hutchinson_probe"),
        ({"hutchinson_redraw": True, "adjoint": True}, ValueError, "hutchinson_redraw"),
        ({"dpm_order": 4}, ValueError, "dpm_order"),
        ({"dpm_end_time": 1.5}, ValueError, "dpm_end_time"),
        ({"event_shape": ()}, ValueError, "event_shape"),
        ({"event_shape": (2, 0)}, ValueError, "event_shape"),
        ({"event_shape": "2"}, TypeError, "event_shape"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    sde = VPSDE()
    event_shape = kwargs.pop("event_shape", (2,))
    with pytest.raises(error, match=match):
        ScoreSDEPrior(mixture_2d(sde), sde, event_shape, **kwargs)


def test_bad_model_or_sde_type():
    sde = VPSDE()
    with pytest.raises(TypeError, match="score_model"):
        ScoreSDEPrior("not a model", sde, (2,))
    with pytest.raises(TypeError, match="sde"):
        ScoreSDEPrior(mixture_2d(sde), "vp", (2,))


@pytest.mark.parametrize("method", ["sample", "log_prob"])
def test_wrong_score_shape_names_time(method):
    sde = VPSDE()
    p = ScoreSDEPrior(lambda x, t: x[:, :1], sde, (2,), num_steps=5, rtol=1e-3, atol=1e-3)
    with pytest.raises(RuntimeError, match=r"shape .* at t="):
        p.sample((3,)) if method == "sample" else p.log_prob(torch.zeros(3, 2))


@pytest.mark.parametrize("sampler", ["sde", "ode", "dpm-solver"])
def test_non_finite_score_names_time(sampler):
    sde = VPSDE()

    def bad(x, t):
        out = -x.clone()
        out[t < 0.5] = float("nan")
        return out

    p = ScoreSDEPrior(bad, sde, (2,), sampler=sampler, num_steps=10)
    with pytest.raises(RuntimeError, match=r"non-finite .* at t=0\.[0-4]"):
        p.sample((3,))
    with pytest.raises(RuntimeError, match="non-finite .* at t="):
        p.log_prob(torch.zeros(3, 2))


def test_solver_failure_is_clear_error():
    sde = VPSDE()
    p = ScoreSDEPrior(mixture_2d(sde), sde, (2,), max_num_steps=3)
    with pytest.raises(SolverError, match="dopri5.*rtol"):
        p.log_prob(torch.zeros(3, 2, dtype=torch.float64))
    assert issubclass(SolverError, RuntimeError)


def test_time_is_clamped_into_interval():
    """Adaptive solvers may probe outside [eps, T]; the model only ever sees clamped times."""
    sde = VPSDE(eps=1e-3)
    score = mixture_2d(sde)
    times = []

    def strict(x, t):
        times.append((float(t.min()), float(t.max())))
        return score(x, t)

    p = ScoreSDEPrior(strict, sde, (2,), sampler="ode", rtol=1e-3, atol=1e-3)
    p.sample((5,))
    p.log_prob(torch.zeros(2, 2, dtype=torch.float64))
    assert min(t[0] for t in times) >= sde.eps and max(t[1] for t in times) <= sde.T


def test_sample_and_log_prob_caches():
    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde), sde, (2,))
    x, lp = prior.sample_and_log_prob((40,))
    assert x.shape == (40, 2) and lp.shape == (40,)
    assert prior.log_prob(x) is lp  # cached: no solve
    fresh = prior.log_prob(x.clone())
    torch.testing.assert_close(fresh, lp, rtol=0, atol=2e-3)  # two solves, opposite directions
    exact = mixture_2d(sde).marginal(sde.eps).log_prob(x)
    assert (lp - exact).abs().mean() < 0.01


def test_repr_and_options(prior):
    assert "VPSDE" in repr(prior) and "event_shape=(2,)" in repr(prior)
    assert prior.with_options(sampler="ode").sampler == "ode"
    assert prior.options["num_steps"] == 20
    assert math.prod(prior.event_shape) == prior.event_dim_size


def test_last_nfe_is_reported_through_plates(prior):
    """pyro.plate expands the prior at every call; the user's object still reports the solve's cost."""
    x = torch.zeros(3, 2)

    def model():
        with pyro.plate("points", 3):
            pyro.sample("x", prior, obs=x)

    assert prior.last_nfe == 0
    pyro.poutine.trace(model).get_trace().log_prob_sum()
    assert prior.last_nfe > 10
    assert prior.expand((3,)).last_nfe == prior.last_nfe
