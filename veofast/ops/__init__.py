"""veofast's fused ops: each has a plain-torch reference (the CPU path and the test oracle) and a Triton
path for CUDA, chosen by ``backend="auto" | "triton" | "torch"``.

This package imports nothing from the rest of veofast, so other training code can use it alone::

    from veofast.ops import fused_linear_cross_entropy, varlen_attention, rms_norm
"""

from .attention import varlen_attention, varlen_attention_reference
from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .moe import (
    MoEPermutation,
    expert_ffn,
    expert_ffn_reference,
    grouped_mm,
    grouped_mm_reference,
    moe_ffn,
    moe_ffn_reference,
    moe_permute,
    moe_permute_reference,
    moe_unpermute,
    moe_unpermute_reference,
)
from .norm import rms_norm, rms_norm_reference
from .rope import apply_rotary, apply_rotary_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "MoEPermutation",
    "apply_rotary",
    "apply_rotary_reference",
    "expert_ffn",
    "expert_ffn_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "grouped_mm",
    "grouped_mm_reference",
    "moe_ffn",
    "moe_ffn_reference",
    "moe_permute",
    "moe_permute_reference",
    "moe_unpermute",
    "moe_unpermute_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "varlen_attention",
    "varlen_attention_reference",
]
