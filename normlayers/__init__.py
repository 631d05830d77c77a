"""normlayers: Batch Kalman Normalization (BKN) for PyTorch (torch only; Triton kernels optional).

BKN (Wang et al., 2018) estimates each norm layer's statistics by combining its micro-batch moments
with a prior propagated from the previous layer's estimate, like a Kalman filter along depth:
``mu_hat = p*mu_P + (1-p)*mu_B``, ``var_hat = p*var_P + (1-p)*var_B + p*(1-p)*(mu_B-mu_P)**2``.
Background (equations, guard, transition, ghost groups): ``docs/background/bkn.md``; executable spec:
:mod:`normlayers.reference`; which function implements which formula in each backend: ``docs/normlayers.md``.

Decisions where the method leaves a choice (tested in tests/normlayers/):

* No prior, or ``prior_weight == 0``: BatchNorm exactly (train and eval, same buffers).
* Guard: ``mean(var_P / (var_B + eps)) >= guard_ratio`` -> plain BN for the step. ``guard_scope="layer"``
  (default, the authors' code): one decision per layer, the mean over all ghost groups and channels, so
  every group of a step uses the same formula; ``guard_scope="group"``: one decision per ghost group (the
  mean over its channels). Without ghost groups the two are the same.
* Running statistics: EMA (``momentum``; ``None`` = cumulative average) of the posterior averaged
  over ALL ghost groups (the reference used the first group only); UNBIASED variance like torch's
  BN (posterior variance times M/(M-1), M = elements per channel per group), so BN checkpoints and
  BN behaviour carry over exactly. Inference is plain BN with these buffers.
* Statistics in float32 (float64 for float64 inputs) whatever the input dtype; output in the input dtype.
* Posteriors carry autograd graph (no stop-gradient), as in the reference; ``bkn.posterior`` is
  ``(C,)`` ungrouped, ``(G, C)`` with ``group_size``; ``None`` after an eval forward.
* Ghost groups are consecutive slices of ``group_size`` samples; gamma/beta are shared; a ``(C,)``
  prior is shared by all groups, a ``(G, C)`` prior is per group.
* Default ``prior_weight=0.9`` (the reference's value for micro-batches of 2).
* Transition: ``monte_carlo`` (the reference: one random image per group, through the activation and
  the next conv) or ``analytic`` (rectified-Gaussian moments for ReLU, Gauss-Hermite quadrature for
  SiLU/GELU/Hardswish/..., then linear moments; padding ignored); residual adds sum means and variances.
* ``convert`` chains through ReLU, ReLU6, SiLU, GELU, Hardswish, Sigmoid and Tanh; squeeze-excite gates,
  SELU, pooling and concatenation are not wired (``ConvertError``, or un-chained with ``strict=False``).
* Prior validation (shape always; NaN/inf/negative variance outside ``torch.compile``) raises ValueError.
* Choosing a norm by name (``bn``/``gn``/``bkn``/``none``, :class:`NormOptions`, the prior-weight rule
  :func:`prior_weight_for`): :mod:`normlayers.select`.
* Data-parallel training: :func:`convert_sync` (after :func:`convert`, before DDP) swaps in
  :class:`SyncBatchKalmanNorm` (global batch moments merged across ranks, synchronized backward, one
  Monte-Carlo seed per forward broadcast from rank 0): :mod:`normlayers.sync`.
* CPU hot path: the per-channel finalize is one C call compiled on first use with the system compiler
  (``normlayers.ops.cfinalize``; torch ops without a compiler or with ``set_cpu_finalize("torch")``).
"""

from normlayers.convert import ConvertError, KalmanChain, convert
from normlayers.functional import batch_kalman_norm
from normlayers.modules import BatchKalmanNorm, BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d
from normlayers.ops.cfinalize import cpu_finalize, set_cpu_finalize
from normlayers.reference import GUARD_SCOPES, batch_kalman_norm_reference, update_running_stats_reference
from normlayers.select import NORM_KINDS, NORMS, NormOptions, NormSpec, norm_spec, prior_weight_for
from normlayers.sync import SyncBatchKalmanNorm, SyncKalmanChain, convert_sync
from normlayers.transition import analytic_prior, monte_carlo_prior, pad_channels, residual_merge

__all__ = [
    "BatchKalmanNorm",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ConvertError",
    "GUARD_SCOPES",
    "KalmanChain",
    "NORMS",
    "NORM_KINDS",
    "NormOptions",
    "NormSpec",
    "SyncBatchKalmanNorm",
    "SyncKalmanChain",
    "analytic_prior",
    "batch_kalman_norm",
    "batch_kalman_norm_reference",
    "convert",
    "convert_sync",
    "cpu_finalize",
    "monte_carlo_prior",
    "norm_spec",
    "pad_channels",
    "prior_weight_for",
    "residual_merge",
    "set_cpu_finalize",
    "update_running_stats_reference",
]
