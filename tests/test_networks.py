import json

import pytest
import torch

from pyro_scoreflow import VESDE, VPSDE, ScoreSDEPrior, SubVPSDE
from pyro_scoreflow.networks import ScoreNet

SMALL = {"hidden": 32, "num_layers": 2, "embed_dim": 16, "channels": (8, 16), "groups": 4}


def randomized(net: ScoreNet, scale: float = 0.2) -> ScoreNet:
    """Non-trivial weights (the output layer starts at zero, so a fresh net returns 0)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return net


SHAPES = [(2,), (5,), (1, 8, 8), (3, 4, 12)]


@pytest.mark.parametrize("event_shape", SHAPES)
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_output_shape_and_finite(event_shape, sde):
    net = randomized(ScoreNet(sde, event_shape, **SMALL))
    x = torch.randn((6, *event_shape)) * sde.prior_std()
    for t in (torch.rand(6) * sde.T, torch.tensor(sde.eps), sde.T, torch.tensor([0.3])):
        s = net(x, t)
        assert s.shape == x.shape and torch.isfinite(s).all()
    assert net.is_image == (len(event_shape) == 3)


def test_fresh_network_predicts_zero_noise():
    net = ScoreNet(VPSDE(), (1, 8, 8), **SMALL)
    assert torch.equal(net(torch.randn(3, 1, 8, 8), torch.rand(3)), torch.zeros(3, 1, 8, 8))


@pytest.mark.parametrize("event_shape", [(3,), (2, 4, 4)])
def test_score_is_minus_noise_over_std(event_shape):
    sde = VPSDE()
    net = randomized(ScoreNet(sde, event_shape, **SMALL))
    x, t = torch.randn((5, *event_shape)), torch.rand(5) * 0.9 + 0.05
    std = sde.marginal(t)[1].reshape((5,) + (1,) * len(event_shape))
    torch.testing.assert_close(net(x, t) * std, -net.predict_noise(x, t))


def test_image_net_accepts_flat_input():
    net = randomized(ScoreNet(VPSDE(), (1, 8, 8), **SMALL))
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    flat = net(x.reshape(4, 64), t)
    assert flat.shape == (4, 64)
    torch.testing.assert_close(flat, net(x, t).reshape(4, 64))


@pytest.mark.parametrize("event_shape", [(2,), (1, 8, 8)])
def test_points_do_not_interact(event_shape):
    """The score of one point must not depend on another (exact divergences need it)."""
    net = randomized(ScoreNet(VPSDE(), event_shape, **SMALL))
    x = torch.randn((3, *event_shape), requires_grad=True)
    (grad,) = torch.autograd.grad(net(x, torch.rand(3))[0].sum(), x)
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1:], torch.zeros_like(grad[1:]))


def test_noise_level_enters():
    net = randomized(ScoreNet(VPSDE(), (2,), **SMALL))
    x = torch.randn(4, 2)
    a, b = net.predict_noise(x, torch.full((4,), 0.2)), net.predict_noise(x, torch.full((4,), 0.21))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("event_shape", [(2,), (1, 8, 8)])
def test_class_conditioning(event_shape):
    net = randomized(ScoreNet(VPSDE(), event_shape, num_classes=3, **SMALL))
    x, t = torch.randn((4, *event_shape)), torch.rand(4)
    a = net(x, t, torch.tensor([0, 1, 2, 0]))
    assert a.shape == x.shape
    torch.testing.assert_close(a[[0, 3]], net(x[[0, 3]], t[[0, 3]], torch.tensor(0)))  # scalar label broadcasts
    assert not torch.allclose(a, net(x, t, torch.tensor([1, 1, 1, 1])))
    torch.testing.assert_close(a, net(x, t, torch.tensor([0.0, 1.0, 2.0, 0.0])))  # integral floats are labels


@pytest.mark.parametrize("event_shape", [(2,), (1, 8, 8)])
def test_vector_context(event_shape):
    net = randomized(ScoreNet(VPSDE(), event_shape, context_dim=3, **SMALL))
    x, t, c = torch.randn((4, *event_shape)), torch.rand(4), torch.randn(4, 3)
    a = net(x, t, c)
    assert a.shape == x.shape
    assert not torch.allclose(a, net(x, t, c + 1))
    torch.testing.assert_close(net(x, t, c[:1].expand(4, 3)), net(x, t, c[0]))  # one context for all points


def test_config_round_trip():
    sde = VESDE()
    net = randomized(ScoreNet(sde, (3, 8, 8), channels=[8, 16, 16], groups=4, embed_dim=12, num_classes=5))
    config = json.loads(json.dumps(net.config))
    assert config == net.config
    assert set(config) >= {"hidden", "num_layers", "embed_dim", "channels", "num_classes", "context_dim"}
    rebuilt = ScoreNet(sde, (3, 8, 8), **config)
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())  # strict: same architecture
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([4, 0])
    assert torch.equal(rebuilt(x, t, y), net(x, t, y))
    assert repr(rebuilt).startswith("ScoreNet(")


def test_default_config_round_trip_vector():
    net = ScoreNet(VPSDE(), (2,), context_dim=4)
    rebuilt = ScoreNet(VPSDE(), (2,), **json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict())
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("event_shape", [(2,), (1, 8, 8)])
def test_float64(event_shape):
    net = randomized(ScoreNet(VPSDE(), event_shape, context_dim=2, **SMALL)).double()
    x = torch.randn((3, *event_shape), dtype=torch.float64)
    s = net(x, torch.rand(3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    assert s.dtype == torch.float64 and torch.isfinite(s).all()


def test_works_as_a_prior_score():
    sde = VPSDE()
    net = randomized(ScoreNet(sde, (1, 4, 4), **SMALL), scale=0.05)
    # a flat event shape with a U-Net inside; cheap solver settings, this only checks the plumbing
    prior = ScoreSDEPrior(
        net, sde, (16,), sampler="dpm-solver", num_steps=10, divergence="hutchinson", rtol=1e-2, atol=1e-2
    )
    x = prior.sample((3,))
    assert x.shape == (3, 16)
    assert torch.isfinite(prior.log_prob(x)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"event_shape": ()}, "event_shape"),
        ({"event_shape": (2, 0)}, "event_shape"),
        ({"hidden": 0}, "hidden"),
        ({"num_layers": 1.5}, "num_layers"),
        ({"embed_dim": 7}, "embed_dim"),
        ({"channels": []}, "channels"),
        ({"channels": (8, 12), "groups": 8}, "groups"),
        ({"event_shape": (1, 6, 6), "channels": (8, 8, 8)}, "divisible by 4"),
        ({"num_classes": 3, "context_dim": 2}, "not both"),
        ({"num_classes": 0}, "num_classes"),
        ({"data_std": -1.0}, "data_std"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    kwargs = {"event_shape": (2,), **kwargs}
    with pytest.raises(ValueError, match=match):
        ScoreNet(VPSDE(), **kwargs)


def test_sde_must_be_a_forward_sde():
    with pytest.raises(TypeError, match="sde"):
        ScoreNet("vp", (2,))


def test_bad_calls():
    net = ScoreNet(VPSDE(), (1, 8, 8), **SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 1, 8, 4), torch.rand(2))
    with pytest.raises(ValueError, match="t must be"):
        net(torch.randn(2, 64), torch.rand(3))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 64), torch.rand(2), torch.zeros(2))
    labels = ScoreNet(VPSDE(), (2,), num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="conditional"):
        labels(torch.randn(2, 2), torch.rand(2))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        labels(torch.randn(2, 2), torch.rand(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        labels(torch.randn(2, 2), torch.rand(2), torch.tensor([0.5, 1.0]))
    vectors = ScoreNet(VPSDE(), (2,), context_dim=3, **SMALL)
    with pytest.raises(ValueError, match=r"context must have shape \(2, 3\)"):
        vectors(torch.randn(2, 2), torch.rand(2), torch.randn(2, 4))
