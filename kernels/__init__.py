"""Triton kernels and their torch reference twins.

Each kernel is a triad: the ``@triton.jit`` kernel, a launcher that checks dtypes, shapes and
strides (and sizes its grid from host values only: no device reads, no synchronization), and
a torch reference that is both the CPU path and the test oracle. Under ``TRITON_INTERPRET=1``
the kernels run on CPU tensors (Triton's numpy interpreter), which is how CI checks them.
"""
