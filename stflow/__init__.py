"""stflow: spatio-temporal crowd-flow forecasting (ACFM and baselines) on city grids.

Tensor layout used everywhere: frames are ``(B, T, C, H, W)`` with C = 2 (inflow, outflow),
a single flow map is ``(B, C, H, W)``, external features are ``(B, D)`` or ``(B, T, D)``.
"""

__version__ = "0.1.0"
