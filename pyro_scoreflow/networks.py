r""":class:`ScoreNet`: a trainable score network for vector and image event shapes.

The network predicts the noise :math:`\epsilon_\theta(x, t)` of
:math:`x_t = \alpha(t) x_0 + \sigma(t) z`, and the score is

.. math::

    s_\theta(x, t) = -\epsilon_\theta(x, t) / \sigma(t).

Why: the denoising score-matching target :math:`-z/\sigma(t)` blows up as
:math:`t \to \epsilon` (:math:`\sigma(\epsilon) \approx 10^{-3}` for the VP
SDE), while :math:`z` has unit variance at every time. Dividing by
:math:`\sigma(t)` analytically lets the network output :math:`O(1)` values at
all noise levels, and the ``"score"``-weighted loss
:math:`\|\sigma s_\theta + z\|^2 = \|z - \epsilon_\theta\|^2` is the
well-conditioned DDPM loss. The input is scaled by
:math:`c_{in} = 1/\sqrt{\alpha^2 \sigma_{data}^2 + \sigma^2}` (Karras et al.
2022), so its variance is about 1 for every SDE, the VE SDE's
:math:`\sigma(T) = 50` included, and the time enters as the noise level
:math:`\log(\sigma/\alpha) = -\lambda/2`, with :math:`\lambda` the log
signal-to-noise ratio, which puts all three SDEs on one scale.

References:

[1] Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole,
    "Score-Based Generative Modeling through Stochastic Differential
    Equations", ICLR 2021.
[2] J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
[3] T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of
    Diffusion-Based Generative Models", NeurIPS 2022.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_event_shape, check_int, check_optional, check_real
from .sde import ForwardSDE, _broadcast_time

__all__ = ["ScoreNet"]

# the noise level log(sigma/alpha) spans about [-14, 4] for the default SDEs; these
# frequencies resolve ~0.05 steps in it without aliasing over the whole range
_MIN_FREQUENCY = 0.05
_MAX_FREQUENCY = 50.0


# Upper bounds on the architecture numbers, far above any CPU/GPU-sized prior: a config (e.g. a hostile
# checkpoint's config.json) cannot make the constructor allocate without bound.
_MAX_WIDTH = 2**15
_MAX_LAYERS = 256


class NoiseLevelEmbedding(nn.Module):
    r"""Sinusoidal features of the noise level :math:`c = \log(\sigma/\alpha)`:
    :math:`(\sin(\omega_k c), \cos(\omega_k c))_k`, :math:`\omega_k` geometric from 0.05 to 50.

    The frequencies are a fixed, non-persistent buffer (a function of ``embed_dim`` only).
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        freqs = torch.exp(torch.linspace(math.log(_MIN_FREQUENCY), math.log(_MAX_FREQUENCY), embed_dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        angles = noise_level.unsqueeze(-1) * self.freqs
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ResidualMLPBlock(nn.Module):
    r""":math:`h + W_2\,\mathrm{SiLU}(W_1\,\mathrm{SiLU}(\mathrm{LN}(h)) + V c)`, with conditioning :math:`c`."""

    def __init__(self, hidden: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.fc1(F.silu(self.norm(h))) + self.cond(cond)
        return h + self.fc2(F.silu(y))


class ResidualConvBlock(nn.Module):
    r"""Two GroupNorm-SiLU-conv3x3 layers with the conditioning added per channel in between, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.cond = nn.Linear(embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(h))) + self.cond(cond)[:, :, None, None]
        y = self.conv2(F.silu(self.norm2(y)))
        return self.skip(h) + y


class MLPBackbone(nn.Module):
    """Residual MLP on flat vectors ``(N, D)``."""

    def __init__(self, dim: int, hidden: int, num_layers: int, embed_dim: int):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden, embed_dim) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, cond)
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)


class UNetBackbone(nn.Module):
    """A small U-Net on ``(N, C, H, W)``: one residual block per resolution on the way down and up,
    one in the middle, stride-2 convolutions down, nearest-neighbour upsampling plus a convolution up.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], embed_dim: int, groups: int):
        super().__init__()
        channels = list(channels)
        levels = len(channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList(
            ResidualConvBlock(channels[max(i - 1, 0)], channels[i], embed_dim, groups) for i in range(levels)
        )
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in channels[:-1])
        self.mid = ResidualConvBlock(channels[-1], channels[-1], embed_dim, groups)
        self.up = nn.ModuleList(
            ResidualConvBlock(channels[min(i + 1, levels - 1)] + channels[i], channels[i], embed_dim, groups)
            for i in range(levels)
        )
        self.upsample = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in channels[1:])
        self.out_norm = nn.GroupNorm(groups, channels[0])
        self.conv_out = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, cond)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, cond)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), cond)
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.out_norm(h)))


class ScoreNet(nn.Module):
    r"""A score network :math:`s_\theta(x, t) = -\epsilon_\theta(x, t)/\sigma(t)`, optionally conditional.

    .. math::

        \epsilon_\theta(x, t) = F_\theta\big(c_{in}(t)\,x,\; \log(\sigma(t)/\alpha(t)),\; y\big),
        \qquad c_{in} = (\alpha^2\sigma_{data}^2 + \sigma^2)^{-1/2},

    where :math:`(\alpha, \sigma)` = ``sde.marginal(t)`` and :math:`y` the
    optional context. Predicting the noise keeps the output :math:`O(1)` as
    :math:`t \to \epsilon`, where the score itself grows like :math:`1/\sigma`;
    see the module docstring. The backbone :math:`F_\theta` is

    * for event shapes ``(C, H, W)``: a small convolutional U-Net with
      ``len(channels)`` resolutions (``H`` and ``W`` divisible by
      :math:`2^{len(channels) - 1}`), GroupNorm with ``groups`` groups, the
      conditioning added per channel in every residual block;
    * for any other event shape (``(D,)`` above all): a residual MLP on the
      flattened event, ``num_layers`` blocks of width ``hidden``, SiLU, LayerNorm.

    The conditioning vector is an MLP of sinusoidal features of the noise
    level :math:`\log(\sigma/\alpha)`, plus the context's embedding: a learned
    ``nn.Embedding`` of integer labels when ``num_classes`` is given, a linear
    map of a real vector ``(N, context_dim)`` when ``context_dim`` is given.

    Every point is processed on its own (no batch statistics), so the score of
    one point never depends on the others, as exact divergences need.

    ``net(x, t)`` (or ``net(x, t, context)``) accepts ``x`` of shape
    ``(N, *event_shape)`` or flattened ``(N, prod(event_shape))`` (so a U-Net
    serves a ``ScoreSDEPrior`` with event shape ``(H*W*C,)``) and returns the
    score in the same shape; ``t`` is a scalar or of shape ``(N,)`` and is
    clamped into :math:`[\epsilon, T]`.

    :param ForwardSDE sde: the forward SDE whose marginals parameterize the net.
    :param event_shape: ``(D,)`` (MLP) or ``(C, H, W)`` (U-Net).
    :param int hidden: MLP width.
    :param int num_layers: number of residual MLP blocks.
    :param int embed_dim: width of the time/context conditioning vector (even).
    :param channels: U-Net channels per resolution, each divisible by ``groups``.
    :param int groups: GroupNorm groups of the U-Net.
    :param int num_classes: condition on integer labels ``(N,)`` in ``[0, num_classes)``.
    :param int context_dim: condition on real vectors ``(N, context_dim)``.
    :param float data_std: the data's standard deviation assumed by :math:`c_{in}`.

    ``net.config`` is a JSON-serialisable dict of these hyper-parameters (all
    but ``sde`` and ``event_shape``): ``ScoreNet(sde, event_shape, **net.config)``
    rebuilds the same architecture, ready for ``load_state_dict``.
    """

    def __init__(
        self,
        sde: ForwardSDE,
        event_shape: Sequence[int] | int,
        *,
        hidden: int = 256,
        num_layers: int = 4,
        embed_dim: int = 128,
        channels: Sequence[int] = (32, 64),
        groups: int = 8,
        num_classes: int | None = None,
        context_dim: int | None = None,
        data_std: float = 1.0,
    ):
        super().__init__()
        if not isinstance(sde, ForwardSDE):
            raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
        self.sde = sde
        self.event_shape = check_event_shape(event_shape)
        self._config = _check_config(
            hidden=hidden, num_layers=num_layers, embed_dim=embed_dim, channels=channels, groups=groups,
            num_classes=num_classes, context_dim=context_dim, data_std=data_std,
        )  # fmt: skip
        cfg = self._config
        self.is_image = len(self.event_shape) == 3
        if self.is_image:
            _check_image_shape(self.event_shape, cfg["channels"])
            self.backbone = UNetBackbone(self.event_shape[0], cfg["channels"], embed_dim, groups)
        else:
            self.backbone = MLPBackbone(math.prod(self.event_shape), hidden, num_layers, embed_dim)
        self.time_embed = NoiseLevelEmbedding(embed_dim)
        self.cond_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.context_embed: nn.Module | None = None
        if num_classes is not None:
            self.context_embed = nn.Embedding(num_classes, embed_dim)
        elif context_dim is not None:
            self.context_embed = nn.Linear(context_dim, embed_dim)

    @property
    def config(self) -> dict:
        """The constructor's hyper-parameters (not ``sde``, not ``event_shape``), JSON-serialisable."""
        return {**self._config, "channels": list(self._config["channels"])}

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, event_shape={tuple(self.event_shape)}, config={self.config}"

    # -- forward ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
        r"""The score :math:`-\epsilon_\theta(x, t)/\sigma(t)`, shaped like ``x``."""
        noise, std = self._noise_and_std(x, t, context)
        return -noise / _broadcast_time(std, noise)

    def predict_noise(self, x: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
        r"""The noise prediction :math:`\epsilon_\theta(x, t)`, shaped like ``x``."""
        return self._noise_and_std(x, t, context)[0]

    def _noise_and_std(self, x: torch.Tensor, t, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_event = self._to_event(x)
        alpha, std = self._marginal(x, t)
        c_in = (alpha**2 * self._config["data_std"] ** 2 + std**2).rsqrt()
        cond = self._conditioning(torch.log(std) - torch.log(alpha), context, x.shape[0])
        noise = self.backbone(x_event * _broadcast_time(c_in, x_event), cond)
        return noise.reshape(x.shape), std

    def _to_event(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped to ``(N, *event_shape)``; accepts that shape or the flat ``(N, prod(event_shape))``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        flat = (math.prod(self.event_shape),)
        if x.dim() < 1 or x.shape[1:] not in (self.event_shape, flat):
            raise ValueError(
                f"x must have shape (N, *{tuple(self.event_shape)}) or (N, {flat[0]}), got {tuple(x.shape)}"
            )
        return x.reshape((x.shape[0],) + self.event_shape)

    def _marginal(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\alpha(t), \sigma(t))`, each ``(N,)`` in ``x``'s dtype; ``t`` clamped into :math:`[\epsilon, T]`."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        alpha, std = self.sde.marginal(self.sde.clamp_time(t).expand(x.shape[0]))
        return alpha, std

    def _conditioning(self, noise_level: torch.Tensor, context: torch.Tensor | None, n: int) -> torch.Tensor:
        """SiLU of the conditioning vector ``(N, embed_dim)``: time MLP plus context embedding."""
        cond = self.cond_mlp(self.time_embed(noise_level))
        if self.context_embed is None:
            if context is not None:
                raise ValueError("this ScoreNet is unconditional (no num_classes or context_dim) but got a context")
        else:
            cond = cond + self.context_embed(self._check_context(context, n))
        return F.silu(cond)

    def _check_context(self, context: torch.Tensor | None, n: int) -> torch.Tensor:
        num_classes, context_dim = self._config["num_classes"], self._config["context_dim"]
        if context is None:
            raise ValueError("this ScoreNet is conditional: call it as net(x, t, context)")
        context = torch.as_tensor(context, device=self.cond_mlp[0].weight.device)
        if num_classes is not None:
            if context.dim() > 1 or (context.dim() == 1 and context.shape[0] not in (1, n)):
                raise ValueError(f"context must be integer labels of shape ({n},), got shape {tuple(context.shape)}")
            if context.is_floating_point() and not torch.equal(context, context.round()):
                raise ValueError("context must hold integer class labels")
            context = context.long()
            if ((context < 0) | (context >= num_classes)).any():
                raise ValueError(f"context labels must lie in [0, {num_classes})")
            return context.expand(n)
        if context.shape[-1:] != (context_dim,) or context.dim() > 2 or context.shape[:-1] not in ((), (1,), (n,)):
            raise ValueError(f"context must have shape ({n}, {context_dim}), got {tuple(context.shape)}")
        return context.to(self.cond_mlp[0].weight.dtype).expand(n, context_dim)


def _check_config(**cfg) -> dict:
    cfg["hidden"] = check_int("hidden", cfg["hidden"], maximum=_MAX_WIDTH)
    cfg["num_layers"] = check_int("num_layers", cfg["num_layers"], maximum=_MAX_LAYERS)
    cfg["embed_dim"] = check_int("embed_dim", cfg["embed_dim"], maximum=_MAX_WIDTH)
    cfg["groups"] = check_int("groups", cfg["groups"], maximum=_MAX_WIDTH)
    cfg["num_classes"] = check_optional(check_int, "num_classes", cfg["num_classes"], maximum=2**20)
    cfg["context_dim"] = check_optional(check_int, "context_dim", cfg["context_dim"], maximum=_MAX_WIDTH)
    if cfg["embed_dim"] % 2:
        raise ValueError(f"embed_dim must be even, got {cfg['embed_dim']}")
    if cfg["num_classes"] is not None and cfg["context_dim"] is not None:
        raise ValueError("give num_classes (integer labels) or context_dim (real vectors), not both")
    channels = cfg["channels"]
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not 1 <= len(channels) <= 8:
        raise ValueError(f"channels must be a sequence of 1 to 8 positive ints, got {channels!r}")
    cfg["channels"] = tuple(check_int("channels", c, maximum=_MAX_WIDTH) for c in channels)
    if any(c % cfg["groups"] for c in cfg["channels"]):
        raise ValueError(f"every entry of channels must be divisible by groups={cfg['groups']}, got {channels}")
    cfg["data_std"] = check_real("data_std", cfg["data_std"], positive=True)
    return cfg


def _check_image_shape(event_shape: torch.Size, channels: Sequence[int]) -> None:
    factor = 2 ** (len(channels) - 1)
    if event_shape[1] % factor or event_shape[2] % factor:
        raise ValueError(
            f"a U-Net with {len(channels)} resolutions needs H and W divisible by {factor}, "
            f"got event_shape {tuple(event_shape)}"
        )
