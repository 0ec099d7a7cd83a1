r"""Small data sets for training and testing score priors.

:func:`load` returns a float32 tensor ``(N, *event_shape)``:

* 2-D toy sets, after FFJORD's (Grathwohl et al. 2019): ``"moons"``,
  ``"circles"``, ``"eight_gaussians"``, ``"checkerboard"``, ``"swissroll"``,
  ``"pinwheel"``. Every point is an independent draw (the mixture component
  is drawn per point, not laid out in fixed proportions), fresh for every
  ``seed``. Each set is put on about unit scale by a *fixed* affine map
  :math:`x \mapsto (x - m) / s`, with :math:`m` the population mean and
  :math:`s^2` the per-coordinate variance averaged over both coordinates
  (one scale, so shapes are not distorted), estimated once from
  :math:`4 \times 10^6` draws. So the data have mean about 0 and
  :math:`E\|x\|^2 \approx 2`, and the distribution does not depend on ``seed``
  or ``num_samples``.
* ``"digits"``: scikit-learn's 1797 8x8 handwritten digits, flattened to 64
  values. A pixel :math:`v \in \{0, \dots, 16\}` becomes
  :math:`(v + u)/17 \cdot 2 - 1` with :math:`u \sim U[0, 1)` (uniform
  dequantization), so values lie in :math:`[-1, 1)` and the continuous
  density relates to the discrete one by
  :math:`\log P(v) \ge \log p(x) + 64 \log(2/17)`. Split ``"train"`` is the first
  1500 images, ``"test"`` the other 297, ``"all"`` both; images come in data
  set order, cycling through the split again (with fresh dequantization
  noise) when ``num_samples`` exceeds its size.

Random numbers come from a private ``torch.Generator`` seeded with ``seed``:
torch's global RNG is neither used nor changed.

References:

[1] W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever, D. Duvenaud,
    "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative
    Models", ICLR 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .checks import check_choice, check_int, check_optional

__all__ = ["load", "names", "event_shape"]

SPLITS = ("train", "test", "all")
DIGITS_TRAIN_SIZE = 1500
DEFAULT_TOY_SAMPLES = 10_000
_DIGITS_INSTALL_HINT = "the 'digits' data set needs scikit-learn: pip install pyro_scoreflow[digits]"


# -- 2-D toy sets (raw, before standardisation) ------------------------------------------
def _moons(n: int, gen: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles (scikit-learn's ``make_moons``), Gaussian noise 0.1."""
    upper = torch.rand(n, generator=gen) < 0.5
    angle = torch.rand(n, generator=gen) * math.pi
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    return torch.stack([x, y], -1) + 0.1 * torch.randn(n, 2, generator=gen)


def _circles(n: int, gen: torch.Generator) -> torch.Tensor:
    """Two concentric circles of radii 1 and 0.5 (``make_circles(factor=0.5)``), noise 0.08."""
    radius = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, 0.5)
    angle = torch.rand(n, generator=gen) * (2 * math.pi)
    circle = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return radius.unsqueeze(-1) * circle + 0.08 * torch.randn(n, 2, generator=gen)


def _eight_gaussians(n: int, gen: torch.Generator) -> torch.Tensor:
    """Eight Gaussians of std 0.5/1.414 at radius 4/1.414 = 2.83 (FFJORD's ``8gaussians``)."""
    angle = torch.randint(0, 8, (n,), generator=gen) * (math.pi / 4)
    centers = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return (4.0 * centers + 0.5 * torch.randn(n, 2, generator=gen)) / 1.414


def _checkerboard(n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform on the 8 black squares of a 4x4 checkerboard on :math:`[-2, 2]^2`."""
    x1 = torch.rand(n, generator=gen) * 4 - 2
    x2 = torch.rand(n, generator=gen) - 2.0 * torch.randint(0, 2, (n,), generator=gen)
    return torch.stack([x1, x2 + torch.floor(x1) % 2], -1)


def _swissroll(n: int, gen: torch.Generator) -> torch.Tensor:
    r"""The (x, z) plane of a noisy swiss roll: :math:`t (\cos t, \sin t) + z`, :math:`t \sim U[1.5\pi, 4.5\pi)`."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=gen))
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], -1) + torch.randn(n, 2, generator=gen)


def _pinwheel(n: int, gen: torch.Generator, arms: int = 5, rate: float = 0.25) -> torch.Tensor:
    """Five spiral arms: radial std 0.3, tangential std 0.1, twisted by ``rate * exp(radius)``."""
    arm = torch.randint(0, arms, (n,), generator=gen)
    feats = torch.randn(n, 2, generator=gen) * torch.tensor([0.3, 0.1])
    radius = feats[:, 0] + 1
    angle = arm * (2 * math.pi / arms) + rate * torch.exp(radius)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([cos * radius - sin * feats[:, 1], sin * radius + cos * feats[:, 1]], -1)


# name -> (raw sampler, population mean, scale); mean and scale estimated from 4e6 draws
_TOY: dict[str, tuple[Callable[[int, torch.Generator], torch.Tensor], tuple[float, float], float]] = {
    "moons": (_moons, (0.5, 0.25), 0.7121),
    "circles": (_circles, (0.0, 0.0), 0.5647),
    "eight_gaussians": (_eight_gaussians, (0.0, 0.0), 2.0313),
    "checkerboard": (_checkerboard, (0.0, 0.0), 1.1545),
    "swissroll": (_swissroll, (1.992, 0.2087), 6.863),
    "pinwheel": (_pinwheel, (0.0, 0.0), 0.7416),
}
_SHAPES: dict[str, tuple[int, ...]] = {**{name: (2,) for name in _TOY}, "digits": (64,)}


def names() -> list[str]:
    """The names :func:`load` accepts."""
    return list(_SHAPES)


def event_shape(name: str) -> tuple[int, ...]:
    """The event shape of one draw of data set ``name``, e.g. ``(2,)`` or ``(64,)``."""
    _check_name(name)
    return _SHAPES[name]


def load(name: str, num_samples: int | None = None, seed: int = 0, split: str = "all") -> torch.Tensor:
    """Draw data set ``name`` as a float32 tensor ``(num_samples, *event_shape(name))``.

    :param str name: one of :func:`names`.
    :param int num_samples: number of points; default 10000 for the 2-D sets
        and the size of the split for ``"digits"``.
    :param int seed: seeds the points (2-D sets) or the dequantization noise (``"digits"``).
    :param str split: ``"train"``, ``"test"`` or ``"all"``; only ``"digits"``
        has splits, the 2-D sets ignore it.
    :raises ValueError: for an unknown ``name`` or ``split`` or a bad ``num_samples`` or ``seed`` (a wrong type
        raises :class:`~pyro_scoreflow.checks.ArgumentTypeError`, also a ``TypeError``).
    :raises ImportError: for ``"digits"`` without scikit-learn.
    """
    _check_name(name)
    split = check_choice("split", split, SPLITS)
    num_samples = check_optional(check_int, "num_samples", num_samples)
    seed = check_int("seed", seed, minimum=-(2**63), maximum=2**64 - 1)  # what torch.Generator.manual_seed takes
    gen = torch.Generator().manual_seed(seed)
    if name == "digits":
        return _digits(num_samples, split, gen)
    sampler, mean, scale = _TOY[name]
    x = sampler(num_samples or DEFAULT_TOY_SAMPLES, gen)
    return ((x - torch.tensor(mean)) / scale).float()


def _check_name(name: str) -> None:
    check_choice("name", name, names())


def _digit_pixels() -> torch.Tensor:
    """The 1797 images as integer pixel values 0..16, ``(1797, 64)``."""
    try:  # an optional dependency (pyro_scoreflow[digits]), imported only for "digits"
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(_DIGITS_INSTALL_HINT) from err
    return torch.as_tensor(load_digits().data, dtype=torch.float64)


def _digits(num_samples: int | None, split: str, gen: torch.Generator) -> torch.Tensor:
    r"""Dequantized digits: :math:`(v + u)/17 \cdot 2 - 1`, cycling through the split's images."""
    pixels = _digit_pixels()
    if split == "train":
        pixels = pixels[:DIGITS_TRAIN_SIZE]
    elif split == "test":
        pixels = pixels[DIGITS_TRAIN_SIZE:]
    n = num_samples or pixels.shape[0]
    v = pixels[torch.arange(n) % pixels.shape[0]]
    u = torch.rand(v.shape, generator=gen, dtype=torch.float64)
    # computed in float64; the clamp stops v = 16, u -> 1 rounding up to 1.0 in float32
    return ((v + u) / 17 * 2 - 1).float().clamp(max=1 - 2**-24)
