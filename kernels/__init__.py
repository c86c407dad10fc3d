"""Numba hot loops over plain arrays. Installed as `fastinfer.kernels`."""
