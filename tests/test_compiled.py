"""``compile=True``: the torch.compile-d augmented field gives eager's log_prob and gradient.

Compiling takes seconds to tens of seconds per graph on a CPU, so these tests are marked slow
and each compiles as few graphs as it can (one grad mode, one batch size).
"""

import os
import pickle
import shutil

import pytest
import torch

from pyro_scoreflow import VPSDE, ScoreNet, ScoreSDEPrior

from helpers import mixture_2d

pytestmark = pytest.mark.slow

# inductor's CPU backend needs a C++ compiler; without one compile=True falls back to eager (tested below)
HAS_COMPILER = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: torch.compile cannot build CPU kernels")


@needs_compiler
def test_compiled_log_prob_and_gradient_match_eager_and_exact():
    sde = VPSDE()
    score = mixture_2d(sde, torch.float32)
    exact = score.marginal(sde.eps)
    x = exact.sample((3,))
    eager = ScoreSDEPrior(score, sde, (2,))
    compiled = eager.with_options(compile=True)
    results = {}
    for name, prior in (("eager", eager), ("compiled", compiled)):
        xr = x.clone().requires_grad_(True)
        lp = prior.log_prob(xr)
        (grad,) = torch.autograd.grad(lp.sum(), xr)
        results[name] = (lp.detach(), grad, prior.last_nfe)
    assert not compiled._compiled["exact"].failed  # it really ran compiled
    (lp_e, g_e, nfe_e), (lp_c, g_c, nfe_c) = results["eager"], results["compiled"]
    # same solver, same steps: equal up to float32 round-off of a different operation order
    assert abs(nfe_c - nfe_e) <= 1  # +1: the one eager validation call
    torch.testing.assert_close(lp_c, lp_e, atol=1e-4, rtol=0)
    torch.testing.assert_close(g_c, g_e, atol=1e-3, rtol=0)
    xr = x.double().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(exact.log_prob(xr).sum(), xr)
    assert (lp_c.double() - exact.log_prob(x.double())).abs().max() < 2e-2  # p_T mismatch, as eager
    assert (g_c.double() - g_exact).abs().max() < 2e-2


def test_compiling_keeps_distribution_validation():
    """torch's dynamo turns Distribution validation off process-wide when it first compiles; it must stay on."""
    from torch.distributions import Distribution

    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde, torch.float32), sde, (2,), compile=True)
    before = Distribution._validate_args
    with torch.no_grad():
        prior.log_prob(torch.zeros(2, 2))
    assert Distribution._validate_args == before
    with pytest.raises(ValueError, match="event shape"):
        ScoreSDEPrior(mixture_2d(sde), sde, (2,)).log_prob(torch.zeros(3))


@needs_compiler
@pytest.mark.parametrize("redraw", [False, True])
def test_compiled_hutchinson_with_seed_matches_eager(redraw):
    sde = VPSDE()
    score = mixture_2d(sde, torch.float32)
    x = score.marginal(sde.eps).sample((4,))
    opts = dict(divergence="hutchinson", hutchinson_samples=2, hutchinson_seed=3, hutchinson_redraw=redraw)
    eager = ScoreSDEPrior(score, sde, (2,), **opts)
    compiled = eager.with_options(compile=True)
    with torch.no_grad():
        lp_e, lp_c = eager.log_prob(x), compiled.log_prob(x)
    assert not compiled._compiled["hutchinson"].failed
    # same probes; float32 round-off of two evaluation orders, larger with redrawn probes (noisier terms)
    torch.testing.assert_close(lp_c, lp_e, atol=1e-3 if redraw else 1e-4, rtol=0)


@needs_compiler
def test_compiled_score_net_matches_eager():
    sde = VPSDE()
    torch.manual_seed(0)
    net = ScoreNet(sde, (3,), hidden=16, num_layers=1).eval()
    net.backbone.out.reset_parameters()  # a non-zero score
    net.requires_grad_(False)
    x = torch.randn(5, 3)
    eager = ScoreSDEPrior(net, sde, (3,), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        lp_e = eager.log_prob(x)
        compiled = eager.with_options(compile=True)
        lp_c = compiled.log_prob(x)
    assert not compiled._compiled["exact"].failed
    torch.testing.assert_close(lp_c, lp_e, atol=1e-4, rtol=0)


def test_failed_compilation_warns_and_runs_eagerly(monkeypatch):
    def compile_without_compiler(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", compile_without_compiler)
    sde = VPSDE()
    score = mixture_2d(sde, torch.float32)
    x = score.marginal(sde.eps).sample((3,))
    eager = ScoreSDEPrior(score, sde, (2,))
    compiled = eager.with_options(compile=True)
    with pytest.warns(RuntimeWarning, match="compile=True.*no C\\+\\+ compiler.*eagerly"):
        lp_c = compiled.log_prob(x)
    torch.testing.assert_close(lp_c, eager.log_prob(x))
    assert "no C++ compiler" in compiled._compiled["exact"].failed


def test_compile_option_round_trips_and_is_shared_with_expanded_copies():
    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde), sde, (2,), compile=True)
    assert prior.options["compile"] is True
    assert prior.with_options(sampler="ode").compile is True
    assert prior.expand((4,))._compiled is prior._compiled
    assert ScoreSDEPrior(mixture_2d(sde), sde, (2,)).compile is False


@needs_compiler
def test_used_compiled_prior_pickles():
    """Multi-chain MCMC with spawn/forkserver and torch.save pickle the prior after it compiled."""
    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde), sde, (2,), compile=True, rtol=1e-4, atol=1e-4)
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    lp = prior.log_prob(x)
    copy = pickle.loads(pickle.dumps(prior))
    torch.testing.assert_close(copy.log_prob(x.clone()), lp)
