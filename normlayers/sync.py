"""Synchronized Batch Kalman Normalization for data-parallel training (torch + torch.distributed only).

:class:`SyncBatchKalmanNorm` is :class:`normlayers.BatchKalmanNorm` whose batch moments are those of the
GLOBAL batch (all ranks of ``process_group``), so a batch split over ranks is normalized exactly as the
whole batch would be in one process. :func:`convert_sync` swaps it in (like
``nn.SyncBatchNorm.convert_sync_batchnorm``), keeping parameters, buffers and the Kalman chain.

Forward (training, world size > 1): each rank computes its per-channel ``(count, mean, M2)`` in float64
(``M2`` = sum of squared deviations from the local mean); one ``all_gather`` of a ``(3, C)`` tensor; every
rank merges them in rank order with Chan's parallel formula (``delta = mu_b - mu_a``,
``mu = mu_a + delta * n_b / n``, ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``), so every rank holds
bit-identical global moments. The Kalman update (prior mixture, guard), the posterior and the running
statistics (unbiased with the GLOBAL count) follow :mod:`normlayers.reference` on these moments.

Backward: :class:`_SyncMoments` all-reduces (sums) the gradients w.r.t. the global ``(mu_B, var_B)``:
``dL/dmu_B = sum(dy * d y/d mu_B) + (posterior/prior terms)`` and likewise for ``var_B``; these are BN's
per-channel sums ``sum(dy)``, ``sum(dy * xhat)`` scaled, plus the gradients arriving through the posterior
(the next layer's prior). One ``all_reduce`` of a ``(2, C)`` tensor; then each rank maps them to its own
``(mean_r, M2_r)`` (``d mu/d mean_r = n_r/N``, ``d var/d mean_r = 2 n_r (mean_r - mu)/N``,
``d var/d M2_r = 1/N``) and autograd carries them to its slice of ``x``.

Gradient semantics are DDP's: the loss is the SUM of the ranks' losses. ``x.grad`` on each rank is the
whole-batch gradient of its slice; gradients of parameters (gamma, beta, convs) and of a prior are each
rank's share, and their SUM over ranks (what DDP's all-reduce forms, up to its 1/world averaging) is the
whole-batch gradient.

The prior must be identical on every rank. The analytic transition is (a deterministic function of the
previous layer's synchronized posterior and of weights DDP keeps equal). For Monte-Carlo transitions,
the :class:`SyncKalmanChain` installed by :func:`convert_sync` draws one seed per training forward on rank 0
(from the chain's generator, else torch's global RNG), broadcasts it, and seeds a chain-private generator
with it on every rank, so all ranks sample the same images. A prior passed by hand (``bkn(x, prior=...)``)
is the caller's business.

Not synchronized: ghost groups (``group_size``) raise ``ValueError`` in a synchronized forward (each rank
would hold its own groups; use plain :class:`BatchKalmanNorm` for ghost-batch training). So the synchronized
forward has one group, the global batch, and ``guard_scope`` ("layer" / "group") makes no difference there: one
guard decision on the global moments; the layer keeps the setting for its unsynchronized forwards. World size 1, no
initialized process group, eval mode, or ``track_running_stats=False`` in eval: exactly
:class:`BatchKalmanNorm`. The synchronized path runs plain torch autograd (not the fused CPU/Triton
kernels) for the per-rank part.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlayers.convert import KalmanChain
from normlayers.modules import BatchKalmanNorm
from normlayers.ops.torch_backend import check_prior_values
from normlayers.reference import stats_dtype, update_running_stats_reference

__all__ = ["SyncBatchKalmanNorm", "SyncKalmanChain", "convert_sync", "sync_batch_kalman_norm"]


def _world_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _SyncMoments(torch.autograd.Function):
    """Local ``(mean_r, M2_r)`` (C,) + local count -> global ``(mu_B, var_B (biased), N)`` across ranks."""

    @staticmethod
    def forward(ctx: Any, mean: Tensor, m2: Tensor, count: int, group: Any, world: int):  # type: ignore[override]
        local = torch.stack([torch.full_like(mean, float(count), dtype=torch.float64),
                             mean.detach().to(torch.float64), m2.detach().to(torch.float64)])  # (3, C)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        # Chan's pairwise merge, in rank order (identical arithmetic on every rank -> identical results)
        n_a, mu, m2_a = 0.0, torch.zeros_like(local[1]), torch.zeros_like(local[2])
        for part in gathered:
            n_b = float(part[0, 0]) if part.shape[1] > 0 else 0.0
            if n_b == 0.0:
                continue
            n = n_a + n_b
            delta = part[1] - mu
            mu = mu + delta * (n_b / n)
            m2_a = m2_a + part[2] + delta * delta * (n_a * n_b / n)
            n_a = n
        if n_a <= 1.0:
            raise ValueError(f"Expected more than 1 value per channel across the process group when training, "
                             f"got {int(n_a)}")
        var = m2_a / n_a
        ctx.save_for_backward(mean, mu)
        ctx.count, ctx.total, ctx.group = float(count), n_a, group
        total = torch.tensor(n_a, dtype=torch.float64, device=mean.device)
        ctx.mark_non_differentiable(total)
        return mu.to(mean.dtype), var.to(mean.dtype), total

    @staticmethod
    def backward(ctx: Any, g_mu: Tensor, g_var: Tensor, _g_total: Tensor | None):  # type: ignore[override]
        mean, mu = ctx.saved_tensors
        g = torch.stack([g_mu, g_var]).to(torch.float64)  # (2, C): this rank's dL_r/d(mu_B, var_B)
        dist.all_reduce(g, group=ctx.group)  # -> dL/d(mu_B, var_B) of the summed loss
        a = ctx.count / ctx.total  # n_r / N
        grad_mean = g[0] * a + g[1] * (2.0 * a) * (mean.to(torch.float64) - mu)
        grad_m2 = g[1] / ctx.total
        return grad_mean.to(mean.dtype), grad_m2.to(mean.dtype), None, None, None


def sync_batch_kalman_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    prior: tuple[Tensor, Tensor] | None,
    prior_weight: float,
    eps: float = 1e-5,
    guard_ratio: float = 100.0,
    process_group: Any = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Training-mode BKN on the batch spread over ``process_group``; ``(y, post_mean (C,), post_var (C,), N)``.

    ``y`` is this rank's slice; the posterior is identical on every rank; ``N`` is the global number of
    elements per channel (for the unbiased running variance). Same formulas as
    :func:`normlayers.reference.batch_kalman_norm_reference` (one group) with the global batch moments.
    """
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {tuple(x.shape)}")
    p = float(prior_weight)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prior_weight must lie in [0, 1], got {prior_weight}")
    c = x.shape[1]
    sdt = stats_dtype(x.dtype)
    world = _world_size(process_group)
    xs = x.to(sdt).reshape(x.shape[0], c, math.prod(x.shape[2:]))  # (N_r, C, L)
    count = xs.shape[0] * xs.shape[2]
    if count > 0:
        var_r, mean_r = torch.var_mean(xs, dim=(0, 2), correction=0)
    else:  # an empty rank contributes nothing (but still takes part in the collectives)
        mean_r = var_r = xs.sum(dim=(0, 2))
    mu_b, var_b, total = _SyncMoments.apply(mean_r, var_r * count, count, process_group, world)

    use_prior = prior is not None and p > 0.0
    if use_prior:
        mu_p, var_p = (t.to(sdt).reshape(-1) if t.dim() == 2 else t.to(sdt) for t in prior)
        for name, t in (("mean", mu_p), ("var", var_p)):
            if tuple(t.shape) != (c,):
                raise ValueError(f"prior {name} must have shape ({c},) or (1, {c}) in a synchronized BKN")
        if not torch.compiler.is_compiling():
            probe = float((mu_p.detach().sum() + var_p.detach().sum()) * 0.0 + var_p.detach().min())
            if not probe >= 0.0:
                check_prior_values(mu_p.detach(), var_p.detach())
        ratio = float((var_p.detach() / (var_b.detach() + eps)).mean())  # identical on every rank
        if ratio >= guard_ratio:
            use_prior = False
    if use_prior:
        d = mu_b - mu_p
        post_mean = p * mu_p + (1.0 - p) * mu_b
        post_var = p * var_p + (1.0 - p) * var_b + p * (1.0 - p) * d * d
    else:
        post_mean, post_var = mu_b, var_b

    rstd = torch.rsqrt(post_var + eps)
    y = (xs - post_mean[None, :, None]) * rstd[None, :, None]
    if weight is not None:
        y = y * weight.to(sdt)[None, :, None]
    if bias is not None:
        y = y + bias.to(sdt)[None, :, None]
    return y.reshape(x.shape).to(x.dtype), post_mean, post_var, int(round(float(total)))


class SyncBatchKalmanNorm(BatchKalmanNorm):
    """:class:`BatchKalmanNorm` with batch moments synchronized across ``process_group`` in training.

    Same constructor (plus ``process_group``), parameters, buffers and state_dict as
    :class:`BatchKalmanNorm`, so checkpoints move both ways. Accepts ``(N, C, *)`` inputs of any rank
    (like ``nn.SyncBatchNorm``). See the module docstring for what is reduced and the limits.
    """

    def __init__(self, num_features: int, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _syncs(self) -> bool:
        return self.training and _world_size(self.process_group) > 1

    def forward(self, x: Tensor, prior: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if not self._syncs():
            return super().forward(x, prior)
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels")
        if self.group_size is not None:
            raise ValueError(
                f"{type(self).__name__}: ghost groups (group_size={self.group_size}) are not synchronized across "
                "ranks; use group_size=None, or the unsynchronized BatchKalmanNorm for ghost-batch training"
            )
        momentum = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        y, post_mean, post_var, total = sync_batch_kalman_norm(
            x, self.weight, self.bias, prior, self.prior_weight, self.eps, self.guard_ratio, self.process_group
        )
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                update_running_stats_reference(self.running_mean, self.running_var, post_mean, post_var,
                                               0.0 if momentum is None else momentum, total)
        self.__dict__["posterior"] = (post_mean, post_var)
        return y


class SyncKalmanChain(KalmanChain):
    """:class:`KalmanChain` whose Monte-Carlo samples are identical on every rank: at each training forward
    rank 0 draws a seed (from ``generator`` if given, else torch's global RNG) and broadcasts it; every rank
    seeds a private generator (on the layers' device) with it. Analytic chains need no communication."""

    def __init__(self, model: nn.Module, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        self.process_group = process_group
        self.user_generator = self.generator
        self._monte_carlo = any(getattr(self.layers[n], "transition", None) == "monte_carlo" for n in self.plan)

    def _reset(self, module: nn.Module, args: Any) -> None:
        super()._reset(module, args)
        if not (self._monte_carlo and module.training and _world_size(self.process_group) > 1):
            return
        ref = next((t for t in module.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        backend_device = device if dist.get_backend(self.process_group) != "gloo" else torch.device("cpu")
        seed = torch.zeros((), dtype=torch.int64, device=backend_device)
        if dist.get_rank(self.process_group) == 0:
            gen = self.user_generator
            seed.fill_(int(torch.randint(0, 2**62, (), generator=gen, device=None if gen is None else gen.device)))
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        dist.broadcast(seed, src=src, group=self.process_group)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
        self.generator = generator


def _to_sync(bkn: BatchKalmanNorm, process_group: Any) -> SyncBatchKalmanNorm:
    new = SyncBatchKalmanNorm(
        bkn.num_features, eps=bkn.eps, momentum=bkn.momentum, affine=bkn.affine,
        track_running_stats=bkn.track_running_stats, prior_weight=bkn.prior_weight, guard_ratio=bkn.guard_ratio,
        guard_scope=bkn.guard_scope, group_size=bkn.group_size, transition=bkn.transition, backend=bkn.backend,
        process_group=process_group, device="meta",
    )
    # the same Parameter and buffer objects (optimizers and references stay valid), like convert_sync_batchnorm
    for name, param in bkn._parameters.items():
        new._parameters[name] = param
    for name, buf in bkn._buffers.items():
        new._buffers[name] = buf
    new.train(bkn.training)
    return new


def convert_sync(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Swap every :class:`BatchKalmanNorm` in ``module`` for :class:`SyncBatchKalmanNorm` (shared
    parameters and buffers) and re-wire every :class:`normlayers.KalmanChain` (``.kalman_chain``) found in
    ``module`` as a :class:`SyncKalmanChain`. Call AFTER :func:`normlayers.convert` and BEFORE wrapping
    the model in ``DistributedDataParallel``. Returns the converted module (a new object only when
    ``module`` itself is a BKN layer). Hooks other than the chain's on the swapped layers are not kept.
    """
    owners = [m for m in module.modules() if isinstance(getattr(m, "kalman_chain", None), KalmanChain)]
    chains = [(m, m.kalman_chain) for m in owners]
    for _, chain in chains:
        chain.remove()
    module = _swap_all(module, process_group)
    for owner, chain in chains:
        if isinstance(chain, SyncKalmanChain):
            generator, group = chain.user_generator, process_group if process_group is not None else chain.process_group
        else:
            generator, group = chain.generator, process_group
        owner.kalman_chain = SyncKalmanChain(owner, chain.plan, chain.unchained, generator, chain.from_input,
                                             chain.output, process_group=group)
    return module


def _swap_all(module: nn.Module, process_group: Any) -> nn.Module:
    out = module
    if isinstance(module, BatchKalmanNorm):
        out = _to_sync(module, process_group if process_group is not None else getattr(module, "process_group",
                                                                                          None))
    for name, child in module.named_children():
        new = _swap_all(child, process_group)
        if new is not child:
            setattr(out, name, new)
    return out
