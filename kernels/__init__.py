"""Triton kernels and their torch reference twins (issue 5)."""
