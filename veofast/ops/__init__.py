"""veofast's fused ops: each has a plain-torch reference (the CPU path and the test oracle) and a Triton
path for CUDA, chosen by ``backend="auto" | "triton" | "torch"``.

This package imports nothing from the rest of veofast, so other training code can use it alone.
"""
