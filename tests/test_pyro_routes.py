"""Every Pyro route works or says why (hardening issue, items 6-10): each test failed before its fix."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta

from pyro_scoreflow import VPSDE, ScoreSDEPrior, SolverError

from helpers import mixture_2d


@pytest.fixture
def prior():
    sde = VPSDE()
    return ScoreSDEPrior(mixture_2d(sde, torch.float32), sde, (2,), rtol=1e-3, atol=1e-3)


def model_of(prior):
    def model(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=y)

    return model


# -- 6. JIT is refused clearly; foreign exceptions are never relabelled ------------------------------------
def test_jit_trace_elbo_is_a_clear_error(prior):
    model = model_of(prior)
    svi = SVI(model, AutoDelta(model), pyro.optim.Adam({"lr": 0.01}), JitTrace_ELBO())
    with pytest.raises(NotImplementedError, match="jit"):
        svi.step(torch.tensor(0.3))


def test_nuts_jit_compile_is_a_clear_error(prior):
    kernel = pyro.infer.NUTS(model_of(prior), jit_compile=True, max_tree_depth=2)
    with pytest.raises(NotImplementedError, match="jit"):
        pyro.infer.MCMC(kernel, num_samples=2, warmup_steps=1, disable_progbar=True).run(torch.tensor(0.3))


def test_a_score_models_own_assertion_error_propagates():
    def failing(x, t):
        raise AssertionError("the model's own check")

    prior = ScoreSDEPrior(failing, VPSDE(), (2,))
    with pytest.raises(AssertionError, match="the model's own check"):
        prior.log_prob(torch.zeros(1, 2))


# -- 7. a wild proposal is a solver failure (a rejected proposal inside HMC) that says why ------------------
def test_overflowing_value_is_a_solver_error_naming_the_input(prior):
    with pytest.raises(SolverError, match="too large for torch.float32"):
        prior.log_prob(torch.tensor([[1e30, 0.0]]))


def test_solver_errors_are_rejected_proposals_in_hmc(prior):
    from pyro.ops.integrator import _EXCEPTION_HANDLERS

    assert any(handler(SolverError("x")) for handler in _EXCEPTION_HANDLERS.values())
    assert not any(handler(NotImplementedError("x")) for handler in _EXCEPTION_HANDLERS.values())


# -- 9. shipped priors: frozen by default, fine-tuning is one argument away ---------------------------------
def test_fine_tuning_a_shipped_prior():
    frozen = ScoreSDEPrior.from_pretrained("moons", rtol=1e-3, atol=1e-3)
    assert not any(p.requires_grad for p in frozen.score_model.parameters())
    prior = ScoreSDEPrior.from_pretrained("moons", trainable=True, rtol=1e-3, atol=1e-3)
    x = torch.tensor([[0.5, 0.2], [-0.8, 0.4]])
    prior.log_prob(x).mean().backward()
    grads = [p.grad for p in prior.score_model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    before = [p.detach().clone() for p in prior.score_model.parameters()]

    def model():
        pyro.module("prior", prior.score_model)
        with pyro.plate("data", 2):
            pyro.sample("x", prior, obs=x)

    SVI(model, lambda: None, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, prior.score_model.parameters()))


# -- 10. TraceMeanField_ELBO solves once per step ------------------------------------------------------------
def test_trace_mean_field_elbo_solves_once(prior):
    calls = []
    score = prior.score_model

    class Counted(torch.nn.Module):
        def forward(self, x, t):
            calls.append(x.shape[0])
            return score(x, t)

    counted = ScoreSDEPrior(Counted(), prior.sde, (2,), rtol=1e-3, atol=1e-3)
    model = model_of(counted)
    guide = AutoDelta(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    svi.step(torch.tensor(0.3))  # initialises the guide (its init draws samples)
    calls.clear()
    svi.step(torch.tensor(0.3))
    one_solve = counted.last_nfe
    assert 0 < len(calls) <= one_solve + 1, (len(calls), one_solve)


# -- 16. validation gaps: each a clear error naming the argument ----------------------------------------
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda s, sde: ScoreSDEPrior(s, sde, (2,), batch_shape=(-1,)), "batch_shape"),
        (lambda s, sde: ScoreSDEPrior(s, sde, (2,), divergence="hutchinson", hutchinson_seed=2**64), "hutchinson_seed"),
        (lambda s, sde: ScoreSDEPrior(s, sde, (2,), max_num_steps=2**31), "max_num_steps"),
        (lambda s, sde: ScoreSDEPrior(s, sde, (2,), compile="false"), "compile"),
        (lambda s, sde: ScoreSDEPrior(s, sde, (2,)).expand((2, -3)), "batch_shape"),
        (lambda s, sde: VPSDE(T=1e6), "T="),
    ],
)
def test_bad_arguments_name_themselves(build, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        build(mixture_2d(sde), sde)


@pytest.mark.parametrize(
    "value, error, match",
    [
        ([[0.0, 1.0]], TypeError, "torch.Tensor"),
        (torch.zeros(1, 2).numpy(), TypeError, "torch.Tensor"),
        (torch.zeros(1, 2, dtype=torch.complex64), ValueError, "real numbers"),
        (torch.zeros(1, 2, dtype=torch.bool), ValueError, "real numbers"),
    ],
)
def test_bad_values_are_clear_errors(prior, value, error, match):
    with pytest.raises(error, match=match):
        prior.log_prob(value)


def test_empty_lower_bound_input_is_a_clear_error(prior):
    with pytest.raises(ValueError, match="at least one point"):
        prior.log_prob_lower_bound(torch.zeros(0, 2))


# -- 17. DiffusionPosterior says when its samples are prior draws in disguise -------------------------------
def test_diffusion_posterior_warns_without_guidance(prior):
    from pyro_scoreflow.infer import DiffusionPosterior

    def detached(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.detach().sum(-1), 0.5), obs=y)

    with pytest.warns(RuntimeWarning, match="zero at every step"):
        DiffusionPosterior(detached, 20, num_steps=5).run(torch.tensor(0.3))


def test_diffusion_posterior_warns_when_the_clip_is_always_active(prior):
    from pyro_scoreflow.infer import DiffusionPosterior

    def tiny_noise(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.sum(-1), 1e-8), obs=y)

    with pytest.warns(RuntimeWarning, match="guidance_clip"):
        DiffusionPosterior(tiny_noise, 20, num_steps=5).run(torch.tensor(0.3))
