"""Triton kernels (``@triton.jit`` functions and their host launchers), installed as ``veofast.kernels``.

Nothing here is public API: ``veofast.ops`` is the door to these kernels.
"""
