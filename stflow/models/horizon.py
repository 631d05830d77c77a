"""Shared pieces of the DIRECT multi-step heads (``horizon=H`` models, see :mod:`stflow.models.registry`).

A direct head predicts the H target slots ``t .. t+H-1`` of a sample at once: its last conv / linear layer gives
``H * 2`` channels in STEP-MAJOR order (channel ``2*k + c`` is step k, flow channel c), which
:func:`split_steps` turns into ``(B, H, 2, h, w)``. The batch's ``ext_target`` is then ``(B, H, D)``: the external
vector of every target slot (calendar known in advance; previous-slot weather taken as given, as the recursive
rollout does). ``horizon=1`` is the one-step network, with ``ext_target (B, D)`` and output ``(B, 2, h, w)``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["check_horizon", "split_steps", "target_ext"]


def check_horizon(model: str, horizon: int) -> None:
    """Raise a one-line ``ValueError`` unless ``horizon`` is an integer >= 1."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"{model}: horizon must be an integer >= 1, got {horizon!r}")


def split_steps(x: Tensor, horizon: int) -> Tensor:
    """(B, H*C, h, w) step-major channels -> (B, H, C, h, w); returned as is when ``horizon`` is 1."""
    return x if horizon == 1 else x.unflatten(1, (horizon, -1))  # (B, H*C, h, w) -> (B, H, C, h, w)


def target_ext(model: str, batch: Mapping[str, Tensor], horizon: int, ext_dim: int) -> Tensor:
    """``batch["ext_target"]`` checked: (B, D) for one step, (B, H, D) for a direct head of H steps."""
    ext = batch.get("ext_target")
    want = (ext_dim,) if horizon == 1 else (horizon, ext_dim)
    if ext is None or tuple(ext.shape[1:]) != want:
        got = None if ext is None else tuple(ext.shape)
        raise ValueError(f"{model} expects ext_target of shape (B, {', '.join(map(str, want))}), got {got}")
    return ext
