"""init_to_score_prior: cheap NUTS/SVI initialization for score-prior sites."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from pyro_scoreflow import VPSDE, ScoreSDEPrior
from pyro_scoreflow.infer import init_to_score_prior

from helpers import mixture_2d


def test_init_uses_few_score_evaluations_and_lands_on_the_prior():
    sde = VPSDE()
    calls = []
    score = mixture_2d(sde)

    def counting(x, t):
        calls.append(x.shape[0])
        return score(x, t)

    prior = ScoreSDEPrior(counting, sde, (2,), rtol=1e-3, atol=1e-3)

    def model():
        x = pyro.sample("x", prior)
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x.sum(-1), s), obs=torch.tensor(0.5))

    tr = pyro.poutine.trace(pyro.infer.autoguide.initialization.InitMessenger(init_to_score_prior)(model)).get_trace()
    assert len(calls) == 10  # 10 DPM-Solver++ steps, not a 500-step reverse SDE
    x0 = tr.nodes["x"]["value"]
    assert x0.shape == (2,) and torch.isfinite(x0).all()
    # the start has prior mass: its exact log density is far above that of a far-away point
    exact = score.marginal(sde.eps)
    assert exact.log_prob(x0.double()) > exact.log_prob(torch.tensor([4.0, 4.0], dtype=torch.float64)) + 10
    assert tr.nodes["s"]["value"] > 0  # fallback (init_to_median: a sample median) for the other site


def test_nuts_runs_with_it():
    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde), sde, (2,), rtol=1e-3, atol=1e-3)

    def model():
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=torch.tensor(0.5, dtype=torch.float64))

    mcmc = MCMC(NUTS(model, init_strategy=init_to_score_prior, max_tree_depth=2), num_samples=5, warmup_steps=5)
    mcmc.run()
    assert mcmc.get_samples()["x"].shape == (5, 2)


def test_solver_failure_in_hmc_is_a_rejected_proposal():
    """A SolverError raised while HMC/NUTS evaluates the potential becomes NaN energy (a divergent,
    rejected proposal) through Pyro's exception-handler registry, not an exception."""
    from pyro.ops.integrator import potential_grad

    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde), sde, (2,), max_num_steps=2)  # cannot finish a solve

    def potential_fn(z):
        return -prior.log_prob(z["x"])

    grads, energy = potential_grad(potential_fn, {"x": torch.zeros(2, dtype=torch.float64)})
    assert torch.isnan(energy)
    assert torch.equal(grads["x"], torch.zeros(2, dtype=torch.float64))
