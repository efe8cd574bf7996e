"""Rotary position embedding frequencies: the default, linear, Llama-3 and YaRN schedules.

``rotary_frequencies(config)`` returns ``(inv_freq (head_dim/2,) fp32, attention_scaling)``; the rotation
itself is ``veofast.ops.apply_rotary``, which takes position ids and these frequencies.
"""

from __future__ import annotations

import math

import torch

from .config import DecoderConfig


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling.get("original_max_position_embeddings") or max_positions
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    original = scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = _default_inv_freq(base, dim)
    interpolation = extrapolation / factor
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency, 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rotary_frequencies(config: DecoderConfig) -> tuple[torch.Tensor, float]:
    """``(inv_freq (head_dim // 2,) float32, attention_scaling)`` for the config's RoPE type."""
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    if scaling is None:
        return _default_inv_freq(base, dim), 1.0
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return _default_inv_freq(base, dim) / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(_default_inv_freq(base, dim), scaling, config.max_position_embeddings), 1.0
    if rope_type == "yarn":
        return _yarn(base, dim, scaling, config.max_position_embeddings)
    raise ValueError(f"rope type {rope_type!r} is not supported")
