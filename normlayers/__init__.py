"""normlayers: Batch Kalman Normalization for PyTorch (torch only; Triton kernels optional)."""
