"""Numba kernels with plain-NumPy reference twins (box matching, k-center updates)."""
