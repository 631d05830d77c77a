"""Batch Kalman Normalization wiring of the forecasting models: which norm hands its statistics to which.

BKN (``normlayers``; background ``docs/background/bkn.md``, ``docs/normlayers.md`` and
``docs/bkn_experiments.md``) estimates a norm layer's statistics from its micro-batch moments mixed with a PRIOR
predicted from the previous norm layer's estimate (its posterior), pushed through what lies between them. A model
gets BKN by being built with BatchNorm, then chained here; the norm layers keep BatchNorm's parameter and buffer
names, so state dicts move between the BN and the BKN model. In eval mode every BKN is plain BN with its running
statistics.

Both models' norm layers sit in pre-activation residual units ``x + conv2(act(norm2(conv1(act(norm1(x))))))``
stacked after a stem conv of the data; the chain is, per unit k:

* ``norm1`` of the first unit: no prior (its input comes from the data through the stem: nothing to predict from);
* ``norm2`` of unit k: ``norm1``'s posterior through ``act`` then ``conv1``;
* ``norm1`` of unit k+1 sees the residual sum ``x + branch``: means add and variances add (independent terms), so
  its prior is unit k's input statistics (``norm1``'s posterior) plus ``norm2``'s posterior through ``act`` then
  ``conv2``.

The transition ("through act then conv") is ``"analytic"`` by default: the activation's Gaussian moments in closed
form, then the conv's linear moments (mean ``sum W mu + b``, variance ``sum W^2 var``); ``"monte_carlo"`` is the
reference's: one random image per group drawn from the posterior at the conv input's size, the activation, the
conv's own weights, the per-channel spatial moments.

* ACFM (SELU units): :class:`KalmanFrameEncoder` wires the shared frame encoder explicitly, because
  ``normlayers.convert`` chains ReLU-like nets only; its SELU moments are :func:`selu_gaussian_moments`.
* ST-ResNet (ReLU units): :func:`kalman_stresnet` runs ``normlayers.convert`` on each component's stack of residual
  units, which derives the chain above (ReLU's rectified-Gaussian moments for the analytic transition) with one
  difference, convert's default ``shortcut="prior"`` (the BKN authors' choice): the identity branch carries
  ``norm1``'s PRIOR (the sum of priors along the stream; its posterior only at the chain start) instead of its
  posterior. ACFM's hand wiring keeps the posterior, the setting its published BKN figures were measured with.
* DeepSTN+ (ReLU ResPlus units): :func:`kalman_deepstn` runs ``normlayers.convert`` on the units plus the output
  norm; a unit's second norm follows a concatenation (local conv | whole-grid dense branch) and keeps no prior.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlayers import BatchKalmanNorm2d, analytic_prior, convert, monte_carlo_prior
from normlayers.select import TRANSITIONS

__all__ = [
    "SELU_ALPHA",
    "SELU_SCALE",
    "selu_gaussian_moments",
    "selu_transition",
    "KalmanFrameEncoder",
    "kalman_acfm",
    "kalman_stresnet",
    "kalman_deepstn",
]

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

Moments = tuple[Tensor, Tensor]


def _ncdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def selu_gaussian_moments(mean: Tensor, var: Tensor) -> Moments:
    """Mean and variance of ``selu(z)``, ``z ~ N(mean, var)``, in closed form (elementwise, differentiable).

    ``selu(z) = s*z`` for ``z > 0`` and ``s*a*(exp(z) - 1)`` otherwise, so with ``sd = sqrt(var)``,
    ``P = Phi(mean/sd)``, ``phi`` the normal density at ``mean/sd`` and ``E_k = E[exp(k z) 1{z <= 0}] =
    exp(k mean + k^2 var / 2) Phi(-(mean + k var)/sd)``:
    ``E[selu] = s (mean P + sd phi + a (E_1 - (1 - P)))`` and
    ``E[selu^2] = s^2 ((mean^2 + var) P + mean sd phi + a^2 (E_2 - 2 E_1 + 1 - P))``.
    """
    sd = (var.clamp_min(0.0) + 1e-12).sqrt()
    t = mean / sd
    p_pos = _ncdf(t)
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)

    # exp(k*mean + k^2 var/2) can overflow for large positive means, but then Phi(.) underflows to 0 faster:
    # combine them in log space.
    def e_k(k: float) -> Tensor:
        z = -(mean + k * var) / sd
        return torch.exp(k * mean + 0.5 * k * k * var + torch.special.log_ndtr(z))

    e1, e2 = e_k(1.0), e_k(2.0)
    m1 = SELU_SCALE * (mean * p_pos + sd * pdf + SELU_ALPHA * (e1 - (1.0 - p_pos)))
    m2 = SELU_SCALE**2 * ((mean * mean + var) * p_pos + mean * sd * pdf + SELU_ALPHA**2 * (e2 - 2.0 * e1 + 1.0 - p_pos))
    return m1, (m2 - m1 * m1).clamp_min(0.0)


def selu_transition(post: Moments, conv: nn.Conv2d, size: tuple[int, int], transition: str) -> Moments:
    """Prior of the norm after ``conv(selu(.))`` from the posterior ``post`` of the norm before; ``(G, C_out)``.

    ``post`` is ``(C,)`` or ``(G, C)`` mean/variance; ``size`` is the conv input's spatial size (Monte Carlo only).
    ``"analytic"``: :func:`selu_gaussian_moments`, then ``normlayers.analytic_prior``'s linear conv moments;
    ``"monte_carlo"``: ``normlayers.monte_carlo_prior`` with SELU (one image per group drawn from the posterior).
    """
    mean, var = post
    mean, var = mean.reshape(-1, mean.shape[-1]), var.reshape(-1, var.shape[-1])  # (C,) or (G, C) -> (G, C)
    if transition == "analytic":
        return analytic_prior(*selu_gaussian_moments(mean, var), conv, relu=False)
    if transition == "monte_carlo":
        return monte_carlo_prior(mean, var, conv, size, activation=F.selu)
    raise ValueError(f"unknown transition {transition!r}; choose from {', '.join(TRANSITIONS)}")


class KalmanFrameEncoder(nn.Module):
    """ACFM's frame encoder with its BatchNorms as a Kalman chain (see the module docstring for the chain).

    Re-runs the encoder's own submodules (same names, hence the same state-dict keys) with ``BatchKalmanNorm2d``
    layers (BN weights and buffers copied) and priors from :func:`selu_transition`. After each forward,
    ``self.wired`` lists, per norm in forward order, whether it received a prior (training only; eval is plain BN
    with running statistics).
    """

    def __init__(self, encoder: nn.Module, prior_weight: float, transition: str = "analytic") -> None:
        super().__init__()
        if transition not in TRANSITIONS:
            raise ValueError(f"unknown transition {transition!r}; choose from {', '.join(TRANSITIONS)}")
        self.transition = transition
        self.stem, self.units, self.act, self.head = encoder.stem, encoder.units, encoder.act, encoder.head
        self.wired: list[bool] = []
        for unit in self.units:
            if not isinstance(unit.act, nn.SELU):
                raise ValueError(f"KalmanFrameEncoder expects SELU residual units, got {type(unit.act).__name__}")
            for name in ("norm1", "norm2"):
                bn = getattr(unit, name)
                if not isinstance(bn, nn.BatchNorm2d):
                    raise ValueError(f"KalmanFrameEncoder converts BatchNorm2d layers, got {type(bn).__name__}")
                bkn = BatchKalmanNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, prior_weight=prior_weight,
                                        transition=transition)
                bkn.load_state_dict(bn.state_dict())
                setattr(unit, name, bkn)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 2, H, W) -> (N, C, H, W)."""
        x = self.stem(x)
        size = tuple(x.shape[2:])
        prior = None
        self.wired = []
        for unit in self.units:
            chain = self.training
            h = unit.norm1(x, prior=prior if chain else None)
            self.wired.append(chain and prior is not None)
            y = unit.conv1(unit.act(h))
            prior2 = selu_transition(unit.norm1.posterior, unit.conv1, size, self.transition) if chain else None
            h2 = unit.norm2(y, prior=prior2)
            self.wired.append(prior2 is not None)
            x = x + unit.conv2(unit.act(h2))
            if chain:  # statistics of the residual sum: the unit's input plus its branch
                branch = selu_transition(unit.norm2.posterior, unit.conv2, size, self.transition)
                m1, v1 = unit.norm1.posterior
                prior = (m1 + branch[0], v1 + branch[1])
        return self.head(self.act(x))


def kalman_acfm(model: nn.Module, prior_weight: float, transition: str = "analytic") -> nn.Module:
    """An ACFM built with BatchNorm -> the same ACFM with its frame encoder (its only norms) as a Kalman chain."""
    if not model.encoder.units:
        raise ValueError("ACFM with res_units=0 has no norm layer to chain with BKN")
    model.encoder = KalmanFrameEncoder(model.encoder, prior_weight=prior_weight, transition=transition)
    return model


def kalman_stresnet(model: nn.Module, prior_weight: float, transition: str = "analytic") -> nn.Module:
    """An ST-ResNet built with BatchNorm -> the same network with each component's residual units as a Kalman chain.

    ``normlayers.convert`` on ``component.units`` (an ``nn.Sequential`` whose input is the stem's output, so its
    first norm starts the chain) swaps the BatchNorms and attaches ``units.kalman_chain``; the components are
    independent chains (different inputs). Without residual units there is nothing to chain: ValueError.
    """
    if model.config.res_units < 1:
        raise ValueError("ST-ResNet with res_units=0 has no norm layer to chain with BKN")
    for component in model.components.values():
        convert(component.units, prior_weight=prior_weight, transition=transition)
    return model


def kalman_deepstn(model: nn.Module, prior_weight: float, transition: str = "analytic") -> nn.Module:
    """A DeepSTN+ built with BatchNorm -> the same network with ``model.body`` (ResPlus units + output norm) as a
    Kalman chain via ``normlayers.convert``; each unit's ``norm2`` (fed by a concatenation) keeps no prior."""
    with warnings.catch_warnings():  # convert warns about the concatenation-fed norm2 layers: expected here
        warnings.filterwarnings("ignore", message="normlayers.convert: .*norm2 left without prior")
        convert(model.body, prior_weight=prior_weight, transition=transition, strict=False)
    return model
