"""Hand-built ghost-group inputs whose groups disagree on the BKN guard, and an independent numpy forward.

Two ghost groups of two samples; the (C,) prior variance averages 1 over the channels. Group 1's batch variance
is 1 in every channel (guard ratio ~1), group 0's is ``a0**2`` (ratio ~``1 / a0**2``); ``GUARD_RATIO = 10``:

* ``"layer_fires"`` (``a0 = 0.2``): group 0's ratio ~25, the layer mean ~13: "layer" falls back to BN in both
  groups, "group" only in group 0.
* ``"layer_mixes"`` (``a0 = 0.25``): group 0's ratio ~16, the layer mean ~8.5: "layer" mixes in both groups,
  "group" falls back in group 0 only.

Shared by test_normlayers_guard_scope.py (reference, torch backends, C finalize) and test_bkn_triton.py.
"""

from __future__ import annotations

import numpy as np
import torch

GUARD_RATIO = 10.0
P = 0.6
EPS = 1e-5
SHAPE = (4, 3, 2, 3)  # (N, C, H, W): two ghost groups of two samples, 12 elements per channel per group
GROUP_SIZE = 2
A0 = {"layer_fires": 0.2, "layer_mixes": 0.25}
# what each scope decides per group in each case: True = the group falls back to plain BN
FIRED = {
    ("layer_fires", "layer"): (True, True),
    ("layer_fires", "group"): (True, False),
    ("layer_mixes", "layer"): (False, False),
    ("layer_mixes", "group"): (True, False),
}


def hand_built(case: str, prior: str = "c", dtype: torch.dtype = torch.float64, seed: int = 0
               ) -> tuple[torch.Tensor, ...]:
    """``(x, gamma, beta, mu_P, var_P)`` (float64 values in ``dtype``); ``prior`` "c" (C,) or "gc" (G, C)
    (the same variances in each group, different means)."""
    rng = np.random.default_rng(seed)
    n, c = SHAPE[:2]
    groups = n // GROUP_SIZE
    z = rng.standard_normal(SHAPE).reshape(groups, GROUP_SIZE, c, -1)  # (G, g, C, L)
    z = (z - z.mean(axis=(1, 3), keepdims=True)) / z.std(axis=(1, 3), keepdims=True)  # exact moments 0, 1
    scale = np.array([A0[case], 1.0])[:, None, None, None]  # (G, 1, 1, 1): group 0 quiet
    shift = rng.standard_normal((groups, 1, c, 1))
    x = (z * scale + shift).reshape(SHAPE)
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.standard_normal(c)
    var_p = np.array([0.5, 1.0, 1.5])  # mean 1
    if prior == "c":
        mu_p = rng.standard_normal(c) * 0.5
    else:
        mu_p = rng.standard_normal((groups, c)) * 0.5
        var_p = np.tile(var_p, (groups, 1))
    return tuple(torch.tensor(t, dtype=dtype) for t in (x, gamma, beta, mu_p, var_p))


def numpy_forward(x, gamma, beta, mu_p, var_p, scope: str, p: float = P, eps: float = EPS,
                  guard_ratio: float = GUARD_RATIO, group_size: int = GROUP_SIZE):
    """Independent float64 forward: ``(y, post_mean (G, C), post_var (G, C), fired (G,), ratios (G, C))``."""
    x, gamma, beta, mu_p, var_p = (np.asarray(t.detach().double().numpy() if isinstance(t, torch.Tensor) else t,
                                              dtype=np.float64) for t in (x, gamma, beta, mu_p, var_p))
    n, c = x.shape[:2]
    groups = n // group_size
    xs = x.reshape(groups, group_size, c, -1)
    mu_b = xs.mean(axis=(1, 3))
    var_b = xs.var(axis=(1, 3))
    mu_p = np.broadcast_to(mu_p, (groups, c))
    var_p = np.broadcast_to(var_p, (groups, c))
    ratios = var_p / (var_b + eps)
    if scope == "layer":
        fired = np.full(groups, ratios.mean() >= guard_ratio)
    else:
        fired = ratios.mean(axis=1) >= guard_ratio
    pk = np.where(fired, 0.0, p)[:, None]  # (G, 1)
    d = mu_b - mu_p
    post_mean = pk * mu_p + (1 - pk) * mu_b
    post_var = pk * var_p + (1 - pk) * var_b + pk * (1 - pk) * d * d
    y = (xs - post_mean[:, None, :, None]) / np.sqrt(post_var[:, None, :, None] + eps)
    y = y * gamma[None, None, :, None] + beta[None, None, :, None]
    return y.reshape(x.shape), post_mean, post_var, fired, ratios
