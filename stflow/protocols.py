"""Named evaluation protocols: which samples are the test set and which numbers are reported.

Every number ``stflow`` prints or writes carries the name of the protocol that produced it.

``deepst`` (DeepST / ST-ResNet / ACFM papers; the default, :mod:`stflow.metrics`): the test set is the last
``test_days`` days of targets (240 hours for BikeNYC, 28 days for TaxiBJ); min-max scaling fitted on the training
slots; RMSE is one global root mean square over every test sample, both channels and every cell, times the
dataset's factor (``sqrt(128/81)`` for BikeNYC: RMSE over its 81 active cells); MAE over the active cells.

``stssl`` (ST-SSL, Ji et al. AAAI 2023, on the same BikeNYC file): the last :data:`STSSL_TEST` (864) target hours
are the test set and the :data:`STSSL_VAL` (431) before them the validation set (everything earlier is training);
inflow and outflow are reported SEPARATELY as MAE and MAPE computed over the (sample, cell) values whose true
count is greater than :data:`STSSL_THRESHOLD` (5) — the masked metrics of the ST-SSL code (``true > 5`` selects
the values; MAPE = mean |pred - true| / true, reported in percent).

The functions here work on plain numpy arrays in ORIGINAL units, ``(N, 2, H, W)`` (channel 0 inflow, 1 outflow),
so they double as an independent check of the streaming metrics of :class:`stflow.metrics.FlowMetrics`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_DESCRIPTIONS",
    "STSSL_TEST",
    "STSSL_THRESHOLD",
    "STSSL_VAL",
    "ProtocolName",
    "check_protocol",
    "deepst_metrics",
    "protocol_metrics",
    "stssl_metrics",
    "stssl_split",
]

ProtocolName = Literal["deepst", "stssl"]
PROTOCOLS: tuple[str, ...] = ("deepst", "stssl")
STSSL_TEST = 864  # test targets (hours): the last 36 days of the BikeNYC file
STSSL_VAL = 431  # validation targets just before the test set
STSSL_THRESHOLD = 5.0  # values with true count <= 5 are left out of MAE and MAPE
PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    "deepst": "deepst: test = last test_days days of targets; global RMSE x dataset factor "
              "(sqrt(128/81) BikeNYC), MAE over active cells; min-max fitted on training slots",
    "stssl": f"stssl: test = last {STSSL_TEST} targets, val = the {STSSL_VAL} before; inflow/outflow MAE and MAPE "
             f"over values with true > {STSSL_THRESHOLD:g}",
}


def check_protocol(name: str) -> str:
    """``name`` if it is a known protocol, else a ``ValueError`` naming the choices."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return name


def stssl_split(n_samples: int, test: int = STSSL_TEST, val: int = STSSL_VAL) -> tuple[slice, slice, slice]:
    """(train, val, test) slices of ``n_samples`` samples in time order under the ST-SSL protocol."""
    if n_samples <= test + val:
        raise ValueError(f"the stssl protocol needs more than {test} + {val} samples (test + validation), "
                         f"got {n_samples}")
    return slice(0, n_samples - test - val), slice(n_samples - test - val, n_samples - test), \
        slice(n_samples - test, n_samples)


def _check(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 4 or pred.shape[1] != 2:
        raise ValueError(f"pred and true must both be (N, 2, H, W) in original units, got {pred.shape}, {true.shape}")
    return pred, true


def stssl_metrics(pred: np.ndarray, true: np.ndarray, threshold: float = STSSL_THRESHOLD) -> dict[str, float]:
    """ST-SSL's masked metrics: ``{inflow,outflow}_{mae,mape}`` over the values with ``true > threshold``
    (MAPE in percent) and ``{inflow,outflow}_values`` (how many values were kept)."""
    pred, true = _check(pred, true)
    out: dict[str, float] = {}
    for c, name in enumerate(("inflow", "outflow")):
        t, p = true[:, c], pred[:, c]  # (N, H, W)
        keep = t > threshold
        if not keep.any():
            raise ValueError(f"stssl metrics: no {name} value is > {threshold:g}, nothing to score")
        err = np.abs(p[keep] - t[keep])
        out[f"{name}_mae"] = float(err.mean())
        out[f"{name}_mape"] = float((err / t[keep]).mean() * 100.0)
        out[f"{name}_values"] = float(keep.sum())
    return out


def deepst_metrics(pred: np.ndarray, true: np.ndarray, metric_factor: float = 1.0,
                   active_mask: np.ndarray | None = None) -> dict[str, float]:
    """The DeepST protocol on whole arrays: ``rmse`` (global, x factor), ``rmse_inflow``, ``rmse_outflow``,
    ``mae`` (mean over the active cells; all cells when ``active_mask`` is None)."""
    pred, true = _check(pred, true)
    err = pred - true
    mse = (err**2).mean(axis=(0, 2, 3))  # (2,)
    mask = np.ones(true.shape[2:], dtype=bool) if active_mask is None else np.asarray(active_mask, dtype=bool)
    return {
        "rmse": float(np.sqrt(mse.mean()) * metric_factor),
        "rmse_inflow": float(np.sqrt(mse[0]) * metric_factor),
        "rmse_outflow": float(np.sqrt(mse[1]) * metric_factor),
        "mae": float(np.abs(err[:, :, mask]).mean()),
    }


def protocol_metrics(protocol: str, pred: np.ndarray, true: np.ndarray, metric_factor: float = 1.0,
                     active_mask: np.ndarray | None = None) -> dict[str, float]:
    """The metrics ``protocol`` reports for one set of predictions (original units)."""
    if check_protocol(protocol) == "stssl":
        return stssl_metrics(pred, true)
    return deepst_metrics(pred, true, metric_factor, active_mask)
