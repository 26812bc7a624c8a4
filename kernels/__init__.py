"""Triton kernels and their torch reference twins.

Each kernel is a triad: the ``@triton.jit`` kernel, a launcher that checks dtypes, shapes and
strides (and sizes its grid from host values only: no device reads, no synchronization), and
a torch reference that is both the CPU path and the test oracle. Under ``TRITON_INTERPRET=1``
the kernels run on CPU tensors (Triton's numpy interpreter), which is how CI checks them.
"""

from __future__ import annotations


def compiled_variants() -> dict[str, int]:
    """Compiled variants per ``@triton.jit`` kernel of this package (all devices), read from Triton's
    caches: how tests/gpu and ``make gpu-check`` show that serving compiles nothing after warm-up.
    Zero under the interpreter, which compiles nothing."""
    import importlib
    import pkgutil

    import triton

    counts = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.JITFunction):
                caches = getattr(obj, "device_caches", None)  # triton >= 3.2: device -> (kernel cache, ...)
                counts[name] = sum(len(c[0]) for c in caches.values()) if caches is not None else \
                    sum(len(c) for c in getattr(obj, "cache", {}).values())
    return counts
